//! Issue #20, the claim: its cost is the rows it touches, not the backlog, whatever the
//! planner knows. With 100,000 ready operations, `EXPLAIN (ANALYZE, BUFFERS)` of the claim
//! statement for 128 rows — a claim of named kinds (what a worker sends) and a claim of any
//! kind — touches a bounded number of shared buffers, in three table states: never
//! analysed (this PostgreSQL runs with autovacuum off), analysed, and after 20,000
//! operations were claimed and completed (their dead index entries kept). No timing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::{ClaimRequest, Completion, NewBatch, NewOperation, Outcome, Queue, Store};
use fascicle_postgres::PostgresStore;
use fascicle_postgres::sqlx::{self, AssertSqlSafe};
use serde_json::{Value, json};

const BACKLOG: usize = 100_000;
const CLAIM: usize = 128;
/// Shared buffers a claim of 128 may touch: for each claimed row its index entry, its heap
/// page, its lock, its new version and the index entries of that (about 18 measured) —
/// never the backlog.
const BUFFERS_PER_CLAIM: u64 = 30 * CLAIM as u64;
/// The most rows any node of the plan may produce (rows × loops): a few per claimed row.
/// A plan that reads the backlog has a node of 100,000.
const ROWS_PER_NODE: u64 = 4 * CLAIM as u64;

fn request(kinds: Option<Vec<String>>) -> ClaimRequest {
    ClaimRequest {
        worker_id: "plans".into(),
        limit: CLAIM,
        lease: Duration::from_secs(60),
        kinds,
    }
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

async fn check(store: &PostgresStore, state: &str) {
    for kinds in [
        Some(vec!["work".to_string()]),
        Some(vec!["work".into(), "other".into()]),
        None,
    ] {
        let plan = store.explain_claim(&request(kinds.clone())).await.unwrap();
        let top = &plan[0]["Plan"];
        let touched = top["Shared Hit Blocks"].as_u64().unwrap_or(0)
            + top["Shared Read Blocks"].as_u64().unwrap_or(0);
        let mut all = Vec::new();
        nodes(top, &mut all);
        eprintln!("{state}, {kinds:?}: {touched} buffers for {CLAIM} rows");
        if std::env::var("PLANS_DUMP").is_ok() {
            eprintln!("{all:?}");
        }
        let rows = top["Actual Rows"].as_u64().unwrap_or(0);
        assert_eq!(
            rows, CLAIM as u64,
            "{state}, {kinds:?}: the claim returned {rows} rows"
        );
        let widest = all.iter().max_by_key(|(_, rows)| *rows).unwrap();
        assert!(
            widest.1 <= ROWS_PER_NODE,
            "{state}, {kinds:?}: the plan reads the backlog: {} produced {} rows (bound \
             {ROWS_PER_NODE}); plan: {all:?}",
            widest.0,
            widest.1
        );
        assert!(
            touched <= BUFFERS_PER_CLAIM,
            "{state}, {kinds:?}: a claim of {CLAIM} touched {touched} shared buffers \
             (bound {BUFFERS_PER_CLAIM}); plan: {all:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_touches_the_rows_it_claims_not_the_backlog() {
    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return;
        }
    };
    let store = common::fresh_store(&database.url).await;
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let queue = Queue::new(Arc::clone(&shared));
    for chunk in 0..BACKLOG / 10_000 {
        queue
            .submit_batch(NewBatch::new("fill").children(
                (0..10_000).map(|i| NewOperation::new("work", json!({ "i": i, "chunk": chunk }))),
            ))
            .await
            .unwrap();
    }
    check(&store, "never analysed").await;
    // ANALYZE samples rows: three samples, three chances for a plan that reads the
    // backlog to show.
    for round in 1..=3 {
        let analyse = format!("ANALYZE {}.operations", store.schema());
        sqlx::query(AssertSqlSafe(analyse))
            .execute(store.pool())
            .await
            .unwrap();
        check(&store, &format!("analysed ({round})")).await;
    }
    // 20,000 claimed and completed: dead index entries ahead of the backlog, kept (no
    // vacuum).
    let mut done = 0;
    while done < 20_000 {
        let claimed = shared
            .claim(&request(Some(vec!["work".into()])))
            .await
            .unwrap();
        let completions: Vec<Completion> = claimed
            .iter()
            .map(|c| Completion {
                id: c.operation.id,
                lease_token: c.lease_token,
                outcome: Outcome::Completed(Value::Null),
            })
            .collect();
        shared.complete(&completions).await.unwrap();
        done += completions.len();
    }
    check(&store, "after 20,000 completed").await;
    common::drop_schema(&store).await;
}
