//! Periodic operations (issue #15): schedules stored in the store, run by every worker's
//! scheduler pass (`fascicle_api::schedule::run_due`) without a leader. The passes here run
//! on a simulated clock (a pass takes its `now`), so a minute of ticks takes a moment.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use fascicle_api::chrono::{DateTime, DurationRound, TimeDelta, Utc};
use fascicle_api::schedule::{self, PassReport, tick_id};
use fascicle_api::{CatchUp, Error, NewOperation, Queue, Schedule, Store};
use serde_json::json;

/// A whole multiple of ten seconds, a little in the past.
fn origin() -> DateTime<Utc> {
    (Utc::now() - TimeDelta::minutes(10))
        .duration_trunc(TimeDelta::seconds(10))
        .unwrap()
}

fn secs(s: f64) -> TimeDelta {
    TimeDelta::milliseconds((s * 1000.0) as i64)
}

async fn pass(queue: &Queue, now: DateTime<Utc>) -> PassReport {
    schedule::run_due(queue, now).await.unwrap()
}

async fn kind_count(store: &Arc<dyn Store>, kind: &str) -> u64 {
    let stats = store.stats().await.unwrap();
    stats.kinds.get(kind).map_or(0, |k| {
        k.ready + k.scheduled + k.processing + k.completed + k.failed + k.cancelled
    })
}

/// A schedule ticking every second submits one operation per tick — its id
/// [`tick_id`]`(name, tick)`, its kind, payload and priority the schedule's, `run_at` the
/// tick — when a pass comes at or after the tick; a pass with nothing due submits
/// nothing, and so does a second pass at the same instant; a schedule declared again
/// keeps its last tick (no tick twice).
pub async fn a_schedule_submits_one_operation_per_tick(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t0 = origin();
    let every = Schedule::every(
        "pulse",
        Duration::from_secs(1),
        NewOperation::new("pulse", json!({ "ping": true })).with_priority(7),
    );
    every.validate().unwrap();
    assert!(store.put_schedule(&every, t0 + secs(0.3)).await.unwrap());
    assert_eq!(pass(&queue, t0 + secs(0.5)).await.submitted, 0);
    assert_eq!(
        pass(&queue, t0 + secs(0.9)).await.schedules,
        0,
        "not due before its tick"
    );
    let first = pass(&queue, t0 + secs(1.2)).await;
    assert_eq!((first.schedules, first.submitted), (1, 1));
    let op = store
        .get(tick_id("pulse", t0 + secs(1.0)))
        .await
        .unwrap()
        .expect("the tick's operation, under its tick id");
    assert_eq!(op.kind, "pulse");
    assert_eq!(op.payload, Some(json!({ "ping": true })));
    assert_eq!(op.priority, 7);
    assert_eq!(op.run_at, t0 + secs(1.0));
    assert_eq!(pass(&queue, t0 + secs(1.2)).await, PassReport::default());
    let later = pass(&queue, t0 + secs(3.5)).await;
    assert_eq!(later.submitted, 2, "two ticks came: {later:?}");
    for s in [2.0, 3.0] {
        assert!(
            store
                .get(tick_id("pulse", t0 + secs(s)))
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(
        !store.put_schedule(&every, t0 + secs(3.6)).await.unwrap(),
        "declared again, not new"
    );
    let again = pass(&queue, t0 + secs(3.7)).await;
    assert_eq!(
        (again.schedules, again.submitted, again.existing),
        (1, 0, 0)
    );
    assert_eq!(kind_count(&store, "pulse").await, 3);
    let stored = store.schedules().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].last_tick, t0 + secs(3.0));
    assert_eq!(stored[0].next_tick, t0 + secs(4.0));
    // A pass advances a schedule only at the version it read: once, not twice.
    let version = stored[0].version;
    let (last, next) = (t0 + secs(4.0), t0 + secs(5.0));
    assert!(
        store
            .advance_schedule("pulse", version, last, next)
            .await
            .unwrap()
    );
    assert!(
        !store
            .advance_schedule("pulse", version, t0, t0)
            .await
            .unwrap(),
        "advanced at a version it no longer has"
    );
    let stored = &store.schedules().await.unwrap()[0];
    assert_eq!((stored.last_tick, stored.next_tick), (last, next));
    assert!(stored.version > version);
}

