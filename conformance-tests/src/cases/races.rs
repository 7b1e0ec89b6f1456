//! Races as cases: two transitions on one batch at the same instant, repeated, with the
//! invariants that must hold whichever lands first — each child in exactly one terminal
//! state, the parent's counters equal to its children's states, the parent finalized
//! exactly once, no error (a deadlock surfacing as an error fails the case).

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::chrono::Utc;
use fascicle_api::{
    ChildCounters, ClaimRequest, Completion, NewBatch, NewOperation, Operation, OperationId,
    Outcome, Queue, Status, Store,
};
use serde_json::json;

use super::lifecycle::{claim, finish, retain_batch, status};

const ROUNDS: usize = 10;

/// The counters a parent must carry, counted from its children's rows.
async fn counted(store: &Arc<dyn Store>, parent: OperationId) -> (ChildCounters, Vec<Operation>) {
    let children = store.children_of(parent).await.unwrap();
    let mut counters = ChildCounters {
        total: children.len() as u64,
        ..ChildCounters::default()
    };
    for child in &children {
        match child.status {
            Status::Completed => counters.completed += 1,
            Status::Failed => counters.failed += 1,
            Status::Cancelled => counters.cancelled += 1,
            _ => {}
        }
    }
    (counters, children)
}

/// The parent's counters match its children, and it is terminal exactly when they are.
async fn assert_batch_consistent(store: &Arc<dyn Store>, parent: OperationId, round: usize) {
    let (expected, children) = counted(store, parent).await;
    let stored = store.get(parent).await.unwrap().unwrap();
    assert_eq!(
        stored.children.unwrap(),
        expected,
        "round {round}: counters disagree with the children's rows"
    );
    let all_terminal = children.iter().all(|c| c.status.is_terminal());
    assert_eq!(
        stored.status.is_terminal(),
        all_terminal,
        "round {round}: parent {:?} with children {:?}",
        stored.status,
        children.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    if all_terminal {
        assert_eq!(
            Some(stored.status),
            fascicle_api::parent_outcome(&expected),
            "round {round}"
        );
    }
}

/// Expired leases on the last allowed attempt: a rescuer and the late workers' completions
/// race for every child of a batch. Each child ends completed or failed, never both, and
/// the batch agrees.
pub async fn rescue_races_a_completion(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..ROUNDS {
        let receipt = queue
            .submit_batch(NewBatch::new("batch").children(
                (0..4).map(|i| NewOperation::new("retain", json!({ "i": i })).with_max_attempts(1)),
            ))
            .await
            .unwrap();
        let claimed = store
            .claim(&ClaimRequest {
                worker_id: "late".into(),
                limit: 4,
                lease: Duration::from_millis(30),
                kinds: None,
            })
            .await
            .unwrap();
        assert_eq!(claimed.len(), 4);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (rescuer, completer) = (Arc::clone(&store), Arc::clone(&store));
        let completions: Vec<Completion> = claimed
            .iter()
            .map(|c| Completion {
                id: c.operation.id,
                lease_token: c.lease_token,
                outcome: Outcome::Completed(json!(round)),
            })
            .collect();
        let rescue = tokio::spawn(async move { rescuer.rescue_expired_leases().await });
        let complete = tokio::spawn(async move { completer.complete(&completions).await });
        let rescued = rescue.await.unwrap().expect("rescue failed in the race");
        let applied = complete
            .await
            .unwrap()
            .expect("completion failed in the race");
        let completed = applied
            .iter()
            .filter(|a| **a == fascicle_api::Applied::Applied)
            .count() as u64;
        assert_eq!(
            rescued.failed + completed,
            4,
            "round {round}: {rescued:?} {applied:?}"
        );
        assert_batch_consistent(&store, receipt.parent_id, round).await;
        assert!(status(&store, receipt.parent_id).await.is_terminal());
    }
}

/// `retry_batch` re-queues a failed child while its sibling's completion is recorded at
/// the same moment: the completion counts once, the retried child is pending, and the
/// batch finishes when that child does.
pub async fn retry_batch_races_an_in_flight_completion(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..ROUNDS {
        let receipt = retain_batch(&queue, 2).await;
        let claimed = claim(&store, 2).await;
        finish(&store, &claimed[0], Outcome::Failed("boom".into())).await;
        let running = claimed[1].clone();
        let (retrier, completer) = (Arc::clone(&store), Arc::clone(&store));
        let parent = receipt.parent_id;
        let retry = tokio::spawn(async move { retrier.retry_batch(parent).await });
        let complete = tokio::spawn(async move {
            completer
                .complete(&[Completion {
                    id: running.operation.id,
                    lease_token: running.lease_token,
                    outcome: Outcome::Completed(json!("done")),
                }])
                .await
        });
        assert_eq!(
            retry
                .await
                .unwrap()
                .expect("retry_batch failed in the race"),
            1
        );
        complete
            .await
            .unwrap()
            .expect("completion failed in the race");
        assert_eq!(
            status(&store, claimed[0].operation.id).await,
            Status::Pending
        );
        assert_eq!(
            status(&store, claimed[1].operation.id).await,
            Status::Completed
        );
        assert_batch_consistent(&store, parent, round).await;
        let again = claim(&store, 1).await.remove(0);
        finish(&store, &again, Outcome::Completed(json!("second try"))).await;
        assert_eq!(
            status(&store, parent).await,
            Status::Completed,
            "round {round}"
        );
        assert_batch_consistent(&store, parent, round).await;
    }
}

/// The reconciler runs while a batch's last child completes: the batch is finalized
/// exactly once, by the completion, and the reconciler touches nothing.
pub async fn reconcile_races_the_last_completion(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..ROUNDS {
        let receipt = retain_batch(&queue, 1).await;
        let running = claim(&store, 1).await.remove(0);
        let (reconciler, completer) = (Arc::clone(&store), Arc::clone(&store));
        let reconcile = tokio::spawn(async move { reconciler.reconcile_orphan_parents().await });
        let complete = tokio::spawn(async move {
            completer
                .complete(&[Completion {
                    id: running.operation.id,
                    lease_token: running.lease_token,
                    outcome: Outcome::Completed(json!("done")),
                }])
                .await
        });
        let report = reconcile
            .await
            .unwrap()
            .expect("reconcile failed in the race");
        complete
            .await
            .unwrap()
            .expect("completion failed in the race");
        assert_eq!(
            (report.empty_parents_failed, report.parents_finalized),
            (0, 0),
            "round {round}: the reconciler finalized a batch its completion finalizes"
        );
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        assert_eq!(parent.status, Status::Completed, "round {round}");
        assert_eq!(
            parent.result,
            Some(fascicle_api::parent_summary(&parent.children.unwrap()))
        );
        assert_batch_consistent(&store, receipt.parent_id, round).await;
    }
}

/// A prune runs while a batch's last child completes: the batch is either kept whole
/// (pruned before it finished) or deleted whole — never a parent without children or a
/// child without its parent.
pub async fn prune_races_a_live_batch(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for round in 0..ROUNDS {
        let receipt = retain_batch(&queue, 2).await;
        let claimed = claim(&store, 2).await;
        finish(&store, &claimed[0], Outcome::Completed(json!(1))).await;
        let last = claimed[1].clone();
        let (pruner, completer) = (Arc::clone(&store), Arc::clone(&store));
        let prune = tokio::spawn(async move {
            pruner
                .prune(Utc::now() + fascicle_api::chrono::Duration::hours(1))
                .await
        });
        let complete = tokio::spawn(async move {
            completer
                .complete(&[Completion {
                    id: last.operation.id,
                    lease_token: last.lease_token,
                    outcome: Outcome::Completed(json!(2)),
                }])
                .await
        });
        let pruned = prune.await.unwrap().expect("prune failed in the race");
        complete
            .await
            .unwrap()
            .expect("completion failed in the race");
        let parent = store.get(receipt.parent_id).await.unwrap();
        let children: Vec<Option<Operation>> = futures_all(&store, &receipt.child_ids).await;
        match parent {
            Some(parent) => {
                assert!(
                    children.iter().all(Option::is_some),
                    "round {round}: a child of a kept batch was pruned"
                );
                assert_eq!(pruned.batches, 0, "round {round}");
                assert_eq!(parent.status, Status::Completed);
                assert_batch_consistent(&store, receipt.parent_id, round).await;
            }
            None => {
                assert!(
                    children.iter().all(Option::is_none),
                    "round {round}: a child outlived its pruned batch"
                );
                assert_eq!((pruned.batches, pruned.operations), (1, 2), "round {round}");
            }
        }
        // Whatever is left is pruned whole afterwards.
        store
            .prune(Utc::now() + fascicle_api::chrono::Duration::hours(1))
            .await
            .unwrap();
        assert!(store.get(receipt.parent_id).await.unwrap().is_none());
    }
}

async fn futures_all(store: &Arc<dyn Store>, ids: &[OperationId]) -> Vec<Option<Operation>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(store.get(*id).await.unwrap());
    }
    out
}
