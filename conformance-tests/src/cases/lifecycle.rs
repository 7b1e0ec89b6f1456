//! The worker lifecycle: claims, leases, outcomes, aggregation, recovery, cancellation,
//! statistics and pruning.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle_api::chrono::{self, Utc};
use fascicle_api::{
    Applied, ChildCounters, ChildRecord, ClaimRequest, ClaimedOperation, Completion, Error,
    HandlerError, Lease, NewBatch, NewOperation, OperationId, Outcome, ParentRecord, Queue,
    Registry, RetryPolicy, Status, Store, Worker, ZERO_CHILDREN_REASON,
};
use serde_json::{Value, json};

pub(super) fn request(limit: usize) -> ClaimRequest {
    ClaimRequest {
        worker_id: "conformance".into(),
        limit,
        lease: Duration::from_secs(30),
        kinds: None,
    }
}

pub(super) fn children(kind: &str, n: usize) -> impl Iterator<Item = NewOperation> + '_ {
    (0..n).map(move |i| NewOperation::new(kind, json!({ "index": i })))
}

/// Submits a batch of `n` `retain` children.
pub(super) async fn retain_batch(queue: &Queue, n: usize) -> fascicle_api::BatchReceipt {
    queue
        .submit_batch(NewBatch::new("batch").children(children("retain", n)))
        .await
        .unwrap()
}

pub(super) async fn claim(store: &Arc<dyn Store>, limit: usize) -> Vec<ClaimedOperation> {
    store.claim(&request(limit)).await.unwrap()
}

pub(super) async fn finish(
    store: &Arc<dyn Store>,
    claimed: &ClaimedOperation,
    outcome: Outcome,
) -> Applied {
    store
        .complete(&[Completion {
            id: claimed.operation.id,
            lease_token: claimed.lease_token,
            outcome,
        }])
        .await
        .unwrap()[0]
}

pub(super) async fn status(store: &Arc<dyn Store>, id: OperationId) -> Status {
    store
        .get(id)
        .await
        .unwrap()
        .expect("operation exists")
        .status
}

pub(super) fn fast_worker(store: &Arc<dyn Store>, registry: Registry) -> Worker {
    Worker::new(Arc::clone(store), registry)
        .poll_interval(Duration::from_millis(20))
        .maintenance_interval(Duration::from_millis(100))
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
            jitter: 0.0,
        })
}

pub(super) type BoxedCheck = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Runs a worker until `done` holds (checked every 20 ms) or 20 s pass.
pub(super) async fn run_until(
    worker: Worker,
    done: impl Fn() -> BoxedCheck + Send + 'static,
) -> fascicle_api::WorkerReport {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if done().await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not finish the work within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    handle.await.unwrap().unwrap()
}

pub(super) fn parent_terminal(store: &Arc<dyn Store>, parent: OperationId) -> BoxedCheck {
    let store = Arc::clone(store);
    Box::pin(async move {
        store
            .get(parent)
            .await
            .unwrap()
            .unwrap()
            .status
            .is_terminal()
    })
}

/// A parent is never handed to a worker, however long the queue is drained.
pub async fn claim_never_returns_parents(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 3).await;
    let claimed = claim(&store, 100).await;
    assert_eq!(claimed.len(), 3);
    assert!(claimed.iter().all(|c| !c.operation.is_parent()));
    assert!(claimed.iter().all(|c| c.operation.id != receipt.parent_id));
    assert!(claim(&store, 100).await.is_empty());
    let claimed_op = &claimed[0].operation;
    assert_eq!(claimed_op.status, Status::Processing);
    assert_eq!(claimed_op.attempts, 1);
    assert_eq!(claimed_op.worker_id.as_deref(), Some("conformance"));
    assert!(claimed_op.lease_expires_at.is_some());
    assert_eq!(status(&store, receipt.parent_id).await, Status::Pending);
}

