//! Scenario 3: enqueue → handler start, sequential samples, with workers woken by
//! notifications (in-process for memory and SQLite, `LISTEN` for PostgreSQL: the worker
//! has its own pool, as another process would).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle_api::{
    HandlerError, InProcessWaker, NewOperation, OperationId, Queue, Registry, Store, Worker,
};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use fascicle_sqlite::SqliteStore;
use serde_json::{Value, json};

use crate::{Args, Measurement, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn samples(args: &Args) -> usize {
    if args.quick { 200 } else { 1_000 }
}

/// Submits one operation at a time through `queue` and measures until its handler
/// starts on a worker over `worker_store`, woken through `waker`.
async fn measure(
    queue: Queue,
    worker_store: Arc<dyn Store>,
    waker: &InProcessWaker,
    n: usize,
) -> Result<Vec<f64>, BoxError> {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register("ping", move |_: Value, ctx| {
        let _ = started_tx.send((ctx.id, Instant::now()));
        async { Ok::<_, HandlerError>(Value::Null) }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(worker_store, registry)
        .poll_interval(Duration::from_secs(3600))
        .maintenance_interval(Duration::from_secs(3600))
        .wake_on(waker.subscribe());
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let receipt = queue.submit(NewOperation::new("ping", json!({}))).await?;
        let (id, at): (OperationId, Instant) =
            tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
                .await
                .map_err(|_| "a notified worker did not start the operation within 10 s")?
                .ok_or("worker stopped")?;
        if id != receipt.id {
            return Err("the worker started an unexpected operation".into());
        }
        latencies.push(at.duration_since(start).as_secs_f64() * 1000.0);
    }
    let _ = stop_tx.send(());
    handle.await??;
    Ok(latencies)
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn rows(
    driver: &'static str,
    latencies: Vec<f64>,
    targets: Option<(f64, f64)>,
) -> Vec<Measurement> {
    let n = latencies.len();
    let p99 = percentile(&latencies, 99.0);
    vec![
        Measurement {
            scenario: format!("enqueue→start p50, {n} sequential"),
            driver,
            unit: "ms",
            samples: latencies,
            baseline_name: None,
            baseline_samples: Vec::new(),
            target: targets.map(|(p50, _)| Target::AtMost { value: p50 }),
        },
        Measurement {
            scenario: format!("enqueue→start p99, {n} sequential"),
            driver,
            unit: "ms",
            samples: vec![p99],
            baseline_name: None,
            baseline_samples: Vec::new(),
            target: targets.map(|(_, p99)| Target::AtMost { value: p99 }),
        },
    ]
}

fn in_process(store: Arc<dyn Store>) -> (Queue, InProcessWaker) {
    let waker = InProcessWaker::new();
    let queue = Queue::new(store).with_notifier(Arc::new(waker.clone()));
    (queue, waker)
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let store: Arc<dyn Store> = Arc::new(fascicle_memory::MemoryStore::new());
    let (queue, waker) = in_process(Arc::clone(&store));
    let latencies = measure(queue, store, &waker, samples(args)).await?;
    Ok(rows("memory", latencies, None))
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_temporary().await?);
    let (queue, waker) = in_process(Arc::clone(&store));
    let latencies = measure(queue, store, &waker, samples(args)).await?;
    Ok(rows("sqlite", latencies, None))
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let schema = format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple());
    let producer =
        PostgresStore::connect_with(PostgresOptions::new(url).schema(schema.clone())).await?;
    let consumer = PostgresStore::connect_with(PostgresOptions::new(url).schema(schema)).await?;
    let waker = InProcessWaker::new();
    let listener = consumer.listen(waker.clone()).await?;
    let outcome = measure(
        Queue::new(Arc::new(producer.clone())),
        Arc::new(consumer.clone()),
        &waker,
        samples(args),
    )
    .await;
    drop(listener);
    consumer.pool().close().await;
    crate::drain::drop_schema(&producer).await;
    Ok(rows("postgres", outcome?, Some((2.0, 8.0))))
}
