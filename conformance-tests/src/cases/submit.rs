//! Submitting: atomic batches, validation, idempotency, notification order.

use std::collections::HashSet;
use std::sync::Arc;

use fascicle_api::chrono::{Duration, Utc};
use fascicle_api::{
    BackendErrorKind, ChildRecord, Error, InlineExecutor, Limits, NewBatch, NewOperation, Notifier,
    OperationId, Queue, Status, Store,
};
use serde_json::{Value, json};

use super::lifecycle::request;
use crate::faults::{FailingNotifier, FaultPlan, FaultyStore};

/// How long a case waits, after a write failed or was abandoned, before it looks again:
/// long enough for a commit that a broken store runs late, in the background, to land.
const LATE_WRITE_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// How long another caller's claim may wait for an open transaction (a single-writer
/// backend queues it behind the writer) before the case stops waiting: waiting is
/// allowed, handing out an uncommitted row is not.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

fn batch_of(kind: &str, n: usize) -> NewBatch {
    NewBatch::new(kind)
        .with_metadata(json!({ "source": "conformance", "children": n }))
        .children((0..n).map(|i| {
            NewOperation::new(
                "retain",
                json!({ "index": i, "text": format!("document {i}") }),
            )
        }))
}

/// A batch whose every id is chosen up front, so a failed submit can be checked for
/// leftovers by id.
fn batch_with_ids(n: usize) -> (NewBatch, OperationId, Vec<OperationId>) {
    let parent = OperationId::new();
    let ids: Vec<OperationId> = (0..n).map(|_| OperationId::new()).collect();
    let batch = NewBatch::new("batch_retain").with_id(parent).children(
        ids.iter()
            .enumerate()
            .map(|(i, id)| NewOperation::new("retain", json!({ "index": i })).with_id(*id)),
    );
    (batch, parent, ids)
}

fn faulty(store: &Arc<dyn Store>, plan: FaultPlan) -> Arc<dyn Store> {
    Arc::new(FaultyStore::new(Arc::clone(store), plan))
}

fn assert_injected(result: fascicle_api::Result<impl std::fmt::Debug>) {
    match result {
        Err(Error::Backend {
            kind: BackendErrorKind::Injected,
            ..
        }) => {}
        other => panic!("expected the injected failure to surface, got {other:?}"),
    }
}

/// Nothing with these ids exists, and the store holds no work and no batch at all.
async fn assert_nothing_stored(
    store: &Arc<dyn Store>,
    parent: OperationId,
    children: &[OperationId],
) {
    assert_absent(store, Some(parent), children, (0, 0), "").await;
}

/// None of a failed write's rows exists — its batch `parent` (if any, with no children
/// either) and the operations `ids` — and `stats` counts exactly `expected` (work,
/// batches): what the case committed besides, nothing more.
async fn assert_absent(
    store: &Arc<dyn Store>,
    parent: Option<OperationId>,
    ids: &[OperationId],
    expected: (u64, u64),
    when: &str,
) {
    if let Some(parent) = parent {
        assert!(
            store.get(parent).await.unwrap().is_none(),
            "parent {parent} survived a failed batch{when}"
        );
        assert!(
            store.children_of(parent).await.unwrap().is_empty(),
            "the failed batch {parent} has children{when}"
        );
    }
    let (what, failed) = match parent {
        Some(_) => ("child", "batch"),
        None => ("operation", "write"),
    };
    for id in ids {
        assert!(
            store.get(*id).await.unwrap().is_none(),
            "{what} {id} survived a failed {failed}{when}"
        );
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats.work().total(),
        expected.0,
        "work rows left behind{when}: {stats:?}"
    );
    assert_eq!(
        stats.batches.total(),
        expected.1,
        "parents left behind{when}: {stats:?}"
    );
}

/// Yields, waits [`LATE_WRITE_WAIT`] and yields again: gives a task that a broken store
/// left behind (a late commit of an abandoned transaction) every chance to run.
async fn let_late_writes_land() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(LATE_WRITE_WAIT).await;
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// Looked at again after a while ([`let_late_writes_land`]): the failed write's rows are
/// still absent and the store still holds exactly `expected` (work, batches) — a case
/// that looks only once, at once, misses a leak that lands moments later.
pub(crate) async fn assert_still_nothing_stored_after_a_while(
    store: &Arc<dyn Store>,
    parent: Option<OperationId>,
    ids: &[OperationId],
    expected: (u64, u64),
) {
    let_late_writes_land().await;
    let when = format!(
        " (found when looking again {} ms later: committed late, in the background?)",
        LATE_WRITE_WAIT.as_millis()
    );
    assert_absent(store, parent, ids, expected, &when).await;
}

