//! Scenario 4: the cost of completing one child as its batch grows. fascicle moves the
//! parent's counters in O(1); the baseline (the design it replaces) recounts every
//! sibling under the parent's lock on each completion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle_api::{Completion, NewBatch, NewOperation, Outcome, Queue, Store};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use fascicle_sqlite::SqliteStore;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use crate::{Args, Measurement, Target, median};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SMALL: usize = 1_000;
/// Completions timed per batch: all of a small batch, a sample of a large one (the
/// baseline's cost per completion grows with the batch, so a sample is representative).
const SAMPLE: usize = 1_000;
const CHUNK: usize = 50;

fn runs(args: &Args) -> usize {
    if args.quick { 3 } else { 5 }
}

fn large(args: &Args) -> usize {
    if args.quick { 20_000 } else { 100_000 }
}

/// Submits the batch under test, after a filler batch that brings the store to `total`
/// rows: both sizes are measured on stores of the same size, so only the number of
/// siblings differs between them.
async fn submit_sized(
    store: &Arc<dyn Store>,
    n: usize,
    total: usize,
) -> Result<fascicle_api::BatchReceipt, BoxError> {
    submit_shaped(store, n, total, Shape::Flat).await
}

/// What the measured batch looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `n` independent children.
    Flat,
    /// `n` children and one more that waits for all of them (`after`): each completion
    /// also releases it by one.
    FanIn,
    /// A 3-level tree of `n` leaves: the batch holds [`BRANCHES`] nested batches, each
    /// of those [`BRANCHES`] more, each of those its share of the leaves.
    Tree,
}

/// Nested batches per level of a [`Shape::Tree`].
const BRANCHES: usize = 10;

async fn submit_shaped(
    store: &Arc<dyn Store>,
    n: usize,
    total: usize,
    shape: Shape,
) -> Result<fascicle_api::BatchReceipt, BoxError> {
    if total > n {
        Queue::new(Arc::clone(store))
            .submit_batch(
                NewBatch::new("filler").children(
                    (0..total - n).map(|i| NewOperation::new("filler", json!({ "i": i }))),
                ),
            )
            .await?;
    }
    submit(store, n, shape).await
}

async fn submit(
    store: &Arc<dyn Store>,
    n: usize,
    shape: Shape,
) -> Result<fascicle_api::BatchReceipt, BoxError> {
    if shape == Shape::Tree {
        let leaves = n / (BRANCHES * BRANCHES);
        let mut root = NewBatch::new("aggregate");
        for b in 0..BRANCHES {
            let mut middle = NewBatch::new("middle");
            for c in 0..BRANCHES {
                middle = middle.child_batch(NewBatch::new("inner").children(
                    (0..leaves).map(|i| NewOperation::new("child", json!({ "i": [b, c, i] }))),
                ));
            }
            root = root.child_batch(middle);
        }
        return Ok(Queue::new(Arc::clone(store)).submit_batch(root).await?);
    }
    let ids: Vec<fascicle_api::OperationId> =
        (0..n).map(|_| fascicle_api::OperationId::new()).collect();
    let mut batch = NewBatch::new("aggregate").children(
        ids.iter()
            .enumerate()
            .map(|(i, id)| NewOperation::new("child", json!({ "i": i })).with_id(*id)),
    );
    if shape == Shape::FanIn {
        batch = batch.child(NewOperation::new("join", json!({})).after(&ids));
    }
    Ok(Queue::new(Arc::clone(store)).submit_batch(batch).await?)
}

/// Mean µs per child completion with fascicle's `Store::complete`, over `SAMPLE` children.
/// `settle` runs after the submit and before the clock starts (a SQLite checkpoint, so
/// the completions do not pay for writing back the submit's pages).
async fn fascicle_cost(
    store: Arc<dyn Store>,
    n: usize,
    total: usize,
    settle: impl AsyncFnOnce() -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    shaped_cost(store, n, total, Shape::Flat, settle).await
}

async fn shaped_cost(
    store: Arc<dyn Store>,
    n: usize,
    total: usize,
    shape: Shape,
    settle: impl AsyncFnOnce() -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    submit_shaped(&store, n, total, shape).await?;
    settle().await?;
    let claimed = store
        .claim(&fascicle_api::ClaimRequest {
            worker_id: "bench".into(),
            limit: SAMPLE.min(n),
            lease: Duration::from_secs(600),
            kinds: Some(vec!["child".into()]),
        })
        .await?;
    let start = Instant::now();
    for chunk in claimed.chunks(CHUNK) {
        let completions: Vec<Completion> = chunk
            .iter()
            .map(|c| Completion {
                id: c.operation.id,
                lease_token: c.lease_token,
                outcome: Outcome::Completed(Value::Null),
            })
            .collect();
        store.complete(&completions).await?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / claimed.len() as f64)
}

