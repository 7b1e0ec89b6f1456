//! Scenario 5 (issue #15): drain throughput with a concurrency limit on one of two kinds.
//! N operations of kind `open` are drained by workers that handle `open` and `capped`:
//!
//! - measured: N `open` operations interleaved with N `capped` ones (submitted first in
//!   each pair, so the limited backlog is ahead in claim order all the way), `capped`
//!   limited to 4 running;
//! - the baseline, in the same run: the same mix with no limit stored (`open`'s
//!   unlimited rate, sharing the workers with `capped`); target ≥ 0.9x;
//! - a stricter one, also in the same run: the N `open` operations alone in the store (no
//!   second kind at all): what the limit's bookkeeping and the second kind's rows cost.
//!
//! The figure is the `open` kind's rate (operations per second until its last one is
//! recorded): a limited kind and its backlog must not hold back the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fascicle_api::{
    HandlerError, KindLimit, NewBatch, NewOperation, Queue, Registry, Store, Worker,
};
use serde_json::{Value, json};

use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

use crate::drain::Fresh;

/// The `capped` kind's running limit.
const CAPPED_RUNNING: u32 = 4;

fn size(args: &Args) -> usize {
    if args.quick { 10_000 } else { 50_000 }
}

fn runs(args: &Args) -> usize {
    if args.quick { 3 } else { args.runs.min(5) }
}

/// `n` operations of `open`, each after one of `capped` when `with_capped`, in batches.
async fn fill(store: &Arc<dyn Store>, n: usize, with_capped: bool) -> Result<(), BoxError> {
    let queue = Queue::new(Arc::clone(store));
    let mut left = n;
    while left > 0 {
        let take = left.min(5_000);
        let children = (0..take).flat_map(|i| {
            let capped = with_capped.then(|| NewOperation::new("capped", json!({ "i": i })));
            capped
                .into_iter()
                .chain([NewOperation::new("open", json!({ "i": i }))])
        });
        queue
            .submit_batch(NewBatch::new("limits").children(children))
            .await?;
        left -= take;
    }
    Ok(())
}

/// Drains with one worker (concurrency 128, claim 128) until every `open` operation is
/// recorded; returns `open` operations per second.
/// With `capped_limit`, also checks on every poll that no more `capped` run.
async fn open_rate(
    store: &Arc<dyn Store>,
    n: usize,
    capped_limit: Option<u32>,
) -> Result<f64, BoxError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ran = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let counter = Arc::clone(&ran);
    registry.register("open", move |_: Value, _| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, HandlerError>(Value::Null) }
    });
    registry.register("capped", |_: Value, _| async {
        Ok::<_, HandlerError>(Value::Null)
    });
    let mut stop = stop_rx.clone();
    let worker = Worker::new(Arc::clone(store), registry)
        .concurrency(128)
        .claim_batch(128)
        .poll_interval(Duration::from_millis(5))
        .maintenance_interval(Duration::from_secs(3600));
    let start = Instant::now();
    let handle = tokio::spawn(worker.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    crate::drain::handlers_ran(&ran, n, start).await?;
    loop {
        let stats = store.stats().await?;
        let open = stats.kinds.get("open").copied().unwrap_or_default();
        let capped = stats.kinds.get("capped").copied().unwrap_or_default();
        if let Some(limit) = capped_limit
            && capped.processing > u64::from(limit)
        {
            return Err(format!(
                "{} capped running under a limit of {limit}",
                capped.processing
            )
            .into());
        }
        if open.completed as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(true);
    handle.await??;
    Ok(per_second(n, elapsed))
}

async fn measure(
    args: &Args,
    driver: &'static str,
    make: impl AsyncFn() -> Fresh,
) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let (mut alone, mut unlimited, mut limited) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs(args) {
        let (store, cleanup) = make().await?;
        fill(&store, n, false).await?;
        alone.push(open_rate(&store, n, None).await?);
        cleanup();
        let (store, cleanup) = make().await?;
        fill(&store, n, true).await?;
        unlimited.push(open_rate(&store, n, None).await?);
        cleanup();
        let (store, cleanup) = make().await?;
        fill(&store, n, true).await?;
        store
            .set_limit("capped", KindLimit::running(CAPPED_RUNNING))
            .await?;
        limited.push(open_rate(&store, n, Some(CAPPED_RUNNING)).await?);
        cleanup();
    }
    let scenario = format!(
        "drain {n} ops of a kind mixed with {n} of a kind limited to {CAPPED_RUNNING} running"
    );
    Ok(vec![
        Measurement {
            scenario: scenario.clone(),
            driver,
            unit: "ops/s",
            samples: limited.clone(),
            baseline_name: Some("the same mix, no limit".into()),
            baseline_samples: unlimited,
            target: Some(Target::RatioAtLeast { value: 0.9 }),
        },
        Measurement {
            scenario,
            driver,
            unit: "ops/s",
            samples: limited,
            baseline_name: Some(format!("the {n} alone in the store")),
            baseline_samples: alone,
            target: None,
        },
    ])
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