/// Higher priority first, then earlier `run_at`, then submission order; nothing before
/// its `run_at`; only the requested kinds.
pub async fn claim_respects_priority_and_run_at(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let now = Utc::now();
    let mut ids = HashMap::new();
    for (name, priority, offset_ms, kind) in [
        ("low", 0, -50, "a"),
        ("high", 10, 0, "a"),
        ("high_earlier", 10, -100, "a"),
        ("later", 100, 60_000, "a"),
        ("other_kind", 50, -100, "b"),
        ("low_second", 0, -50, "a"),
    ] {
        let receipt = queue
            .submit(
                NewOperation::new(kind, json!({ "name": name }))
                    .with_priority(priority)
                    .with_run_at(now + chrono::Duration::milliseconds(offset_ms)),
            )
            .await
            .unwrap();
        ids.insert(receipt.id, name);
    }
    let claimed = store
        .claim(&ClaimRequest {
            kinds: Some(vec!["a".into()]),
            ..request(10)
        })
        .await
        .unwrap();
    let order: Vec<&str> = claimed.iter().map(|c| ids[&c.operation.id]).collect();
    assert_eq!(order, ["high_earlier", "high", "low", "low_second"]);
    let rest = claim(&store, 10).await;
    let rest: Vec<&str> = rest.iter().map(|c| ids[&c.operation.id]).collect();
    assert_eq!(rest, ["other_kind"], "a future run_at must not be claimed");
}

/// A retryable error goes back to `pending` after a backoff, then succeeds.
pub async fn retry_backoff_then_success(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit(NewOperation::new("flaky", json!({})).with_max_attempts(3))
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let mut registry = Registry::new();
    registry.register("flaky", move |_: Value, ctx| {
        let seen = Arc::clone(&seen);
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            if ctx.attempt == 1 {
                Err(HandlerError::retryable("temporarily unavailable"))
            } else {
                Ok(json!({ "attempt": ctx.attempt }))
            }
        }
    });
    let id = receipt.id;
    let check_store = Arc::clone(&store);
    let report = run_until(fast_worker(&store, registry), move || {
        let store = Arc::clone(&check_store);
        Box::pin(async move { status(&store, id).await == Status::Completed })
    })
    .await;
    let op = store.get(id).await.unwrap().unwrap();
    assert_eq!(op.attempts, 2);
    assert_eq!(op.result, Some(json!({ "attempt": 2 })));
    assert_eq!(
        op.error, None,
        "a completed operation keeps no earlier attempt's error"
    );
    assert!(op.completed_at.is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!((report.retried, report.completed), (1, 1));
}

/// A permanent error fails the operation at once, whatever attempts remain.
pub async fn permanent_error_fails_immediately(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit(NewOperation::new("doomed", json!({})).with_max_attempts(5))
        .await
        .unwrap();
    let claimed = claim(&store, 1).await;
    let mut registry = Registry::new();
    registry.register("doomed", |_: Value, _| async {
        Err::<Value, _>(HandlerError::permanent("document is not UTF-8"))
    });
    // Return the claim first, so the worker gets it.
    store
        .release(&[Lease {
            id: claimed[0].operation.id,
            token: claimed[0].lease_token,
        }])
        .await
        .unwrap();
    let id = receipt.id;
    let check_store = Arc::clone(&store);
    run_until(fast_worker(&store, registry), move || {
        let store = Arc::clone(&check_store);
        Box::pin(async move { status(&store, id).await.is_terminal() })
    })
    .await;
    let op = store.get(id).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Failed);
    assert_eq!(op.attempts, 1, "release must not spend an attempt");
    assert_eq!(op.error.as_deref(), Some("document is not UTF-8"));
    assert!(op.completed_at.is_some());
}

