//! The workload of the plan tests (issue #20): every hot call of a store once — claims of
//! one kind, of two, of any kind and of a limited kind (every claim counts its running
//! operations), heartbeat, release, completions of every outcome
//! (stand-alone operations and batch children, and the last children of a batch), the
//! rescue of expired leases — each handling [`ROWS`] rows, over a backlog from [`fill`].
//!
//! A driver's plan test measures each call its own way (PostgreSQL: the plans the server
//! explains; SQLite: `EXPLAIN QUERY PLAN` and the statements' own counters) in the
//! `measure` callback, which runs after each call with the call's name and its rows.

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::chrono::{self, Utc};
use fascicle_api::{
    Applied, ClaimRequest, ClaimedOperation, Completion, KindLimit, Lease, NewBatch, NewOperation,
    Outcome, Queue, Store,
};
use serde_json::{Value, json};

/// Rows each measured call handles.
pub const ROWS: u64 = 128;
/// Operations a worker holds throughout (with an hour's lease): the rescue finds its
/// expired leases among them.
pub const HELD: usize = 10_000;
/// How long a lease is while it should hold.
pub const HOUR: Duration = Duration::from_secs(3600);

/// A claim request of `worker "plans"`.
pub fn request(kinds: Option<&[&str]>, limit: u64, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker_id: "plans".into(),
        limit: limit as usize,
        lease,
        kinds: kinds.map(|kinds| kinds.iter().map(|k| k.to_string()).collect()),
    }
}

/// The leases of `claimed`.
pub fn leases(claimed: &[ClaimedOperation]) -> Vec<Lease> {
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

/// Operations of the kind limited to [`CAPPED_RUNNING`] running, stand-alone.
pub const CAPPED: usize = 10_000;
/// The running limit of kind `capped`: every claim counts that kind's running operations.
pub const CAPPED_RUNNING: u32 = 1_000;

/// The backlog: `solos` stand-alone operations of kind `solo` and [`CAPPED`] of kind
/// `capped` (limited to [`CAPPED_RUNNING`] running), in one transaction, and `children`
/// batch children of kind `work` in batches of 10,000; then [`HELD`] of the `work`
/// claimed and held.
pub async fn fill(store: &Arc<dyn Store>, solos: usize, children: usize) {
    let queue = Queue::new(Arc::clone(store));
    let now = Utc::now();
    let records: Vec<_> = (0..solos)
        .map(|i| ("solo", i))
        .chain((0..CAPPED).map(|i| ("capped", i)))
        .map(|(kind, i)| {
            queue
                .limits()
                .prepare_operation(NewOperation::new(kind, json!({ "i": i })), None, now)
                .expect("a valid operation")
        })
        .collect();
    store
        .set_limit("capped", KindLimit::running(CAPPED_RUNNING))
        .await
        .expect("set the limit");
    let mut tx = store.begin().await.expect("begin");
    tx.insert_children(&records).await.expect("insert");
    tx.commit().await.expect("commit");
    for chunk in 0..children.div_ceil(10_000) {
        let n = (children - chunk * 10_000).min(10_000);
        queue
            .submit_batch(NewBatch::new("fill").children(
                (0..n).map(|i| NewOperation::new("work", json!({ "i": i, "chunk": chunk }))),
            ))
            .await
            .expect("submit");
    }
    let held = store
        .claim(&request(Some(&["work"]), HELD as u64, HOUR))
        .await
        .expect("claim the held");
    assert_eq!(held.len(), HELD, "the held claim");
}

/// Claims [`ROWS`] of `kind`, measured.
async fn claim(
    store: &dyn Store,
    kind: &str,
    lease: Duration,
    measure: &mut impl FnMut(&str, u64),
) -> Vec<ClaimedOperation> {
    let claimed = store
        .claim(&request(Some(&[kind]), ROWS, lease))
        .await
        .expect("claim");
    assert_eq!(claimed.len() as u64, ROWS, "claim of {kind}");
    measure(&format!("claim of {kind}"), ROWS);
    claimed
}

/// Every hot call once, each followed by `measure(call, rows)`. Between them the
/// workload does things that are not hot calls (releasing, submitting, sleeping), each
/// followed by `measure(.., 0)`: a call of no rows is to be discarded, not measured.
/// Discard what ran before calling this.
pub async fn every_hot_path(store: &Arc<dyn Store>, mut measure: impl FnMut(&str, u64)) {
    let queue = Queue::new(Arc::clone(store));
    let store = store.as_ref();
    let measure = &mut measure;
    // The claim of named kinds, of two kinds, and of any kind.
    let named = claim(store, "solo", HOUR, measure).await;
    let two = store
        .claim(&request(Some(&["work", "solo"]), ROWS, HOUR))
        .await
        .expect("claim");
    assert_eq!(two.len() as u64, ROWS);
    measure("claim of two kinds", ROWS);
    let any = store
        .claim(&request(None, ROWS, HOUR))
        .await
        .expect("claim");
    assert_eq!(any.len() as u64, ROWS);
    measure("claim of any kind", ROWS);
    // A limited kind: its running operations counted under its limit's lock.
    let capped = claim(store, "capped", HOUR, measure).await;
    store
        .complete(&completions(&capped, || Outcome::Completed(Value::Null)))
        .await
        .expect("complete");
    measure("(complete capped, not measured)", 0);

    // Heartbeat, then release.
    let held = leases(&named);
    let status = store.heartbeat(&held, HOUR).await.expect("heartbeat");
    assert!(status.iter().all(|s| s.held));
    measure("heartbeat", ROWS);
    assert_eq!(store.release(&held).await.expect("release"), ROWS);
    measure("release", ROWS);
    for claimed in [two, any] {
        store.release(&leases(&claimed)).await.expect("release");
    }
    measure("(releases, not measured)", 0);

    // Completions of every outcome, stand-alone and batch children.
    for (kind, outcome) in [
        ("solo", "completed"),
        ("work", "completed"),
        ("solo", "retried"),
        ("solo", "failed"),
        ("work", "failed"),
        ("work", "cancelled"),
    ] {
        let claimed = claim(store, kind, HOUR, measure).await;
        let applied = store
            .complete(&completions(&claimed, || match outcome {
                "completed" => Outcome::Completed(json!({ "ok": true })),
                "retried" => Outcome::Retry {
                    error: "try again".into(),
                    run_at: Utc::now() + chrono::Duration::hours(1),
                },
                "failed" => Outcome::Failed("broken".into()),
                _ => Outcome::Cancelled("stopped".into()),
            }))
            .await
            .expect("complete");
        assert!(applied.iter().all(|a| *a == Applied::Applied));
        measure(&format!("complete {kind} ({outcome})"), ROWS);
    }

    // The last children of a batch: its parent finishes in the same call.
    queue
        .submit_batch(
            NewBatch::new("closing")
                .children((0..ROWS).map(|i| NewOperation::new("closing", json!({ "i": i })))),
        )
        .await
        .expect("submit");
    measure("(submit, not measured)", 0);
    let claimed = claim(store, "closing", HOUR, measure).await;
    store
        .complete(&completions(&claimed, || Outcome::Completed(Value::Null)))
        .await
        .expect("complete");
    measure("complete the last children of a batch", ROWS);

    // Rescue: ROWS expired leases among the HELD.
    let expiring = claim(store, "solo", Duration::from_millis(1), measure).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    measure("(sleep, not measured)", 0);
    let rescued = store.rescue_expired_leases().await.expect("rescue");
    assert_eq!(rescued.requeued, expiring.len() as u64, "rescue");
    measure("rescue", ROWS);
}
