//! Scenario 1: submit one batch of N children. Baselines insert the same children one
//! statement per row — the design fascicle replaces — in the same run.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use fascicle_api::{ChildRecord, Limits, NewBatch, NewOperation, ParentRecord, Queue, Store};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use fascicle_sqlite::SqliteStore;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHILDREN: usize = 10_000;
/// Rows for the SQLite transaction-per-row baseline: every row is an fsync, so fewer.
const PER_ROW_TX_ROWS: usize = 300;

fn batch(n: usize) -> NewBatch {
    NewBatch::new("batch_retain")
        .with_metadata(json!({ "documents": n }))
        .children((0..n).map(|i| {
            NewOperation::new(
                "retain",
                json!({
                    "document_id": format!("docs/{i:05}.txt"),
                    "bank": "bench",
                    "text": "The quick brown fox jumps over the lazy dog, twice over.",
                }),
            )
        }))
}

fn records(n: usize) -> (ParentRecord, Vec<ChildRecord>) {
    Limits::default()
        .prepare_batch(batch(n))
        .expect("benchmark batch is valid")
        .batches
        .remove(0)
}

fn scenario() -> String {
    format!("submit batch of {CHILDREN} children")
}

/// Children of the resubmitted batch, each with a payload of about 2 KB.
const RESUBMIT_CHILDREN: usize = 50_000;
/// Runs of the resubmit scenario (each moves 100 MB of payloads on its first submit).
const RESUBMIT_RUNS: usize = 3;

/// The same batch (caller-supplied id) submitted twice: the first submit's and the
/// idempotent resubmit's wall time, in ms. The resubmit must return the stored batch.
async fn first_and_resubmit(store: Arc<dyn Store>) -> Result<(f64, f64), BoxError> {
    let queue = Queue::new(store);
    let text = "x".repeat(2_000);
    let input = NewBatch::new("batch_retain")
        .with_id(fascicle_api::OperationId::new())
        .children(
            (0..RESUBMIT_CHILDREN)
                .map(|i| NewOperation::new("retain", json!({ "i": i, "text": text }))),
        );
    let start = Instant::now();
    let first = queue.submit_batch(input.clone()).await?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let again = queue.submit_batch(input).await?;
    let again_ms = start.elapsed().as_secs_f64() * 1e3;
    assert!(first.created && !again.created);
    assert_eq!(again.child_ids, first.child_ids);
    Ok((first_ms, again_ms))
}

/// Scenario 1b: an idempotent resubmit against the first submit of the same batch.
async fn resubmit(
    driver: &'static str,
    store: impl Fn() -> Arc<dyn Store>,
) -> Result<Measurement, BoxError> {
    let (mut firsts, mut resubmits) = (Vec::new(), Vec::new());
    for _ in 0..RESUBMIT_RUNS {
        let (first, again) = first_and_resubmit(store()).await?;
        firsts.push(first);
        resubmits.push(again);
    }
    Ok(Measurement {
        scenario: format!(
            "idempotent resubmit of a {RESUBMIT_CHILDREN}-child batch (2 KB payloads)"
        ),
        driver,
        unit: "ms",
        samples: resubmits,
        baseline_name: Some("first submit of that batch".into()),
        baseline_samples: firsts,
        target: None,
    })
}

async fn submit_once(store: Arc<dyn Store>) -> Result<f64, BoxError> {
    let queue = Queue::new(store);
    let input = batch(CHILDREN);
    let start = Instant::now();
    let receipt = queue.submit_batch(input).await?;
    let elapsed = start.elapsed();
    assert_eq!(receipt.child_ids.len(), CHILDREN);
    Ok(per_second(CHILDREN, elapsed))
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut samples = Vec::new();
    for _ in 0..args.runs {
        samples.push(submit_once(Arc::new(fascicle_memory::MemoryStore::new())).await?);
    }
    let resubmitted = resubmit("memory", || Arc::new(fascicle_memory::MemoryStore::new())).await?;
    Ok(vec![
        Measurement {
            scenario: scenario(),
            driver: "memory",
            unit: "rows/s",
            samples,
            baseline_name: None,
            baseline_samples: Vec::new(),
            target: None,
        },
        resubmitted,
    ])
}