/// The last allowed attempt failing fails the child and, with it, the batch.
pub async fn max_attempts_exhausted_fails_and_fails_parent(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("batch")
                .child(NewOperation::new("ok", json!({})))
                .child(NewOperation::new("always_busy", json!({})).with_max_attempts(2)),
        )
        .await
        .unwrap();
    let mut registry = Registry::new();
    registry.register("ok", |_: Value, _| async {
        Ok::<_, HandlerError>(json!("done"))
    });
    registry.register("always_busy", |_: Value, _| async {
        Err::<Value, _>(HandlerError::retryable("database is busy"))
    });
    let parent = receipt.parent_id;
    let check = Arc::clone(&store);
    run_until(fast_worker(&store, registry), move || {
        parent_terminal(&check, parent)
    })
    .await;
    let busy = store.get(receipt.child_ids[1]).await.unwrap().unwrap();
    assert_eq!(busy.status, Status::Failed);
    assert_eq!(busy.attempts, 2);
    assert!(busy.error.as_deref().unwrap().contains("database is busy"));
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert!(
        parent
            .error
            .as_deref()
            .unwrap()
            .contains("database is busy")
    );
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 2,
            completed: 1,
            failed: 1,
            cancelled: 0
        }
    );
    assert!(parent.completed_at.is_some());
}

/// All children completed → the parent completes, with a summary, exactly when the last
/// one does.
pub async fn parent_completes_when_all_children_complete(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 3).await;
    let claimed = claim(&store, 3).await;
    for (i, c) in claimed.iter().enumerate() {
        assert_eq!(status(&store, receipt.parent_id).await, Status::Pending);
        assert_eq!(
            finish(&store, c, Outcome::Completed(json!({ "n": i }))).await,
            Applied::Applied
        );
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        assert_eq!(parent.children.unwrap().completed, i as u64 + 1);
    }
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Completed);
    assert_eq!(parent.error, None);
    assert_eq!(
        parent.result,
        Some(json!({ "children": 3, "completed": 3, "failed": 0, "cancelled": 0 }))
    );
    assert!(parent.completed_at.is_some());
    let done = store.get(claimed[0].operation.id).await.unwrap().unwrap();
    assert_eq!(done.result, Some(json!({ "n": 0 })));
    assert!(done.completed_at.is_some() && done.worker_id.is_none());
}

/// Any child failed → the parent fails with the most common child error.
pub async fn parent_fails_with_most_common_child_error(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 5).await;
    let claimed = claim(&store, 5).await;
    let outcomes = [
        Outcome::Failed("timeout".into()),
        Outcome::Completed(json!(null)),
        Outcome::Failed("disk full".into()),
        Outcome::Failed("disk full".into()),
        Outcome::Cancelled("stop".into()),
    ];
    for (c, outcome) in claimed.iter().zip(outcomes) {
        finish(&store, c, outcome).await;
    }
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    let error = parent.error.unwrap();
    assert!(error.starts_with("disk full"), "{error}");
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 5,
            completed: 1,
            failed: 3,
            cancelled: 1
        }
    );
}

