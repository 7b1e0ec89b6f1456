//! Cancellation lasts: a cancel request made while an operation runs survives every way
//! back to `pending` (a retryable outcome, a release at shutdown, a rescue of an expired
//! lease) and ends the operation `cancelled`; only `retry_batch` clears it. Also the
//! races of a cancel with the outcomes it competes with.

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::chrono::Utc;
use fascicle_api::{ChildCounters, Lease, NewOperation, Outcome, Queue, Status, Store, messages};
use serde_json::json;

use super::lifecycle::{claim, claim_with_short_lease, finish, retain_batch, status};

fn retry_now(error: &str) -> Outcome {
    Outcome::Retry {
        error: error.into(),
        run_at: Utc::now(),
    }
}

fn lease_of(claimed: &fascicle_api::ClaimedOperation) -> Lease {
    Lease {
        id: claimed.operation.id,
        token: claimed.lease_token,
    }
}

/// `cancel(batch)` while a child runs, then the child asks for a retry: it ends
/// `cancelled` (its attempt's error kept beside the reason), is never claimed again, and
/// the batch ends `cancelled` — not `completed`.
pub async fn cancel_request_survives_a_retryable_outcome(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 2).await;
    let running = claim(&store, 2).await;
    assert_eq!(running.len(), 2);
    let report = store.cancel(receipt.parent_id).await.unwrap();
    assert_eq!(report.signalled, 2);

    finish(&store, &running[0], retry_now("flaky network")).await;
    let child = store.get(running[0].operation.id).await.unwrap().unwrap();
    assert_eq!(
        child.status,
        Status::Cancelled,
        "a retryable outcome re-queued a cancelled operation"
    );
    assert_eq!(
        child.error.as_deref(),
        Some(messages::cancelled_instead_of_retry("flaky network").as_str())
    );
    assert!(child.completed_at.is_some());
    assert!(
        claim(&store, 10).await.is_empty(),
        "a cancelled child was claimed"
    );

    finish(&store, &running[1], Outcome::Completed(json!(1))).await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Cancelled);
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 2,
            completed: 1,
            failed: 0,
            cancelled: 1
        }
    );
}

/// A worker that shuts down with a cancelled operation still held releases it as
/// `cancelled`, not back to `pending`.
pub async fn cancel_request_survives_release(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 1).await;
    let running = claim(&store, 1).await.remove(0);
    store.cancel(receipt.parent_id).await.unwrap();
    assert_eq!(store.release(&[lease_of(&running)]).await.unwrap(), 1);
    let child = store.get(running.operation.id).await.unwrap().unwrap();
    assert_eq!(
        child.status,
        Status::Cancelled,
        "release re-queued a cancelled operation"
    );
    assert_eq!(child.error.as_deref(), Some(messages::CANCELLED_AT_RELEASE));
    assert!(child.worker_id.is_none() && child.lease_expires_at.is_none());
    assert!(claim(&store, 10).await.is_empty());
    assert_eq!(status(&store, receipt.parent_id).await, Status::Cancelled);
    // A stale release changes nothing more.
    assert_eq!(store.release(&[lease_of(&running)]).await.unwrap(), 0);
}

/// An expired lease of a cancelled operation is rescued as `cancelled`, even with
/// attempts left, and its batch finalizes.
pub async fn cancel_request_survives_rescue(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 1).await;
    let running = claim_with_short_lease(&store, Duration::from_millis(50)).await;
    assert!(running.operation.attempts < running.operation.max_attempts);
    store.cancel(receipt.parent_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let report = store.rescue_expired_leases().await.unwrap();
    assert_eq!(
        (report.requeued, report.failed, report.cancelled),
        (0, 0, 1),
        "{report:?}"
    );
    let child = store.get(running.operation.id).await.unwrap().unwrap();
    assert_eq!(child.status, Status::Cancelled);
    assert_eq!(child.error.as_deref(), Some(messages::CANCELLED_AT_RESCUE));
    assert!(claim(&store, 10).await.is_empty());
    assert_eq!(status(&store, receipt.parent_id).await, Status::Cancelled);
}