/// A pass that read a schedule before it was changed cannot undo the change: its advance
/// is refused (the version moved), and the next pass ticks by the new timing.
pub async fn a_pass_that_read_before_a_change_does_not_undo_it(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t0 = origin();
    let hourly = Schedule::every(
        "moving",
        Duration::from_secs(3600),
        NewOperation::new("moving", json!(1)),
    );
    store.put_schedule(&hourly, t0).await.unwrap();
    // A pass reads it…
    let read = store.due_schedules(t0 + secs(0.1)).await.unwrap();
    assert_eq!(read.len(), 1);
    let stale = &read[0];
    let plan = stale
        .schedule
        .plan(stale.last_tick, t0 + secs(0.1))
        .unwrap();
    // …an operator changes it to every second…
    let every_second = Schedule::every(
        "moving",
        Duration::from_secs(1),
        NewOperation::new("moving", json!(2)),
    );
    assert!(
        !store
            .put_schedule(&every_second, t0 + secs(0.2))
            .await
            .unwrap()
    );
    // …and the stale pass's advance (next tick in an hour) is refused.
    assert!(
        !store
            .advance_schedule("moving", stale.version, plan.last_tick, plan.next_tick)
            .await
            .unwrap(),
        "a stale pass advanced a schedule changed since it read it"
    );
    let next = pass(&queue, t0 + secs(1.5)).await;
    assert_eq!(next.submitted, 1, "the new timing ticks: {next:?}");
    let op = store
        .get(tick_id("moving", t0 + secs(1.0)))
        .await
        .unwrap()
        .expect("the tick of the new timing");
    assert_eq!(op.payload, Some(json!(2)));
}

/// Ticks seen later than the grace are missed: `Skip` runs only those within it,
/// `RunOnce` one more for the missed ones (the latest), `RunAll { max }` the latest `max`
/// missed ones too, oldest first.
pub async fn missed_ticks_follow_the_catch_up(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t0 = origin();
    let make = |name: &str, catch_up| {
        Schedule::every(
            name,
            Duration::from_secs(10),
            NewOperation::new(name, json!(null)),
        )
        .catch_up(catch_up)
        .grace(Duration::from_secs(15))
    };
    for (name, catch_up) in [
        ("skip", CatchUp::Skip),
        ("once", CatchUp::RunOnce),
        ("all", CatchUp::RunAll { max: 2 }),
    ] {
        store
            .put_schedule(&make(name, catch_up), t0 + secs(0.5))
            .await
            .unwrap();
    }
    // Down from t0 to t0 + 65 s: ticks 10 … 60; 50 and 60 are within the 15 s grace.
    let report = pass(&queue, t0 + secs(65.0)).await;
    assert_eq!(report.schedules, 3);
    let ticks = |name: &'static str, at: &'static [f64]| {
        let store = Arc::clone(&store);
        async move {
            for s in at {
                assert!(
                    store
                        .get(tick_id(name, t0 + secs(*s)))
                        .await
                        .unwrap()
                        .is_some(),
                    "{name}: tick {s} did not run"
                );
            }
            assert_eq!(kind_count(&store, name).await, at.len() as u64, "{name}");
        }
    };
    ticks("skip", &[50.0, 60.0]).await;
    ticks("once", &[40.0, 50.0, 60.0]).await;
    ticks("all", &[30.0, 40.0, 50.0, 60.0]).await;
    // The missed ticks are handled: the next pass runs only what comes next.
    let next = pass(&queue, t0 + secs(71.0)).await;
    assert_eq!(next.submitted, 3, "{next:?}");
}