/// 200 batches of 2 children, the two completed at the same instant from two tasks:
/// every parent ends terminal exactly once with exact counters.
pub async fn last_two_children_race(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let mut pairs = Vec::new();
    for _ in 0..200 {
        let receipt = queue
            .submit_batch(NewBatch::new("pair").children(children("half", 2)))
            .await
            .unwrap();
        pairs.push(receipt);
    }
    let claimed = claim(&store, 400).await;
    assert_eq!(claimed.len(), 400);
    let by_id: HashMap<OperationId, ClaimedOperation> =
        claimed.into_iter().map(|c| (c.operation.id, c)).collect();
    let (left, right): (Vec<_>, Vec<_>) = pairs
        .iter()
        .map(|r| {
            (
                by_id[&r.child_ids[0]].clone(),
                by_id[&r.child_ids[1]].clone(),
            )
        })
        .unzip();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = [left, right]
        .into_iter()
        .map(|side| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                for c in side {
                    barrier.wait().await;
                    let applied = finish(&store, &c, Outcome::Completed(json!(1))).await;
                    assert_eq!(applied, Applied::Applied);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for receipt in &pairs {
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        assert_eq!(parent.status, Status::Completed, "parent {}", parent.id);
        assert_eq!(parent.children.unwrap().completed, 2, "counters drifted");
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.batches.completed, 200);
    assert_eq!(stats.batches.open, 0);
}

/// Four workers drain 5,000 operations: each completed exactly once, and no operation
/// ever has two handlers running at once.
pub async fn concurrent_workers_no_double_processing(store: Arc<dyn Store>) {
    const N: usize = 5_000;
    let queue = Queue::new(Arc::clone(&store));
    for chunk in 0..(N / 500) {
        queue
            .submit_batch(NewBatch::new("chunk").children(
                (0..500).map(|i| NewOperation::new("count", json!({ "n": chunk * 500 + i }))),
            ))
            .await
            .unwrap();
    }
    let runs: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let in_flight: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for w in 0..4 {
        let mut registry = Registry::new();
        let (runs, in_flight, overlaps) = (
            Arc::clone(&runs),
            Arc::clone(&in_flight),
            Arc::clone(&overlaps),
        );
        registry.register("count", move |p: Value, _| {
            let (runs, in_flight, overlaps) = (
                Arc::clone(&runs),
                Arc::clone(&in_flight),
                Arc::clone(&overlaps),
            );
            async move {
                let n = p["n"].as_u64().unwrap();
                if !in_flight.lock().unwrap().insert(n) {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                *runs.lock().unwrap().entry(n).or_default() += 1;
                tokio::task::yield_now().await;
                in_flight.lock().unwrap().remove(&n);
                Ok::<_, HandlerError>(Value::Null)
            }
        });
        let mut stop = stop_rx.clone();
        let worker = fast_worker(&store, registry)
            .id(format!("worker-{w}"))
            .concurrency(8)
            .claim_batch(16);
        handles.push(tokio::spawn(worker.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = store.stats().await.unwrap();
        if stats
            .kinds
            .get("count")
            .is_some_and(|k| k.completed == N as u64)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drain too slow: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let mut completed = 0;
    for handle in handles {
        let report = handle.await.unwrap().unwrap();
        completed += report.completed;
        assert_eq!(report.lease_lost, 0);
    }
    assert_eq!(completed, N as u64);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two handlers ran one operation at once"
    );
    {
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), N);
        assert!(runs.values().all(|&n| n == 1), "an operation ran twice");
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.batches.completed, (N / 500) as u64);
}

pub(super) async fn claim_with_short_lease(
    store: &Arc<dyn Store>,
    lease: Duration,
) -> ClaimedOperation {
    let mut claimed = store
        .claim(&ClaimRequest {
            lease,
            ..request(1)
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    claimed.remove(0)
}

/// An expired lease goes back to `pending`; past `max_attempts` it fails, and its parent
/// with it.
pub async fn expired_lease_is_rescued(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit_batch(
            NewBatch::new("batch").child(NewOperation::new("slow", json!({})).with_max_attempts(2)),
        )
        .await
        .unwrap();
    let child = receipt.child_ids[0];
    let lease = Duration::from_millis(300);
    let claimed_at = tokio::time::Instant::now();
    let first = claim_with_short_lease(&store, lease).await;
    let early = store.rescue_expired_leases().await.unwrap().requeued;
    // Only meaningful while the lease has not run out by the clock of this task: on a
    // loaded host the rescue may start after it did.
    if claimed_at.elapsed() < lease {
        assert_eq!(early, 0, "a lease that has not expired was rescued");
    }
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let report = store.rescue_expired_leases().await.unwrap();
    assert_eq!((early + report.requeued, report.failed), (1, 0));
    let op = store.get(child).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Pending);
    assert!(op.worker_id.is_none() && op.lease_expires_at.is_none());
    drop(first);

    let second = claim_with_short_lease(&store, Duration::from_millis(50)).await;
    assert_eq!(second.operation.attempts, 2);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let report = store.rescue_expired_leases().await.unwrap();
    assert_eq!((report.requeued, report.failed), (0, 1));
    assert_eq!(status(&store, child).await, Status::Failed);
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Failed);
    assert!(parent.error.unwrap().contains("lease expired"));
}

/// Fencing: once a lease was rescued, the old holder's completion and heartbeat change
/// nothing, and the new holder's do.
pub async fn rescued_worker_cannot_complete(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = queue
        .submit(NewOperation::new("slow", json!({})))
        .await
        .unwrap();
    let stale = claim_with_short_lease(&store, Duration::from_millis(40)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.rescue_expired_leases().await.unwrap().requeued, 1);
    let fresh = claim(&store, 1).await.remove(0);
    assert_ne!(fresh.lease_token, stale.lease_token);

    let beat = store
        .heartbeat(
            &[Lease {
                id: receipt.id,
                token: stale.lease_token,
            }],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(!beat[0].held, "a stale lease must not be extended");
    assert_eq!(
        finish(&store, &stale, Outcome::Completed(json!("stale"))).await,
        Applied::LeaseLost
    );
    assert_eq!(
        finish(&store, &stale, Outcome::Failed("stale".into())).await,
        Applied::LeaseLost
    );
    assert_eq!(status(&store, receipt.id).await, Status::Processing);
    assert_eq!(
        finish(&store, &fresh, Outcome::Completed(json!("fresh"))).await,
        Applied::Applied
    );
    let op = store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.result),
        (Status::Completed, Some(json!("fresh")))
    );
    // A duplicate completion of the same attempt changes nothing either.
    assert_eq!(
        finish(&store, &fresh, Outcome::Failed("late duplicate".into())).await,
        Applied::LeaseLost
    );
    assert_eq!(status(&store, receipt.id).await, Status::Completed);
}

/// A parent whose children never reached the store fails with an explicit reason.
pub async fn reconcile_zero_child_parent(store: Arc<dyn Store>) {
    // Only a broken producer (or data from before fascicle) can leave such a parent; make
    // one through the raw transaction API.
    let parent = ParentRecord {
        id: OperationId::new(),
        kind: "batch_retain".into(),
        metadata: Value::Null,
        children_total: 2,
        created_at: Utc::now(),
        plan: Default::default(),
        parent_id: None,
        dependents: Vec::new(),
    };
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&parent).await.unwrap();
    tx.commit().await.unwrap();
    let healthy = Queue::new(Arc::clone(&store))
        .submit_batch(NewBatch::new("batch").children(children("retain", 1)))
        .await
        .unwrap();

    let report = store.reconcile_orphan_parents().await.unwrap();
    assert_eq!(
        (report.empty_parents_failed, report.parents_finalized),
        (1, 0)
    );
    let stranded = store.get(parent.id).await.unwrap().unwrap();
    assert_eq!(stranded.status, Status::Failed);
    assert_eq!(stranded.error.as_deref(), Some(ZERO_CHILDREN_REASON));
    assert!(stranded.completed_at.is_some());
    assert_eq!(status(&store, healthy.parent_id).await, Status::Pending);
    let again = store.reconcile_orphan_parents().await.unwrap();
    assert_eq!(
        (again.empty_parents_failed, again.parents_finalized),
        (0, 0)
    );
}

/// A pending parent whose children are all terminal (its counters drifted) is recounted
/// and finalized.
pub async fn reconcile_parent_with_all_children_terminal(store: Arc<dyn Store>) {
    // Counters that promise 3 children where only 2 exist — the state a crash between
    // two non-atomic writes of an older writer left; the API cannot produce it, so the
    // driver's fixture writes it: the last completion leaves the parent pending.
    let now = Utc::now();
    let parent = ParentRecord {
        id: OperationId::new(),
        kind: "batch".into(),
        metadata: Value::Null,
        children_total: 2,
        created_at: now,
        plan: Default::default(),
        parent_id: None,
        dependents: Vec::new(),
    };
    let kids: Vec<ChildRecord> = (0..2)
        .map(|i| ChildRecord {
            id: OperationId::new(),
            parent_id: Some(parent.id),
            kind: "retain".into(),
            payload: json!(i),
            payload_json: json!(i).to_string(),
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
    tx.insert_children(&kids).await.unwrap();
    tx.commit().await.unwrap();
    crate::tamper_children_total(parent.id, 3).await;
    assert_eq!(
        store
            .get(parent.id)
            .await
            .unwrap()
            .unwrap()
            .children
            .unwrap()
            .total,
        3,
        "the fixture's tamper did not write children_total"
    );
    let claimed = claim(&store, 2).await;
    finish(&store, &claimed[0], Outcome::Completed(json!(null))).await;
    finish(&store, &claimed[1], Outcome::Failed("bad input".into())).await;
    assert_eq!(status(&store, parent.id).await, Status::Pending);

    let report = store.reconcile_orphan_parents().await.unwrap();
    assert_eq!(
        (report.empty_parents_failed, report.parents_finalized),
        (0, 1)
    );
    let fixed = store.get(parent.id).await.unwrap().unwrap();
    assert_eq!(fixed.status, Status::Failed);
    assert_eq!(fixed.error.as_deref(), Some("bad input"));
    assert_eq!(
        fixed.children.unwrap(),
        ChildCounters {
            total: 2,
            completed: 1,
            failed: 1,
            cancelled: 0
        }
    );
}

/// Cancelling a batch cancels its pending children, signals its running ones, and the
/// parent is finalized once they stop.
pub async fn cancel_batch_cascades(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 4).await;
    let running = claim(&store, 1).await.remove(0);
    let report = store.cancel(receipt.parent_id).await.unwrap();
    assert_eq!((report.cancelled, report.signalled), (3, 1));
    assert_eq!(status(&store, receipt.parent_id).await, Status::Pending);
    let beat = store
        .heartbeat(
            &[Lease {
                id: running.operation.id,
                token: running.lease_token,
            }],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(
        beat[0].held && beat[0].cancel_requested,
        "the handler must see the signal"
    );
    finish(
        &store,
        &running,
        Outcome::Cancelled("cancellation requested".into()),
    )
    .await;
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Cancelled);
    assert_eq!(parent.children.unwrap().cancelled, 4);
    assert!(
        claim(&store, 10).await.is_empty(),
        "cancelled children must not be claimed"
    );
    let again = store.cancel(receipt.parent_id).await.unwrap();
    assert_eq!(again.already_terminal, 4);
    assert!(matches!(
        store.cancel(OperationId::new()).await,
        Err(Error::NotFound(_))
    ));
}

/// Retrying a batch re-queues its failed and cancelled children and reopens the parent.
pub async fn retry_batch_requeues_failed_children(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let receipt = retain_batch(&queue, 3).await;
    let claimed = claim(&store, 3).await;
    finish(&store, &claimed[0], Outcome::Completed(json!(null))).await;
    finish(&store, &claimed[1], Outcome::Failed("boom".into())).await;
    finish(&store, &claimed[2], Outcome::Cancelled("stop".into())).await;
    assert_eq!(status(&store, receipt.parent_id).await, Status::Failed);

    assert_eq!(store.retry_batch(receipt.parent_id).await.unwrap(), 2);
    let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Pending);
    assert!(parent.completed_at.is_none() && parent.error.is_none());
    assert_eq!(
        parent.children.unwrap(),
        ChildCounters {
            total: 3,
            completed: 1,
            failed: 0,
            cancelled: 0
        }
    );
    let again = claim(&store, 10).await;
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|c| c.operation.attempts == 1));
    for c in &again {
        finish(&store, c, Outcome::Completed(json!(null))).await;
    }
    assert_eq!(status(&store, receipt.parent_id).await, Status::Completed);
    assert!(matches!(
        store.retry_batch(receipt.parent_id).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        store.retry_batch(OperationId::new()).await,
        Err(Error::NotFound(_))
    ));
}

