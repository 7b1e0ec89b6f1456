//! Nested batches (`NewBatch::child_batch`): a tree of batches submitted in one
//! transaction, each inner batch a child of the one holding it that counts its outcome
//! there when it ends; cancel, `retry_batch`, dependencies, the reconciler and prune act
//! on the tree.

use std::collections::HashSet;
use std::sync::Arc;

use fascicle_api::chrono::{Duration as TimeDelta, Utc};
use fascicle_api::{
    Applied, BatchPlan, ChildCounters, ClaimRequest, ClaimedOperation, Error, FailurePolicy,
    MAX_BATCH_DEPTH, NewBatch, NewOperation, OperationId, Outcome, ParentRecord, Queue, Status,
    Store, ZERO_CHILDREN_REASON, messages,
};
use serde_json::{Value, json};

use super::lifecycle::{finish, request, status};

fn op(kind: &str, id: OperationId) -> NewOperation {
    NewOperation::new(kind, json!({ "id": id.to_string() })).with_id(id)
}

fn counters(total: u64, completed: u64, failed: u64, cancelled: u64) -> ChildCounters {
    ChildCounters {
        total,
        completed,
        failed,
        cancelled,
    }
}

async fn counters_of(store: &Arc<dyn Store>, id: OperationId) -> ChildCounters {
    store
        .get(id)
        .await
        .unwrap()
        .expect("the batch exists")
        .children
        .expect("a batch has counters")
}

/// Claims every ready operation of `kinds`.
async fn claim_kinds(store: &Arc<dyn Store>, kinds: &[&str]) -> Vec<ClaimedOperation> {
    store
        .claim(&ClaimRequest {
            kinds: Some(kinds.iter().map(|k| k.to_string()).collect()),
            ..request(1000)
        })
        .await
        .unwrap()
}

fn ids(claimed: &[ClaimedOperation]) -> HashSet<OperationId> {
    claimed.iter().map(|c| c.operation.id).collect()
}

async fn complete(store: &Arc<dyn Store>, claimed: &[ClaimedOperation]) {
    for c in claimed {
        assert_eq!(
            finish(store, c, Outcome::Completed(json!(1))).await,
            Applied::Applied
        );
    }
}

/// Three levels: `root` holds operation `r1` and batch `b`; `b` holds `b1`, `b2` and
/// batch `c`; `c` holds `c1`. Kinds say the level: `outer`, `middle`, `inner`.
struct Tree {
    root: OperationId,
    b: OperationId,
    c: OperationId,
    r1: OperationId,
    b1: OperationId,
    b2: OperationId,
    c1: OperationId,
}

impl Tree {
    fn new() -> Self {
        let [root, b, c, r1, b1, b2, c1] = [(); 7].map(|_| OperationId::new());
        Self {
            root,
            b,
            c,
            r1,
            b1,
            b2,
            c1,
        }
    }

    fn batch(&self, policy: FailurePolicy) -> NewBatch {
        NewBatch::new("root")
            .with_id(self.root)
            .with_failure_policy(policy)
            .child(op("outer", self.r1))
            .child_batch(
                NewBatch::new("middle_batch")
                    .with_id(self.b)
                    .with_metadata(json!({ "level": 2 }))
                    .child(op("middle", self.b1))
                    .child(op("middle", self.b2))
                    .child_batch(
                        NewBatch::new("inner_batch")
                            .with_id(self.c)
                            .child(op("inner", self.c1)),
                    ),
            )
    }

    fn operations(&self) -> [OperationId; 4] {
        [self.r1, self.b1, self.b2, self.c1]
    }
}

