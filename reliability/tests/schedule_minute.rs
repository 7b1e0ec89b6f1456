//! Issue #15's race for periodic operations, in real time: twenty workers on two store
//! instances ("two processes": two pools on one PostgreSQL schema, two `SqliteStore`s on
//! one file, two handles on one memory store) all declare the same every-second schedule
//! and run their scheduler passes for a minute. Each tick is exactly one operation, none
//! missing and none twice, and each ran once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle::chrono::{DateTime, DurationRound, TimeDelta, Utc};
use fascicle::schedule::tick_id;
use fascicle::{HandlerError, NewOperation, Registry, Schedule, Store, Worker};
use serde_json::{Value, json};

const WORKERS: usize = 20;
const RUN: Duration = Duration::from_secs(60);

async fn a_minute_of_ticks(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let runs: Arc<Mutex<HashMap<fascicle::OperationId, u32>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let schedule = || {
        Schedule::every(
            "minute-race",
            Duration::from_secs(1),
            NewOperation::new("tick", json!(null)),
        )
    };
    let started = Utc::now();
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
        let mut registry = Registry::new();
        let runs = Arc::clone(&runs);
        registry.register("tick", move |_: Value, ctx| {
            *runs.lock().unwrap().entry(ctx.id).or_default() += 1;
            async { Ok::<_, HandlerError>(Value::Null) }
        });
        let mut stop = stop_rx.clone();
        let worker = Worker::new(store, registry)
            .schedule(schedule())
            .scheduler_interval(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(100));
        workers.push(tokio::spawn(worker.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    tokio::time::sleep(RUN).await;
    let stopped = Utc::now();
    // Let the last tick's operation run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    for worker in workers {
        worker.await.unwrap().unwrap();
    }
    // The schedule was first stored when the first worker started: its ticks are the
    // whole seconds after that, up to when the workers stopped.
    let anchor = a.schedules().await.unwrap()[0].clone();
    assert_eq!(anchor.schedule.name, "minute-race");
    let first = (started + TimeDelta::seconds(1))
        .duration_trunc(TimeDelta::seconds(1))
        .unwrap();
    let mut expected: Vec<DateTime<Utc>> = Vec::new();
    let mut tick = first + TimeDelta::seconds(1);
    while tick + TimeDelta::milliseconds(500) < stopped {
        expected.push(tick);
        tick += TimeDelta::seconds(1);
    }
    assert!(expected.len() >= 55, "{} ticks in a minute", expected.len());
    let runs = runs.lock().unwrap().clone();
    let mut missing = Vec::new();
    for tick in &expected {
        let id = tick_id("minute-race", *tick);
        match runs.get(&id) {
            Some(1) => {}
            Some(n) => panic!("tick {tick} ran {n} times"),
            None => missing.push(*tick),
        }
    }
    assert!(missing.is_empty(), "ticks that never ran: {missing:?}");
    let stats = a.stats().await.unwrap();
    let ticks = stats.kinds["tick"];
    assert_eq!(ticks.completed as usize, runs.len(), "{ticks:?}");
    assert!(runs.values().all(|n| *n == 1), "an operation ran twice");
    // No operation that is not a tick of the schedule.
    let tick_ids: std::collections::HashSet<_> = (-2..=70)
        .map(|k| tick_id("minute-race", first + TimeDelta::seconds(k)))
        .collect();
    assert!(
        runs.keys().all(|id| tick_ids.contains(id)),
        "an operation that is no tick"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_ticks_on_memory() {
    let memory = fascicle::memory::MemoryStore::new();
    a_minute_of_ticks(Arc::new(memory.clone()), Arc::new(memory)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_ticks_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticks.db");
    let a = fascicle::sqlite::SqliteStore::open(&path).await.unwrap();
    let b = fascicle::sqlite::SqliteStore::open(&path).await.unwrap();
    a_minute_of_ticks(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_ticks_on_postgres() {
    let Some(url) = fascicle_reliability::postgres_url("a_minute_of_ticks_on_postgres") else {
        return;
    };
    let a = fascicle_reliability::fresh_postgres(&url, "ticks", |o| o).await;
    let b = fascicle::postgres::PostgresStore::connect_with(
        fascicle::postgres::PostgresOptions::new(&url).schema(a.schema()),
    )
    .await
    .unwrap();
    a_minute_of_ticks(Arc::new(a.clone()), Arc::new(b.clone())).await;
    b.pool().close().await;
    fascicle_reliability::drop_schema(&a).await;
}