/// What another caller sees while a transaction holding `parent` (if any) and `ids` is
/// open: none of them by `get`, no child by `children_of`, nothing at all in `stats`
/// (the store holds nothing else), and nothing handed out by a claim (given
/// [`CLAIM_PATIENCE`]: a claim that waits for the writer sees nothing either).
async fn assert_invisible_to_other_callers(
    store: &Arc<dyn Store>,
    parent: Option<OperationId>,
    ids: &[OperationId],
    when: &str,
) {
    let reader = Arc::clone(store);
    let ids = ids.to_vec();
    let seen = tokio::spawn(async move {
        let mut visible = Vec::new();
        for id in parent.iter().chain(&ids) {
            if reader.get(*id).await.unwrap().is_some() {
                visible.push(*id);
            }
        }
        let children = match parent {
            Some(parent) => reader.children_of(parent).await.unwrap().len(),
            None => 0,
        };
        let stats = reader.stats().await.unwrap();
        let claimed: Vec<OperationId> =
            match tokio::time::timeout(CLAIM_PATIENCE, reader.claim(&request(100))).await {
                Ok(Ok(claimed)) => claimed.into_iter().map(|c| c.operation.id).collect(),
                Ok(Err(e)) if e.is_transient() => Vec::new(),
                Ok(Err(e)) => panic!("a claim beside an open transaction failed: {e}"),
                // Queued behind the open transaction: it saw nothing.
                Err(_) => Vec::new(),
            };
        (
            visible,
            children,
            stats.work().total(),
            stats.batches.total(),
            claimed,
        )
    })
    .await
    .unwrap();
    assert_eq!(
        seen,
        (Vec::new(), 0, 0, 0, Vec::new()),
        "uncommitted rows were visible {when} (by get, children_of, work and batch \
         statistics, claim)"
    );
}

async fn assert_batch_stored(
    store: &Arc<dyn Store>,
    parent: OperationId,
    children: &[OperationId],
) {
    let stored = store
        .get(parent)
        .await
        .unwrap()
        .expect("committed parent is missing");
    assert!(stored.is_parent());
    assert_eq!(stored.children.unwrap().total, children.len() as u64);
    let stored_children: Vec<OperationId> = store
        .children_of(parent)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(
        stored_children, children,
        "children missing or out of order"
    );
}

/// A committed batch: parent and children readable, children in insertion order, every
/// field as submitted.
pub async fn batch_commit_makes_parent_and_children_visible(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(batch_of("batch_retain", 3))
        .await
        .unwrap();
    assert!(receipt.created && receipt.notified);
    assert_eq!(receipt.child_ids.len(), 3);

    let parent = store.get(receipt.parent_id).await.unwrap().expect("parent");
    assert_eq!(parent.kind, "batch_retain");
    assert_eq!(parent.status, Status::Pending);
    assert_eq!(parent.parent_id, None);
    let counters = parent.children.expect("a parent carries child counters");
    assert_eq!((counters.total, counters.terminal()), (3, 0));

    let children = store.children_of(receipt.parent_id).await.unwrap();
    let ids: Vec<OperationId> = children.iter().map(|c| c.id).collect();
    assert_eq!(
        ids, receipt.child_ids,
        "children_of must follow insertion order"
    );
    for (i, child) in children.iter().enumerate() {
        assert_eq!(child.kind, "retain");
        assert_eq!(child.status, Status::Pending);
        assert_eq!(child.parent_id, Some(receipt.parent_id));
        assert_eq!(
            child.payload,
            Some(json!({ "index": i, "text": format!("document {i}") }))
        );
        assert_eq!(child.attempts, 0);
        assert_eq!(child.max_attempts, fascicle_api::DEFAULT_MAX_ATTEMPTS);
        assert!(child.children.is_none() && child.completed_at.is_none());
        let fetched = store.get(child.id).await.unwrap().expect("child by id");
        assert_eq!(&fetched, child);
    }
}