/// A three-level tree is stored in one transaction: each nested batch is a batch row
/// (never claimed, counted with the batches) that is one child of the batch holding it;
/// it finalizes into that batch's counters level by level, and the root ends last.
pub async fn a_nested_tree_finalizes_level_by_level(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    let receipt = queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    assert_eq!(receipt.parent_id, t.root);
    assert_eq!(
        receipt.child_ids,
        [t.r1, t.b],
        "operations, then nested batches"
    );

    let root_children: Vec<OperationId> = store
        .children_of(t.root)
        .await
        .unwrap()
        .iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(root_children, [t.r1, t.b]);
    assert_eq!(store.child_ids_of(t.b).await.unwrap(), [t.b1, t.b2, t.c]);
    let b = store.get(t.b).await.unwrap().unwrap();
    assert!(b.is_parent(), "a nested batch is a batch row");
    assert_eq!(b.parent_id, Some(t.root));
    assert_eq!(b.kind, "middle_batch");
    assert_eq!(b.metadata, Some(json!({ "level": 2 })));
    assert_eq!(counters_of(&store, t.root).await, counters(2, 0, 0, 0));
    assert_eq!(counters_of(&store, t.b).await, counters(3, 0, 0, 0));
    assert_eq!(counters_of(&store, t.c).await, counters(1, 0, 0, 0));
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.batches.open, 3, "every level is a batch: {stats:?}");
    assert_eq!(stats.work().ready, 4, "batches are never work: {stats:?}");

    let all = claim_kinds(&store, &["outer", "middle", "inner"]).await;
    assert_eq!(
        ids(&all),
        HashSet::from(t.operations()),
        "no batch is claimed"
    );
    let by_id = |id: OperationId| all.iter().find(|c| c.operation.id == id).unwrap();

    complete(&store, std::slice::from_ref(by_id(t.c1))).await;
    assert_eq!(status(&store, t.c).await, Status::Completed);
    assert_eq!(counters_of(&store, t.b).await, counters(3, 1, 0, 0));
    assert_eq!(status(&store, t.b).await, Status::Pending);
    complete(&store, &[by_id(t.b1).clone(), by_id(t.b2).clone()]).await;
    assert_eq!(status(&store, t.b).await, Status::Completed);
    assert_eq!(counters_of(&store, t.root).await, counters(2, 1, 0, 0));
    assert_eq!(status(&store, t.root).await, Status::Pending);
    complete(&store, std::slice::from_ref(by_id(t.r1))).await;
    let root = store.get(t.root).await.unwrap().unwrap();
    assert_eq!(root.status, Status::Completed);
    assert_eq!(root.children, Some(counters(2, 2, 0, 0)));
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.batches.open, stats.batches.completed), (0, 3));
}

/// A nested batch that fails counts as a failed child of the batch holding it, with its
/// error: under `FailFast` it cancels the outer batch's pending operations naming it and
/// the outer batch fails with its error.
pub async fn a_failed_nested_batch_fails_fast_its_outer_batch(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::FailFast))
        .await
        .unwrap();
    let inner = claim_kinds(&store, &["inner"]).await;
    assert_eq!(
        finish(&store, &inner[0], Outcome::Failed("disk full".into())).await,
        Applied::Applied
    );
    // `c` (WaitAll) fails with its child's error; `b` (WaitAll) waits for its others.
    let c = store.get(t.c).await.unwrap().unwrap();
    assert_eq!(
        (c.status, c.error.as_deref()),
        (Status::Failed, Some("disk full"))
    );
    assert_eq!(status(&store, t.root).await, Status::Pending);
    let middle = claim_kinds(&store, &["middle"]).await;
    complete(&store, &middle).await;
    let b = store.get(t.b).await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.error.as_deref()),
        (Status::Failed, Some("disk full"))
    );
    // `b` failed: the root (FailFast) cancels its pending operation naming `b`.
    let r1 = store.get(t.r1).await.unwrap().unwrap();
    assert_eq!(r1.status, Status::Cancelled);
    assert_eq!(
        r1.error.as_deref(),
        Some(messages::cancelled_by_fail_fast(t.b).as_str())
    );
    let root = store.get(t.root).await.unwrap().unwrap();
    assert_eq!(
        (root.status, root.error.as_deref()),
        (Status::Failed, Some("disk full"))
    );
    assert_eq!(root.children, Some(counters(2, 0, 1, 1)));
}

