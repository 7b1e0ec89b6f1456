//! Scenario `many`: 10,000 independent stand-alone operations submitted with
//! `Queue::submit_many` (one transaction, the driver's bulk insert). Baselines in the
//! same run that do not move with fascicle's schema: the raw bound — the same number of
//! rows bulk-inserted into a minimal jobs table by one statement — and, on PostgreSQL
//! with `--peer-gw`, the graphile_worker crate's `add_jobs` (1,000 jobs a call, its
//! documented way of enqueueing many).

use std::sync::Arc;
use std::time::Instant;

use fascicle_api::{NewOperation, Queue, Store};
use fascicle_sqlite::SqliteStore;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const OPERATIONS: usize = 10_000;

fn scenario() -> String {
    format!("submit_many of {OPERATIONS} stand-alone operations")
}

/// The operations, made before the clock starts (as the peer's jobs are).
fn operations() -> Vec<NewOperation> {
    (0..OPERATIONS)
        .map(|i| NewOperation::new("noop", json!({ "i": i })))
        .collect()
}

async fn submit_many_once(store: Arc<dyn Store>) -> Result<f64, BoxError> {
    let queue = Queue::new(store);
    let input = operations();
    let start = Instant::now();
    let receipts = queue.submit_many(input).await?;
    let elapsed = start.elapsed();
    assert_eq!(receipts.len(), OPERATIONS);
    assert!(receipts.iter().all(|r| r.created));
    Ok(per_second(OPERATIONS, elapsed))
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut samples = Vec::new();
    for _ in 0..args.runs {
        samples.push(submit_many_once(Arc::new(fascicle_memory::MemoryStore::new())).await?);
    }
    Ok(vec![Measurement {
        scenario: scenario(),
        driver: "memory",
        unit: "rows/s",
        samples,
        baseline_name: None,
        baseline_samples: Vec::new(),
        target: None,
    }])
}

/// The raw bound on SQLite: the rows inserted by one prepared statement in one
/// transaction into a minimal table, with the store's durability settings.
pub(crate) fn sqlite_raw(path: &std::path::Path, n: usize) -> Result<f64, BoxError> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
             payload TEXT NOT NULL, run_at INTEGER NOT NULL, status TEXT NOT NULL);
         DELETE FROM jobs;",
    )?;
    let payloads: Vec<String> = (0..n).map(|i| json!({ "i": i }).to_string()).collect();
    let start = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO jobs (kind, payload, run_at, status) VALUES ('noop', ?1, ?2, 'pending')",
        )?;
        let now = chrono::Utc::now().timestamp_micros();
        for payload in &payloads {
            stmt.execute(rusqlite::params![payload, now])?;
        }
    }
    tx.commit()?;
    Ok(per_second(n, start.elapsed()))
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let mut fascicle = Vec::new();
    let mut raw = Vec::new();
    let dir = tempfile::tempdir()?;
    for run in 0..args.runs {
        // Interleaved, so that machine noise hits both sides alike.
        let store = SqliteStore::open_temporary().await?;
        fascicle.push(submit_many_once(Arc::new(store)).await?);
        let path = dir.path().join(format!("raw{run}.db"));
        raw.push(tokio::task::spawn_blocking(move || sqlite_raw(&path, OPERATIONS)).await??);
    }
    Ok(vec![Measurement {
        scenario: scenario(),
        driver: "sqlite",
        unit: "rows/s",
        samples: fascicle,
        baseline_name: Some("raw bound: 1 prepared INSERT/row, 1 tx, minimal table".into()),
        baseline_samples: raw,
        target: Some(Target::AtLeast { value: 300_000.0 }),
    }])
}

/// The raw bound on PostgreSQL: the rows in one `INSERT … SELECT unnest(…)` into a
/// minimal jobs table (a bigserial key, a partial index on pending rows), one round trip.
pub(crate) async fn postgres_raw(
    pool: &sqlx::PgPool,
    table: &str,
    n: usize,
) -> Result<f64, BoxError> {
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {table}")))
        .execute(pool)
        .await?;
    let payloads: Vec<String> = (0..n).map(|i| json!({ "i": i }).to_string()).collect();
    let start = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (kind, payload) SELECT 'noop', p::jsonb FROM unnest($1::text[]) AS p"
    )))
    .bind(&payloads)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(per_second(n, start.elapsed()))
}

