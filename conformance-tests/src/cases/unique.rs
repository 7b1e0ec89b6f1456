//! Unique operations (issue #15): `NewOperation::unique` and `unique_within`. A submit
//! whose key is held by an operation that blocks it inserts nothing and answers that
//! operation, `created: false`; racing submitters of one key insert exactly one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fascicle_api::chrono::{self, Utc};
use fascicle_api::{
    Applied, Error, NewBatch, NewOperation, OperationId, Outcome, Queue, Receipt, Status, Store,
};
use serde_json::json;
use tokio::sync::Barrier;

use super::lifecycle::{claim, finish, status};

async fn unique(queue: &Queue, key: &str, n: u64) -> Receipt {
    queue
        .submit(NewOperation::new("report", json!({ "n": n })).unique(key))
        .await
        .unwrap()
}

async fn within(queue: &Queue, key: &str, period: Duration) -> Receipt {
    queue
        .submit(NewOperation::new("report", json!(null)).unique_within(key, period))
        .await
        .unwrap()
}

/// Claims and completes `id` (the only ready operation).
async fn run_to_completion(store: &Arc<dyn Store>, id: OperationId) {
    let claimed = claim(store, 10).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].operation.id, id);
    assert_eq!(
        finish(store, &claimed[0], Outcome::Completed(json!(1))).await,
        Applied::Applied
    );
}

/// While the operation holding a key is `pending` or `processing`, a submit with the key
/// inserts nothing and answers it (`created: false`) — whatever its payload; once it ended
/// (completed, failed, cancelled) the key is free and the next submit creates a new one.
/// Keys are independent of each other.
pub async fn a_unique_submit_answers_the_open_operation(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let first = unique(&queue, "report:7", 1).await;
    assert!(first.created);
    let again = unique(&queue, "report:7", 2).await;
    assert_eq!(
        (again.id, again.created),
        (first.id, false),
        "pending holds the key"
    );
    let other = unique(&queue, "report:8", 3).await;
    assert!(
        other.created && other.id != first.id,
        "another key is another operation"
    );
    let held = claim(&store, 1).await;
    assert_eq!(held[0].operation.id, first.id);
    let while_running = unique(&queue, "report:7", 4).await;
    assert_eq!(
        (while_running.id, while_running.created),
        (first.id, false),
        "processing holds the key"
    );
    assert_eq!(
        store.get(first.id).await.unwrap().unwrap().payload,
        Some(json!({ "n": 1 })),
        "a collision changed the held operation"
    );
    assert_eq!(store.stats().await.unwrap().kinds["report"].processing, 1);
    finish(&store, &held[0], Outcome::Completed(json!("done"))).await;
    let after = unique(&queue, "report:7", 5).await;
    assert!(
        after.created,
        "a completed operation holds no key by default"
    );
    assert_ne!(after.id, first.id);
    // A cancelled or failed holder frees the key too.
    store.cancel(after.id).await.unwrap();
    let third = unique(&queue, "report:7", 6).await;
    assert!(third.created);
    let kinds = store.stats().await.unwrap().kinds["report"];
    assert_eq!(
        (kinds.ready, kinds.completed, kinds.cancelled),
        (2, 1, 1),
        "exactly the operations created were stored"
    );
}