/// A `FailFast` batch whose child fails cancels the pending operations of the batches
/// nested in it too, and asks their running ones to stop; each nested batch then ends
/// and counts into it, which ends last.
pub async fn fail_fast_reaches_into_nested_batches(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::FailFast))
        .await
        .unwrap();
    let running = claim_kinds(&store, &["middle"]).await;
    let outer = claim_kinds(&store, &["outer"]).await;
    finish(&store, &outer[0], Outcome::Failed("bad".into())).await;
    let reason = messages::cancelled_by_fail_fast(t.r1);
    let c1 = store.get(t.c1).await.unwrap().unwrap();
    assert_eq!(
        (c1.status, c1.error.as_deref()),
        (Status::Cancelled, Some(reason.as_str()))
    );
    assert_eq!(status(&store, t.c).await, Status::Cancelled);
    for m in &running {
        let held = store
            .heartbeat(
                &[fascicle_api::Lease {
                    id: m.operation.id,
                    token: m.lease_token,
                }],
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert!(
            held[0].cancel_requested,
            "a running nested operation was not asked to stop"
        );
    }
    assert_eq!(
        status(&store, t.b).await,
        Status::Pending,
        "b has running children"
    );
    assert_eq!(status(&store, t.root).await, Status::Pending);
    for m in &running {
        finish(&store, m, Outcome::Cancelled("stopped".into())).await;
    }
    assert_eq!(status(&store, t.b).await, Status::Cancelled);
    let root = store.get(t.root).await.unwrap().unwrap();
    assert_eq!(
        (root.status, root.error.as_deref()),
        (Status::Failed, Some("bad"))
    );
    assert_eq!(root.children, Some(counters(2, 0, 1, 1)));
}

/// `cancel` on a nested batch cancels its own tree and leaves the rest of the outer
/// batch alone; on the root it cancels every level.
pub async fn cancel_acts_on_the_tree(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    let report = store.cancel(t.b).await.unwrap();
    assert_eq!(
        (report.cancelled, report.signalled, report.already_terminal),
        (3, 0, 0)
    );
    for id in [t.b1, t.b2, t.c1] {
        assert_eq!(status(&store, id).await, Status::Cancelled);
    }
    assert_eq!(status(&store, t.c).await, Status::Cancelled);
    assert_eq!(status(&store, t.b).await, Status::Cancelled);
    assert_eq!(status(&store, t.r1).await, Status::Pending);
    assert_eq!(counters_of(&store, t.root).await, counters(2, 0, 0, 1));

    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    let running = claim_kinds(&store, &["inner"]).await;
    let report = store.cancel(t.root).await.unwrap();
    assert_eq!(
        (report.cancelled, report.signalled, report.already_terminal),
        (3, 1, 0)
    );
    assert_eq!(status(&store, t.b).await, Status::Pending, "c1 still runs");
    finish(&store, &running[0], Outcome::Cancelled("stopped".into())).await;
    for id in [t.c, t.b, t.root] {
        assert_eq!(status(&store, id).await, Status::Cancelled);
    }
    assert_eq!(counters_of(&store, t.root).await, counters(2, 0, 0, 2));
}

/// `retry_batch` on the root re-queues the failed and cancelled operations of every
/// level and reopens each nested batch that holds one; on a nested batch it reopens that
/// batch and the batches holding it.
pub async fn retry_batch_reopens_the_tree(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    for claimed in claim_kinds(&store, &["outer", "middle", "inner"]).await {
        let outcome = if claimed.operation.id == t.c1 {
            Outcome::Failed("flaky".into())
        } else {
            Outcome::Completed(json!(1))
        };
        finish(&store, &claimed, outcome).await;
    }
    for id in [t.c, t.b, t.root] {
        assert_eq!(status(&store, id).await, Status::Failed, "{id}");
    }
    // Retrying the nested `c` reopens it and the batches holding it.
    assert_eq!(store.retry_batch(t.c).await.unwrap(), 1);
    for id in [t.c1, t.c, t.b, t.root] {
        assert_eq!(status(&store, id).await, Status::Pending, "{id}");
    }
    assert_eq!(counters_of(&store, t.c).await, counters(1, 0, 0, 0));
    assert_eq!(counters_of(&store, t.b).await, counters(3, 2, 0, 0));
    assert_eq!(counters_of(&store, t.root).await, counters(2, 1, 0, 0));
    let again = claim_kinds(&store, &["inner"]).await;
    finish(&store, &again[0], Outcome::Failed("flaky again".into())).await;
    assert_eq!(status(&store, t.root).await, Status::Failed);

    // Retrying the root re-queues it from every level.
    assert_eq!(store.retry_batch(t.root).await.unwrap(), 1);
    assert_eq!(counters_of(&store, t.root).await, counters(2, 1, 0, 0));
    let again = claim_kinds(&store, &["inner"]).await;
    assert_eq!(ids(&again), HashSet::from([t.c1]));
    complete(&store, &again).await;
    let root = store.get(t.root).await.unwrap().unwrap();
    assert_eq!(root.status, Status::Completed);
    assert_eq!(root.error, None);
    assert_eq!(root.children, Some(counters(2, 2, 0, 0)));
    assert!(matches!(
        store.retry_batch(t.root).await,
        Err(Error::Conflict(_))
    ));
}