/// The 2nd of 3 children fails to insert: no row at all remains, the parent included —
/// at once and a while later, while a fresh batch commits beside it — and only then are
/// the same ids submitted again, creating the batch.
pub async fn rollback_on_child_failure(store: Arc<dyn Store>) {
    let (batch, parent, children) = batch_with_ids(3);
    let broken = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_child: Some(2),
            ..FaultPlan::default()
        },
    ));
    assert_injected(broken.submit_batch(batch.clone()).await);
    assert_nothing_stored(&store, parent, &children).await;

    // The store stays usable: a batch with fresh ids commits at once.
    let queue = Queue::new(Arc::clone(&store));
    let fresh = queue
        .submit_batch(batch_of("batch_retain", 2))
        .await
        .unwrap();
    assert!(fresh.created);
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &children, (2, 1)).await;

    // With nothing left behind, the failed batch's own ids are free.
    let receipt = queue.submit_batch(batch).await.unwrap();
    assert!(
        receipt.created,
        "resubmitting the failed batch's ids found a batch already stored"
    );
    assert_batch_stored(&store, parent, &children).await;
}

/// The very first child fails: the parent, already inserted, is rolled back too — and
/// stays absent a while later.
pub async fn rollback_on_first_child_failure(store: Arc<dyn Store>) {
    let (batch, parent, children) = batch_with_ids(4);
    let broken = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_child: Some(1),
            ..FaultPlan::default()
        },
    ));
    assert_injected(broken.submit_batch(batch).await);
    assert_nothing_stored(&store, parent, &children).await;
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &children, (0, 0)).await;
}

/// The commit fails: nothing is visible, at once or a while later, and the store stays
/// usable.
pub async fn rollback_on_commit_failure(store: Arc<dyn Store>) {
    let (batch, parent, children) = batch_with_ids(3);
    let broken = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_commit: true,
            ..FaultPlan::default()
        },
    ));
    assert_injected(broken.submit_batch(batch).await);
    assert_nothing_stored(&store, parent, &children).await;
    let fresh = Queue::new(Arc::clone(&store))
        .submit_batch(batch_of("batch_retain", 2))
        .await
        .unwrap();
    assert!(fresh.created);
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &children, (2, 1)).await;
    assert_batch_stored(&store, fresh.parent_id, &fresh.child_ids).await;
}

async fn insert_by_hand(
    store: &Arc<dyn Store>,
    n: usize,
) -> (
    Box<dyn fascicle_api::Transaction>,
    OperationId,
    Vec<OperationId>,
) {
    let now = Utc::now();
    let parent = fascicle_api::ParentRecord {
        id: OperationId::new(),
        kind: "batch_retain".into(),
        metadata: Value::Null,
        children_total: n as u64,
        created_at: now,
        plan: Default::default(),
        parent_id: None,
        dependents: Vec::new(),
    };
    let children: Vec<fascicle_api::ChildRecord> = (0..n)
        .map(|i| fascicle_api::ChildRecord {
            id: OperationId::new(),
            parent_id: Some(parent.id),
            kind: "retain".into(),
            payload: json!({ "index": i }),
            payload_json: json!({ "index": i }).to_string(),
            priority: 0,
            run_at: now,
            serialization_key: None,
            max_attempts: 3,
            created_at: now,
            timeout: None,
            after: Vec::new(),
            dependents: Vec::new(),
        })
        .collect();
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&parent).await.unwrap();
    tx.insert_child(&children[0]).await.unwrap();
    tx.insert_children(&children[1..]).await.unwrap();
    let ids = children.iter().map(|c| c.id).collect();
    (tx, parent.id, ids)
}

/// Dropping an uncommitted transaction discards everything it inserted, for good.
pub async fn dropped_transaction_rolls_back(store: Arc<dyn Store>) {
    let (tx, parent, children) = insert_by_hand(&store, 5).await;
    drop(tx);
    assert_nothing_stored(&store, parent, &children).await;
    // The store is usable again at once (a dropped transaction released its lock).
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(batch_of("batch_retain", 2))
        .await
        .unwrap();
    assert_eq!(store.children_of(receipt.parent_id).await.unwrap().len(), 2);
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &children, (2, 1)).await;
}

/// An explicit rollback discards everything inserted, for good.
pub async fn explicit_rollback(store: Arc<dyn Store>) {
    let (tx, parent, children) = insert_by_hand(&store, 5).await;
    tx.rollback().await.unwrap();
    assert_nothing_stored(&store, parent, &children).await;
    let (tx, kept, kept_children) = insert_by_hand(&store, 2).await;
    tx.commit().await.unwrap();
    assert_batch_stored(&store, kept, &kept_children).await;
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &children, (2, 1)).await;
}

