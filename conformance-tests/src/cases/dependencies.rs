//! Dependencies inside a batch (`NewOperation::after`, `after_any`): an operation is not
//! claimable before what it waits for has released it; a dependency that fails or is
//! cancelled cancels the operations that needed it completed, naming it; the graph is
//! checked at submit.

use std::collections::HashSet;
use std::sync::Arc;

use fascicle_api::{
    Applied, ChildCounters, ClaimedOperation, Dependency, Error, NewBatch, NewOperation,
    OperationId, Outcome, Queue, Status, Store, messages,
};
use serde_json::json;

use super::lifecycle::{claim, finish, status};

fn step(id: OperationId) -> NewOperation {
    NewOperation::new("step", json!({ "id": id.to_string() })).with_id(id)
}

fn ids(claimed: &[ClaimedOperation]) -> HashSet<OperationId> {
    claimed.iter().map(|c| c.operation.id).collect()
}

async fn complete_all(store: &Arc<dyn Store>, claimed: &[ClaimedOperation]) {
    for c in claimed {
        assert_eq!(
            finish(store, c, Outcome::Completed(json!(1))).await,
            Applied::Applied
        );
    }
}

/// A diamond — `b` and `c` after `a`, `d` after both — runs in its order: each step is
/// claimable only once everything it waits for completed, and reads back what it waits
/// for and how many have not released it yet.
pub async fn dependencies_run_in_order(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [a, b, c, d] = [(); 4].map(|_| OperationId::new());
    let receipt = queue
        .submit_batch(NewBatch::new("diamond").children([
            step(d).after(&[b, c]),
            step(b).after(&[a]),
            step(c).after(&[a]),
            step(a),
        ]))
        .await
        .unwrap();
    let read = store.get(d).await.unwrap().unwrap();
    assert_eq!(read.waiting_on, 2);
    assert_eq!(
        read.after,
        [
            Dependency { id: b, any: false },
            Dependency { id: c, any: false }
        ]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.kinds["step"].ready, stats.kinds["step"].waiting),
        (1, 3)
    );

    let first = claim(&store, 10).await;
    assert_eq!(ids(&first), HashSet::from([a]), "only `a` is free to run");
    complete_all(&store, &first).await;
    let second = claim(&store, 10).await;
    assert_eq!(ids(&second), HashSet::from([b, c]));
    assert_eq!(store.get(d).await.unwrap().unwrap().waiting_on, 2);
    complete_all(&store, &second[..1]).await;
    assert_eq!(store.get(d).await.unwrap().unwrap().waiting_on, 1);
    assert!(
        claim(&store, 10).await.is_empty(),
        "`d` ran before both of its dependencies"
    );
    complete_all(&store, &second[1..]).await;
    let last = claim(&store, 10).await;
    assert_eq!(ids(&last), HashSet::from([d]));
    assert_eq!(last[0].operation.waiting_on, 0);
    complete_all(&store, &last).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);
}

/// A dependency that fails cancels what needed it completed — and what needed that, in
/// the same transaction, each naming its own dependency — while an `after_any` step
/// (a `finally`) is released and runs.
pub async fn a_failed_dependency_cancels_its_dependents_and_after_any_still_runs(
    store: Arc<dyn Store>,
) {
    let queue = Queue::new(Arc::clone(&store));
    let [a, b, c, f] = [(); 4].map(|_| OperationId::new());
    let receipt = queue
        .submit_batch(NewBatch::new("chain").children([
            step(a),
            step(b).after(&[a]),
            step(c).after(&[b]),
            step(f).after_any(&[a]),
        ]))
        .await
        .unwrap();
    let first = claim(&store, 10).await;
    assert_eq!(ids(&first), HashSet::from([a]));
    finish(&store, &first[0], Outcome::Failed("broken input".into())).await;
    let b_row = store.get(b).await.unwrap().unwrap();
    assert_eq!(b_row.status, Status::Cancelled);
    assert_eq!(
        b_row.error.as_deref(),
        Some(messages::cancelled_by_dependency(a, Status::Failed).as_str())
    );
    let c_row = store.get(c).await.unwrap().unwrap();
    assert_eq!(c_row.status, Status::Cancelled);
    assert_eq!(
        c_row.error.as_deref(),
        Some(messages::cancelled_by_dependency(b, Status::Cancelled).as_str())
    );
    let finally = claim(&store, 10).await;
    assert_eq!(
        ids(&finally),
        HashSet::from([f]),
        "the after_any step did not run"
    );
    assert_eq!(status(&store, receipt.parent_id).await, Status::Pending);
    complete_all(&store, &finally).await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(parent.error.as_deref(), Some("broken input"));
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 4,
            completed: 1,
            failed: 1,
            cancelled: 2
        }
    );
}