/// Operations wait across the tree: for a nested batch (released when it ends — a
/// failed one cancels what needed it completed, naming it) and for an operation of an
/// outer batch.
pub async fn dependencies_cross_the_tree(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [root, inner, prepare, work, report, cleanup] = [(); 6].map(|_| OperationId::new());
    queue
        .submit_batch(
            NewBatch::new("pipeline")
                .with_id(root)
                .child(op("prepare", prepare))
                .child(op("report", report).after(&[inner]))
                .child(op("cleanup", cleanup).after_any(&[inner]))
                .child_batch(
                    NewBatch::new("fan_out")
                        .with_id(inner)
                        .child(op("work", work).after(&[prepare])),
                ),
        )
        .await
        .unwrap();
    assert_eq!(store.get(report).await.unwrap().unwrap().waiting_on, 1);
    let first = claim_kinds(&store, &["prepare", "work", "report", "cleanup"]).await;
    assert_eq!(
        ids(&first),
        HashSet::from([prepare]),
        "everything else waits"
    );
    complete(&store, &first).await;
    let second = claim_kinds(&store, &["prepare", "work", "report", "cleanup"]).await;
    assert_eq!(ids(&second), HashSet::from([work]));
    finish(&store, &second[0], Outcome::Failed("no luck".into())).await;
    assert_eq!(status(&store, inner).await, Status::Failed);
    let report_row = store.get(report).await.unwrap().unwrap();
    assert_eq!(report_row.status, Status::Cancelled);
    assert_eq!(
        report_row.error.as_deref(),
        Some(messages::cancelled_by_dependency(inner, Status::Failed).as_str())
    );
    let last = claim_kinds(&store, &["prepare", "work", "report", "cleanup"]).await;
    assert_eq!(
        ids(&last),
        HashSet::from([cleanup]),
        "after_any runs anyway"
    );
    complete(&store, &last).await;
    let parent = store.get(root).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(parent.children, Some(counters(4, 2, 1, 1)));
}

/// Bad trees are refused with `InvalidInput` naming what is wrong, and nothing is
/// written: nesting deeper than [`MAX_BATCH_DEPTH`], an empty nested batch, an id used
/// twice across levels, an operation waiting for the batch it is in.
pub async fn invalid_trees_are_refused(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let leaf = || NewOperation::new("leaf", json!(null));
    let mut deep = NewBatch::new("level").child(leaf());
    for _ in 1..=MAX_BATCH_DEPTH {
        deep = NewBatch::new("level").child(leaf()).child_batch(deep);
    }
    let twice = OperationId::new();
    let holder = OperationId::new();
    let root = OperationId::new();
    let cases: Vec<(NewBatch, String)> = vec![
        (deep, format!("at most {MAX_BATCH_DEPTH} levels")),
        (
            NewBatch::new("outer")
                .child(leaf())
                .child_batch(NewBatch::new("hollow")),
            "`hollow` has no children".into(),
        ),
        (
            NewBatch::new("outer")
                .child(leaf().with_id(twice))
                .child_batch(NewBatch::new("inner").child(leaf().with_id(twice))),
            format!("repeats id {twice}"),
        ),
        (
            NewBatch::new("outer").child(leaf()).child_batch(
                NewBatch::new("inner")
                    .with_id(holder)
                    .child(leaf().after(&[holder])),
            ),
            "cycle".into(),
        ),
        (
            NewBatch::new("outer")
                .with_id(root)
                .child_batch(NewBatch::new("inner").child(leaf().after(&[root]))),
            format!("waits for {root}"),
        ),
    ];
    for (batch, expected) in cases {
        match queue.submit_batch(batch).await {
            Err(Error::InvalidInput(message)) => {
                assert!(
                    message.contains(&expected),
                    "{message:?} lacks {expected:?}"
                )
            }
            other => panic!("expected InvalidInput naming {expected:?}, got {other:?}"),
        }
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.batches.total(), stats.work().total()),
        (0, 0),
        "a refused tree wrote something: {stats:?}"
    );
}