/// Rows inserted in an open transaction are invisible to `get`, `children_of`, `stats`
/// and `claim` until the commit returns — at once and a while later; then all of them
/// appear at once.
pub async fn uncommitted_rows_are_invisible_to_other_callers(store: Arc<dyn Store>) {
    let (tx, parent, children) = insert_by_hand(&store, 4).await;
    assert_invisible_to_other_callers(&store, Some(parent), &children, "before the commit").await;
    let_late_writes_land().await;
    assert_invisible_to_other_callers(
        &store,
        Some(parent),
        &children,
        "a while later, still before the commit",
    )
    .await;
    tx.commit().await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().ready, 4);
    assert_eq!(stats.batches.open, 1);
    assert_eq!(store.children_of(parent).await.unwrap().len(), 4);
}

/// Notifiers run after the commit: an inline executor reads every notified child back.
pub async fn notify_runs_after_commit(store: Arc<dyn Store>) {
    let executor = Arc::new(InlineExecutor::new(Arc::clone(&store)));
    let queue = Queue::new(Arc::clone(&store)).with_notifier(executor.clone());
    let receipt = queue
        .submit_batch(batch_of("batch_retain", 3))
        .await
        .unwrap();
    assert!(
        receipt.notified,
        "the inline executor could not see the committed rows"
    );
    let seen = executor.seen();
    let ids: Vec<OperationId> = seen.iter().map(|op| op.id).collect();
    assert_eq!(ids, receipt.child_ids);
    for op in &seen {
        assert_eq!(op.parent_id, Some(receipt.parent_id));
        assert_eq!(op.status, Status::Pending);
    }
}

/// A submit that fails before its commit notifies nobody.
pub async fn notify_not_called_when_submit_fails(store: Arc<dyn Store>) {
    let executor = Arc::new(InlineExecutor::new(Arc::clone(&store)));
    let queue = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_child: Some(2),
            ..FaultPlan::default()
        },
    ))
    .with_notifier(executor.clone());
    assert_injected(queue.submit_batch(batch_of("batch_retain", 3)).await);
    assert!(
        executor.seen().is_empty(),
        "a failed submit notified workers"
    );
    let queue = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_commit: true,
            ..FaultPlan::default()
        },
    ))
    .with_notifier(executor.clone());
    assert_injected(queue.submit_batch(batch_of("batch_retain", 3)).await);
    assert!(
        executor.seen().is_empty(),
        "a failed commit notified workers"
    );
}

/// A notifier failing after the commit loses nothing: the rows stay, pending and ready.
pub async fn notify_failure_keeps_the_batch(store: Arc<dyn Store>) {
    let failing: Arc<dyn Notifier> = Arc::new(FailingNotifier);
    let queue = Queue::new(Arc::clone(&store)).with_notifier(failing);
    let receipt = queue
        .submit_batch(batch_of("batch_retain", 3))
        .await
        .unwrap();
    assert!(!receipt.notified);
    assert_batch_stored(&store, receipt.parent_id, &receipt.child_ids).await;
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().ready, 3);
    for id in &receipt.child_ids {
        assert_eq!(
            store.get(*id).await.unwrap().unwrap().status,
            Status::Pending
        );
    }
}

/// The parent is an aggregator: no payload, its metadata kept; every child has one.
pub async fn parent_has_no_payload(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(batch_of("batch_retain", 2))
        .await
        .unwrap();
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.payload, None);
    assert_eq!(
        parent.metadata,
        Some(json!({ "source": "conformance", "children": 2 }))
    );
    for child in store.children_of(receipt.parent_id).await.unwrap() {
        assert!(child.payload.is_some() && !child.is_parent());
    }
}

/// Queue depth counts children and stand-alone operations only; parents are batches.
pub async fn stats_do_not_count_parents_as_work(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    queue
        .submit_batch(batch_of("batch_retain", 3))
        .await
        .unwrap();
    queue
        .submit_batch(batch_of("batch_retain", 3))
        .await
        .unwrap();
    queue
        .submit(NewOperation::new("consolidate", json!({})))
        .await
        .unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total(), 7);
    assert_eq!(stats.work().ready, 7);
    assert_eq!(stats.batches.open, 2);
    assert_eq!(stats.batches.total(), 2);
    assert!(
        !stats.kinds.contains_key("batch_retain"),
        "a parent kind was counted as work: {stats:?}"
    );
    assert_eq!(stats.kinds["retain"].ready, 6);
    assert_eq!(stats.kinds["consolidate"].ready, 1);
}

