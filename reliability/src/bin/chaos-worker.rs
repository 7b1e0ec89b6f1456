//! A worker process for the crash tests:
//! `chaos-worker <database-url> <postgres-schema or -> <execution-log>`.
//!
//! Runs until killed (or until stdin closes, for a graceful stop), with short leases
//! and frequent maintenance so that the operations of a killed worker are rescued
//! within the test.

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
    let worker = Worker::new(store, registry)
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