/// The reconciler drives a stranded nested batch — here one inserted with no child — to
/// its end and counts it into the batch holding it, which ends in the same pass.
pub async fn the_reconciler_counts_a_nested_batch_into_its_parent(store: Arc<dyn Store>) {
    let record = |id: OperationId, parent_id: Option<OperationId>| ParentRecord {
        id,
        kind: "stranded".into(),
        metadata: Value::Null,
        children_total: 0,
        created_at: Utc::now(),
        plan: BatchPlan::default(),
        parent_id,
        dependents: Vec::new(),
    };
    let (outer, inner) = (OperationId::new(), OperationId::new());
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&record(outer, None)).await.unwrap();
    tx.insert_parent(&record(inner, Some(outer))).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        counters_of(&store, outer).await.total,
        1,
        "the nested batch is a child"
    );
    let report = store.reconcile_orphan_parents().await.unwrap();
    assert_eq!(report.empty_parents_failed, 1, "{report:?}");
    let inner_row = store.get(inner).await.unwrap().unwrap();
    assert_eq!(
        (inner_row.status, inner_row.error.as_deref()),
        (Status::Failed, Some(ZERO_CHILDREN_REASON))
    );
    let outer_row = store.get(outer).await.unwrap().unwrap();
    assert_eq!(outer_row.status, Status::Failed);
    assert_eq!(outer_row.children, Some(counters(1, 0, 1, 0)));
    assert_eq!(outer_row.error.as_deref(), Some(ZERO_CHILDREN_REASON));
}

/// A nested batch's row names a batch of the same transaction, like a child's.
pub async fn a_nested_batch_joins_only_a_batch_of_its_transaction(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let existing = queue
        .submit_batch(NewBatch::new("done").child(NewOperation::new("leaf", json!(1))))
        .await
        .unwrap();
    let mut tx = store.begin().await.unwrap();
    let stray = ParentRecord {
        id: OperationId::new(),
        kind: "stray".into(),
        metadata: Value::Null,
        children_total: 0,
        created_at: Utc::now(),
        plan: BatchPlan::default(),
        parent_id: Some(existing.parent_id),
        dependents: Vec::new(),
    };
    assert!(matches!(
        tx.insert_parent(&stray).await,
        Err(Error::InvalidInput(_))
    ));
    drop(tx);
    assert!(store.get(stray.id).await.unwrap().is_none());
    assert_eq!(counters_of(&store, existing.parent_id).await.total, 1);
}

/// Prune deletes whole trees, never a nested batch alone: a finished nested batch of an
/// open tree stays.
pub async fn prune_removes_whole_trees(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    let inner = claim_kinds(&store, &["inner"]).await;
    complete(&store, &inner).await;
    assert_eq!(status(&store, t.c).await, Status::Completed);
    let later = Utc::now() + TimeDelta::hours(1);
    let report = store.prune(later).await.unwrap();
    assert!(report.is_empty(), "pruned part of an open tree: {report:?}");
    assert!(store.get(t.c1).await.unwrap().is_some());
    complete(&store, &claim_kinds(&store, &["outer", "middle"]).await).await;
    assert_eq!(status(&store, t.root).await, Status::Completed);
    let report = store.prune(later).await.unwrap();
    assert_eq!((report.batches, report.operations), (3, 4), "{report:?}");
    for id in [t.root, t.b, t.c, t.r1, t.b1, t.b2, t.c1] {
        assert!(
            store.get(id).await.unwrap().is_none(),
            "{id} survived the prune"
        );
    }
}