/// An operation scheduled in the future is `scheduled`, not `ready`, and keeps its
/// `run_at`.
pub async fn scheduled_operations_are_not_ready(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let later = Utc::now() + Duration::hours(1);
    let receipt = queue
        .submit_batch(
            NewBatch::new("batch")
                .child(NewOperation::new("retain", json!({})))
                .child(NewOperation::new("retain", json!({})).with_run_at(later)),
        )
        .await
        .unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.kinds["retain"].ready, stats.kinds["retain"].scheduled),
        (1, 1)
    );
    let scheduled = store.get(receipt.child_ids[1]).await.unwrap().unwrap();
    let drift = (scheduled.run_at - later).num_microseconds().unwrap().abs();
    assert!(
        drift <= 1,
        "run_at not kept: {} vs {later}",
        scheduled.run_at
    );
}

fn assert_invalid(result: fascicle_api::Result<impl std::fmt::Debug>, needle: &str) {
    match result {
        Err(Error::InvalidInput(message)) => assert!(
            message.contains(needle),
            "error `{message}` does not mention `{needle}`"
        ),
        other => panic!("expected InvalidInput mentioning `{needle}`, got {other:?}"),
    }
}

async fn assert_store_empty(store: &Arc<dyn Store>) {
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total() + stats.batches.total(), 0, "{stats:?}");
}

/// A batch with no children is refused and writes nothing.
pub async fn empty_batch_rejected_nothing_written(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = OperationId::new();
    assert_invalid(
        queue
            .submit_batch(NewBatch::new("batch_retain").with_id(id))
            .await,
        "no children",
    );
    assert!(store.get(id).await.unwrap().is_none());
    assert_store_empty(&store).await;
}

/// A payload over the limit is refused, naming the child; one at the limit is taken.
pub async fn oversized_payload_rejected(store: Arc<dyn Store>) {
    let default_queue = Queue::new(Arc::clone(&store));
    let huge = "x".repeat(1024 * 1024);
    assert_invalid(
        default_queue
            .submit_batch(
                NewBatch::new("batch")
                    .child(NewOperation::new("retain", json!({})))
                    .child(NewOperation::new("retain", json!(huge))),
            )
            .await,
        "child #1 payload",
    );
    assert_store_empty(&store).await;

    let limit = 64;
    let queue = Queue::new(Arc::clone(&store)).with_limits(Limits {
        max_payload_bytes: limit,
        ..Limits::default()
    });
    // A JSON string of n characters serializes to n + 2 bytes.
    let at_limit = json!("y".repeat(limit - 2));
    let over_limit = json!("y".repeat(limit - 1));
    assert_invalid(
        queue.submit(NewOperation::new("retain", over_limit)).await,
        "limit is 64",
    );
    assert_store_empty(&store).await;
    let receipt = queue
        .submit(NewOperation::new("retain", at_limit.clone()))
        .await
        .unwrap();
    let stored = store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(stored.payload, Some(at_limit));
}

/// Two children with the same id are refused before anything is written.
pub async fn duplicate_child_ids_rejected(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let dup = OperationId::new();
    assert_invalid(
        queue
            .submit_batch(
                NewBatch::new("batch")
                    .child(NewOperation::new("retain", json!(1)).with_id(dup))
                    .child(NewOperation::new("retain", json!(2)))
                    .child(NewOperation::new("retain", json!(3)).with_id(dup)),
            )
            .await,
        "child #2 repeats id",
    );
    assert!(store.get(dup).await.unwrap().is_none());
    let parent = OperationId::new();
    assert_invalid(
        queue
            .submit_batch(
                NewBatch::new("batch")
                    .with_id(parent)
                    .child(NewOperation::new("retain", json!(1)).with_id(parent)),
            )
            .await,
        "repeats id",
    );
    assert_store_empty(&store).await;
}

/// Empty kinds, NUL characters and zero attempts are refused with a typed error.
pub async fn invalid_names_and_values_rejected(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    assert_invalid(
        queue.submit_batch(batch_of("", 1)).await,
        "batch kind is empty",
    );
    assert_invalid(
        queue
            .submit_batch(NewBatch::new("batch").child(NewOperation::new(" ", json!({}))))
            .await,
        "child #0 kind is empty",
    );
    assert_invalid(
        queue
            .submit(NewOperation::new(
                "retain",
                json!({ "text": "nul\u{0}inside" }),
            ))
            .await,
        "NUL",
    );
    assert_invalid(
        queue
            .submit(NewOperation::new("re\u{0}tain", json!({})))
            .await,
        "NUL",
    );
    assert_invalid(
        queue
            .submit(NewOperation::new("retain", json!({})).with_max_attempts(0))
            .await,
        "max_attempts",
    );
    assert_store_empty(&store).await;
}