/// `unique_within(key, period)`: an operation that completed with the key less than
/// `period` ago blocks too — the scope is the asking submit's: a plain `unique` submit
/// is not blocked by it — failed and cancelled ones do not; after the period the key is
/// free. Pruning a holder frees its key.
pub async fn unique_within_blocks_a_recently_completed_operation(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let period = Duration::from_millis(900);
    let first = within(&queue, "daily", period).await;
    assert!(first.created);
    run_to_completion(&store, first.id).await;
    let completed_at = Utc::now();
    let again = within(&queue, "daily", period).await;
    if Utc::now() - completed_at < chrono::Duration::milliseconds(800) {
        assert_eq!(
            (again.id, again.created),
            (first.id, false),
            "completed within the period blocks"
        );
    }
    let plain = unique(&queue, "daily", 0).await;
    assert!(
        plain.created,
        "a plain unique submit is blocked only by open operations"
    );
    store.cancel(plain.id).await.unwrap();
    let after_cancel = within(&queue, "daily", period).await;
    assert!(after_cancel.created, "a cancelled holder blocks nothing");
    run_to_completion(&store, after_cancel.id).await;
    tokio::time::sleep(period + Duration::from_millis(100)).await;
    let later = within(&queue, "daily", period).await;
    assert!(later.created, "the period is over");
    run_to_completion(&store, later.id).await;
    let long = Duration::from_secs(3600);
    let blocked = within(&queue, "daily", long).await;
    assert_eq!((blocked.id, blocked.created), (later.id, false));
    let report = store
        .prune(Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert!(report.operations >= 3, "{report:?}");
    assert!(store.get(later.id).await.unwrap().is_none());
    let after_prune = within(&queue, "daily", long).await;
    assert!(after_prune.created, "a pruned holder still held its key");
    assert_eq!(status(&store, after_prune.id).await, Status::Pending);
}

/// Submitters racing with one key — sixteen at once, half through a second store
/// instance — insert exactly one operation, and every one of them answers its id; five
/// rounds, each after the last holder completed, so the rounds race the hand-over of a
/// key too.
pub async fn racing_unique_submits_insert_one(store: Arc<dyn Store>) {
    const RACERS: usize = 16;
    let twin = crate::twin().await;
    let mut holders = Vec::new();
    for round in 0..5u64 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut racers = Vec::new();
        for i in 0..RACERS {
            let instance = if i % 2 == 0 { &store } else { &twin };
            let queue = Queue::new(Arc::clone(instance));
            let barrier = Arc::clone(&barrier);
            racers.push(tokio::spawn(async move {
                barrier.wait().await;
                queue
                    .submit(
                        NewOperation::new("nightly", json!({ "round": round })).unique("nightly"),
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut receipts = Vec::new();
        for racer in racers {
            receipts.push(racer.await.unwrap());
        }
        let created: Vec<&Receipt> = receipts.iter().filter(|r| r.created).collect();
        assert_eq!(created.len(), 1, "round {round}: {receipts:?}");
        let ids: HashSet<OperationId> = receipts.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 1, "round {round}: racers answered different ids");
        let id = created[0].id;
        let claimed = claim(&store, 10).await;
        assert_eq!(
            claimed.iter().map(|c| c.operation.id).collect::<Vec<_>>(),
            [id],
            "round {round}: more than one operation was inserted"
        );
        finish(&store, &claimed[0], Outcome::Completed(json!(null))).await;
        holders.push(id);
    }
    let kinds = store.stats().await.unwrap().kinds["nightly"];
    assert_eq!(kinds.completed, 5);
    assert_eq!(kinds.ready + kinds.processing, 0);
    assert_eq!(holders.iter().collect::<HashSet<_>>().len(), 5);
}

/// A submit with its own id and a key: resubmitting the same id answers it (idempotent),
/// another id with the key held answers the holder and stores nothing under the new id.
pub async fn a_unique_submit_with_its_own_id(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let (x, y) = (OperationId::new(), OperationId::new());
    let op = |id| {
        NewOperation::new("report", json!(null))
            .with_id(id)
            .unique("own")
    };
    let first = queue.submit(op(x)).await.unwrap();
    assert_eq!((first.id, first.created), (x, true));
    let same = queue.submit(op(x)).await.unwrap();
    assert_eq!((same.id, same.created), (x, false));
    let other = queue.submit(op(y)).await.unwrap();
    assert_eq!(
        (other.id, other.created),
        (x, false),
        "the key's holder answers"
    );
    assert!(
        store.get(y).await.unwrap().is_none(),
        "nothing stored under the new id"
    );
}

/// A key that is not a name, a period outside 1 ms–10 years, and a key on a batch child
/// (a batch is inserted whole or not at all) are `InvalidInput` naming what is wrong, and
/// nothing is written.
pub async fn unique_keys_that_cannot_be_are_refused(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let refused = |result: fascicle_api::Result<Receipt>, needle: &str| match result {
        Err(Error::InvalidInput(message)) => {
            assert!(
                message.contains(needle),
                "{message:?} should say {needle:?}"
            )
        }
        other => panic!("expected InvalidInput about {needle}, got {other:?}"),
    };
    let op = || NewOperation::new("report", json!(null));
    refused(queue.submit(op().unique("")).await, "unique key");
    refused(queue.submit(op().unique("nul\0")).await, "unique key");
    refused(
        queue.submit(op().unique_within("k", Duration::ZERO)).await,
        "period",
    );
    refused(
        queue
            .submit(op().unique_within(
                "k",
                fascicle_api::MAX_UNIQUE_PERIOD + Duration::from_secs(1),
            ))
            .await,
        "period",
    );
    match queue
        .submit_batch(NewBatch::new("batch").children([op(), op().unique("in-a-batch")]))
        .await
    {
        Err(Error::InvalidInput(message)) => assert!(message.contains("unique"), "{message}"),
        other => panic!("a batch child with a unique key: {other:?}"),
    }
    let stats = store.stats().await.unwrap();
    assert!(
        stats.kinds.is_empty() && stats.batches.open == 0,
        "{stats:?}"
    );
    // The key stays free: nothing took it.
    assert!(
        queue
            .submit(op().unique("in-a-batch"))
            .await
            .unwrap()
            .created
    );
}
