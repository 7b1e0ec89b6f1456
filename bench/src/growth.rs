//! Scenario `growth` (issue #17 item 3, PostgreSQL): what the work costs as the table
//! grows, each row a ratio to the small case of the same run.
//!
//! 1. **Finished rows kept**: N no-op operations (100,000; 20,000 with `--quick`) drained
//!    by one tuned worker from a table that also holds 20 N finished operations
//!    (2,000,000: submitted, then marked completed a day ago by one `UPDATE` and
//!    vacuumed), beside the same drain from a table holding only the N. Target ≥ 0.9×.
//! 2. **Prune beside a drain**: in that table, a drain of 4 N runs while `Store::prune`
//!    deletes the 21 N finished rows; the longest time no handler started while both ran
//!    (until the drain or the prune ended), beside the longest such gap of a drain of 4 N
//!    in the empty table over its first 3 s. Target ≤ 100 ms.
//! 3. **Bloat**: 10 N operations run through a table with autovacuum at the server's
//!    defaults (switched on with `ALTER SYSTEM` for the run where this server has it off,
//!    then reset) — a steady flow, about N waiting throughout (topped up 10,000 at a
//!    time), the worker pruning what finished more than a second ago
//!    (`Worker::prune_finished_after`, maintenance every second) — leaving about N
//!    pending: the table's size with its indexes and TOAST, beside a fresh table loaded
//!    with as many pending rows. Target ≤ 2×.
//!
//! The drain in a table of 1,000,000 pending is the `backlog` scenario.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fascicle_api::{NewOperation, Queue, Store};
use fascicle_postgres::PostgresStore;
use serde_json::json;
use sqlx::AssertSqlSafe;