/// `cancel` on a pending dependency cascades like a failure: its strict dependents are
/// cancelled naming it, an `after_any` dependent is released.
pub async fn cancelling_a_dependency_cascades_to_its_dependents(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [a, b, f] = [(); 3].map(|_| OperationId::new());
    queue
        .submit_batch(NewBatch::new("chain").children([
            step(a),
            step(b).after(&[a]),
            step(f).after_any(&[a]),
        ]))
        .await
        .unwrap();
    let report = store.cancel(a).await.unwrap();
    assert_eq!(report.cancelled, 1);
    let b_row = store.get(b).await.unwrap().unwrap();
    assert_eq!(b_row.status, Status::Cancelled);
    assert_eq!(
        b_row.error.as_deref(),
        Some(messages::cancelled_by_dependency(a, Status::Cancelled).as_str())
    );
    assert_eq!(ids(&claim(&store, 10).await), HashSet::from([f]));
}

/// One operation after 300 others: each finished dependency costs its one counter; the
/// dependent stays unclaimable until the last one.
pub async fn a_fan_in_releases_its_dependent_after_the_last_dependency(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let deps: Vec<OperationId> = (0..300).map(|_| OperationId::new()).collect();
    let join = OperationId::new();
    let mut batch = NewBatch::new("fan_in").child(step(join).after(&deps));
    batch = batch.children(deps.iter().map(|&id| step(id)));
    queue.submit_batch(batch).await.unwrap();
    let claimed = claim(&store, 1000).await;
    assert_eq!(claimed.len(), 300);
    assert!(!ids(&claimed).contains(&join));
    complete_all(&store, &claimed[..299]).await;
    assert_eq!(store.get(join).await.unwrap().unwrap().waiting_on, 1);
    assert!(claim(&store, 10).await.is_empty());
    complete_all(&store, &claimed[299..]).await;
    assert_eq!(ids(&claim(&store, 10).await), HashSet::from([join]));
}

