//! Scenario 7 (issue #20): does the drain rate depend on the backlog? N no-op operations
//! drained by one tuned worker (concurrency 128, claim 128) from a backlog of 10 N
//! (1,000,000 for N = 100,000), against the same drain from a backlog of N in the same
//! run. Target: ≥ 0.9x — a claim's cost is the rows it claims, not the rows waiting.
//!
//! The rate is the completions the worker recorded over the time from its start until it
//! stopped, once N handlers ran (the same stop in both cases: the store's statistics are
//! not read, which would scan the larger table).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fascicle_api::{HandlerError, Registry, Store, Worker};
use serde_json::Value;

use crate::drain::{Fresh, fill, handlers_ran};
use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn size(args: &Args) -> usize {
    if args.quick { 20_000 } else { 100_000 }
}

fn runs(args: &Args) -> usize {
    if args.quick { 2 } else { args.runs.min(3) }
}

/// A registry whose `noop` handler counts its runs in the answered counter.
pub(crate) fn counting_noop() -> (Registry, Arc<AtomicUsize>) {
    let ran = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let counter = Arc::clone(&ran);
    registry.register("noop", move |_: Value, _| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, HandlerError>(Value::Null) }
    });
    (registry, ran)
}

/// One tuned worker (concurrency 128, claim 128, polling every 5 ms, maintenance hourly)
/// over [`counting_noop`], with its counter of runs.
pub(crate) fn tuned_noop_worker(store: Arc<dyn Store>) -> (Worker, Arc<AtomicUsize>) {
    let (registry, ran) = counting_noop();
    let worker = Worker::new(store, registry)
        .concurrency(128)
        .claim_batch(128)
        .poll_interval(Duration::from_millis(5))
        .maintenance_interval(Duration::from_secs(3600));
    (worker, ran)
}

/// Drains `n` operations (of however many are stored) with one tuned worker; returns
/// completions recorded per second.
pub(crate) async fn drain(store: &Arc<dyn Store>, n: usize) -> Result<f64, BoxError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (worker, ran) = tuned_noop_worker(Arc::clone(store));
    let mut stop = stop_rx.clone();
    let start = Instant::now();
    let handle = tokio::spawn(worker.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    handlers_ran(&ran, n, start).await?;
    let _ = stop_tx.send(true);
    let report = handle.await??;
    let elapsed = start.elapsed();
    if (report.completed as usize) < n {
        return Err(format!("the worker recorded {} of {n}", report.completed).into());
    }
    Ok(per_second(report.completed as usize, elapsed))
}

async fn measure(
    args: &Args,
    driver: &'static str,
    make: impl AsyncFn() -> Fresh,
) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for _ in 0..runs(args) {
        let (store, cleanup) = make().await?;
        fill(&store, n).await?;
        small.push(drain(&store, n).await?);
        cleanup();
        let (store, cleanup) = make().await?;
        fill(&store, 10 * n).await?;
        large.push(drain(&store, n).await?);
        cleanup();
    }
    Ok(vec![Measurement {
        scenario: format!("drain {n} no-op ops from a backlog of {}", 10 * n),
        driver,
        unit: "ops/s",
        samples: large,
        baseline_name: Some(format!("the same drain from a backlog of {n}")),
        baseline_samples: small,
        target: Some(Target::RatioAtLeast { value: 0.9 }),
    }])
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    measure(args, "memory", crate::drain::fresh_memory).await
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    measure(args, "sqlite", crate::drain::fresh_sqlite).await
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    measure(args, "postgres", async || {
        crate::drain::fresh_postgres(url).await
    })
    .await
}
