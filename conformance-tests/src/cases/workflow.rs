//! Workflows: batch callbacks (inserted in the transaction that finalizes the batch,
//! exactly once per round) and failure policies (`WaitAll`, `FailFast`,
//! `IgnoreFailures`), with the races they must survive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle_api::chrono::Utc;
use fascicle_api::{
    Applied, BatchInfo, BatchPlan, Callback, CallbackOn, ChildCounters, ClaimRequest,
    ClaimedOperation, Error, FailurePolicy, HandlerError, Lease, NewBatch, NewOperation,
    OperationId, Outcome, ParentRecord, Queue, Registry, Status, Store, ZERO_CHILDREN_REASON,
    messages,
};
use serde_json::{Value, json};

use super::lifecycle::{children, claim, fast_worker, finish, request, run_until, status};

const CALLBACK_KINDS: [&str; 3] = ["cb_success", "cb_failure", "cb_complete"];

/// A batch of `n` `step` children with all three callbacks.
fn with_callbacks(n: usize) -> NewBatch {
    NewBatch::new("flow")
        .children(children("step", n))
        .on_success(
            NewOperation::new("cb_success", json!({ "say": "well done" }))
                .with_priority(7)
                .with_max_attempts(2)
                .with_timeout(Duration::from_secs(9)),
        )
        .on_failure(
            NewOperation::new("cb_failure", json!({ "say": "alas" }))
                .with_serialization_key("alerts"),
        )
        .on_complete(NewOperation::new("cb_complete", json!(null)))
}

/// Claims every ready operation of the callback kinds (a few rounds at most: a store
/// that hands out the same operation again must not keep a case looping).
async fn claim_callbacks(store: &Arc<dyn Store>) -> Vec<ClaimedOperation> {
    let mut all = Vec::new();
    for _ in 0..3 {
        let claimed = store
            .claim(&ClaimRequest {
                kinds: Some(CALLBACK_KINDS.iter().map(|k| k.to_string()).collect()),
                ..request(1000)
            })
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        all.extend(claimed);
    }
    all
}

/// Claims and completes every ready `step`, with `outcome` for each.
async fn finish_steps(store: &Arc<dyn Store>, outcome: impl Fn(usize) -> Outcome) {
    let steps = store
        .claim(&ClaimRequest {
            kinds: Some(vec!["step".into()]),
            ..request(1000)
        })
        .await
        .unwrap();
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(finish(store, step, outcome(i)).await, Applied::Applied);
    }
}

/// Claims every ready `step`: the first fails with `error`, the others complete.
async fn fail_the_first_step(store: &Arc<dyn Store>, error: &str) {
    finish_steps(store, |i| {
        if i == 0 {
            Outcome::Failed(error.into())
        } else {
            Outcome::Completed(json!(1))
        }
    })
    .await;
}

fn batch_of(claimed: &ClaimedOperation) -> &BatchInfo {
    claimed
        .operation
        .callback_for
        .as_ref()
        .unwrap_or_else(|| panic!("{} carries no batch", claimed.operation.kind))
}

fn kinds(callbacks: &[ClaimedOperation]) -> Vec<&str> {
    let mut kinds: Vec<&str> = callbacks
        .iter()
        .map(|c| c.operation.kind.as_str())
        .collect();
    kinds.sort_unstable();
    kinds
}