/// A dependency finishing while its dependent is cancelled, in two transactions at once:
/// whichever wins, the dependent ends cancelled and never runs, and the batch's counters
/// add up.
pub async fn a_dependency_finishing_races_its_dependent_being_cancelled(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let mut pairs = Vec::new();
    for _ in 0..80 {
        let (a, b) = (OperationId::new(), OperationId::new());
        let receipt = queue
            .submit_batch(NewBatch::new("pair").children([step(a), step(b).after(&[a])]))
            .await
            .unwrap();
        pairs.push((receipt.parent_id, a, b));
    }
    let claimed = claim(&store, 200).await;
    assert_eq!(claimed.len(), 80, "only the first of each pair is free");
    let by_id: std::collections::HashMap<OperationId, ClaimedOperation> =
        claimed.into_iter().map(|c| (c.operation.id, c)).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let completer = {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        let mine: Vec<ClaimedOperation> = pairs.iter().map(|p| by_id[&p.1].clone()).collect();
        tokio::spawn(async move {
            for c in mine {
                barrier.wait().await;
                finish(&store, &c, Outcome::Completed(json!(1))).await;
            }
        })
    };
    let canceller = {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        let mine: Vec<OperationId> = pairs.iter().map(|p| p.2).collect();
        tokio::spawn(async move {
            for b in mine {
                barrier.wait().await;
                store.cancel(b).await.unwrap();
            }
        })
    };
    completer.await.unwrap();
    canceller.await.unwrap();
    let work = store.stats().await.unwrap().work();
    assert_eq!(
        (work.ready, work.waiting, work.cancelled),
        (0, 0, 80),
        "a dependent is left ready or waiting: {work:?}"
    );
    for (parent, a, b) in pairs {
        assert_eq!(status(&store, a).await, Status::Completed);
        let b = store.get(b).await.unwrap().unwrap();
        assert_eq!(
            (b.status, b.error.as_deref(), b.waiting_on),
            (Status::Cancelled, Some(messages::CANCELLED_BEFORE_RUN), 0),
            "{}",
            b.id
        );
        let parent = store.get(parent).await.unwrap().unwrap();
        assert_eq!(parent.status, Status::Cancelled, "batch {}", parent.id);
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
}

/// `retry_batch` re-queues a failed dependency, the dependents it cancelled and an
/// `after_any` step that ran and failed; each waits for the dependency again and runs
/// after it.
pub async fn retry_batch_requeues_a_dependency_chain(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [a, b, f] = [(); 3].map(|_| OperationId::new());
    let receipt = queue
        .submit_batch(NewBatch::new("chain").children([
            step(a),
            step(b).after(&[a]),
            step(f).after_any(&[a]),
        ]))
        .await
        .unwrap();
    let first = claim(&store, 10).await;
    finish(&store, &first[0], Outcome::Failed("first try".into())).await;
    let finally = claim(&store, 10).await;
    assert_eq!(ids(&finally), HashSet::from([f]));
    finish(
        &store,
        &finally[0],
        Outcome::Failed("finally failed".into()),
    )
    .await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Failed);
    assert_eq!(store.retry_batch(receipt.parent_id).await.unwrap(), 3);
    assert_eq!(store.get(b).await.unwrap().unwrap().waiting_on, 1);
    assert_eq!(
        store.get(f).await.unwrap().unwrap().waiting_on,
        1,
        "a re-queued after_any step must wait for its re-queued dependency again"
    );
    let again = claim(&store, 10).await;
    assert_eq!(
        ids(&again),
        HashSet::from([a]),
        "a dependent ran before `a`"
    );
    complete_all(&store, &again).await;
    let then = claim(&store, 10).await;
    assert_eq!(ids(&then), HashSet::from([b, f]));
    complete_all(&store, &then).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);
}

fn refused(result: fascicle_api::Result<impl std::fmt::Debug>, needles: &[String]) {
    match result {
        Err(Error::InvalidInput(message)) => {
            for needle in needles {
                assert!(
                    message.contains(needle.as_str()),
                    "`{message}` does not name {needle}"
                );
            }
        }
        other => panic!("an invalid dependency graph was not refused: {other:?}"),
    }
}

/// Unknown ids, ids outside the batch, an operation waiting for itself, a dependency
/// listed twice and cycles are refused with `InvalidInput` naming the ids; dependencies
/// on a stand-alone operation or a callback too; nothing is written.
pub async fn invalid_dependencies_are_refused_naming_the_ids(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let [x, y, z, outside] = [(); 4].map(|_| OperationId::new());
    let batch = |children: Vec<NewOperation>| NewBatch::new("bad").children(children);
    let name = |id: OperationId| id.to_string();
    refused(
        queue
            .submit_batch(batch(vec![step(x).after(&[outside])]))
            .await,
        &[name(x), name(outside)],
    );
    refused(
        queue.submit_batch(batch(vec![step(x).after(&[x])])).await,
        &[name(x)],
    );
    refused(
        queue
            .submit_batch(batch(vec![step(y), step(x).after(&[y]).after_any(&[y])]))
            .await,
        &[name(x), name(y)],
    );
    refused(
        queue
            .submit_batch(batch(vec![
                step(x).after(&[z]),
                step(y).after(&[x]),
                step(z).after(&[y]),
            ]))
            .await,
        &[name(x), name(y), name(z), "cycle".into()],
    );
    refused(queue.submit(step(x).after(&[y])).await, &[name(y)]);
    refused(
        queue
            .submit_batch(
                batch(vec![step(y)]).on_success(NewOperation::new("cb", json!(1)).after(&[y])),
            )
            .await,
        &[name(y)],
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total() + stats.batches.total(), 0);
}