const SQLITE_INSERT_PARENT: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, metadata, parent_id, priority, attempts, max_attempts, run_at,
     children_total, children_completed, children_failed, children_cancelled, created_at, updated_at)
    VALUES (?1, ?2, 'pending', NULL, ?3, NULL, 0, 0, 0, ?4, ?5, 0, 0, 0, ?4, ?4)";
const SQLITE_INSERT_CHILD: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, parent_id, priority, serialization_key, attempts, max_attempts,
     run_at, created_at, updated_at)
    VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?9)";

fn sqlite_child(stmt: &mut rusqlite::CachedStatement<'_>, c: &ChildRecord) -> rusqlite::Result<()> {
    stmt.execute(rusqlite::params![
        c.id.as_bytes(),
        c.kind,
        c.payload.to_string(),
        c.parent_id.as_ref().map(|p| p.as_bytes()),
        c.priority,
        c.serialization_key,
        c.max_attempts,
        c.run_at.timestamp_micros(),
        c.created_at.timestamp_micros(),
    ])?;
    Ok(())
}

fn sqlite_parent(conn: &rusqlite::Connection, p: &ParentRecord) -> rusqlite::Result<()> {
    conn.execute(
        SQLITE_INSERT_PARENT,
        rusqlite::params![
            p.id.as_bytes(),
            p.kind,
            p.metadata.to_string(),
            p.created_at.timestamp_micros(),
            p.children_total as i64
        ],
    )?;
    Ok(())
}