/// A batch that completes inserts its `on_success` and `on_complete` callbacks — not
/// before its last child ends, not `on_failure`, and each once — as ready operations
/// with the fields they were given and the batch they belong to.
pub async fn callbacks_fire_once_for_the_outcome(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue.submit_batch(with_callbacks(3)).await.unwrap();
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    let plan = parent.plan.expect("a parent reads back its plan");
    assert_eq!(plan.failure_policy, FailurePolicy::WaitAll);
    let ons: Vec<CallbackOn> = plan.callbacks.iter().map(|c| c.on).collect();
    assert_eq!(ons, CallbackOn::ALL);
    assert_eq!(store.stats().await.unwrap().work().total(), 3);

    let steps = claim(&store, 3).await;
    for step in &steps[..2] {
        finish(&store, step, Outcome::Completed(json!(1))).await;
    }
    assert!(
        claim_callbacks(&store).await.is_empty(),
        "a callback was inserted before the batch ended"
    );
    finish(&store, &steps[2], Outcome::Completed(json!(1))).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);

    let callbacks = claim_callbacks(&store).await;
    assert_eq!(kinds(&callbacks), ["cb_complete", "cb_success"]);
    let success = callbacks
        .iter()
        .find(|c| c.operation.kind == "cb_success")
        .unwrap();
    let op = &success.operation;
    assert_eq!(op.payload, Some(json!({ "say": "well done" })));
    assert_eq!((op.priority, op.max_attempts), (7, 2));
    assert_eq!(op.timeout, Some(Duration::from_secs(9)));
    assert_eq!(op.parent_id, None, "a callback is not a child of its batch");
    let info = batch_of(success);
    assert_eq!(info.id, receipt.parent_id);
    assert_eq!(info.kind, "flow");
    assert_eq!(info.outcome, Status::Completed);
    assert_eq!(info.on, CallbackOn::Success);
    assert_eq!(info.error, None);
    assert_eq!(
        info.children,
        ChildCounters {
            total: 3,
            completed: 3,
            failed: 0,
            cancelled: 0
        }
    );
    assert_eq!(batch_of(&callbacks[0]).id, receipt.parent_id);
    // Reading a callback by id shows the same batch.
    let read = store.get(op.id).await.unwrap().unwrap();
    assert_eq!(read.callback_for.as_ref(), Some(info));
    for callback in &callbacks {
        finish(&store, callback, Outcome::Completed(json!("ok"))).await;
    }
    assert!(claim_callbacks(&store).await.is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().completed, 5, "three steps and two callbacks");
    assert_eq!(stats.batches.completed, 1);
}

/// A failed batch inserts `on_failure` and `on_complete`, carrying the batch's error.
pub async fn a_failed_batch_fires_its_failure_callbacks(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue.submit_batch(with_callbacks(2)).await.unwrap();
    fail_the_first_step(&store, "disk full").await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    let callbacks = claim_callbacks(&store).await;
    assert_eq!(kinds(&callbacks), ["cb_complete", "cb_failure"]);
    for callback in &callbacks {
        let info = batch_of(callback);
        assert_eq!(info.outcome, Status::Failed);
        assert_eq!(info.error.as_deref(), Some("disk full"));
        assert_eq!(info.error, parent.error);
        assert_eq!(info.children.failed, 1);
    }
    let failure = callbacks
        .iter()
        .find(|c| c.operation.kind == "cb_failure")
        .unwrap();
    assert_eq!(
        failure.operation.serialization_key.as_deref(),
        Some("alerts")
    );
}

/// A cancelled batch ends `cancelled`: only `on_complete` fires.
pub async fn a_cancelled_batch_fires_only_on_complete(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue.submit_batch(with_callbacks(3)).await.unwrap();
    let report = store.cancel(receipt.parent_id).await.unwrap();
    assert_eq!(report.cancelled, 3);
    assert_eq!(status(&store, receipt.parent_id).await, Status::Cancelled);
    let callbacks = claim_callbacks(&store).await;
    assert_eq!(kinds(&callbacks), ["cb_complete"]);
    assert_eq!(batch_of(&callbacks[0]).outcome, Status::Cancelled);
    assert_eq!(batch_of(&callbacks[0]).children.cancelled, 3);
    // Cancelling again finalizes nothing more.
    store.cancel(receipt.parent_id).await.unwrap();
    assert!(claim_callbacks(&store).await.is_empty());
}