/// Never two `processing` operations with the same serialization key.
pub async fn serialization_key_exclusive(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for i in 0..3 {
        queue
            .submit(NewOperation::new("bank", json!({ "i": i })).with_serialization_key("bank:1"))
            .await
            .unwrap();
    }
    queue
        .submit(NewOperation::new("bank", json!({ "i": 9 })).with_serialization_key("bank:2"))
        .await
        .unwrap();
    let first = claim(&store, 10).await;
    let keys: Vec<_> = first
        .iter()
        .map(|c| c.operation.serialization_key.clone().unwrap())
        .collect();
    assert_eq!(first.len(), 2, "one per key: {keys:?}");
    assert!(keys.contains(&"bank:1".to_string()) && keys.contains(&"bank:2".to_string()));
    assert!(claim(&store, 10).await.is_empty(), "bank:1 is held");
    let held = first
        .iter()
        .find(|c| c.operation.serialization_key.as_deref() == Some("bank:1"))
        .unwrap();
    finish(&store, held, Outcome::Completed(json!(null))).await;
    let next = claim(&store, 10).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].operation.serialization_key.as_deref(),
        Some("bank:1")
    );

    // Concurrent claimers still never hold the same key twice.
    for i in 0..20 {
        queue
            .submit(NewOperation::new("bank", json!({ "j": i })).with_serialization_key("bank:3"))
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { claim(&store, 5).await })
        })
        .collect();
    let mut bank3 = 0;
    for task in tasks {
        bank3 += task
            .await
            .unwrap()
            .iter()
            .filter(|c| c.operation.serialization_key.as_deref() == Some("bank:3"))
            .count();
    }
    assert_eq!(bank3, 1, "two holders of serialization key bank:3");
}

