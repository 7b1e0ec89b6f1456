//! A worker process for the crash tests:
//! `chaos-worker <database-url> <postgres-schema or -> <execution-log>`.
//!
//! Runs until killed (or until stdin closes, for a graceful stop), with short leases
//! and frequent maintenance (every 500 ms, in the elected process) so that the
//! operations of a killed worker are rescued within the test. `CHAOS_WORKER_ID` sets the
//! worker's id.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle::postgres::{PostgresOptions, PostgresStore};
use fascicle::{HandlerError, Registry, Store, Worker};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, schema, log] = args.as_slice() else {
        eprintln!("usage: chaos-worker <database-url> <postgres-schema or -> <execution-log>");
        std::process::exit(2);
    };
    let store: Arc<dyn Store> = if url.starts_with("postgres") {
        Arc::new(
            PostgresStore::connect_with(
                PostgresOptions::new(url.as_str())
                    .schema(schema.as_str())
                    .max_connections(4),
            )
            .await
            .expect("connect"),
        )
    } else {
        fascicle::connect(url).await.expect("open")
    };
    // `CHAOS_ROUNDS_LOG`: one line per maintenance round (its rescue call) — the worker's
    // id and the call's start and end in microseconds since the epoch — for the processes
    // test to check that rounds of two processes never overlap.
    let store: Arc<dyn Store> = match std::env::var("CHAOS_ROUNDS_LOG") {
        Ok(path) => Arc::new(fascicle::Layered::new(
            store,
            Rounds {
                id: std::env::var("CHAOS_WORKER_ID").unwrap_or_default(),
                log: Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("open the rounds log"),
                ),
            },
        )),
        Err(_) => store,
    };
    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the execution log"),
    ));
    let mut registry = Registry::new();
    registry.register(
        fascicle_reliability::KIND,
        move |input: serde_json::Value, ctx| {
            let log = Arc::clone(&log);
            async move {
                {
                    // One write(2) per line: O_APPEND keeps lines from several processes
                    // whole, and a SIGKILL cannot leave half a line.
                    let line = format!("{}\n", ctx.id);
                    let mut file = log.lock().expect("log");
                    file.write_all(line.as_bytes())
                        .map_err(HandlerError::retryable)?;
                }
                let wait = input["n"].as_u64().unwrap_or(0) % 4;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                Ok::<_, HandlerError>(serde_json::json!({ "n": input["n"] }))
            }
        },
    );
    let mut worker = Worker::new(store, registry);
    // The id the processes test names each process by (the maintenance role's holder).
    if let Ok(id) = std::env::var("CHAOS_WORKER_ID") {
        worker = worker.id(id);
    }
    let worker = worker
        .concurrency(16)
        .claim_batch(16)
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(50))
        .maintenance_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(5));
    let stop = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
        })
        .await;
    };
    if let Err(error) = worker.run(stop).await {
        eprintln!("worker stopped with an error: {error}");
        std::process::exit(1);
    }
}

/// Logs each maintenance round of this process (see `CHAOS_ROUNDS_LOG`).
#[derive(Debug)]
struct Rounds {
    id: String,
    log: Mutex<std::fs::File>,
}

#[fascicle::async_trait]
impl fascicle::Layer for Rounds {
    fn after(&self, call: &fascicle::Call<'_>, _: Result<(), &fascicle::Error>, elapsed: Duration) {
        if matches!(call, fascicle::Call::RescueExpiredLeases) {
            let end = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after the epoch");
            let start = end.saturating_sub(elapsed);
            let line = format!("{} {} {}\n", self.id, start.as_micros(), end.as_micros());
            let _ = self.log.lock().expect("log").write_all(line.as_bytes());
        }
    }
}
