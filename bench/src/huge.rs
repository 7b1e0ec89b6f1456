//! Scenario `huge`: one batch of 1,000,000 children (100,000 with `--quick`) submitted
//! from an iterator with `Queue::submit_batch_from` — validated and inserted 10,000 at a
//! time inside the batch's one transaction — on SQLite and PostgreSQL. Two rows each:
//!
//! - child rows per second, beside the raw bound of the same run (the same number of rows
//!   bulk-inserted into a minimal jobs table: one `INSERT … unnest` on PostgreSQL, one
//!   prepared `INSERT` per row on SQLite); target ≥ 150k rows/s on PostgreSQL (issue #17);
//! - the process's peak resident memory during the submit (`VmHWM`, reset through
//!   `/proc/self/clear_refs` just before), beside the same batch submitted whole with
//!   `submit_batch` (every child built first, as a caller had to before); target ≤ 200 MB.
//!
//! Run it on its own (`--only huge`): a scenario run before it leaves the allocator's
//! memory in the process, which the peak counts.

use std::sync::Arc;
use std::time::Instant;

use fascicle_api::{NewBatch, NewOperation, Queue, Store};
use fascicle_sqlite::SqliteStore;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::many::{create_raw_table, postgres_raw, sqlite_raw};
use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn size(args: &Args) -> usize {
    if args.quick { 100_000 } else { 1_000_000 }
}

fn runs(args: &Args) -> usize {
    if args.quick { 1 } else { args.runs.min(3) }
}

fn child(i: usize) -> NewOperation {
    NewOperation::new("noop", json!({ "i": i }))
}

/// Sets the peak resident size to the current one (Linux: `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident size since the last reset, in MB (`VmHWM`); NaN where unknown.
fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One streamed submit: (rows/s, peak MB).
async fn streamed(store: &Arc<dyn Store>, n: usize) -> Result<(f64, f64), BoxError> {
    let queue = Queue::new(Arc::clone(store));
    reset_peak();
    let start = Instant::now();
    let receipt = queue
        .submit_batch_from(NewBatch::new("huge"), (0..n).map(child))
        .await?;
    let elapsed = start.elapsed();
    let peak = peak_mb();
    assert_eq!(receipt.child_ids.len(), n);
    Ok((per_second(n, elapsed), peak))
}

/// The same batch built whole and submitted with `submit_batch`: (rows/s, peak MB).
async fn whole(store: &Arc<dyn Store>, n: usize) -> Result<(f64, f64), BoxError> {
    let queue = Queue::new(Arc::clone(store));
    reset_peak();
    let start = Instant::now();
    let receipt = queue
        .submit_batch(NewBatch::new("huge").children((0..n).map(child)))
        .await?;
    let elapsed = start.elapsed();
    let peak = peak_mb();
    assert_eq!(receipt.child_ids.len(), n);
    Ok((per_second(n, elapsed), peak))
}

fn rows(
    n: usize,
    driver: &'static str,
    (rate, peak): (Vec<f64>, Vec<f64>),
    raw: (&str, Vec<f64>),
    whole_peak: Vec<f64>,
    rate_target: Option<Target>,
) -> Vec<Measurement> {
    let scenario = format!("submit_batch_from: one {n}-child batch from an iterator");
    vec![
        Measurement {
            scenario: scenario.clone(),
            driver,
            unit: "rows/s",
            samples: rate,
            baseline_name: Some(raw.0.into()),
            baseline_samples: raw.1,
            target: rate_target,
        },
        Measurement {
            scenario: format!("{scenario}: peak resident memory"),
            driver,
            unit: "MB",
            samples: peak,
            baseline_name: Some("submit_batch of the same batch built whole".into()),
            baseline_samples: whole_peak,
            target: Some(Target::AtMost { value: 200.0 }),
        },
    ]
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let dir = tempfile::tempdir()?;
    let (mut rate, mut peak, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs(args) {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join(format!("streamed{run}.db"))).await?);
        let (r, p) = streamed(&store, n).await?;
        rate.push(r);
        peak.push(p);
        drop(store);
        let path = dir.path().join(format!("raw{run}.db"));
        raw.push(tokio::task::spawn_blocking(move || sqlite_raw(&path, n)).await??);
    }
    // Last: the whole batch leaves its memory with the allocator.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("whole.db")).await?);
    let (_, whole_peak) = whole(&store, n).await?;
    Ok(rows(
        n,
        "sqlite",
        (rate, peak),
        ("raw bound: 1 prepared INSERT/row, 1 tx, minimal table", raw),
        vec![whole_peak],
        None,
    ))
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let store = crate::drain::postgres_in_fresh_schema(url, 4).await?;
    let schema = store.schema().to_string();
    let table = format!("{schema}.raw_jobs");
    let outcome = async {
        create_raw_table(store.pool(), &table).await?;
        let truncate = || {
            sqlx::query(AssertSqlSafe(format!("TRUNCATE {schema}.operations")))
                .execute(store.pool())
        };
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let (mut rate, mut peak, mut raw) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs(args) {
            truncate().await?;
            let (r, p) = streamed(&dyn_store, n).await?;
            rate.push(r);
            peak.push(p);
            raw.push(postgres_raw(store.pool(), &table, n).await?);
        }
        truncate().await?;
        let (_, whole_peak) = whole(&dyn_store, n).await?;
        Ok::<_, BoxError>(rows(
            n,
            "postgres",
            (rate, peak),
            ("raw bound: 1 INSERT … unnest, minimal table", raw),
            vec![whole_peak],
            Some(Target::AtLeast { value: 150_000.0 }),
        ))
    }
    .await;
    crate::drain::drop_schema(&store).await;
    outcome
}