/// The longest chain a batch may hold (`MAX_DEPENDENCY_DEPTH` operations each waiting for
/// the one before) is cancelled link by link in one transaction when its head fails; one
/// link more is refused at submit.
pub async fn the_longest_chain_allowed_cancels_in_one_step(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let chain = |n: usize| {
        let ids: Vec<OperationId> = (0..n).map(|_| OperationId::new()).collect();
        let batch =
            NewBatch::new("chain").children(ids.iter().enumerate().map(|(i, &id)| match i {
                0 => step(id),
                _ => step(id).after(&[ids[i - 1]]),
            }));
        (ids, batch)
    };
    let (_, too_long) = chain(fascicle_api::MAX_DEPENDENCY_DEPTH + 1);
    refused(
        queue.submit_batch(too_long).await,
        &[fascicle_api::MAX_DEPENDENCY_DEPTH.to_string()],
    );
    let (links, batch) = chain(fascicle_api::MAX_DEPENDENCY_DEPTH);
    let receipt = queue.submit_batch(batch).await.unwrap();
    let head = claim(&store, 10).await;
    assert_eq!(ids(&head), HashSet::from([links[0]]));
    finish(&store, &head[0], Outcome::Failed("the head broke".into())).await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(
        parent.children.unwrap().cancelled,
        fascicle_api::MAX_DEPENDENCY_DEPTH as u64 - 1
    );
    let tail = store.get(*links.last().unwrap()).await.unwrap().unwrap();
    assert_eq!(
        tail.error.as_deref(),
        Some(messages::cancelled_by_dependency(links[links.len() - 2], Status::Cancelled).as_str())
    );
}

/// Every way a running dependency ends cancelled after a cancel request — its handler
/// stopping (`stop_cancelled`), a retryable outcome (`retry_after_cancel`), a release at
/// shutdown (`release_after_cancel`), an expired lease (`rescue_after_cancel`) — cancels
/// what needed it completed, naming it, and releases its `after_any` dependent.
pub async fn every_cancelled_ending_releases_the_dependents(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for path in [
        "stop_cancelled",
        "retry_after_cancel",
        "release_after_cancel",
        "rescue_after_cancel",
    ] {
        let [d, strict, finally] = [(); 3].map(|_| OperationId::new());
        queue
            .submit_batch(NewBatch::new("pair").children([
                step(d),
                step(strict).after(&[d]),
                step(finally).after_any(&[d]),
            ]))
            .await
            .unwrap();
        let lease = if path == "rescue_after_cancel" {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs(30)
        };
        let held = store
            .claim(&fascicle_api::ClaimRequest {
                worker_id: "conformance".into(),
                limit: 10,
                lease,
                kinds: None,
            })
            .await
            .unwrap();
        assert_eq!(ids(&held), HashSet::from([d]), "{path}");
        assert_eq!(store.cancel(d).await.unwrap().signalled, 1, "{path}");
        match path {
            "stop_cancelled" => {
                finish(&store, &held[0], Outcome::Cancelled("stopped".into())).await;
            }
            "retry_after_cancel" => {
                let retry = Outcome::Retry {
                    error: "again".into(),
                    run_at: fascicle_api::chrono::Utc::now(),
                };
                finish(&store, &held[0], retry).await;
            }
            "release_after_cancel" => {
                let lease = fascicle_api::Lease {
                    id: d,
                    token: held[0].lease_token,
                };
                assert_eq!(store.release(&[lease]).await.unwrap(), 1);
            }
            _ => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                assert_eq!(store.rescue_expired_leases().await.unwrap().cancelled, 1);
            }
        }
        assert_eq!(status(&store, d).await, Status::Cancelled, "{path}");
        let strict_row = store.get(strict).await.unwrap().unwrap();
        assert_eq!(
            (strict_row.status, strict_row.error.as_deref()),
            (
                Status::Cancelled,
                Some(messages::cancelled_by_dependency(d, Status::Cancelled).as_str())
            ),
            "{path}"
        );
        let finally_row = store.get(finally).await.unwrap().unwrap();
        assert_eq!(
            (finally_row.status, finally_row.waiting_on),
            (Status::Pending, 0),
            "{path}: the after_any step was not released"
        );
        let ran = claim(&store, 10).await;
        assert_eq!(ids(&ran), HashSet::from([finally]), "{path}");
        complete_all(&store, &ran).await;
    }
}
