//! Scenario 2: drain N pre-inserted no-op operations with the Worker runtime, default
//! and tuned settings. Baselines in the same run: a bare claim-50 + complete loop on a
//! table of the same shape (SQLite: one connection, same pragmas; PostgreSQL: 4
//! connections, `FOR UPDATE SKIP LOCKED`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle_api::{HandlerError, NewBatch, NewOperation, Queue, Registry, Store, Worker};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use fascicle_sqlite::SqliteStore;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use crate::{Args, Measurement, Target, per_second};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A fresh store for one run, and what to do with it afterwards.
pub(crate) type Fresh = Result<(Arc<dyn Store>, Box<dyn FnOnce() + Send>), BoxError>;

fn size(args: &Args) -> usize {
    if args.quick { 20_000 } else { 100_000 }
}

fn runs(args: &Args) -> usize {
    if args.quick { 3 } else { args.runs.min(5) }
}

/// Fills the store with `n` no-op operations, in batches of 10,000.
pub(crate) async fn fill(store: &Arc<dyn Store>, n: usize) -> Result<(), BoxError> {
    let queue = Queue::new(Arc::clone(store));
    let mut left = n;
    while left > 0 {
        let take = left.min(10_000);
        queue
            .submit_batch(
                NewBatch::new("drain")
                    .children((0..take).map(|i| NewOperation::new("noop", json!({ "i": i })))),
            )
            .await?;
        left -= take;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Settings {
    concurrency: usize,
    claim_batch: usize,
}

/// `Worker::new`'s defaults.
const DEFAULT: Settings = Settings {
    concurrency: 64,
    claim_batch: 64,
};
const TUNED: Settings = Settings {
    concurrency: 128,
    claim_batch: 128,
};

/// Drains with `workers` workers of `settings`; returns ops/s.
async fn drain(
    store: &Arc<dyn Store>,
    n: usize,
    workers: usize,
    settings: Settings,
) -> Result<f64, BoxError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let mut registry = Registry::new();
        let counter = Arc::clone(&ran);
        registry.register("noop", move |_: Value, _| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Ok::<_, HandlerError>(Value::Null) }
        });
        let mut stop = stop_rx.clone();
        let worker = Worker::new(Arc::clone(store), registry)
            .concurrency(settings.concurrency)
            .claim_batch(settings.claim_batch)
            .poll_interval(Duration::from_millis(5))
            .maintenance_interval(Duration::from_secs(3600));
        handles.push(tokio::spawn(worker.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let mut completed = 0u64;
    // Wait cheaply until every handler ran, then on the store's statistics (the
    // independent check) until every completion is recorded.
    handlers_ran(&ran, n, start).await?;
    loop {
        let stats = store.stats().await?;
        let k = stats.kinds.get("noop").copied().unwrap_or_default();
        if k.completed as usize >= n {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!("drain stalled at {} of {n}", k.completed).into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(true);
    for handle in handles {
        completed += handle.await??.completed;
    }
    if completed as usize != n {
        return Err(format!("workers completed {completed} of {n}").into());
    }
    Ok(per_second(n, elapsed))
}

/// Waits cheaply (a counter read each millisecond) until `n` handlers ran; an error after
/// ten minutes from `start`.
pub(crate) async fn handlers_ran(
    ran: &std::sync::atomic::AtomicUsize,
    n: usize,
    start: Instant,
) -> Result<(), BoxError> {
    while ran.load(std::sync::atomic::Ordering::Relaxed) < n {
        if start.elapsed() > Duration::from_secs(600) {
            return Err("drain stalled".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn fascicle_runs(
    args: &Args,
    make: impl AsyncFn() -> Fresh,
    workers: usize,
    settings: Settings,
) -> Result<Vec<f64>, BoxError> {
    let n = size(args);
    let mut samples = Vec::new();
    for _ in 0..runs(args) {
        let (store, cleanup) = make().await?;
        fill(&store, n).await?;
        samples.push(drain(&store, n, workers, settings).await?);
        cleanup();
    }
    Ok(samples)
}

fn row(
    args: &Args,
    driver: &'static str,
    label: &str,
    samples: Vec<f64>,
    baseline: Option<(&str, Vec<f64>)>,
    target: Option<Target>,
) -> Measurement {
    let (baseline_name, baseline_samples) = match baseline {
        Some((name, samples)) => (Some(name.to_string()), samples),
        None => (None, Vec::new()),
    };
    Measurement {
        scenario: format!("drain {} no-op ops, {label}", size(args)),
        driver,
        unit: "ops/s",
        samples,
        baseline_name,
        baseline_samples,
        target,
    }
}

pub(crate) async fn memory(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let make = async || -> Fresh {
        let store: Arc<dyn Store> = Arc::new(fascicle_memory::MemoryStore::new());
        let cleanup: Box<dyn FnOnce() + Send> = Box::new(|| ());
        Ok((store, cleanup))
    };
    let default = fascicle_runs(args, make, 1, DEFAULT).await?;
    let tuned = fascicle_runs(args, make, 1, TUNED).await?;
    // One worker per core: the memory store's drain is CPU-bound, and its lock is held
    // only briefly, so a second worker uses the second core.
    let two = fascicle_runs(args, make, 2, TUNED).await?;
    Ok(vec![
        row(args, "memory", "default settings", default, None, None),
        row(
            args,
            "memory",
            "tuned (concurrency 128, claim 128)",
            tuned,
            None,
            Some(Target::AtLeast { value: 1_000_000.0 }),
        ),
        row(
            args,
            "memory",
            "tuned (2 workers, concurrency 128, claim 128)",
            two,
            None,
            None,
        ),
    ])
}

/// The bare SQLite bound: one connection claims 50 and completes them, two commits per
/// round, on a fascicle-shaped table with the same pragmas.
fn sqlite_bound(path: &std::path::Path, n: usize) -> Result<f64, BoxError> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -32768;\n         PRAGMA foreign_keys = ON;",
    )?;
    let start = Instant::now();
    let mut done = 0;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let seqs: Vec<i64> = tx
            .prepare_cached(
                "UPDATE fascicle_operations SET status = 'processing', attempts = attempts + 1,
                     worker_id = 'bound', lease_expires_at = ?1, updated_at = ?1
                 WHERE seq IN (SELECT seq FROM fascicle_operations
                               WHERE status = 'pending' AND payload IS NOT NULL AND run_at <= ?1
                               ORDER BY priority DESC, run_at LIMIT 50)
                 RETURNING seq",
            )?
            .query_map([chrono::Utc::now().timestamp_micros()], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        if seqs.is_empty() {
            break;
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE fascicle_operations SET status = 'completed', completed_at = ?2,
                     updated_at = ?2 WHERE seq = ?1 AND status = 'processing'",
            )?;
            let now = chrono::Utc::now().timestamp_micros();
            for seq in &seqs {
                stmt.execute(rusqlite::params![seq, now])?;
            }
        }
        tx.commit()?;
        done += seqs.len();
    }
    if done != n {
        return Err(format!("bound drained {done} of {n}").into());
    }
    Ok(per_second(n, start.elapsed()))
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let make = async || -> Fresh {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_temporary().await?);
        let cleanup: Box<dyn FnOnce() + Send> = Box::new(|| ());
        Ok((store, cleanup))
    };
    let mut bound = Vec::new();
    for _ in 0..runs(args) {
        let store = SqliteStore::open_temporary().await?;
        let path = store.path().to_path_buf();
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        fill(&shared, n).await?;
        bound.push(tokio::task::spawn_blocking(move || sqlite_bound(&path, n)).await??);
        drop(store);
    }
    let default = fascicle_runs(args, make, 1, DEFAULT).await?;
    let tuned = fascicle_runs(args, make, 1, TUNED).await?;
    Ok(vec![
        row(
            args,
            "sqlite",
            "default settings",
            default,
            Some(("bare claim-50 + complete", bound.clone())),
            None,
        ),
        row(
            args,
            "sqlite",
            "tuned (concurrency 128, claim 128)",
            tuned,
            Some(("bare claim-50 + complete", bound)),
            Some(Target::RatioAtLeast { value: 0.5 }),
        ),
    ])
}

/// The raw PostgreSQL bound: 4 connections each claiming 50 with `FOR UPDATE SKIP LOCKED`
/// and completing them with one `UPDATE`.
async fn postgres_bound(store: &PostgresStore, n: usize) -> Result<f64, BoxError> {
    let schema = store.schema().to_string();
    let claim = format!(
        "UPDATE {schema}.operations SET status = 'processing', attempts = attempts + 1,
             worker_id = 'bound', lease_expires_at = now() + interval '30 seconds',
             updated_at = now()
         WHERE id IN (SELECT id FROM {schema}.operations
                      WHERE status = 'pending' AND payload IS NOT NULL AND run_at <= now()
                      ORDER BY priority DESC, run_at, seq LIMIT 50 FOR UPDATE SKIP LOCKED)
         RETURNING id"
    );
    let complete = format!(
        "UPDATE {schema}.operations SET status = 'completed', completed_at = now(),
             updated_at = now() WHERE id = ANY($1) AND status = 'processing'"
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = store.pool().clone();
        let (claim, complete) = (claim.clone(), complete.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let ids: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(claim.as_str()))
                    .fetch_all(&pool)
                    .await?;
                if ids.is_empty() {
                    return Ok::<_, sqlx::Error>(done);
                }
                sqlx::query(AssertSqlSafe(complete.as_str()))
                    .bind(&ids)
                    .execute(&pool)
                    .await?;
                done += ids.len();
            }
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await??;
    }
    if done != n {
        return Err(format!("bound drained {done} of {n}").into());
    }
    Ok(per_second(n, start.elapsed()))
}

/// Fills the store with `n` stand-alone no-op operations, 10,000 per `submit_many`.
pub(crate) async fn fill_standalone(store: &Arc<dyn Store>, n: usize) -> Result<(), BoxError> {
    let queue = Queue::new(Arc::clone(store));
    let mut left = n;
    while left > 0 {
        let take = left.min(10_000);
        queue
            .submit_many((0..take).map(|i| NewOperation::new("noop", json!({ "i": i }))))
            .await?;
        left -= take;
    }
    Ok(())
}

/// One tuned PostgreSQL drain in a fresh schema, with what it cost the database: WAL
/// bytes per job (`pg_stat_wal`, cluster-wide, read around the drain) and rows written
/// per job (inserted, updated or deleted in the schema's tables, from
/// `pg_stat_user_tables` once the store's connections closed and flushed their counts;
/// the fill's inserts are subtracted).
struct Costed {
    rate: f64,
    wal_bytes_per_job: f64,
    rows_per_job: f64,
}

async fn postgres_costed(url: &str, n: usize, standalone: bool) -> Result<Costed, BoxError> {
    let schema = format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    let store = PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(schema.clone())
            .max_connections(8),
    )
    .await?;
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let outcome = async {
        let filled = if standalone {
            fill_standalone(&shared, n).await?;
            n
        } else {
            fill(&shared, n).await?;
            n + n.div_ceil(10_000)
        };
        let wal = "SELECT wal_bytes::float8 FROM pg_stat_wal";
        let wal_before: f64 = sqlx::query_scalar(wal).fetch_one(&admin).await?;
        let rate = drain(&shared, n, 2, TUNED).await?;
        let wal_after: f64 = sqlx::query_scalar(wal).fetch_one(&admin).await?;
        store.pool().close().await;
        // A closed backend has reported its counts; give the stats system a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let written: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::float8
             FROM pg_stat_user_tables WHERE schemaname = $1",
        )
        .bind(&schema)
        .fetch_one(&admin)
        .await?;
        Ok::<_, BoxError>(Costed {
            rate,
            wal_bytes_per_job: (wal_after - wal_before) / n as f64,
            rows_per_job: (written - filled as f64) / n as f64,
        })
    }
    .await;
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&admin)
    .await;
    admin.close().await;
    outcome
}

