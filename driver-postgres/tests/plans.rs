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
use std::time::Duration;

use fascicle_api::{
    ClaimRequest, ClaimedOperation, Completion, Lease, NewBatch, NewOperation, Outcome, Queue,
    Store,
};
use fascicle_postgres::sqlx::{self, AssertSqlSafe};
use fascicle_postgres::{PostgresOptions, PostgresStore};
use serde_json::{Value, json};

/// Rows handled by each measured call.
const ROWS: u64 = 128;
/// Shared buffers one call may touch per row it handles, plus a constant: for each row its
/// index entries, its heap page, its lock, its new version and the index entries of that,
/// its parent's row — never the backlog. What was measured is printed beside.
const BUFFERS_PER_ROW: u64 = 56;
const BUFFERS_FIXED: u64 = 200;
/// The most rows any node may produce (rows × loops) per row handled, plus a constant. A
/// plan that reads the backlog has a node of 100,000.
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
    /// The node that produced the most rows, and how many.
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
                buffers: top["Shared Hit Blocks"].as_u64().unwrap_or(0)
                    + top["Shared Read Blocks"].as_u64().unwrap_or(0),
                widest: all.into_iter().max_by_key(|(_, rows)| *rows)?,
            })
        })
        .collect()
}

/// Every node of a plan with the rows it produced (rows × loops), depth first.
fn nodes(node: &Value, out: &mut Vec<(String, u64)>) {
    if let Some(kind) = node["Node Type"].as_str() {
        let on = node["Index Name"]
            .as_str()
            .or(node["Relation Name"].as_str())
            .or(node["CTE Name"].as_str());
        let rows =
            node["Actual Rows"].as_u64().unwrap_or(0) * node["Actual Loops"].as_u64().unwrap_or(0);
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
            "{state}, {call}: a plan reads the backlog: {} produced {} rows (bound \
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

fn request(kinds: Option<&[&str]>, limit: u64, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker_id: "plans".into(),
        limit: limit as usize,
        lease,
        kinds: kinds.map(|kinds| kinds.iter().map(|k| k.to_string()).collect()),
    }
}

fn leases(claimed: &[ClaimedOperation]) -> Vec<Lease> {
    claimed
        .iter()
        .map(|c| Lease {
            id: c.operation.id,
            token: c.lease_token,
        })
        .collect()
}

fn completions(claimed: &[ClaimedOperation], outcome: impl Fn() -> Outcome) -> Vec<Completion> {
    claimed
        .iter()
        .map(|c| Completion {
            id: c.operation.id,
            lease_token: c.lease_token,
            outcome: outcome(),
        })
        .collect()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Claims `ROWS` of `kind` (named) and checks the claim.
async fn claim(
    store: &dyn Store,
    state: &str,
    kind: &str,
    lease: Duration,
) -> Vec<ClaimedOperation> {
    take_statements();
    let claimed = store
        .claim(&request(Some(&[kind]), ROWS, lease))
        .await
        .unwrap();
    assert_eq!(claimed.len() as u64, ROWS, "{state}: claim of {kind}");
    check(state, &format!("claim of {kind}"), ROWS);
    claimed
}

/// Every hot call once, each checked.
async fn every_hot_path(queue: &Queue, store: &dyn Store, state: &str) {
    // The claim of named kinds, of two kinds, and of any kind.
    let named = claim(store, state, "solo", HOUR).await;
    take_statements();
    let two = store
        .claim(&request(Some(&["work", "solo"]), ROWS, HOUR))
        .await
        .unwrap();
    assert_eq!(two.len() as u64, ROWS);
    check(state, "claim of two kinds", ROWS);
    let any = store.claim(&request(None, ROWS, HOUR)).await.unwrap();
    assert_eq!(any.len() as u64, ROWS);
    check(state, "claim of any kind", ROWS);

    // Heartbeat, then release.
    let held = leases(&named);
    let status = store.heartbeat(&held, HOUR).await.unwrap();
    assert!(status.iter().all(|s| s.held));
    check(state, "heartbeat", ROWS);
    assert_eq!(store.release(&held).await.unwrap(), ROWS);
    check(state, "release", ROWS);
    for claimed in [two, any] {
        store.release(&leases(&claimed)).await.unwrap();
    }

    // Completions of every outcome, stand-alone and batch children.
    for (kind, outcome) in [
        ("solo", "completed"),
        ("work", "completed"),
        ("solo", "retried"),
        ("solo", "failed"),
        ("work", "failed"),
        ("work", "cancelled"),
    ] {
        let claimed = claim(store, state, kind, HOUR).await;
        let applied = store
            .complete(&completions(&claimed, || match outcome {
                "completed" => Outcome::Completed(json!({ "ok": true })),
                "retried" => Outcome::Retry {
                    error: "try again".into(),
                    run_at: chrono::Utc::now() + chrono::Duration::hours(1),
                },
                "failed" => Outcome::Failed("broken".into()),
                _ => Outcome::Cancelled("stopped".into()),
            }))
            .await
            .unwrap();
        assert!(applied.iter().all(|a| *a == fascicle_api::Applied::Applied));
        check(state, &format!("complete {kind} ({outcome})"), ROWS);
    }

    // The last children of a batch: its parent finishes in the same call.
    queue
        .submit_batch(
            NewBatch::new("closing")
                .children((0..ROWS).map(|i| NewOperation::new("closing", json!({ "i": i })))),
        )
        .await
        .unwrap();
    let claimed = claim(store, state, "closing", HOUR).await;
    store
        .complete(&completions(&claimed, || Outcome::Completed(Value::Null)))
        .await
        .unwrap();
    check(state, "complete the last children of a batch", ROWS);

    // Rescue: ROWS expired leases among the 10,000 held.
    let expiring = claim(store, state, "solo", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    take_statements();
    let rescued = store.rescue_expired_leases().await.unwrap();
    assert_eq!(rescued.requeued, expiring.len() as u64, "{state}: rescue");
    check(state, "rescue", ROWS);
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
    let queue = Queue::new(Arc::clone(&shared));

    // 50,000 stand-alone operations (one transaction) and 50,000 batch children.
    let now = chrono::Utc::now();
    let solos: Vec<_> = (0..50_000)
        .map(|i| {
            queue
                .limits()
                .prepare_operation(NewOperation::new("solo", json!({ "i": i })), None, now)
                .unwrap()
        })
        .collect();
    let mut tx = shared.begin().await.unwrap();
    tx.insert_children(&solos).await.unwrap();
    tx.commit().await.unwrap();
    for chunk in 0..5 {
        queue
            .submit_batch(NewBatch::new("fill").children(
                (0..10_000).map(|i| NewOperation::new("work", json!({ "i": i, "chunk": chunk }))),
            ))
            .await
            .unwrap();
    }
    // 10,000 held by a worker: the rescue's expired leases are found among them.
    let held = shared
        .claim(&request(Some(&["work"]), 10_000, HOUR))
        .await
        .unwrap();
    assert_eq!(held.len(), 10_000);
    take_statements();

    every_hot_path(&queue, shared.as_ref(), "never analysed").await;
    for round in 1..=3 {
        analyse(&store).await;
        every_hot_path(&queue, shared.as_ref(), &format!("analysed ({round})")).await;
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
        let passed = shared.claim(&request(kinds, 1, HOUR)).await.unwrap();
        shared.release(&leases(&passed)).await.unwrap();
    }
    take_statements();
    DEAD_AHEAD.store(true, std::sync::atomic::Ordering::Relaxed);
    every_hot_path(&queue, shared.as_ref(), "after 1,000,000 completed").await;
    analyse(&store).await;
    every_hot_path(
        &queue,
        shared.as_ref(),
        "after 1,000,000 completed, analysed",
    )
    .await;
    DEAD_AHEAD.store(false, std::sync::atomic::Ordering::Relaxed);
    sql(&store, &format!("VACUUM {}.operations", store.schema())).await;
    every_hot_path(
        &queue,
        shared.as_ref(),
        "after 1,000,000 completed, vacuumed",
    )
    .await;
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