use crate::backlog::{drain, tuned_noop_worker};
use crate::{Args, Measurement, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn size(args: &Args) -> usize {
    if args.quick { 20_000 } else { 100_000 }
}

async fn fresh(url: &str) -> Result<PostgresStore, BoxError> {
    crate::drain::postgres_in_fresh_schema(url, 8).await
}

/// `n` pending no-op stand-alone operations, 10,000 a call.
async fn fill(store: &PostgresStore, n: usize) -> Result<(), BoxError> {
    crate::drain::fill_standalone(&(Arc::new(store.clone()) as Arc<dyn Store>), n).await
}

async fn sql(store: &PostgresStore, text: String) -> Result<(), BoxError> {
    sqlx::query(AssertSqlSafe(text))
        .execute(store.pool())
        .await?;
    Ok(())
}

/// `n` operations finished a day ago, vacuumed: what a long-running table keeps.
async fn finished(store: &PostgresStore, n: usize) -> Result<(), BoxError> {
    fill(store, n).await?;
    let s = store.schema();
    sql(
        store,
        format!(
            "UPDATE {s}.operations SET status = 'completed', attempts = 1,
                 completed_at = now() - interval '1 day', updated_at = now() - interval '1 day'
             WHERE status = 'pending'"
        ),
    )
    .await?;
    sql(store, format!("VACUUM ANALYZE {s}.operations")).await
}

/// A drain of the `total` pending operations by one tuned worker while `beside` runs:
/// the longest time no handler started while both ran (ms), and for how long both ran (s).
async fn longest_gap(
    store: &PostgresStore,
    total: usize,
    beside: impl Future<Output = Result<(), BoxError>>,
) -> Result<(f64, f64), BoxError> {
    let (worker, ran) = tuned_noop_worker(Arc::new(store.clone()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(worker.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    // The worker's first claims.
    while ran.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (ran, done) = (Arc::clone(&ran), Arc::clone(&done));
        tokio::spawn(async move {
            let window = Instant::now();
            let (mut last, mut since, mut longest) = (0, Instant::now(), Duration::ZERO);
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let now = ran.load(Ordering::Relaxed);
                if now != last {
                    longest = longest.max(since.elapsed());
                    (last, since) = (now, Instant::now());
                }
                if now >= total {
                    // The drain is over: the gap after its last start is no stall.
                    return (longest, window.elapsed());
                }
                if done.load(Ordering::Relaxed) {
                    return (longest.max(since.elapsed()), window.elapsed());
                }
            }
        })
    };
    beside.await?;
    done.store(true, Ordering::Relaxed);
    let (longest, overlap) = watch.await?;
    while ran.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop_tx.send(true);
    handle.await??;
    Ok((longest.as_secs_f64() * 1e3, overlap.as_secs_f64()))
}

async fn relation_size(store: &PostgresStore) -> Result<f64, BoxError> {
    let bytes: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT pg_total_relation_size('{}.operations')",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await?;
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Turns autovacuum on for the run where the server has it off; answers whether it did.
async fn autovacuum_on(store: &PostgresStore) -> Result<bool, BoxError> {
    let on: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(store.pool())
        .await?;
    if on == "on" {
        return Ok(false);
    }
    sqlx::query("ALTER SYSTEM SET autovacuum = on")
        .execute(store.pool())
        .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(store.pool())
        .await?;
    Ok(true)
}

async fn autovacuum_reset(store: &PostgresStore) {
    let _ = sqlx::query("ALTER SYSTEM RESET autovacuum")
        .execute(store.pool())
        .await;
    let _ = sqlx::query("SELECT pg_reload_conf()")
        .execute(store.pool())
        .await;
}

/// Phase 3: 10 n run through with pruning, n left pending; (size, fresh size) in MB.
async fn bloat(url: &str, n: usize) -> Result<(f64, f64), BoxError> {
    let store = fresh(url).await?;
    let outcome = async {
        fill(&store, n).await?;
        let mut submitted = n;
        let queue = Queue::new(Arc::new(store.clone()));
        let (worker, ran) = tuned_noop_worker(Arc::new(store.clone()));
        let worker = worker
            .maintenance_interval(Duration::from_secs(1))
            .prune_finished_after(Duration::from_secs(1));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let handle = tokio::spawn(worker.run(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        let started = Instant::now();
        // A steady flow: about n waiting throughout, topped up 10,000 at a time, until
        // 10 n have run.
        while ran.load(Ordering::Relaxed) < 10 * n {
            if started.elapsed() > Duration::from_secs(900) {
                return Err("the bloat drain did not finish in 15 minutes".into());
            }
            let waiting = submitted.saturating_sub(ran.load(Ordering::Relaxed));
            if submitted < 11 * n && waiting + 10_000 <= n {
                let take = (11 * n - submitted).min(10_000);
                queue
                    .submit_many((0..take).map(|i| NewOperation::new("noop", json!({ "i": i }))))
                    .await?;
                submitted += take;
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = stop_tx.send(true);
        handle.await??;
        // What is left of the finished rows goes too: n pending stay.
        store
            .prune(chrono::Utc::now() + chrono::Duration::days(1))
            .await?;
        let left = store.stats().await?.work().total();
        let grown = relation_size(&store).await?;
        let (dead, autovacuums): (i64, i64) = sqlx::query_as(
            "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables
             WHERE schemaname = $1 AND relname = 'operations'",
        )
        .bind(store.schema())
        .fetch_one(store.pool())
        .await?;
        eprintln!(
            "growth: {} ran in {:.1} s; {left} left, {dead} dead row versions, {autovacuums} \
             autovacuum runs of the table",
            10 * n,
            started.elapsed().as_secs_f64()
        );
        let loaded = fresh(url).await?;
        fill(&loaded, left as usize).await?;
        let baseline = relation_size(&loaded).await?;
        crate::drain::drop_schema(&loaded).await;
        Ok::<_, BoxError>((grown, baseline))
    }
    .await;
    crate::drain::drop_schema(&store).await;
    outcome
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let mut rows = Vec::new();

    // 1 and 2: the small case, then the table with 20 n finished rows.
    let small = fresh(url).await?;
    fill(&small, n).await?;
    let small_rate = drain(&(Arc::new(small.clone()) as Arc<dyn Store>), n).await;
    fill(&small, 4 * n).await?;
    let small_gap = longest_gap(&small, 4 * n, async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    })
    .await;
    crate::drain::drop_schema(&small).await;
    let (small_rate, (small_gap, _)) = (small_rate?, small_gap?);

    let large = fresh(url).await?;
    let outcome = async {
        finished(&large, 20 * n).await?;
        fill(&large, n).await?;
        let large_rate = drain(&(Arc::new(large.clone()) as Arc<dyn Store>), n).await?;
        rows.push(Measurement {
            scenario: format!("drain {n} no-op ops with {} finished rows kept", 20 * n),
            driver: "postgres",
            unit: "ops/s",
            samples: vec![large_rate],
            baseline_name: Some(format!("the same drain of {n} in an empty table")),
            baseline_samples: vec![small_rate],
            target: Some(Target::RatioAtLeast { value: 0.9 }),
        });
        fill(&large, 4 * n).await?;
        let cutoff = chrono::Utc::now();
        let pruning = async {
            let report = large.prune(cutoff).await?;
            eprintln!(
                "growth: prune deleted {} operations beside the drain",
                report.operations
            );
            Ok(())
        };
        let prune_started = Instant::now();
        let (gap, overlap) = longest_gap(&large, 4 * n, pruning).await?;
        eprintln!(
            "growth: prune took {:.1} s, {overlap:.1} s of it beside the drain",
            prune_started.elapsed().as_secs_f64(),
        );
        rows.push(Measurement {
            scenario: format!(
                "longest stall of a drain while prune deletes {} finished rows",
                21 * n
            ),
            driver: "postgres",
            unit: "ms",
            samples: vec![gap],
            baseline_name: Some("the longest stall of the same drain, no prune".into()),
            baseline_samples: vec![small_gap],
            target: Some(Target::AtMost { value: 100.0 }),
        });
        Ok::<_, BoxError>(())
    }
    .await;
    crate::drain::drop_schema(&large).await;
    outcome?;

    // 3: bloat, with autovacuum on.
    let admin = fresh(url).await?;
    let switched = autovacuum_on(&admin).await?;
    let measured = bloat(url, n).await;
    if switched {
        autovacuum_reset(&admin).await;
    }
    crate::drain::drop_schema(&admin).await;
    let (grown, baseline) = measured?;
    rows.push(Measurement {
        scenario: format!(
            "size of a table {} operations ran through (pruned, autovacuum on), {n} left",
            10 * n
        ),
        driver: "postgres",
        unit: "MB",
        samples: vec![grown],
        baseline_name: Some(format!("a fresh table loaded with the same {n} rows")),
        baseline_samples: vec![baseline],
        target: Some(Target::RatioAtMost { value: 2.0 }),
    });
    Ok(rows)
}