/// `retry_batch` clears a cancel request on purpose: the retried child runs without the
/// signal, and its outcomes count normally again.
pub async fn retry_batch_clears_the_cancel_request(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 1).await;
    let running = claim(&store, 1).await.remove(0);
    store.cancel(receipt.parent_id).await.unwrap();
    finish(&store, &running, retry_now("flaky")).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Cancelled);

    assert_eq!(store.retry_batch(receipt.parent_id).await.unwrap(), 1);
    let again = claim(&store, 1).await.remove(0);
    let beat = store
        .heartbeat(&[lease_of(&again)], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(beat[0].held);
    assert!(
        !beat[0].cancel_requested,
        "retry_batch must clear the cancel request"
    );
    // A retryable outcome re-queues it again: the request is gone.
    finish(&store, &again, retry_now("flaky again")).await;
    assert_eq!(status(&store, again.operation.id).await, Status::Pending);
    let last = claim(&store, 1).await.remove(0);
    finish(&store, &last, Outcome::Completed(json!("done"))).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);
}

/// A cancel and a retryable outcome arrive at the same moment, twenty times over:
/// whichever lands first, the operation ends `cancelled` and is never claimed again.
pub async fn cancel_races_a_retryable_outcome(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..20 {
        let receipt = queue
            .submit(NewOperation::new("race", json!({ "round": round })))
            .await
            .unwrap();
        let running = claim(&store, 1).await.remove(0);
        assert_eq!(running.operation.id, receipt.id);
        let (canceller, completer) = (Arc::clone(&store), Arc::clone(&store));
        let id = receipt.id;
        let cancel = tokio::spawn(async move { canceller.cancel(id).await.unwrap() });
        let retry = tokio::spawn(async move {
            let running = running;
            finish(&completer, &running, retry_now("transient")).await
        });
        let (cancel, _) = (cancel.await.unwrap(), retry.await.unwrap());
        assert_eq!(cancel.already_terminal, 0, "round {round}: {cancel:?}");
        assert_eq!(
            status(&store, id).await,
            Status::Cancelled,
            "round {round}: the cancel was lost to a retry"
        );
        assert!(claim(&store, 1).await.is_empty(), "round {round}");
    }
}

/// A cancel races the completion of a batch's only running child, twenty times over:
/// the child ends either `completed` or `cancelled`, and its batch agrees, exactly once.
pub async fn cancel_races_a_completion(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..20 {
        let receipt = retain_batch(&queue, 1).await;
        let running = claim(&store, 1).await.remove(0);
        let (canceller, completer) = (Arc::clone(&store), Arc::clone(&store));
        let parent = receipt.parent_id;
        let cancel = tokio::spawn(async move { canceller.cancel(parent).await.unwrap() });
        let complete = tokio::spawn(async move {
            let running = running;
            finish(&completer, &running, Outcome::Completed(json!(round))).await
        });
        cancel.await.unwrap();
        complete.await.unwrap();
        let child = store.get(receipt.child_ids[0]).await.unwrap().unwrap();
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        // The completion holds the lease, so it is recorded whichever comes first.
        assert_eq!(child.status, Status::Completed, "round {round}");
        assert_eq!(parent.status, Status::Completed, "round {round}");
        let counters = parent.children.unwrap();
        assert_eq!(
            (counters.total, counters.completed, counters.cancelled),
            (1, 1, 0),
            "round {round}: counted twice or not at all"
        );
    }
}

/// A hundred ready operations sharing one serialization key ahead of ten without a key:
/// one claim of 64 returns the key's first operation and all ten others — the
/// one-per-key rule is applied before the limit, not after.
pub async fn claim_skips_key_duplicates_before_the_limit(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for i in 0..100 {
        queue
            .submit(
                NewOperation::new("keyed", json!({ "i": i }))
                    .with_priority(10)
                    .with_serialization_key("one-key"),
            )
            .await
            .unwrap();
    }
    for i in 0..10 {
        queue
            .submit(NewOperation::new("free", json!({ "i": i })))
            .await
            .unwrap();
    }
    let claimed = claim(&store, 64).await;
    let keyed = claimed
        .iter()
        .filter(|c| c.operation.serialization_key.is_some())
        .count();
    assert_eq!(
        (claimed.len(), keyed),
        (11, 1),
        "one per key, then the keyless work behind it"
    );
    assert_eq!(claimed[0].operation.kind, "keyed", "priority order kept");
}
