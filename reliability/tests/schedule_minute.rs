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
    // Stored first: its anchor (the stored last tick) is where the ticks start.
    fascicle::schedule::put(&fascicle::Queue::new(Arc::clone(&a)), &schedule())
        .await
        .unwrap();
    let anchor = a.schedules().await.unwrap()[0].last_tick;
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
    // Stop the ticks, then let every tick submitted run, however loaded the machine.
    a.pause_schedule("minute-race", true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = a.schedules().await.unwrap()[0].last_tick;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ticks = a
            .stats()
            .await
            .unwrap()
            .kinds
            .get("tick")
            .copied()
            .unwrap_or_default();
        if ticks.ready + ticks.scheduled + ticks.processing == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ticks left unrun: {ticks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    for worker in workers {
        worker.await.unwrap().unwrap();
    }
    // Exactly the whole seconds in (anchor, last].
    let mut expected: Vec<DateTime<Utc>> = Vec::new();
    let mut tick = (anchor + TimeDelta::seconds(1))
        .duration_trunc(TimeDelta::seconds(1))
        .unwrap();
    while tick <= last {
        expected.push(tick);
        tick += TimeDelta::seconds(1);
    }
    assert!(expected.len() >= 50, "{} ticks in a minute", expected.len());
    let runs = runs.lock().unwrap().clone();
    let mut missing = Vec::new();
    for tick in &expected {
        match runs.get(&tick_id("minute-race", *tick)) {
            Some(1) => {}
            Some(n) => panic!("tick {tick} ran {n} times"),
            None => missing.push(*tick),
        }
    }
    assert!(missing.is_empty(), "ticks that never ran: {missing:?}");
    // A pass in flight when the schedule was paused may have submitted the tick after
    // `last` (its advance then refused): once, like every tick.
    let after: Vec<_> = (1..=2)
        .map(|k| tick_id("minute-race", last + TimeDelta::seconds(k)))
        .collect();
    let extra: Vec<_> = runs
        .keys()
        .filter(|id| !expected.iter().any(|t| tick_id("minute-race", *t) == **id))
        .collect();
    assert!(
        extra.iter().all(|id| after.contains(id)),
        "operations that are no tick of the schedule: {extra:?}"
    );
    assert!(runs.values().all(|n| *n == 1), "an operation ran twice");
    let ticks = a.stats().await.unwrap().kinds["tick"];
    assert_eq!(ticks.completed as usize, runs.len(), "{ticks:?}");
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