fn sqlite_connection(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -32768;\n         PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// The same rows, one INSERT statement each, inside one transaction.
fn sqlite_per_row_statements(path: &std::path::Path, n: usize) -> Result<f64, BoxError> {
    let (parent, children) = records(n);
    let mut conn = sqlite_connection(path)?;
    let start = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    sqlite_parent(&tx, &parent)?;
    for child in &children {
        // A fresh statement per row, as a row-at-a-time ORM would do.
        let mut stmt = tx.prepare_cached(SQLITE_INSERT_CHILD)?;
        sqlite_child(&mut stmt, child)?;
    }
    tx.commit()?;
    Ok(per_second(n, start.elapsed()))
}

/// The same rows, each in its own auto-committed transaction (the original bug's shape).
fn sqlite_per_row_transactions(path: &std::path::Path, n: usize) -> Result<f64, BoxError> {
    let (parent, children) = records(n);
    let conn = sqlite_connection(path)?;
    let start = Instant::now();
    sqlite_parent(&conn, &parent)?;
    let mut stmt = conn.prepare_cached(SQLITE_INSERT_CHILD)?;
    for child in &children {
        sqlite_child(&mut stmt, child)?;
    }
    Ok(per_second(n, start.elapsed()))
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut fascicle = Vec::new();
    let mut per_statement = Vec::new();
    let mut per_transaction = Vec::new();
    for _ in 0..args.runs {
        // Interleave so that machine noise hits both sides alike.
        let store = SqliteStore::open_temporary().await?;
        let path = store.path().to_path_buf();
        fascicle.push(submit_once(Arc::new(store.clone())).await?);
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("baseline.db");
        drop(SqliteStore::open(&base).await?);
        let base2 = base.clone();
        per_statement.push(
            tokio::task::spawn_blocking(move || sqlite_per_row_statements(&base2, CHILDREN))
                .await??,
        );
        let tx_rows = if args.quick {
            PER_ROW_TX_ROWS / 3
        } else {
            PER_ROW_TX_ROWS
        };
        per_transaction.push(
            tokio::task::spawn_blocking(move || sqlite_per_row_transactions(&base, tx_rows))
                .await??,
        );
        drop(path);
    }
    let store = SqliteStore::open_temporary().await?;
    let resubmitted = resubmit("sqlite", || Arc::new(store.clone())).await?;
    Ok(vec![
        resubmitted,
        Measurement {
            scenario: scenario(),
            driver: "sqlite",
            unit: "rows/s",
            samples: fascicle.clone(),
            baseline_name: Some("1 statement/row, 1 tx".into()),
            baseline_samples: per_statement,
            target: Some(Target::AtLeast { value: 300_000.0 }),
        },
        Measurement {
            scenario: scenario(),
            driver: "sqlite",
            unit: "rows/s",
            samples: fascicle,
            baseline_name: Some("1 tx/row (autocommit)".into()),
            baseline_samples: per_transaction,
            target: None,
        },
    ])
}

/// The same children, one INSERT statement per row inside one transaction.
async fn postgres_per_row(store: &PostgresStore, n: usize) -> Result<f64, BoxError> {
    let (parent, children) = records(n);
    let schema = store.schema();
    let insert_parent = format!(
        "INSERT INTO {schema}.operations (id, kind, status, payload, metadata, parent_id, priority,
            attempts, max_attempts, run_at, children_total, children_completed, children_failed,
            children_cancelled, created_at, updated_at)
         VALUES ($1, $2, 'pending', NULL, $3, NULL, 0, 0, 0, $4, $5, 0, 0, 0, $4, $4)"
    );
    let insert_child = format!(
        "INSERT INTO {schema}.operations (id, kind, status, payload, parent_id, priority,
            serialization_key, attempts, max_attempts, run_at, created_at, updated_at)
         VALUES ($1, $2, 'pending', $3::jsonb, $4, $5, $6, 0, $7, $8, $9, $9)"
    );
    let start = Instant::now();
    let mut tx = store.pool().begin().await?;
    sqlx::query(AssertSqlSafe(insert_parent.as_str()))
        .bind(parent.id.as_uuid())
        .bind(&parent.kind)
        .bind(&parent.metadata)
        .bind(parent.created_at)
        .bind(parent.children_total as i64)
        .execute(&mut *tx)
        .await?;
    for c in &children {
        sqlx::query(AssertSqlSafe(insert_child.as_str()))
            .bind(c.id.as_uuid())
            .bind(&c.kind)
            .bind(c.payload.to_string())
            .bind(c.parent_id.map(uuid::Uuid::from))
            .bind(c.priority)
            .bind(c.serialization_key.as_deref())
            .bind(c.max_attempts as i32)
            .bind(c.run_at)
            .bind(c.created_at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(per_second(n, start.elapsed()))
}

async fn truncate(store: &PostgresStore) -> Result<(), BoxError> {
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE {}.operations",
        store.schema()
    )))
    .execute(store.pool())
    .await?;
    Ok(())
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let schema = format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple());
    let store =
        PostgresStore::connect_with(PostgresOptions::new(url).schema(schema).max_connections(4))
            .await?;
    let outcome = async {
        let mut fascicle = Vec::new();
        let mut baseline = Vec::new();
        // One warm-up of each, so both sides run with prepared statements and warm caches.
        submit_once(Arc::new(store.clone())).await?;
        postgres_per_row(&store, CHILDREN).await?;
        for _ in 0..args.runs {
            truncate(&store).await?;
            fascicle.push(submit_once(Arc::new(store.clone())).await?);
            truncate(&store).await?;
            baseline.push(postgres_per_row(&store, CHILDREN).await?);
        }
        truncate(&store).await?;
        let resubmitted = resubmit("postgres", || Arc::new(store.clone())).await?;
        Ok::<_, BoxError>(vec![
            Measurement {
                scenario: scenario(),
                driver: "postgres",
                unit: "rows/s",
                samples: fascicle,
                baseline_name: Some("1 statement/row, 1 tx".into()),
                baseline_samples: baseline,
                target: Some(Target::RatioAtLeast { value: 15.0 }),
            },
            resubmitted,
        ])
    }
    .await;
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        store.schema()
    )))
    .execute(store.pool())
    .await;
    store.pool().close().await;
    let _ = Utc::now();
    outcome
}