/// The last operations of two different nested batches finish at the same moment on two
/// workers: each nested batch ends once, the root ends once, and its callback is inserted
/// once.
pub async fn last_children_of_two_nested_batches_race(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..10 {
        let (x, y) = (OperationId::new(), OperationId::new());
        let receipt = queue
            .submit_batch(
                NewBatch::new("race")
                    .with_failure_policy(if round % 2 == 0 {
                        FailurePolicy::WaitAll
                    } else {
                        FailurePolicy::FailFast
                    })
                    .child_batch(NewBatch::new("left").child(op("left", x)))
                    .child_batch(NewBatch::new("right").child(op("right", y)))
                    .on_complete(NewOperation::new("race_done", json!(round))),
            )
            .await
            .unwrap();
        let left = claim_kinds(&store, &["left"]).await;
        let right = claim_kinds(&store, &["right"]).await;
        let (a, b) = (Arc::clone(&store), Arc::clone(&store));
        let (l, r) = (left[0].clone(), right[0].clone());
        let failing = round % 3 == 0;
        let (first, second) = tokio::join!(
            tokio::spawn(async move {
                let outcome = if failing {
                    Outcome::Failed("left broke".into())
                } else {
                    Outcome::Completed(json!(1))
                };
                finish(&a, &l, outcome).await
            }),
            tokio::spawn(async move { finish(&b, &r, Outcome::Completed(json!(2))).await })
        );
        assert_eq!(first.unwrap(), Applied::Applied);
        assert_eq!(second.unwrap(), Applied::Applied);
        let root = store.get(receipt.parent_id).await.unwrap().unwrap();
        let expected = if failing {
            Status::Failed
        } else {
            Status::Completed
        };
        assert_eq!(root.status, expected, "round {round}");
        assert_eq!(root.children.unwrap().terminal(), 2, "round {round}");
        let callbacks = claim_kinds(&store, &["race_done"]).await;
        assert_eq!(
            callbacks.len(),
            1,
            "round {round}: the callback fired {} times",
            callbacks.len()
        );
        complete(&store, &callbacks).await;
    }
}

/// The deepest tree allowed ([`MAX_BATCH_DEPTH`] levels, one operation each): its deepest
/// operation ending ends every level in that one transaction — completed under
/// `WaitAll`, failed level after level (each a `FailFast` step) when it fails.
pub async fn the_deepest_tree_allowed_ends_in_one_step(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for (policy, outcome, expected) in [
        (
            FailurePolicy::WaitAll,
            Outcome::Completed(json!(1)),
            Status::Completed,
        ),
        (
            FailurePolicy::FailFast,
            Outcome::Failed("deep down".into()),
            Status::Failed,
        ),
    ] {
        let levels: Vec<OperationId> = (0..MAX_BATCH_DEPTH).map(|_| OperationId::new()).collect();
        let leaf = OperationId::new();
        let mut tree = NewBatch::new("level")
            .with_id(levels[MAX_BATCH_DEPTH - 1])
            .with_failure_policy(policy)
            .child(op("deepest", leaf));
        for &id in levels[..MAX_BATCH_DEPTH - 1].iter().rev() {
            tree = NewBatch::new("level")
                .with_id(id)
                .with_failure_policy(policy)
                .child(NewOperation::new("shallow", json!(null)))
                .child_batch(tree);
        }
        queue.submit_batch(tree).await.unwrap();
        complete(&store, &claim_kinds(&store, &["shallow"]).await).await;
        for &id in &levels {
            assert_eq!(status(&store, id).await, Status::Pending);
        }
        let deepest = claim_kinds(&store, &["deepest"]).await;
        assert_eq!(finish(&store, &deepest[0], outcome).await, Applied::Applied);
        for &id in &levels {
            let batch = store.get(id).await.unwrap().unwrap();
            assert_eq!(batch.status, expected, "level {id}");
            if expected == Status::Failed {
                assert_eq!(batch.error.as_deref(), Some("deep down"));
            }
        }
    }
}

