//! A profiling aid, not a benchmark: fills the memory store with N no-op operations
//! and drains them with one tuned worker. With `fill-only` it stops after filling, so
//! `perf stat -e instructions:u` of both runs gives the drain's instructions per
//! operation independently of how busy the host is (where the VM exposes the counter;
//! otherwise compare `task-clock`):
//!
//! A number as the second argument runs that many workers instead of one; `sqlite` as
//! the third drains a temporary SQLite file instead of the memory store, `postgres` a
//! fresh schema of `DATABASE_URL` (sample `pg_stat_activity` meanwhile to see which
//! statement the time goes to).
//!
//! ```sh
//! cargo build --release -p fascicle-bench --example profile_drain
//! perf stat -e instructions:u target/release/examples/profile_drain 200000
//! perf stat -e instructions:u target/release/examples/profile_drain 200000 fill-only
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fascicle_api::{HandlerError, NewBatch, NewOperation, Queue, Registry, Store, Worker};
use serde_json::{Value, json};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let mode = args.next();
    let fill_only = mode.as_deref() == Some("fill-only");
    let workers: usize = mode.and_then(|m| m.parse().ok()).unwrap_or(1);
    let store: Arc<dyn Store> = match args.next().as_deref() {
        Some("sqlite") => Arc::new(
            fascicle_sqlite::SqliteStore::open_temporary()
                .await
                .unwrap(),
        ),
        Some("postgres") => {
            let url = std::env::var("DATABASE_URL").expect("DATABASE_URL for postgres");
            let schema = format!("profile_{}", uuid::Uuid::new_v4().simple());
            Arc::new(
                fascicle_postgres::PostgresStore::connect_with(
                    fascicle_postgres::PostgresOptions::new(url)
                        .schema(schema)
                        .max_connections(8),
                )
                .await
                .unwrap(),
            )
        }
        _ => Arc::new(fascicle_memory::MemoryStore::new()),
    };
    let queue = Queue::new(Arc::clone(&store));
    for start in (0..n).step_by(10_000) {
        let take = (n - start).min(10_000);
        queue
            .submit_batch(
                NewBatch::new("drain")
                    .children((0..take).map(|i| NewOperation::new("noop", json!({ "i": i })))),
            )
            .await
            .unwrap();
    }
    if fill_only {
        return;
    }
    let ran = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let counter = Arc::clone(&ran);
        let mut registry = Registry::new();
        registry.register("noop", move |_: Value, _| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandlerError>(Value::Null) }
        });
        let mut stopped = stopped.clone();
        handles.push(tokio::spawn(
            Worker::new(Arc::clone(&store), registry)
                .concurrency(128)
                .claim_batch(128)
                .poll_interval(Duration::from_millis(5))
                .maintenance_interval(Duration::from_secs(3600))
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }),
        ));
    }
    while ran.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let stats = store.stats().await.unwrap();
        if stats.kinds.get("noop").map_or(0, |k| k.completed) as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    let mut completed = 0;
    for handle in handles {
        completed += handle.await.unwrap().unwrap().completed;
    }
    assert_eq!(completed as usize, n);
    assert_eq!(ran.load(Ordering::Relaxed), n);
    println!(
        "{n} operations drained in {elapsed:?}: {:.0} ops/s",
        n as f64 / elapsed.as_secs_f64()
    );
}