/// A payload nested up to `MAX_JSON_DEPTH` is stored and read back (by `get` and by a
/// claim); one level deeper is refused with `InvalidInput` and writes nothing, instead
/// of storing a row no reader could parse.
pub async fn deeply_nested_payload_limit(store: Arc<dyn Store>) {
    fn nested(depth: usize) -> Value {
        let mut value = json!("leaf");
        for level in 0..depth {
            value = if level % 2 == 0 {
                json!([value])
            } else {
                json!({ "k": value })
            };
        }
        value
    }
    let queue = Queue::new(Arc::clone(&store));
    let deepest = nested(fascicle_api::MAX_JSON_DEPTH);
    let receipt = queue
        .submit(NewOperation::new("deep", deepest.clone()))
        .await
        .unwrap();
    let stored = store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(stored.payload.as_ref(), Some(&deepest));
    assert_invalid(
        queue
            .submit_batch(
                NewBatch::new("batch")
                    .child(NewOperation::new("deep", json!(1)))
                    .child(NewOperation::new(
                        "deep",
                        nested(fascicle_api::MAX_JSON_DEPTH + 1),
                    )),
            )
            .await,
        "child #1 payload nests arrays and objects more than",
    );
    assert_invalid(
        queue.submit(NewOperation::new("deep", nested(1_000))).await,
        "levels deep",
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.work().total(), stats.batches.total()), (1, 0));
    let claimed = store
        .claim(&fascicle_api::ClaimRequest {
            worker_id: "conformance".into(),
            limit: 10,
            lease: std::time::Duration::from_secs(30),
            kinds: None,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].operation.payload.as_ref(), Some(&deepest));
}

/// Unusual but valid text — control characters, a byte-order mark, astral-plane
/// characters, quotes and backslashes, right-to-left script — is stored and read back
/// unchanged, in payloads, kinds, metadata and serialization keys.
pub async fn unusual_text_round_trips(store: Arc<dyn Store>) {
    let text = "\u{1}\u{1f}\u{7f} \u{feff}bom \"quoted\" back\\slash 😀 \u{10ffff} שלום\n\ttab";
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("batch·ünïcode")
                .with_metadata(json!({ "note": text }))
                .child(
                    NewOperation::new("retain·😀", json!({ "text": text, text: [text] }))
                        .with_serialization_key(format!("key {text}")),
                ),
        )
        .await
        .unwrap();
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.kind, "batch·ünïcode");
    assert_eq!(parent.metadata, Some(json!({ "note": text })));
    let child = store.get(receipt.child_ids[0]).await.unwrap().unwrap();
    assert_eq!(child.kind, "retain·😀");
    assert_eq!(child.payload, Some(json!({ "text": text, text: [text] })));
    assert_eq!(child.serialization_key, Some(format!("key {text}")));
}

/// Resubmitting a caller-supplied parent id returns the existing batch; nothing is
/// duplicated.
pub async fn idempotent_submit_returns_existing_batch(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = OperationId::new();
    let first = queue
        .submit_batch(batch_of("batch_retain", 3).with_id(id))
        .await
        .unwrap();
    assert!(first.created);
    let again = queue
        .submit_batch(batch_of("batch_retain", 3).with_id(id))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.parent_id, id);
    assert_eq!(again.child_ids, first.child_ids);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.work().total(), stats.batches.total()), (3, 1));
}

/// Eight identical submits racing: exactly one creates the batch, all return it.
pub async fn concurrent_identical_submits_create_one_batch(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = OperationId::new();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                queue
                    .submit_batch(batch_of("batch_retain", 4).with_id(id))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    let mut child_sets = HashSet::new();
    for task in tasks {
        let receipt = task.await.unwrap().unwrap();
        assert_eq!(receipt.parent_id, id);
        created += usize::from(receipt.created);
        child_sets.insert(receipt.child_ids);
    }
    assert_eq!(created, 1, "more than one submit created the batch");
    assert_eq!(
        child_sets.len(),
        1,
        "submits disagree on the batch's children"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.work().total(), stats.batches.total()), (4, 1));
}