/// The last two children of many batches finish at the same moment, in two
/// transactions: each batch fires its callback exactly once.
pub async fn the_last_two_children_race_fires_each_callback_once(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let mut pairs = Vec::new();
    for _ in 0..100 {
        let batch = NewBatch::new("pair")
            .children(children("step", 2))
            .on_complete(NewOperation::new("cb_complete", json!(null)));
        pairs.push(queue.submit_batch(batch).await.unwrap());
    }
    let claimed = claim(&store, 200).await;
    assert_eq!(claimed.len(), 200);
    let by_id: HashMap<OperationId, ClaimedOperation> =
        claimed.into_iter().map(|c| (c.operation.id, c)).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = [0, 1]
        .into_iter()
        .map(|side| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            let mine: Vec<ClaimedOperation> = pairs
                .iter()
                .map(|r| by_id[&r.child_ids[side]].clone())
                .collect();
            tokio::spawn(async move {
                for c in mine {
                    barrier.wait().await;
                    assert_eq!(
                        finish(&store, &c, Outcome::Completed(json!(1))).await,
                        Applied::Applied
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let callbacks = claim_callbacks(&store).await;
    let mut per_batch: HashMap<OperationId, usize> = HashMap::new();
    for callback in &callbacks {
        *per_batch.entry(batch_of(callback).id).or_default() += 1;
    }
    for receipt in &pairs {
        assert_eq!(
            per_batch.get(&receipt.parent_id).copied().unwrap_or(0),
            1,
            "batch {} fired its callback a wrong number of times",
            receipt.parent_id
        );
    }
    assert_eq!(callbacks.len(), pairs.len());
}

/// The reconciler finalizes a stranded batch and a batch with no child rows: each fires
/// its callbacks once, in the reconciler's transaction; a second pass fires nothing.
pub async fn the_reconciler_fires_the_callbacks_of_the_batches_it_finalizes(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let stranded = queue.submit_batch(with_callbacks(2)).await.unwrap();
    crate::tamper_children_total(stranded.parent_id, 3).await;
    finish_steps(&store, |_| Outcome::Completed(json!(1))).await;
    assert_eq!(status(&store, stranded.parent_id).await, Status::Pending);
    assert!(claim_callbacks(&store).await.is_empty());

    // A parent with no child rows, as an older writer left them.
    let callback = |on, kind: &str| Callback {
        on,
        kind: kind.into(),
        payload: json!({ "empty": true }),
        priority: 0,
        serialization_key: None,
        max_attempts: 1,
        timeout_ms: None,
    };
    let empty = ParentRecord {
        id: OperationId::new(),
        kind: "empty".into(),
        metadata: Value::Null,
        children_total: 0,
        created_at: Utc::now(),
        plan: BatchPlan {
            failure_policy: FailurePolicy::WaitAll,
            callbacks: vec![
                callback(CallbackOn::Success, "cb_success"),
                callback(CallbackOn::Failure, "cb_failure"),
            ],
        },
        parent_id: None,
        dependents: Vec::new(),
    };
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&empty).await.unwrap();
    tx.commit().await.unwrap();

    let report = store.reconcile_orphan_parents().await.unwrap();
    assert_eq!(
        (report.parents_finalized, report.empty_parents_failed),
        (1, 1)
    );
    let callbacks = claim_callbacks(&store).await;
    let mut fired: Vec<(OperationId, &str)> = callbacks
        .iter()
        .map(|c| (batch_of(c).id, c.operation.kind.as_str()))
        .collect();
    fired.sort_unstable();
    let mut expected = vec![
        (stranded.parent_id, "cb_success"),
        (stranded.parent_id, "cb_complete"),
        (empty.id, "cb_failure"),
    ];
    expected.sort_unstable();
    assert_eq!(fired, expected);
    let on_empty = callbacks
        .iter()
        .find(|c| batch_of(c).id == empty.id)
        .unwrap();
    assert_eq!(
        batch_of(on_empty).error.as_deref(),
        Some(ZERO_CHILDREN_REASON)
    );
    assert_eq!(
        store.reconcile_orphan_parents().await.unwrap(),
        Default::default()
    );
    assert!(claim_callbacks(&store).await.is_empty());
}

/// `retry_batch` opens a new round: the batch that failed (and fired `on_failure`) now
/// completes and fires `on_success`; `on_complete` fires once per round.
pub async fn retry_batch_fires_the_callbacks_of_the_new_outcome(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue.submit_batch(with_callbacks(2)).await.unwrap();
    fail_the_first_step(&store, "first try").await;
    let first = claim_callbacks(&store).await;
    assert_eq!(kinds(&first), ["cb_complete", "cb_failure"]);
    assert_eq!(store.retry_batch(receipt.parent_id).await.unwrap(), 1);
    assert!(
        claim_callbacks(&store).await.is_empty(),
        "a reopened batch fired before it ended again"
    );
    finish_steps(&store, |_| Outcome::Completed(json!(2))).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);
    let second = claim_callbacks(&store).await;
    assert_eq!(kinds(&second), ["cb_complete", "cb_success"]);
    for callback in &second {
        assert_eq!(batch_of(callback).outcome, Status::Completed);
        assert_eq!(batch_of(callback).children.completed, 2);
    }
    let ids: std::collections::HashSet<OperationId> = first
        .iter()
        .chain(&second)
        .map(|c| c.operation.id)
        .collect();
    assert_eq!(ids.len(), 4, "a callback id was reused");
}

/// `FailFast`: the first child that fails for good cancels its pending siblings (naming
/// it) and asks the running ones to stop; the batch fails with that child's error once
/// the running ones end.
pub async fn fail_fast_cancels_pending_siblings_and_stops_running_ones(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("fast")
                .children(children("step", 4))
                .with_failure_policy(FailurePolicy::FailFast)
                .on_failure(NewOperation::new("cb_failure", json!(null))),
        )
        .await
        .unwrap();
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.plan.unwrap().failure_policy, FailurePolicy::FailFast);
    let running = claim(&store, 2).await;
    assert_eq!(running.len(), 2);
    finish(&store, &running[0], Outcome::Failed("root cause".into())).await;
    let failed_id = running[0].operation.id;
    let reason = messages::cancelled_by_fail_fast(failed_id);
    for pending in &receipt.child_ids[2..] {
        let child = store.get(*pending).await.unwrap().unwrap();
        assert_eq!(
            child.status,
            Status::Cancelled,
            "a pending sibling still runs"
        );
        assert_eq!(child.error.as_deref(), Some(reason.as_str()));
    }
    assert!(claim(&store, 10).await.is_empty());
    let heartbeat = store
        .heartbeat(
            &[Lease {
                id: running[1].operation.id,
                token: running[1].lease_token,
            }],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(heartbeat[0].held && heartbeat[0].cancel_requested);
    assert_eq!(
        status(&store, receipt.parent_id).await,
        Status::Pending,
        "the batch ended while a child still ran"
    );
    assert!(claim_callbacks(&store).await.is_empty());

    // The running sibling stops; its later error does not replace the first one.
    finish(
        &store,
        &running[1],
        Outcome::Failed("a later failure, which sorts first".into()),
    )
    .await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(parent.error.as_deref(), Some("root cause"));
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 4,
            completed: 0,
            failed: 2,
            cancelled: 2
        }
    );
    let callbacks = claim_callbacks(&store).await;
    assert_eq!(kinds(&callbacks), ["cb_failure"]);
    assert_eq!(batch_of(&callbacks[0]).error.as_deref(), Some("root cause"));
}

