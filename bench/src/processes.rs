//! Scenario `processes` (issue #17 item 5): N no-op stand-alone operations (100,000;
//! 20,000 with `--quick`) drained by four worker processes on one database, beside the
//! same drain by one process, interleaved run by run. Each process is this binary in its
//! hidden child mode (`fascicle-bench --drain-process URL SCHEMA`): one tuned worker
//! (concurrency 128, claim 128, polling every 10 ms) with the maintenance elected among
//! them, stopped (stdin closed) once the parent sees nothing outstanding. The rate is N
//! over the time from the processes' start until the store's statistics show nothing
//! outstanding (looked at every 50 ms), start-up included. Target ≥ 1.0× one process on
//! PostgreSQL.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle_api::{Registry, Store, Worker};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use fascicle_sqlite::SqliteStore;
use serde_json::Value;

use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The hidden flag of the child mode.
pub(crate) const CHILD_FLAG: &str = "--drain-process";

fn size(args: &Args) -> usize {
    if args.quick { 20_000 } else { 100_000 }
}

fn runs(args: &Args) -> usize {
    if args.quick { 1 } else { args.runs.min(3) }
}

async fn open(url: &str, schema: &str) -> Result<Arc<dyn Store>, BoxError> {
    Ok(if url.starts_with("postgres") {
        Arc::new(
            PostgresStore::connect_with(
                PostgresOptions::new(url).schema(schema).max_connections(4),
            )
            .await?,
        )
    } else {
        Arc::new(SqliteStore::open(url).await?)
    })
}

/// The child mode: one tuned worker until stdin closes.
pub(crate) async fn child(url: &str, schema: &str) -> Result<(), BoxError> {
    let store = open(url, schema).await?;
    let mut registry = Registry::new();
    registry.register("noop", |_: Value, _| async {
        Ok::<_, fascicle_api::HandlerError>(Value::Null)
    });
    let worker = Worker::new(store, registry)
        .concurrency(128)
        .claim_batch(128)
        .poll_interval(Duration::from_millis(10))
        .without_scheduler();
    let stop = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
        })
        .await;
    };
    worker.run(stop).await?;
    Ok(())
}

fn spawn(url: &str, schema: &str) -> Result<Child, BoxError> {
    Ok(Command::new(std::env::current_exe()?)
        .args([CHILD_FLAG, url, schema])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?)
}

/// One drain of `n` by `processes` processes: ops/s.
async fn drain(
    store: &Arc<dyn Store>,
    url: &str,
    schema: &str,
    n: usize,
    processes: usize,
) -> Result<f64, BoxError> {
    crate::drain::fill_standalone(store, n).await?;
    let start = Instant::now();
    let mut children = (0..processes)
        .map(|_| spawn(url, schema))
        .collect::<Result<Vec<_>, _>>()?;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if store.stats().await?.work().outstanding() == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err("the processes did not drain the backlog in 10 minutes".into());
        }
    }
    let elapsed = start.elapsed();
    for child in &mut children {
        drop(child.stdin.take());
    }
    for mut child in children {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("a drain process ended with {status}").into());
        }
    }
    let _ = store
        .prune(chrono::Utc::now() + chrono::Duration::days(1))
        .await?;
    Ok(per_second(n, elapsed))
}

/// The target is PostgreSQL's (issue #17): SQLite has one writer at a time, whatever the
/// processes, so there more processes share the same writes.
fn measurement(driver: &'static str, n: usize, four: Vec<f64>, one: Vec<f64>) -> Vec<Measurement> {
    vec![Measurement {
        scenario: format!("drain {n} no-op ops by 4 worker processes, maintenance elected"),
        driver,
        unit: "ops/s",
        samples: four,
        baseline_name: Some("the same drain by 1 process".into()),
        baseline_samples: one,
        target: (driver == "postgres").then_some(Target::RatioAtLeast { value: 1.0 }),
    }]
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("processes.db");
    let url = path.display().to_string();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await?);
    let (mut four, mut one) = (Vec::new(), Vec::new());
    for _ in 0..runs(args) {
        four.push(drain(&store, &url, "-", n, 4).await?);
        one.push(drain(&store, &url, "-", n, 1).await?);
    }
    Ok(measurement("sqlite", n, four, one))
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let store = crate::drain::postgres_in_fresh_schema(url, 4).await?;
    let schema = store.schema().to_string();
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let outcome = async {
        let (mut four, mut one) = (Vec::new(), Vec::new());
        for _ in 0..runs(args) {
            four.push(drain(&dyn_store, url, &schema, n, 4).await?);
            one.push(drain(&dyn_store, url, &schema, n, 1).await?);
        }
        Ok::<_, BoxError>(measurement("postgres", n, four, one))
    }
    .await;
    crate::drain::drop_schema(&store).await;
    outcome
}