/// The raw bound's minimal jobs table: a bigserial key, a partial index on pending rows.
pub(crate) async fn create_raw_table(pool: &sqlx::PgPool, table: &str) -> Result<(), BoxError> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id bigserial PRIMARY KEY, kind text NOT NULL,
             payload jsonb NOT NULL, run_at timestamptz NOT NULL DEFAULT now(),
             status text NOT NULL DEFAULT 'pending')"
    )))
    .execute(pool)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE INDEX ON {table} (run_at, id) WHERE status = 'pending'"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// One field of the graphile_worker peer's line (`enqueue_rows_per_s`,
/// `drain_jobs_per_s`) from one run of its binary on `n` jobs, against its own database
/// `peer_rs_gw` beside `url`'s (created if missing), with no latency phase.
pub(crate) fn peer_field(
    peer: &std::path::Path,
    url: &str,
    n: usize,
    field: &str,
) -> Result<f64, BoxError> {
    let Some((server, _)) = url.rsplit_once('/') else {
        return Err(format!("cannot place the peer's database beside {url}").into());
    };
    let psql = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", url, "-c", "CREATE DATABASE peer_rs_gw"])
        .output();
    // Fails when it exists: the peer's own connection below says whether it is usable.
    drop(psql);
    let output = std::process::Command::new(peer)
        .env("DATABASE_URL", format!("{server}/peer_rs_gw"))
        .env("N", n.to_string())
        .env("CHUNK", "1000")
        .env("LQ", "500")
        .env("BATCH_MS", "1")
        .env("CONC", "24")
        .env("LAT", "0")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "the peer {} failed ({}): {}",
            peer.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let prefix = format!("{field}=");
    let value = stdout
        .split_whitespace()
        .find_map(|f| f.strip_prefix(prefix.as_str()))
        .ok_or_else(|| format!("the peer printed no {field}: {stdout}"))?;
    Ok(value.parse()?)
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let store = crate::drain::postgres_in_fresh_schema(url, 4).await?;
    let schema = store.schema().to_string();
    let table = format!("{schema}.raw_jobs");
    let outcome = async {
        create_raw_table(store.pool(), &table).await?;
        let truncate = || {
            sqlx::query(AssertSqlSafe(format!("TRUNCATE {schema}.operations")))
                .execute(store.pool())
        };
        // One warm-up of each: prepared statements and warm caches on both sides.
        submit_many_once(Arc::new(store.clone())).await?;
        postgres_raw(store.pool(), &table, OPERATIONS).await?;
        let (mut fascicle, mut raw, mut peer) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs {
            truncate().await?;
            fascicle.push(submit_many_once(Arc::new(store.clone())).await?);
            raw.push(postgres_raw(store.pool(), &table, OPERATIONS).await?);
            if let Some(binary) = args.peer_gw.clone() {
                let url = url.to_string();
                peer.push(
                    tokio::task::spawn_blocking(move || {
                        peer_field(&binary, &url, OPERATIONS, "enqueue_rows_per_s")
                    })
                    .await??,
                );
            }
        }
        let mut rows = vec![Measurement {
            scenario: scenario(),
            driver: "postgres",
            unit: "rows/s",
            samples: fascicle.clone(),
            baseline_name: Some("raw bound: 1 INSERT … unnest, minimal table".into()),
            baseline_samples: raw,
            target: Some(Target::AtLeast { value: 100_000.0 }),
        }];
        if !peer.is_empty() {
            rows.push(Measurement {
                scenario: scenario(),
                driver: "postgres",
                unit: "rows/s",
                samples: fascicle,
                baseline_name: Some("graphile_worker 0.14.1 add_jobs, 1,000 a call".into()),
                baseline_samples: peer,
                target: Some(Target::AtLeast { value: 100_000.0 }),
            });
        } else {
            eprintln!(
                "postgres: submit_many runs without the graphile_worker peer (pass --peer-gw \
                 PATH or set FASCICLE_PEER_GW to measure it beside)"
            );
        }
        Ok::<_, BoxError>(rows)
    }
    .await;
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(store.pool())
    .await;
    store.pool().close().await;
    outcome
}