fn rows(
    driver: &'static str,
    args: &Args,
    fascicle: (f64, f64),
    baseline: Option<(f64, f64)>,
) -> Vec<Measurement> {
    let (small, big) = fascicle;
    vec![Measurement {
        scenario: format!(
            "completion cost {} vs {SMALL} children (ratio of µs/child)",
            large(args)
        ),
        driver,
        unit: "x",
        samples: vec![big / small],
        baseline_name: baseline.map(|_| "sibling rescan".to_string()),
        baseline_samples: baseline.map(|(s, b)| vec![b / s]).unwrap_or_default(),
        target: Some(Target::AtMost { value: 1.3 }),
    }]
    .into_iter()
    .chain([
        Measurement {
            scenario: format!("µs per child completion, batch of {SMALL}"),
            driver,
            unit: "µs",
            samples: vec![small],
            baseline_name: baseline.map(|_| "sibling rescan".to_string()),
            baseline_samples: baseline.map(|(s, _)| vec![s]).unwrap_or_default(),
            target: None,
        },
        Measurement {
            scenario: format!("µs per child completion, batch of {}", large(args)),
            driver,
            unit: "µs",
            samples: vec![big],
            baseline_name: baseline.map(|_| "sibling rescan".to_string()),
            baseline_samples: baseline.map(|(_, b)| vec![b]).unwrap_or_default(),
            target: None,
        },
    ])
    .collect()
}

/// The rows of a shaped batch: the cost of one completion — which also releases the
/// dependent of an `n`-way fan-in, or moves the levels above a leaf of a 3-level tree —
/// small vs large, beside the flat batch of the same size in the same run.
fn shaped_rows(
    driver: &'static str,
    args: &Args,
    shape: Shape,
    costs: (f64, f64),
    flat: (f64, f64),
) -> Vec<Measurement> {
    let (small, big) = costs;
    let (ratio, per): (String, fn(usize) -> String) = match shape {
        Shape::Tree => (
            format!(
                "3-level tree completion cost {} vs {SMALL} leaves (ratio of µs/completion)",
                large(args)
            ),
            |n: usize| format!("µs per leaf completion, 3-level tree of {n} leaves"),
        ),
        _ => (
            format!(
                "fan-in release cost {} vs {SMALL} dependencies (ratio of µs/completion)",
                large(args)
            ),
            |n: usize| format!("µs per completion releasing a {n}-way fan-in"),
        ),
    };
    let row = |scenario: String, unit, samples, baseline: f64| Measurement {
        scenario,
        driver,
        unit,
        samples: vec![samples],
        baseline_name: Some("flat batch of that size, same run".to_string()),
        baseline_samples: vec![baseline],
        target: None,
    };
    vec![
        Measurement {
            target: Some(Target::AtMost { value: 1.3 }),
            ..row(ratio, "x", big / small, flat.1 / flat.0)
        },
        row(per(SMALL), "µs", small, flat.0),
        row(per(large(args)), "µs", big, flat.1),
    ]
}

/// Costs of a shaped batch (small, large) on fresh stores from `open`.
async fn shaped_costs<S, F, Fut>(args: &Args, shape: Shape, open: F) -> Result<(f64, f64), BoxError>
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<S, BoxError>>,
{
    let total = large(args);
    let mut small = Vec::new();
    let mut big = Vec::new();
    for _ in 0..runs(args) {
        let store: Arc<dyn Store> = Arc::new(open().await?);
        small.push(shaped_cost(store, SMALL, total, shape, async || Ok(())).await?);
        let store: Arc<dyn Store> = Arc::new(open().await?);
        big.push(shaped_cost(store, total, total, shape, async || Ok(())).await?);
    }
    Ok((median(&small), median(&big)))
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut small = Vec::new();
    let mut big = Vec::new();
    for _ in 0..runs(args) {
        let store = || Arc::new(fascicle_memory::MemoryStore::new());
        let total = large(args);
        small.push(fascicle_cost(store(), SMALL, total, async || Ok(())).await?);
        big.push(fascicle_cost(store(), total, total, async || Ok(())).await?);
    }
    let flat = (median(&small), median(&big));
    let mut rows = rows("memory", args, flat, None);
    for shape in [Shape::FanIn, Shape::Tree] {
        let costs = shaped_costs(
            args,
            shape,
            async || Ok(fascicle_memory::MemoryStore::new()),
        )
        .await?;
        rows.extend(shaped_rows("memory", args, shape, costs, flat));
    }
    Ok(rows)
}