/// `../shared/peers/raw_bound.sh` (or `--raw-bound PATH`): claim-50 `SKIP LOCKED` plus one
/// completing `UPDATE` on a minimal table, by `pgbench` with 4 clients — the database's
/// job-queue ceiling on this host, independent of fascicle's schema. Its jobs/s.
fn raw_bound_script(script: &std::path::Path, quick: bool) -> Result<f64, BoxError> {
    let mut command = std::process::Command::new("bash");
    command.arg(script);
    if quick {
        command.env("ROWS", "300000").env("SECS", "3");
    }
    let output = command.output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let rate = stdout
        .split_whitespace()
        .find_map(|field| field.strip_prefix("jobs_per_s="))
        .ok_or_else(|| format!("{} printed no jobs_per_s: {stdout}", script.display()))?;
    Ok(rate.parse()?)
}

/// The graphile_worker peer's drain of `n` no-op jobs (tuned as its documentation
/// advises for throughput: local queue 500, batched completions, concurrency 24).
fn peer_drain(peer: &std::path::Path, url: &str, n: usize) -> Result<f64, BoxError> {
    crate::many::peer_field(peer, url, n, "drain_jobs_per_s")
}

/// The claim-50 loop on fascicle's own table: a baseline that moves with our schema.
const OWN_TABLE: &str = "claim-50 x4 on fascicle's table (moves with our schema)";

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let mut bound = Vec::new();
    let mut stores = Vec::new();
    let url = url.to_string();
    let make = {
        let url = url.clone();
        async move || -> Fresh { fresh_postgres(&url).await }
    };
    for _ in 0..runs(args) {
        let store = PostgresStore::connect_with(
            PostgresOptions::new(&url)
                .schema(format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple()))
                .max_connections(8),
        )
        .await?;
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        fill(&shared, n).await?;
        bound.push(postgres_bound(&store, n).await?);
        stores.push(store);
    }
    for store in &stores {
        drop_schema(store).await;
    }
    let default = fascicle_runs(args, &make, 1, DEFAULT).await?;

    // Interleaved run by run: the schema-independent raw bound, the peer, and fascicle's
    // tuned drain of batch children and of stand-alone operations.
    let script = args.raw_bound.clone();
    if script.is_none() {
        eprintln!(
            "postgres: drain runs without the raw bound of ../shared/peers/raw_bound.sh (pass \
             --raw-bound PATH; it needs psql and pgbench)"
        );
    }
    if args.peer_gw.is_none() {
        eprintln!(
            "postgres: drain runs without the graphile_worker peer (pass --peer-gw PATH or set \
             FASCICLE_PEER_GW)"
        );
    }
    let (mut raw, mut peer, mut children, mut standalone) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs(args) {
        if let Some(script) = script.clone() {
            let quick = args.quick;
            raw.push(tokio::task::spawn_blocking(move || raw_bound_script(&script, quick)).await??);
        }
        if let Some(binary) = args.peer_gw.clone() {
            let url = url.clone();
            peer.push(tokio::task::spawn_blocking(move || peer_drain(&binary, &url, n)).await??);
        }
        children.push(postgres_costed(&url, n, false).await?);
        standalone.push(postgres_costed(&url, n, true).await?);
    }
    let rates = |c: &[Costed]| c.iter().map(|c| c.rate).collect::<Vec<_>>();
    let mut rows = vec![row(
        args,
        "postgres",
        "default settings",
        default,
        Some((OWN_TABLE, bound.clone())),
        None,
    )];
    for (label, costed) in [
        ("tuned (2 workers, concurrency 128, claim 128)", &children),
        (
            "tuned (2 workers, concurrency 128, claim 128), stand-alone operations",
            &standalone,
        ),
    ] {
        let baselines = [
            (OWN_TABLE, &bound, None),
            (
                "raw bound: raw_bound.sh, minimal table, pgbench -c 4",
                &raw,
                Some(Target::RatioAtLeast { value: 0.75 }),
            ),
            (
                "graphile_worker 0.14.1 (local queue 500, batched, conc 24)",
                &peer,
                Some(Target::RatioAtLeast { value: 1.2 }),
            ),
        ];
        for (name, samples, target) in baselines {
            if !samples.is_empty() {
                let baseline = Some((name, samples.clone()));
                rows.push(row(
                    args,
                    "postgres",
                    label,
                    rates(costed),
                    baseline,
                    target,
                ));
            }
        }
        for (what, unit, values) in [
            (
                "WAL bytes per job",
                "B/job",
                costed
                    .iter()
                    .map(|c| c.wal_bytes_per_job)
                    .collect::<Vec<_>>(),
            ),
            (
                "rows written per job",
                "rows/job",
                costed.iter().map(|c| c.rows_per_job).collect(),
            ),
        ] {
            let mut measured = row(args, "postgres", label, values, None, None);
            measured.scenario = format!("{}: {what}", measured.scenario);
            measured.unit = unit;
            rows.push(measured);
        }
    }
    Ok(rows)
}