/// `FailFast` racing a completing sibling, in two transactions at once: the completion
/// still applies, the batch fails exactly once with the failing child's error, and its
/// counters add up.
pub async fn fail_fast_races_a_completing_sibling(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let mut batches = Vec::new();
    for _ in 0..60 {
        let batch = NewBatch::new("fast")
            .children(children("step", 3))
            .with_failure_policy(FailurePolicy::FailFast)
            .on_failure(NewOperation::new("cb_failure", json!(null)));
        batches.push(queue.submit_batch(batch).await.unwrap());
    }
    // Two of each batch's three children run; the third is pending.
    let wanted: std::collections::HashSet<OperationId> = batches
        .iter()
        .flat_map(|r| r.child_ids[..2].iter().copied())
        .collect();
    let mut by_id: HashMap<OperationId, ClaimedOperation> = HashMap::new();
    let mut extra = Vec::new();
    for c in claim(&store, 180).await {
        if wanted.contains(&c.operation.id) {
            by_id.insert(c.operation.id, c);
        } else {
            extra.push(c);
        }
    }
    // Put the third children back: they must be pending when the race starts.
    let leases: Vec<Lease> = extra
        .iter()
        .map(|c| Lease {
            id: c.operation.id,
            token: c.lease_token,
        })
        .collect();
    store.release(&leases).await.unwrap();
    assert_eq!(by_id.len(), 120);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|side| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            let mine: Vec<ClaimedOperation> = batches
                .iter()
                .map(|r| by_id[&r.child_ids[side]].clone())
                .collect();
            tokio::spawn(async move {
                for c in mine {
                    barrier.wait().await;
                    let outcome = if side == 0 {
                        Outcome::Failed("the failing one".into())
                    } else {
                        Outcome::Completed(json!(1))
                    };
                    assert_eq!(finish(&store, &c, outcome).await, Applied::Applied);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for receipt in &batches {
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        assert_eq!(parent.status, Status::Failed, "batch {}", parent.id);
        assert_eq!(parent.error.as_deref(), Some("the failing one"));
        assert_eq!(
            parent.children.unwrap(),
            ChildCounters {
                total: 3,
                completed: 1,
                failed: 1,
                cancelled: 1
            },
            "batch {}",
            parent.id
        );
        let third = store.get(receipt.child_ids[2]).await.unwrap().unwrap();
        assert_eq!(third.status, Status::Cancelled);
        assert_eq!(
            status(&store, receipt.child_ids[1]).await,
            Status::Completed
        );
    }
    let callbacks = claim_callbacks(&store).await;
    assert_eq!(callbacks.len(), batches.len(), "one on_failure per batch");
}

/// `FailFast` also starts when a child's last attempt expires (`rescue_exhausted`).
pub async fn fail_fast_on_an_expired_last_attempt(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("fast")
                .children(children("step", 3).map(|c| c.with_max_attempts(1)))
                .with_failure_policy(FailurePolicy::FailFast),
        )
        .await
        .unwrap();
    let short = store
        .claim(&ClaimRequest {
            lease: Duration::from_millis(50),
            ..request(1)
        })
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let report = store.rescue_expired_leases().await.unwrap();
    assert_eq!(report.failed, 1);
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(
        parent.error.as_deref(),
        Some(messages::lease_expired_on_last_attempt(1).as_str())
    );
    let reason = messages::cancelled_by_fail_fast(short.operation.id);
    for id in receipt
        .child_ids
        .iter()
        .filter(|id| **id != short.operation.id)
    {
        let child = store.get(*id).await.unwrap().unwrap();
        assert_eq!(child.status, Status::Cancelled);
        assert_eq!(child.error.as_deref(), Some(reason.as_str()));
    }
}

/// `IgnoreFailures`: failed children are counted and reported, and the batch completes
/// (firing `on_success`). `WaitAll`, the default, fails the same batch.
pub async fn ignore_failures_completes_a_batch_with_failed_children(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ignoring = queue
        .submit_batch(with_callbacks(3).with_failure_policy(FailurePolicy::IgnoreFailures))
        .await
        .unwrap();
    let waiting = queue.submit_batch(with_callbacks(3)).await.unwrap();
    finish_steps(&store, |i| {
        if i % 3 == 0 {
            Outcome::Failed("one bad apple".into())
        } else {
            Outcome::Completed(json!(1))
        }
    })
    .await;
    let expected = ChildCounters {
        total: 3,
        completed: 2,
        failed: 1,
        cancelled: 0,
    };
    let parent = store.get(ignoring.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Completed);
    assert_eq!(parent.children.unwrap(), expected);
    assert_eq!(
        parent.result,
        Some(fascicle_api::parent_summary(&expected)),
        "the failures are reported in the summary"
    );
    assert_eq!(
        status(&store, waiting.parent_id).await,
        Status::Failed,
        "WaitAll is the default"
    );
    let callbacks = claim_callbacks(&store).await;
    let mut fired: Vec<(OperationId, &str)> = callbacks
        .iter()
        .map(|c| (batch_of(c).id, c.operation.kind.as_str()))
        .collect();
    fired.sort_unstable();
    let mut expected = vec![
        (ignoring.parent_id, "cb_success"),
        (ignoring.parent_id, "cb_complete"),
        (waiting.parent_id, "cb_failure"),
        (waiting.parent_id, "cb_complete"),
    ];
    expected.sort_unstable();
    assert_eq!(fired, expected);
}

/// A callback is validated like any operation, and takes neither an id nor a `run_at`;
/// a refused batch writes nothing.
pub async fn invalid_callbacks_are_refused_and_nothing_is_written(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let base = || NewBatch::new("flow").children(children("step", 2));
    let refusals = [
        (
            base().on_success(NewOperation::new("cb", json!(1)).with_id(OperationId::new())),
            "on_success",
        ),
        (
            base().on_failure(NewOperation::new("cb", json!(1)).with_run_at(Utc::now())),
            "on_failure",
        ),
        (
            base().on_complete(NewOperation::new(" ", json!(1))),
            "on_complete",
        ),
        (
            base().on_success(NewOperation::new("cb", json!("a\0b"))),
            "on_success",
        ),
        (
            base().on_failure(NewOperation::new("cb", json!(1)).with_max_attempts(0)),
            "on_failure",
        ),
    ];
    for (batch, named) in refusals {
        match queue.submit_batch(batch).await {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains(named), "{message} does not name {named}")
            }
            other => panic!("an invalid {named} callback was not refused: {other:?}"),
        }
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total() + stats.batches.total(), 0);
}

