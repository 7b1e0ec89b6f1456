//! Issue #20: each hot path costs the rows it touches, not the backlog, whatever the planner
//! knows. No timing: every statement the store runs is explained by the server itself
//! (`auto_explain` loaded into the test's connections, its plans sent back as notices), so
//! the test sees the real statements with their real parameters — the claim of named kinds
//! (what a worker sends) and of any kind, completions of every outcome (stand-alone, batch
//! children moving their parents' counters, the last children finishing a batch),
//! heartbeats, releases and the rescue of expired leases.
//!
//! With 100,000 pending operations and 10,000 more held by a worker, each call's statements
//! together touch a bounded number of shared buffers per row they handle, and no node of
//! any plan produces more than a few rows per row handled, in three table states: never
//! analysed (this PostgreSQL runs with autovacuum off), analysed (three times: ANALYZE
//! samples), and with 1,000,000 more operations completed, their dead versions kept
//! (never analysed and analysed), then vacuumed. While the claimed rows' dead index
//! entries lie ahead of the backlog unvacuumed, a claim still reads their leaf pages (a
//! B-tree property; see `check`): there the node bound holds and the buffers are printed.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use fascicle_api::Store;
use fascicle_conformance::hot_paths;
use fascicle_postgres::sqlx::{self, AssertSqlSafe};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use serde_json::Value;

/// Shared buffers one call may touch per row it handles, plus a constant: for each row its
/// index entries, its heap page, its lock, its new version and the index entries of that,
/// its parent's row — never the backlog. What was measured is printed beside.
const BUFFERS_PER_ROW: u64 = 48;
const BUFFERS_FIXED: u64 = 200;
/// The most rows any node may read (rows × loops, with those it filtered out) per row
/// handled, plus a constant. A plan that reads the backlog has a node of 100,000.
const NODE_ROWS_PER_ROW: u64 = 4;
const NODE_ROWS_FIXED: u64 = 64;

/// `auto_explain` for every statement of the store's connections, at NOTICE level so the
/// server sends each plan to the client, which hands it to `tracing`.
const AUTO_EXPLAIN: &str = "-c session_preload_libraries=auto_explain \
     -c auto_explain.log_min_duration=0 -c auto_explain.log_analyze=on \
     -c auto_explain.log_buffers=on -c auto_explain.log_timing=off \
     -c auto_explain.log_format=json -c auto_explain.log_level=notice";

/// Set while dead index entries lie ahead of the backlog, unvacuumed (see `check`).
static DEAD_AHEAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The plans the server sent, in order.
fn notices() -> &'static Mutex<Vec<String>> {
    static NOTICES: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    NOTICES.get_or_init(|| Mutex::new(Vec::new()))
}

/// A subscriber that keeps the server's notices (sqlx's `sqlx::postgres::notice` events)
/// and nothing else.
struct Notices;

struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && self.0.is_none() {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Notices {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.enabled(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "sqlx::postgres::notice"
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(None);
        event.record(&mut message);
        if let Some(message) = message.0 {
            notices().lock().unwrap().push(message);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// One statement as the server ran it.
#[derive(Debug)]
struct Explained {
    text: String,
    /// Shared buffers hit or read, inclusive of every node under the top one.
    buffers: u64,
    /// The node that read the most rows, and how many.
    widest: (String, u64),
}

/// The statements run since the last call, explained.
fn take_statements() -> Vec<Explained> {
    let taken = std::mem::take(&mut *notices().lock().unwrap());
    taken
        .iter()
        .filter_map(|notice| {
            let plan: Value = serde_json::from_str(&notice[notice.find('{')?..]).ok()?;
            let top = &plan["Plan"];
            let mut all = Vec::new();
            nodes(top, &mut all);
            Some(Explained {
                text: plan["Query Text"]
                    .as_str()
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                buffers: (top["Shared Hit Blocks"].as_f64().unwrap_or(0.0)
                    + top["Shared Read Blocks"].as_f64().unwrap_or(0.0))
                    as u64,
                widest: all.into_iter().max_by_key(|(_, rows)| *rows)?,
            })
        })
        .collect()
}

/// Every node of a plan with the rows it read: those it produced and those it read and
/// threw away (removed by a filter, an index recheck or a join filter), times its loops,
/// depth first. (PostgreSQL 18 writes row counts with decimals.)
fn nodes(node: &Value, out: &mut Vec<(String, u64)>) {
    if let Some(kind) = node["Node Type"].as_str() {
        let on = node["Index Name"]
            .as_str()
            .or(node["Relation Name"].as_str())
            .or(node["CTE Name"].as_str());
        let count = |field: &str| node[field].as_f64().unwrap_or(0.0);
        let per_loop = count("Actual Rows")
            + count("Rows Removed by Filter")
            + count("Rows Removed by Index Recheck")
            + count("Rows Removed by Join Filter");
        let rows = (per_loop * count("Actual Loops")).round() as u64;
        let name = match on {
            Some(on) => format!("{kind} on {on}"),
            None => kind.to_string(),
        };
        out.push((name, rows));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

/// The workload's measure: checks each call's statements (a call of no rows is not a hot
/// call: what it ran is discarded).
fn measure(state: &str) -> impl FnMut(&str, u64) + '_ {
    move |call, rows| {
        if rows == 0 {
            take_statements();
        } else {
            check(state, call, rows);
        }
    }
}

/// Checks the statements of one call that handled `rows` rows.
fn check(state: &str, call: &str, rows: u64) {
    let statements = take_statements();
    assert!(
        !statements.is_empty(),
        "{state}, {call}: no statement was explained (is auto_explain loaded?)"
    );
    let touched: u64 = statements.iter().map(|s| s.buffers).sum();
    let bound = BUFFERS_PER_ROW * rows + BUFFERS_FIXED;
    eprintln!(
        "{state}, {call}: {} statements, {touched} buffers for {rows} rows (bound {bound})",
        statements.len()
    );
    if std::env::var("PLANS_DUMP").is_ok() {
        for statement in &statements {
            eprintln!("    {statement:?}");
        }
    }
    let node_bound = NODE_ROWS_PER_ROW * rows + NODE_ROWS_FIXED;
    for statement in &statements {
        assert!(
            statement.widest.1 <= node_bound,
            "{state}, {call}: a plan reads the backlog: {} read {} rows (bound \
             {node_bound}) in: {}",
            statement.widest.0,
            statement.widest.1,
            statement.text
        );
    }
    if call.starts_with("claim") && DEAD_AHEAD.load(std::sync::atomic::Ordering::Relaxed) {
        // Dead index entries lie ahead of the backlog in claim order and no vacuum has
        // run: a B-tree scan reads the leaf pages of the entries it has marked dead (it
        // skips them, never their rows) until VACUUM removes them. That cost is the dead
        // entries', not the backlog's; the node bound above still holds, and the state
        // after VACUUM checks the claim's buffers again.
        eprintln!("    (dead index entries ahead, not vacuumed: buffers not bounded by the rows)");
        return;
    }
    assert!(
        touched <= bound,
        "{state}, {call}: {touched} shared buffers for {rows} rows (bound {bound}); \
         statements: {statements:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hot_path_touches_the_rows_it_handles_not_the_backlog() {
    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return;
        }
    };
    let _ = tracing::subscriber::set_global_default(Notices);
    let separator = if database.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{separator}options={}",
        database.url,
        AUTO_EXPLAIN.replace(' ', "%20").replace('=', "%3D")
    );
    let store = PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(common::fresh_schema())
            .max_connections(4),
    )
    .await
    .unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    // 50,000 stand-alone operations and 50,000 batch children, 10,000 of them held.
    hot_paths::fill(&shared, 50_000, 50_000).await;
    take_statements();
    hot_paths::every_hot_path(&shared, measure("never analysed")).await;
    for round in 1..=3 {
        analyse(&store).await;
        hot_paths::every_hot_path(&shared, measure(&format!("analysed ({round})"))).await;
    }

    // 1,000,000 operations completed, their dead versions kept (no vacuum). They ran
    // before the backlog (an earlier run_at): their dead index entries lie ahead of it in
    // claim order. One claim of each kind passes them first, as the claims that ran them
    // would have (an index scan marks the dead entries it passes): the state a drain of
    // them leaves, not the first pass over entries nobody has read.
    let statement = format!(
        "INSERT INTO {s}.operations (id, kind, status, payload, max_attempts, run_at,
             created_at, updated_at)
         SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'solo' ELSE 'work' END,
             'pending', jsonb_build_object('i', i), 3, '2000-01-01'::timestamptz, now(), now()
         FROM generate_series(1, 1000000) AS i",
        s = store.schema()
    );
    sql(&store, &statement).await;
    let statement = format!(
        "UPDATE {s}.operations SET status = 'completed', attempts = 1, result = 'null',
             completed_at = now(), updated_at = now()
         WHERE run_at = '2000-01-01'::timestamptz",
        s = store.schema()
    );
    sql(&store, &statement).await;
    for kinds in [Some(&["solo"][..]), Some(&["work"][..]), None] {
        let passed = shared
            .claim(&hot_paths::request(kinds, 1, hot_paths::HOUR))
            .await
            .unwrap();
        shared.release(&hot_paths::leases(&passed)).await.unwrap();
    }
    take_statements();
    DEAD_AHEAD.store(true, std::sync::atomic::Ordering::Relaxed);
    hot_paths::every_hot_path(&shared, measure("after 1,000,000 completed")).await;
    analyse(&store).await;
    hot_paths::every_hot_path(&shared, measure("after 1,000,000 completed, analysed")).await;
    DEAD_AHEAD.store(false, std::sync::atomic::Ordering::Relaxed);
    sql(&store, &format!("VACUUM {}.operations", store.schema())).await;
    hot_paths::every_hot_path(&shared, measure("after 1,000,000 completed, vacuumed")).await;
    common::drop_schema(&store).await;
}

async fn analyse(store: &PostgresStore) {
    sql(store, &format!("ANALYZE {}.operations", store.schema())).await;
    take_statements();
}

async fn sql(store: &PostgresStore, statement: &str) {
    sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(store.pool())
        .await
        .unwrap();
    take_statements();
}