/// A child whose id another batch already uses fails the whole new batch.
pub async fn child_id_taken_by_another_batch_rolls_back(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let (first, first_parent, first_children) = batch_with_ids(2);
    queue.submit_batch(first).await.unwrap();
    let second_parent = OperationId::new();
    let fresh = OperationId::new();
    let result = queue
        .submit_batch(
            NewBatch::new("batch_retain")
                .with_id(second_parent)
                .child(NewOperation::new("retain", json!(0)).with_id(fresh))
                .child(NewOperation::new("retain", json!(1)).with_id(first_children[1])),
        )
        .await;
    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
    assert_absent(&store, Some(second_parent), &[fresh], (2, 1), "").await;
    assert_batch_stored(&store, first_parent, &first_children).await;
    assert_still_nothing_stored_after_a_while(&store, Some(second_parent), &[fresh], (2, 1)).await;
    assert_batch_stored(&store, first_parent, &first_children).await;

    // The failed batch's own ids were never taken: with a free second child they commit.
    let retried = queue
        .submit_batch(
            NewBatch::new("batch_retain")
                .with_id(second_parent)
                .child(NewOperation::new("retain", json!(0)).with_id(fresh))
                .child(NewOperation::new("retain", json!(1))),
        )
        .await
        .unwrap();
    assert!(
        retried.created,
        "resubmitting the failed batch's ids found a batch already stored"
    );
    assert_eq!(retried.child_ids[0], fresh);
}

/// A stand-alone operation has no parent, is ready at once, and is idempotent on its id.
pub async fn standalone_submit_is_visible_and_idempotent(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = OperationId::new();
    let op = NewOperation::new("consolidate", json!({ "bank": "b1" }))
        .with_id(id)
        .with_priority(7)
        .with_serialization_key("bank:b1")
        .with_max_attempts(2);
    let first = queue.submit(op.clone()).await.unwrap();
    assert!(first.created && first.id == id);
    let again = queue.submit(op).await.unwrap();
    assert!(!again.created);
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.parent_id, None);
    assert_eq!(stored.priority, 7);
    assert_eq!(stored.serialization_key.as_deref(), Some("bank:b1"));
    assert_eq!(stored.max_attempts, 2);
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(store.stats().await.unwrap().work().total(), 1);

    // A parent id reused as a stand-alone id is a conflict, not a silent success.
    let batch = queue.submit_batch(batch_of("batch", 1)).await.unwrap();
    let result = queue
        .submit(NewOperation::new("consolidate", json!({})).with_id(batch.parent_id))
        .await;
    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
}

/// 10,000 children: a failure on the very last one leaves nothing, at once or a while
/// later; then the whole batch, same ids, commits and is visible at once.
pub async fn large_batch_10k_children_commits_atomically(store: Arc<dyn Store>) {
    const N: usize = 10_000;
    let (batch, parent, children) = batch_with_ids(N);
    let broken = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_child: Some(N),
            ..FaultPlan::default()
        },
    ));
    assert_injected(broken.submit_batch(batch.clone()).await);
    let sample = [children[0], children[N - 2], children[N - 1]];
    assert_nothing_stored(&store, parent, &sample).await;
    assert_still_nothing_stored_after_a_while(&store, Some(parent), &sample, (0, 0)).await;

    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(batch)
        .await
        .unwrap();
    assert!(
        receipt.created,
        "resubmitting the failed batch's ids found a batch already stored"
    );
    assert_eq!(receipt.child_ids.len(), N);
    assert_batch_stored(&store, parent, &children).await;
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().ready, N as u64);
    assert_eq!(stats.batches.open, 1);
}

/// A stand-alone operation as a caller would insert it by hand: no parent.
fn standalone_record(id: OperationId) -> ChildRecord {
    let now = Utc::now();
    ChildRecord {
        id,
        parent_id: None,
        kind: "consolidate".into(),
        payload: json!({ "by_hand": true }),
        payload_json: json!({ "by_hand": true }).to_string(),
        priority: 0,
        run_at: now,
        serialization_key: None,
        max_attempts: 3,
        created_at: now,
        timeout: None,
        after: Vec::new(),
        dependents: Vec::new(),
    }
}