/// End to end with a worker: a callback's handler reads its batch in `Context::batch`
/// and runs after every step.
pub async fn a_callback_handler_sees_its_batch(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(None::<BatchInfo>));
    let mut registry = Registry::new();
    let steps = Arc::clone(&order);
    registry.register("step", move |payload: Value, _ctx| {
        let steps = Arc::clone(&steps);
        async move {
            steps
                .lock()
                .unwrap()
                .push(format!("step {}", payload["index"]));
            Ok::<_, HandlerError>(json!(null))
        }
    });
    let done = Arc::clone(&order);
    let batch_seen = Arc::clone(&seen);
    registry.register(
        "cb_complete",
        move |_payload: Value, ctx: fascicle_api::Context| {
            let done = Arc::clone(&done);
            let batch_seen = Arc::clone(&batch_seen);
            async move {
                done.lock().unwrap().push("callback".into());
                *batch_seen.lock().unwrap() = ctx.batch.clone();
                Ok::<_, HandlerError>(json!(null))
            }
        },
    );
    let receipt = queue
        .submit_batch(
            NewBatch::new("flow")
                .children(children("step", 3))
                .on_complete(NewOperation::new("cb_complete", json!(null))),
        )
        .await
        .unwrap();
    let worker = fast_worker(&store, registry);
    let watched = Arc::clone(&seen);
    run_until(worker, move || {
        let watched = Arc::clone(&watched);
        Box::pin(async move { watched.lock().unwrap().is_some() })
    })
    .await;
    let info = seen.lock().unwrap().clone().expect("the callback ran");
    assert_eq!(info.id, receipt.parent_id);
    assert_eq!(info.outcome, Status::Completed);
    assert_eq!(info.on, CallbackOn::Complete);
    assert_eq!(info.children.completed, 3);
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 4, "{order:?}");
    assert_eq!(
        order.last().map(String::as_str),
        Some("callback"),
        "{order:?}"
    );
}

