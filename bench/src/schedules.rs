//! Scenario 6 (issue #15): the cost of one scheduler pass with 1,000 schedules stored.
//!
//! - **idle**: a pass when none is due (every worker runs one each second): one indexed
//!   read, whatever the number of schedules. Baseline in the same run: one `stats()` call
//!   on the same store (a read of the same kind, for scale).
//! - **all due**: a pass at the instant all 1,000 tick (each submits its operation and is
//!   advanced). Baseline in the same run: 1,000 plain `Queue::submit` calls — the ratio is
//!   what a tick costs beyond its submit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle_api::chrono::{DateTime, DurationRound, TimeDelta, Utc};
use fascicle_api::schedule::{self, run_due};
use fascicle_api::{NewOperation, Queue, Schedule};
use serde_json::json;

use crate::drain::Fresh;
use crate::{Args, Measurement};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SCHEDULES: usize = 1_000;

fn runs(args: &Args) -> usize {
    if args.quick { 3 } else { args.runs.min(5) }
}

/// Stores 1,000 hourly schedules and runs the first pass; returns the next top of the hour.
async fn fill(queue: &Queue) -> Result<DateTime<Utc>, BoxError> {
    for i in 0..SCHEDULES {
        let s = Schedule::every(
            format!("hourly-{i}"),
            Duration::from_secs(3600),
            NewOperation::new("tick", json!({ "i": i })),
        );
        schedule::put(queue, &s).await?;
    }
    run_due(queue, Utc::now()).await?;
    Ok(Utc::now().duration_trunc(TimeDelta::hours(1))? + TimeDelta::hours(1))
}

async fn measure(
    args: &Args,
    driver: &'static str,
    make: impl AsyncFn() -> Fresh,
) -> Result<Vec<Measurement>, BoxError> {
    let (mut idle, mut stats, mut due, mut submits) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs(args) {
        let (store, cleanup) = make().await?;
        let queue = Queue::new(Arc::clone(&store));
        let next_hour = fill(&queue).await?;
        // Idle passes, and stats reads, interleaved.
        let (mut pass_time, mut stats_time) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..50 {
            let t = Instant::now();
            let report = run_due(&queue, Utc::now()).await?;
            pass_time += t.elapsed();
            if report.schedules != 0 {
                return Err(format!("an idle pass read {} schedules", report.schedules).into());
            }
            let t = Instant::now();
            store.stats().await?;
            stats_time += t.elapsed();
        }
        idle.push(pass_time.as_secs_f64() * 1e6 / 50.0);
        stats.push(stats_time.as_secs_f64() * 1e6 / 50.0);
        // All due at once.
        let t = Instant::now();
        let report = run_due(&queue, next_hour + TimeDelta::seconds(1)).await?;
        due.push(t.elapsed().as_secs_f64() * 1e3);
        if report.submitted != SCHEDULES as u64 {
            return Err(
                format!("the due pass submitted {} of {SCHEDULES}", report.submitted).into(),
            );
        }
        let t = Instant::now();
        for i in 0..SCHEDULES {
            queue
                .submit(NewOperation::new("plain", json!({ "i": i })))
                .await?;
        }
        submits.push(t.elapsed().as_secs_f64() * 1e3);
        cleanup();
        drop(store);
    }
    Ok(vec![
        Measurement {
            scenario: format!("scheduler pass, none of {SCHEDULES} schedules due"),
            driver,
            unit: "µs",
            samples: idle,
            baseline_name: Some("one stats() read".into()),
            baseline_samples: stats,
            target: None,
        },
        Measurement {
            scenario: format!("scheduler pass, all {SCHEDULES} schedules due"),
            driver,
            unit: "ms",
            samples: due,
            baseline_name: Some(format!("{SCHEDULES} plain submits")),
            baseline_samples: submits,
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