/// Inserts one stand-alone operation in an open transaction.
async fn standalone_by_hand(
    store: &Arc<dyn Store>,
) -> (Box<dyn fascicle_api::Transaction>, OperationId) {
    let id = OperationId::new();
    let mut tx = store.begin().await.unwrap();
    tx.insert_child(&standalone_record(id)).await.unwrap();
    (tx, id)
}

/// Another stand-alone operation commits, the store is usable; returns its id.
async fn commit_another_standalone(store: &Arc<dyn Store>) -> OperationId {
    let receipt = Queue::new(Arc::clone(store))
        .submit(NewOperation::new("consolidate", json!({ "other": true })))
        .await
        .unwrap();
    assert!(receipt.created);
    receipt.id
}

/// The id of a stand-alone write that failed is free: submitting it creates the
/// operation.
async fn assert_id_free_again(store: &Arc<dyn Store>, id: OperationId) {
    let again = Queue::new(Arc::clone(store))
        .submit(NewOperation::new("consolidate", json!({ "again": true })).with_id(id))
        .await
        .unwrap();
    assert!(
        again.created,
        "resubmitting a failed operation's id found an operation already stored"
    );
    let stored = store.get(id).await.unwrap().expect("resubmitted operation");
    assert_eq!(stored.payload, Some(json!({ "again": true })));
}

/// A stand-alone operation (`Queue::submit`) whose commit fails leaves nothing — at once
/// or a while later, by `get`, `stats` or `claim` — and its id can be submitted again.
pub async fn standalone_rollback_on_commit_failure(store: Arc<dyn Store>) {
    let id = OperationId::new();
    let broken = Queue::new(faulty(
        &store,
        FaultPlan {
            fail_commit: true,
            ..FaultPlan::default()
        },
    ));
    assert_injected(
        broken
            .submit(NewOperation::new("consolidate", json!({ "bank": "b1" })).with_id(id))
            .await,
    );
    assert_absent(&store, None, &[id], (0, 0), "").await;
    let other = commit_another_standalone(&store).await;
    assert_still_nothing_stored_after_a_while(&store, None, &[id], (1, 0)).await;
    let claimed: Vec<OperationId> = store
        .claim(&request(10))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.operation.id)
        .collect();
    assert_eq!(claimed, [other], "a claim handed out a failed write");
    assert_id_free_again(&store, id).await;
}

/// Dropping an uncommitted transaction holding a stand-alone operation discards it, for
/// good, and releases the store at once.
pub async fn standalone_dropped_transaction_rolls_back(store: Arc<dyn Store>) {
    let (tx, id) = standalone_by_hand(&store).await;
    drop(tx);
    assert_absent(&store, None, &[id], (0, 0), "").await;
    commit_another_standalone(&store).await;
    assert_still_nothing_stored_after_a_while(&store, None, &[id], (1, 0)).await;
    assert_id_free_again(&store, id).await;
}

/// An explicit rollback discards a stand-alone operation, for good.
pub async fn standalone_explicit_rollback(store: Arc<dyn Store>) {
    let (tx, id) = standalone_by_hand(&store).await;
    tx.rollback().await.unwrap();
    assert_absent(&store, None, &[id], (0, 0), "").await;
    let (tx, kept) = standalone_by_hand(&store).await;
    tx.commit().await.unwrap();
    assert_eq!(
        store.get(kept).await.unwrap().map(|op| op.parent_id),
        Some(None),
        "a committed stand-alone operation is missing"
    );
    assert_still_nothing_stored_after_a_while(&store, None, &[id], (1, 0)).await;
    assert_id_free_again(&store, id).await;
}

/// A stand-alone operation in an open transaction is invisible to `get`, `stats` and
/// `claim` — at once and a while later; after the commit it is there, ready, and claimed
/// exactly once.
pub async fn standalone_uncommitted_is_invisible_to_get_stats_and_claim(store: Arc<dyn Store>) {
    let (tx, id) = standalone_by_hand(&store).await;
    assert_invisible_to_other_callers(&store, None, &[id], "before the commit").await;
    let_late_writes_land().await;
    assert_invisible_to_other_callers(
        &store,
        None,
        &[id],
        "a while later, still before the commit",
    )
    .await;
    tx.commit().await.unwrap();
    let stored = store.get(id).await.unwrap().expect("committed operation");
    assert_eq!((stored.parent_id, stored.status), (None, Status::Pending));
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.work().ready, stats.batches.total()), (1, 0));
    let claimed = store.claim(&request(10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].operation.id, id);
    assert!(store.claim(&request(10)).await.unwrap().is_empty());
}