/// A worker that records the last child of a batch claims the callback it fired at once,
/// without a notification and long before its poll interval (a minute here).
pub async fn a_callback_runs_without_waiting_for_the_poll_interval(store: Arc<dyn Store>) {
    // Submits wake the worker; the callbacks the store inserts notify no one in-process.
    let waker = fascicle_api::InProcessWaker::new();
    let queue = Queue::new(Arc::clone(&store)).with_notifier(Arc::new(waker.clone()));
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut registry = Registry::new();
    registry.register("step", |_: Value, _ctx| async move {
        // Not ready on its first poll: recorded by the background recorder.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, HandlerError>(json!(null))
    });
    registry.register("quick", |_: Value, _ctx| async move {
        // Ready on its first poll: recorded inline by the claiming loop.
        Ok::<_, HandlerError>(json!(null))
    });
    let flag = Arc::clone(&ran);
    registry.register("cb_complete", move |_: Value, _ctx| {
        let flag = Arc::clone(&flag);
        async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, HandlerError>(json!(null))
        }
    });
    let worker = fascicle_api::Worker::new(Arc::clone(&store), registry)
        .poll_interval(Duration::from_secs(60))
        .maintenance_interval(Duration::from_secs(60))
        .wake_on(waker.subscribe());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    for kind in ["step", "quick"] {
        ran.store(false, std::sync::atomic::Ordering::SeqCst);
        queue
            .submit_batch(
                NewBatch::new("flow")
                    .children(children(kind, 2))
                    .on_complete(NewOperation::new("cb_complete", json!(null))),
            )
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        while !ran.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the callback of a `{kind}` batch waited for the poll interval"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = stop_tx.send(());
    handle.await.unwrap().unwrap();
}