/// A fresh memory store.
pub(crate) async fn fresh_memory() -> Fresh {
    let store: Arc<dyn Store> = Arc::new(fascicle_memory::MemoryStore::new());
    let cleanup: Box<dyn FnOnce() + Send> = Box::new(|| ());
    Ok((store, cleanup))
}

/// A SQLite store on a temporary file (deleted with the store).
pub(crate) async fn fresh_sqlite() -> Fresh {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_temporary().await?);
    let cleanup: Box<dyn FnOnce() + Send> = Box::new(|| ());
    Ok((store, cleanup))
}

/// A PostgreSQL store in a schema of its own (8 connections), dropped by the clean-up.
pub(crate) async fn fresh_postgres(url: &str) -> Fresh {
    let store = PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple()))
            .max_connections(8),
    )
    .await?;
    let cleanup_store = store.clone();
    let cleanup: Box<dyn FnOnce() + Send> = Box::new(move || {
        tokio::spawn(async move { drop_schema(&cleanup_store).await });
    });
    let store: Arc<dyn Store> = Arc::new(store);
    Ok((store, cleanup))
}

/// A PostgreSQL store in a fresh schema of its own (`fascicle_bench_<uuid>`) with at most
/// `connections` connections; [`drop_schema`] removes it.
pub(crate) async fn postgres_in_fresh_schema(
    url: &str,
    connections: u32,
) -> Result<PostgresStore, BoxError> {
    Ok(PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(format!("fascicle_bench_{}", uuid::Uuid::new_v4().simple()))
            .max_connections(connections),
    )
    .await?)
}

pub(crate) async fn drop_schema(store: &PostgresStore) {
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        store.schema()
    )))
    .execute(store.pool())
    .await;
    store.pool().close().await;
}