/// The replaced design on SQLite: per completion, update the child, then recount all of
/// its siblings to decide whether the parent is done — inside one write transaction.
fn sqlite_rescan(path: &std::path::Path, n: usize) -> Result<f64, BoxError> {
    checkpoint(path)?;
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -32768;",
    )?;
    let children: Vec<(i64, Vec<u8>)> = conn
        .prepare(
            "SELECT seq, parent_id FROM fascicle_operations
             WHERE parent_id IS NOT NULL AND kind = 'child' LIMIT ?1",
        )?
        .query_map([SAMPLE.min(n) as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let start = Instant::now();
    for chunk in children.chunks(CHUNK) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (seq, parent) in chunk {
            tx.execute(
                "UPDATE fascicle_operations SET status = 'completed' WHERE seq = ?1",
                [seq],
            )?;
            let open: i64 = tx.query_row(
                "SELECT count(*) FROM fascicle_operations
                 WHERE parent_id = ?1 AND status NOT IN ('completed', 'failed', 'cancelled')",
                [parent],
                |r| r.get(0),
            )?;
            if open == 0 {
                tx.execute(
                    "UPDATE fascicle_operations SET status = 'completed' WHERE id = ?1",
                    [parent],
                )?;
            }
        }
        tx.commit()?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / children.len() as f64)
}

/// Writes the WAL back into the database file, so timed work starts from the same state
/// whatever was submitted before.
fn checkpoint(path: &std::path::Path) -> Result<(), BoxError> {
    rusqlite::Connection::open(path)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(())
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut fascicle = [Vec::new(), Vec::new()];
    let mut baseline = [Vec::new(), Vec::new()];
    for _ in 0..runs(args) {
        for (i, n) in [SMALL, large(args)].into_iter().enumerate() {
            let store = SqliteStore::open_temporary().await?;
            let path = store.path().to_path_buf();
            let settle = async || checkpoint(&path);
            let total = large(args);
            fascicle[i].push(fascicle_cost(Arc::new(store.clone()), n, total, settle).await?);
            let store = SqliteStore::open_temporary().await?;
            submit_sized(&(Arc::new(store.clone()) as Arc<dyn Store>), n, total).await?;
            let path = store.path().to_path_buf();
            baseline[i].push(tokio::task::spawn_blocking(move || sqlite_rescan(&path, n)).await??);
        }
    }
    let flat = (median(&fascicle[0]), median(&fascicle[1]));
    let mut rows = rows(
        "sqlite",
        args,
        flat,
        Some((median(&baseline[0]), median(&baseline[1]))),
    );
    for shape in [Shape::FanIn, Shape::Tree] {
        let costs = shaped_costs(args, shape, async || {
            Ok(SqliteStore::open_temporary().await?)
        })
        .await?;
        rows.extend(shaped_rows("sqlite", args, shape, costs, flat));
    }
    Ok(rows)
}

async fn postgres_rescan(store: &PostgresStore, n: usize) -> Result<f64, BoxError> {
    let s = store.schema().to_string();
    let children: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, parent_id FROM {s}.operations
         WHERE parent_id IS NOT NULL AND kind = 'child' LIMIT $1"
    )))
    .bind(SAMPLE.min(n) as i64)
    .fetch_all(store.pool())
    .await?;
    let start = Instant::now();
    for chunk in children.chunks(CHUNK) {
        let mut tx = store.pool().begin().await?;
        for (id, parent) in chunk {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {s}.operations SET status = 'completed' WHERE id = $1"
            )))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "SELECT 1 FROM {s}.operations WHERE id = $1 FOR UPDATE"
            )))
            .bind(parent)
            .execute(&mut *tx)
            .await?;
            let open: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {s}.operations
                 WHERE parent_id = $1 AND status NOT IN ('completed', 'failed', 'cancelled')"
            )))
            .bind(parent)
            .fetch_one(&mut *tx)
            .await?;
            if open == 0 {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {s}.operations SET status = 'completed' WHERE id = $1"
                )))
                .bind(parent)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / children.len() as f64)
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let mut fascicle = Vec::new();
    let mut baseline = Vec::new();
    for n in [SMALL, large(args)] {
        for rescan in [false, true] {
            let store = PostgresStore::connect_with(
                PostgresOptions::new(url)
                    .schema(format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple())),
            )
            .await?;
            let shared: Arc<dyn Store> = Arc::new(store.clone());
            let total = large(args);
            let result = if rescan {
                submit_sized(&shared, n, total).await?;
                postgres_rescan(&store, n).await
            } else {
                fascicle_cost(shared, n, total, async || Ok(())).await
            };
            crate::drain::drop_schema(&store).await;
            if rescan {
                baseline.push(result?);
            } else {
                fascicle.push(result?);
            }
        }
    }
    let flat = (fascicle[0], fascicle[1]);
    let mut rows = rows("postgres", args, flat, Some((baseline[0], baseline[1])));
    for shape in [Shape::FanIn, Shape::Tree] {
        let mut costs = Vec::new();
        for n in [SMALL, large(args)] {
            let store = PostgresStore::connect_with(
                PostgresOptions::new(url)
                    .schema(format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple())),
            )
            .await?;
            let shared: Arc<dyn Store> = Arc::new(store.clone());
            let result = shaped_cost(shared, n, large(args), shape, async || Ok(())).await;
            crate::drain::drop_schema(&store).await;
            costs.push(result?);
        }
        rows.extend(shaped_rows(
            "postgres",
            args,
            shape,
            (costs[0], costs[1]),
            flat,
        ));
    }
    Ok(rows)
}