/// Several endings recorded by one store call form one step on every driver: a
/// `complete` whose first completion fails a `FailFast` child and whose second asks for a
/// retry leaves the retried sibling cancelled by the fail-fast step (not re-queued), and
/// siblings are named after the batch's first failure (submission order among failures
/// recorded together), whichever order the call lists them in.
pub async fn one_complete_call_is_one_fail_fast_step(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("fast")
                .children(children("step", 4))
                .with_failure_policy(FailurePolicy::FailFast),
        )
        .await
        .unwrap();
    let running = claim(&store, 3).await;
    let by_id: HashMap<OperationId, &ClaimedOperation> =
        running.iter().map(|c| (c.operation.id, c)).collect();
    let [first, second, third] = [0, 1, 2].map(|i| by_id[&receipt.child_ids[i]]);
    let completion = |c: &ClaimedOperation, outcome| fascicle_api::Completion {
        id: c.operation.id,
        lease_token: c.lease_token,
        outcome,
    };
    let applied = store
        .complete(&[
            completion(second, Outcome::Failed("second's error".into())),
            completion(first, Outcome::Failed("first's error".into())),
            completion(
                third,
                Outcome::Retry {
                    error: "try again".into(),
                    run_at: Utc::now(),
                },
            ),
        ])
        .await
        .unwrap();
    assert_eq!(applied, [Applied::Applied; 3]);
    let reason = messages::cancelled_by_fail_fast(receipt.child_ids[0]);
    for id in &receipt.child_ids[2..] {
        let child = store.get(*id).await.unwrap().unwrap();
        assert_eq!(child.status, Status::Cancelled, "{id}");
        assert_eq!(child.error.as_deref(), Some(reason.as_str()), "{id}");
    }
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert_eq!(parent.error.as_deref(), Some("first's error"));
}

/// A rescue is one step too: in a `FailFast` batch whose child on its last attempt and
/// whose sibling with attempts left both lost their leases, the sibling goes back to
/// `pending` and is then cancelled by the fail-fast step, on every driver.
pub async fn one_rescue_is_one_fail_fast_step(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let last = OperationId::new();
    let receipt = queue
        .submit_batch(
            NewBatch::new("fast")
                .child(
                    NewOperation::new("step", json!(0))
                        .with_id(last)
                        .with_max_attempts(1),
                )
                .children(children("step", 2))
                .with_failure_policy(FailurePolicy::FailFast),
        )
        .await
        .unwrap();
    let short = store
        .claim(&ClaimRequest {
            lease: Duration::from_millis(50),
            ..request(2)
        })
        .await
        .unwrap();
    assert_eq!(short.len(), 2);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let report = store.rescue_expired_leases().await.unwrap();
    assert_eq!((report.requeued, report.failed), (1, 1));
    let reason = messages::cancelled_by_fail_fast(last);
    for id in &receipt.child_ids[1..] {
        let child = store.get(*id).await.unwrap().unwrap();
        assert_eq!(child.status, Status::Cancelled, "{id}");
        assert_eq!(child.error.as_deref(), Some(reason.as_str()), "{id}");
    }
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert!(claim(&store, 10).await.is_empty());
}