/// `retry_batch` of a nested batch is refused (`Conflict`, naming both, nothing changed)
/// when it would re-queue an operation that needs completed something outside the
/// nested batch that ended otherwise — it could never run; retrying the root re-queues
/// both, in their order.
pub async fn retry_batch_never_strands_a_dependent(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [root, inner, prepare, work] = [(); 4].map(|_| OperationId::new());
    queue
        .submit_batch(
            NewBatch::new("pipeline")
                .with_id(root)
                .child(op("prepare", prepare))
                .child_batch(
                    NewBatch::new("fan_out")
                        .with_id(inner)
                        .child(op("work", work).after(&[prepare])),
                ),
        )
        .await
        .unwrap();
    let first = claim_kinds(&store, &["prepare"]).await;
    finish(&store, &first[0], Outcome::Failed("no input".into())).await;
    assert_eq!(status(&store, work).await, Status::Cancelled);
    assert_eq!(status(&store, root).await, Status::Failed);
    match store.retry_batch(inner).await {
        Err(Error::Conflict(message)) => assert_eq!(
            message,
            messages::retry_strands_a_dependent(inner, work, prepare, Status::Failed)
        ),
        other => panic!("expected a Conflict, got {other:?}"),
    }
    for (id, expected) in [
        (work, Status::Cancelled),
        (inner, Status::Cancelled),
        (root, Status::Failed),
    ] {
        assert_eq!(
            status(&store, id).await,
            expected,
            "the refused retry changed {id}"
        );
    }
    assert_eq!(store.retry_batch(root).await.unwrap(), 2);
    let work_row = store.get(work).await.unwrap().unwrap();
    assert_eq!((work_row.status, work_row.waiting_on), (Status::Pending, 1));
    assert_eq!(status(&store, inner).await, Status::Pending);
    let again = claim_kinds(&store, &["prepare", "work"]).await;
    assert_eq!(ids(&again), HashSet::from([prepare]));
    complete(&store, &again).await;
    complete(&store, &claim_kinds(&store, &["work"]).await).await;
    assert_eq!(status(&store, root).await, Status::Completed);

    // A dependency inside the retried tree — a nested batch that reopens with it — is no
    // reason to refuse.
    let [outer, nested, flaky, after] = [(); 4].map(|_| OperationId::new());
    queue
        .submit_batch(
            NewBatch::new("outer")
                .with_id(outer)
                .child(op("after", after).after(&[nested]))
                .child_batch(
                    NewBatch::new("nested")
                        .with_id(nested)
                        .child(op("flaky", flaky)),
                ),
        )
        .await
        .unwrap();
    let first = claim_kinds(&store, &["flaky"]).await;
    finish(&store, &first[0], Outcome::Failed("once".into())).await;
    assert_eq!(status(&store, after).await, Status::Cancelled);
    assert_eq!(store.retry_batch(outer).await.unwrap(), 2);
    assert_eq!(store.get(after).await.unwrap().unwrap().waiting_on, 1);
    complete(&store, &claim_kinds(&store, &["flaky", "after"]).await).await;
    complete(&store, &claim_kinds(&store, &["after"]).await).await;
    assert_eq!(status(&store, outer).await, Status::Completed);
}

/// Resubmitting with the id of a nested batch of another tree is a `Conflict`, never that
/// nested batch returned as if it were the batch asked for.
pub async fn a_nested_batch_id_is_not_a_batch_to_resubmit(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let t = Tree::new();
    queue
        .submit_batch(t.batch(FailurePolicy::WaitAll))
        .await
        .unwrap();
    let again = NewBatch::new("middle_batch")
        .with_id(t.b)
        .child(NewOperation::new("middle", json!(1)));
    match queue.submit_batch(again).await {
        Err(Error::Conflict(message)) => {
            assert!(message.contains(&t.root.to_string()), "{message}")
        }
        other => panic!("expected a Conflict, got {other:?}"),
    }
    assert_eq!(counters_of(&store, t.b).await.total, 3);
}

/// `cancel` of a tree is one step on every driver, also when a nested batch it ends
/// fails (it had a failed operation) under a `FailFast` root: every pending operation
/// is cancelled as cancelled before it ran — none by a fail-fast started half-way — and
/// the report counts them all.
pub async fn cancelling_a_fail_fast_tree_is_one_step(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [root, left, right, x, y1, y2] = [(); 6].map(|_| OperationId::new());
    queue
        .submit_batch(
            NewBatch::new("root")
                .with_id(root)
                .with_failure_policy(FailurePolicy::FailFast)
                .child_batch(NewBatch::new("left").with_id(left).child(op("x", x)))
                .child_batch(
                    NewBatch::new("right")
                        .with_id(right)
                        .child(op("y1", y1))
                        .child(op("y2", y2)),
                ),
        )
        .await
        .unwrap();
    let first = claim_kinds(&store, &["y1"]).await;
    finish(&store, &first[0], Outcome::Failed("y1 broke".into())).await;
    assert_eq!(status(&store, right).await, Status::Pending);
    let report = store.cancel(root).await.unwrap();
    assert_eq!(
        (report.cancelled, report.signalled, report.already_terminal),
        (2, 0, 1)
    );
    for id in [x, y2] {
        let row = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.error.as_deref()),
            (Status::Cancelled, Some(messages::CANCELLED_BEFORE_RUN)),
            "{id}"
        );
    }
    assert_eq!(status(&store, left).await, Status::Cancelled);
    assert_eq!(status(&store, right).await, Status::Failed);
    let root_row = store.get(root).await.unwrap().unwrap();
    assert_eq!(
        (root_row.status, root_row.error.as_deref()),
        (Status::Failed, Some("y1 broke"))
    );
}