/// A cron schedule reads its expression in its zone: `0 9 * * *` in Paris ticks at
/// 08:00 UTC in winter, and the next tick is stored for the next day.
pub async fn a_cron_schedule_ticks_in_its_zone(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
    let paris = Schedule::cron(
        "paris",
        "0 9 * * *",
        NewOperation::new("report", json!(null)),
    )
    .in_zone("Europe/Paris");
    paris.validate().unwrap();
    store
        .put_schedule(&paris, at("2026-01-05T07:00:00Z"))
        .await
        .unwrap();
    assert_eq!(pass(&queue, at("2026-01-05T07:59:59Z")).await.submitted, 0);
    assert_eq!(pass(&queue, at("2026-01-05T08:00:20Z")).await.submitted, 1);
    let op = store
        .get(tick_id("paris", at("2026-01-05T08:00:00Z")))
        .await
        .unwrap()
        .expect("09:00 in Paris");
    assert_eq!(op.run_at, at("2026-01-05T08:00:00Z"));
    let stored = store.schedules().await.unwrap();
    assert_eq!(stored[0].next_tick, at("2026-01-06T08:00:00Z"));
}

/// A paused schedule is run by no pass; resumed, the ticks it missed while paused follow
/// its catch-up (here: those within the grace run). A removed one submits nothing more;
/// pausing one that does not exist is `NotFound`. `schedules` lists them with their state.
pub async fn paused_and_removed_schedules_submit_nothing(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t0 = origin();
    let s = Schedule::every(
        "tide",
        Duration::from_secs(10),
        NewOperation::new("tide", json!(1)),
    );
    store.put_schedule(&s, t0).await.unwrap();
    assert!(store.pause_schedule("tide", true).await.unwrap());
    assert!(
        !store.pause_schedule("tide", true).await.unwrap(),
        "paused already"
    );
    assert!(store.schedules().await.unwrap()[0].paused);
    assert_eq!(
        pass(&queue, t0 + secs(25.0)).await.schedules,
        0,
        "a paused schedule ran"
    );
    assert!(store.pause_schedule("tide", false).await.unwrap());
    let resumed = pass(&queue, t0 + secs(25.0)).await;
    assert_eq!(
        resumed.submitted, 2,
        "ticks 10 and 20, within the grace: {resumed:?}"
    );
    assert!(store.remove_schedule("tide").await.unwrap());
    assert!(!store.remove_schedule("tide").await.unwrap());
    assert_eq!(pass(&queue, t0 + secs(45.0)).await, PassReport::default());
    assert!(store.schedules().await.unwrap().is_empty());
    assert!(matches!(
        store.pause_schedule("tide", true).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(kind_count(&store, "tide").await, 2);
}

/// Twenty scheduler loops on two store instances run one every-second schedule through a
/// minute of ticks (a simulated clock moving 50 ms at a time, every loop passing as fast as
/// it can): each tick is exactly one operation — none missing, none twice — and the passes'
/// reports add up to exactly one insert per tick.
pub async fn racing_scheduler_passes_submit_each_tick_once(store: Arc<dyn Store>) {
    const LOOPS: usize = 20;
    const SECONDS: i64 = 60;
    let twin = crate::twin().await;
    let t0 = origin() - TimeDelta::minutes(5);
    let s = Schedule::every(
        "race",
        Duration::from_secs(1),
        NewOperation::new("race", json!(null)),
    )
    .catch_up(CatchUp::RunAll { max: 100 });
    store.put_schedule(&s, t0).await.unwrap();
    let clock = Arc::new(AtomicI64::new(t0.timestamp_micros()));
    let done = Arc::new(AtomicBool::new(false));
    // The schedule's last tick, read all along: it never moves back (a stale pass that
    // advanced it would make it).
    let monitor = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if let Some(s) = store.schedules().await.unwrap().first() {
                    seen.push(s.last_tick);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            seen
        })
    };
    let mut loops = Vec::new();
    for i in 0..LOOPS {
        let queue = Queue::new(Arc::clone(if i % 2 == 0 { &store } else { &twin }));
        let (clock, done) = (Arc::clone(&clock), Arc::clone(&done));
        loops.push(tokio::spawn(async move {
            let mut total = PassReport::default();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let now = DateTime::from_timestamp_micros(clock.load(Ordering::SeqCst)).unwrap();
                let report = pass(&queue, now).await;
                total.submitted += report.submitted;
                total.existing += report.existing;
                total.lost_races += report.lost_races;
                if finished {
                    return total;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let end = t0 + TimeDelta::seconds(SECONDS) + secs(0.5);
    while clock.load(Ordering::SeqCst) < end.timestamp_micros() {
        tokio::time::sleep(Duration::from_millis(2)).await;
        clock.fetch_add(50_000, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
    let mut submitted = 0;
    for l in loops {
        submitted += l.await.unwrap().submitted;
    }
    let seen = monitor.await.unwrap();
    assert!(
        seen.len() > 10,
        "the monitor read the schedule {} times",
        seen.len()
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the last tick moved back"
    );
    assert_eq!(
        store.schedules().await.unwrap()[0].last_tick,
        t0 + TimeDelta::seconds(SECONDS)
    );
    let mut missing = Vec::new();
    for k in 1..=SECONDS {
        if store
            .get(tick_id("race", t0 + TimeDelta::seconds(k)))
            .await
            .unwrap()
            .is_none()
        {
            missing.push(k);
        }
    }
    assert!(
        missing.is_empty(),
        "ticks without an operation: {missing:?}"
    );
    assert_eq!(
        kind_count(&store, "race").await,
        SECONDS as u64,
        "an operation that is no tick, or a tick twice"
    );
    assert_eq!(submitted, SECONDS as u64, "inserts reported by the passes");
    let ids: HashSet<_> = (1..=SECONDS)
        .map(|k| tick_id("race", t0 + TimeDelta::seconds(k)))
        .collect();
    assert_eq!(ids.len(), SECONDS as usize);
}

/// A schedule whose tick cannot be submitted (here: stored by a queue allowing larger
/// payloads than the one running the pass) is left where it is, counted as failed, and
/// every other due schedule still runs.
pub async fn a_schedule_that_cannot_submit_does_not_stop_the_others(store: Arc<dyn Store>) {
    let t0 = origin();
    let roomy = Queue::new(Arc::clone(&store)).with_limits(fascicle_api::Limits {
        max_payload_bytes: 4 << 20,
        ..fascicle_api::Limits::default()
    });
    let big = json!({ "blob": "x".repeat(2 << 20) });
    // "a-big" sorts first: the pass meets it before the other.
    let bad = Schedule::every(
        "a-big",
        Duration::from_secs(1),
        NewOperation::new("big", big),
    );
    bad.validate_with(&roomy.limits()).unwrap();
    store.put_schedule(&bad, t0).await.unwrap();
    let fine = Schedule::every(
        "b-fine",
        Duration::from_secs(1),
        NewOperation::new("fine", json!(1)),
    );
    store.put_schedule(&fine, t0).await.unwrap();
    let queue = Queue::new(Arc::clone(&store));
    let report = pass(&queue, t0 + secs(1.5)).await;
    assert_eq!((report.failed, report.submitted), (1, 1), "{report:?}");
    assert!(
        store
            .get(tick_id("b-fine", t0 + secs(1.0)))
            .await
            .unwrap()
            .is_some()
    );
    let stored = store.schedules().await.unwrap();
    assert_eq!(
        stored[0].last_tick, t0,
        "the failing schedule waits where it was"
    );
    assert_eq!(stored[1].last_tick, t0 + secs(1.0));
}

/// A schedule that cannot be is refused by `schedule::put` with `InvalidInput` naming the
/// field, and nothing is stored.
pub async fn invalid_schedules_are_refused(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let op = || NewOperation::new("job", json!(null));
    let cases = [
        (Schedule::cron("a", "not a cron", op()), "cron expression"),
        (
            Schedule::cron("a", "* * * * *", op()).in_zone("Nowhere/City"),
            "zone",
        ),
        (
            Schedule::every("a", Duration::from_millis(10), op()),
            "interval",
        ),
        (Schedule::every("", Duration::from_secs(10), op()), "name"),
        (
            Schedule::every(
                "a",
                Duration::from_secs(10),
                op().with_id(fascicle_api::OperationId::new()),
            ),
            "id",
        ),
        (
            Schedule::every(
                "a",
                Duration::from_secs(10),
                NewOperation::new("job", json!(null)).with_max_attempts(0),
            ),
            "operation",
        ),
    ];
    for (schedule, field) in cases {
        match schedule::put(&queue, &schedule).await {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains(field), "{message:?} should name {field}")
            }
            other => panic!("{field}: expected InvalidInput, got {other:?}"),
        }
    }
    assert!(
        store.schedules().await.unwrap().is_empty(),
        "a refused schedule was stored"
    );
}