/// Shutdown stops claiming, waits for handlers up to the timeout, then releases the
/// rest to `pending` without spending an attempt.
pub async fn graceful_shutdown_releases_in_flight(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let quick = queue
        .submit(NewOperation::new("quick", json!({})).with_priority(1))
        .await
        .unwrap();
    let stuck = queue
        .submit(NewOperation::new("stuck", json!({})))
        .await
        .unwrap();
    let mut registry = Registry::new();
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    registry.register("quick", |_: Value, _| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, HandlerError>(json!("quick"))
    });
    registry.register("stuck", move |_: Value, _| {
        let signal = Arc::clone(&signal);
        async move {
            signal.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, HandlerError>(json!("never"))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = fast_worker(&store, registry)
        .concurrency(4)
        .shutdown_timeout(Duration::from_millis(300));
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the stuck handler never started");
    let _ = stop_tx.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("shutdown did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(report.released, 1);
    assert_eq!(status(&store, quick.id).await, Status::Completed);
    let op = store.get(stuck.id).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Pending);
    assert_eq!(op.attempts, 0, "a released attempt must not count");
    assert!(op.worker_id.is_none());
}

/// Statistics report every state per kind, with batches apart.
pub async fn stats_breakdown(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    queue
        .submit_batch(NewBatch::new("batch").children(children("k", 6)))
        .await
        .unwrap();
    queue
        .submit(
            NewOperation::new("k", json!({})).with_run_at(Utc::now() + chrono::Duration::hours(1)),
        )
        .await
        .unwrap();
    let claimed = claim(&store, 4).await;
    finish(&store, &claimed[0], Outcome::Completed(json!(null))).await;
    finish(&store, &claimed[1], Outcome::Failed("x".into())).await;
    finish(&store, &claimed[2], Outcome::Cancelled("y".into())).await;
    let stats = store.stats().await.unwrap();
    let k = stats.kinds["k"];
    assert_eq!(
        (
            k.ready,
            k.scheduled,
            k.processing,
            k.completed,
            k.failed,
            k.cancelled
        ),
        (2, 1, 1, 1, 1, 1)
    );
    assert_eq!(stats.batches.open, 1);
    assert!(!stats.kinds.contains_key("batch"));
}

/// Pruning deletes old terminal work, a batch only whole and only once its parent is
/// terminal; nothing younger than the cut-off.
pub async fn prune_removes_only_whole_terminal_batches(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let done = queue
        .submit_batch(NewBatch::new("batch").children(children("a", 2)))
        .await
        .unwrap();
    let open = queue
        .submit_batch(NewBatch::new("batch").children(children("b", 2)))
        .await
        .unwrap();
    let single = queue
        .submit(NewOperation::new("c", json!({})))
        .await
        .unwrap();
    for c in claim(&store, 10).await {
        let keep_open = c.operation.id == open.child_ids[1];
        if !keep_open {
            finish(&store, &c, Outcome::Completed(json!(null))).await;
        }
    }
    assert_eq!(status(&store, done.parent_id).await, Status::Completed);
    assert_eq!(status(&store, open.child_ids[0]).await, Status::Completed);

    let before = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.prune(before).await.unwrap(), Default::default());
    let report = store
        .prune(Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!((report.batches, report.operations), (1, 3));
    assert!(store.get(done.parent_id).await.unwrap().is_none());
    assert!(store.get(done.child_ids[0]).await.unwrap().is_none());
    assert!(store.get(single.id).await.unwrap().is_none());
    // The open batch keeps every row, its completed child included.
    assert!(store.get(open.parent_id).await.unwrap().is_some());
    assert!(store.get(open.child_ids[0]).await.unwrap().is_some());
    assert_eq!(store.children_of(open.parent_id).await.unwrap().len(), 2);
}

/// A prune longer than one chunk (`PRUNE_CHUNK_ROWS`): three finished batches of a
/// chunk's size each and a few finished stand-alone operations all go — every batch
/// whole — while a live batch and a recent one stay.
pub async fn prune_deletes_a_long_history_in_chunks(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let size = fascicle_api::PRUNE_CHUNK_ROWS as usize;
    let mut old = Vec::new();
    for _ in 0..3 {
        let receipt = retain_batch(&queue, size).await;
        store.cancel(receipt.parent_id).await.unwrap();
        old.push(receipt);
    }
    let mut singles = Vec::new();
    for i in 0..10 {
        let id = queue
            .submit(NewOperation::new("single", json!({ "i": i })))
            .await
            .unwrap()
            .id;
        store.cancel(id).await.unwrap();
        singles.push(id);
    }
    let live = retain_batch(&queue, 3).await;
    let cutoff = Utc::now() + chrono::Duration::milliseconds(50);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recent = retain_batch(&queue, 1).await;
    store.cancel(recent.parent_id).await.unwrap();

    let report = store.prune(cutoff).await.unwrap();
    assert_eq!(
        (report.batches, report.operations),
        (3, 3 * size as u64 + 10),
        "{report:?}"
    );
    for receipt in &old {
        assert!(store.get(receipt.parent_id).await.unwrap().is_none());
        assert!(
            store
                .children_of(receipt.parent_id)
                .await
                .unwrap()
                .is_empty()
        );
    }
    for id in singles {
        assert!(store.get(id).await.unwrap().is_none());
    }
    assert_eq!(store.children_of(live.parent_id).await.unwrap().len(), 3);
    assert_eq!(store.children_of(recent.parent_id).await.unwrap().len(), 1);
    assert!(store.prune(cutoff).await.unwrap().is_empty());
}
