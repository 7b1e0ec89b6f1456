//! Two store instances on one backend at once — two pools on one schema, two
//! `SqliteStore`s on one file, two handles on one in-process store — the second (and a
//! third) from the fixture's [`twin`](crate::twin). The same work goes through both:
//! workers on each draining one queue, and every transition racing its counterpart on the
//! other instance. Whichever lands first: each operation is run and recorded once, each
//! child is in exactly one state, a parent's counters equal a recount of its children's
//! rows (read through every instance, which all read the same), every report adds up to
//! what happened — nothing counted twice — and no call fails (a deadlock or a lock
//! timeout between the two instances surfacing as an error fails the case).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle_api::chrono::{self, Utc};
use fascicle_api::{
    Applied, ChildCounters, ClaimRequest, ClaimedOperation, Completion, HandlerError, NewBatch,
    NewOperation, Operation, OperationId, Outcome, ParentRecord, PruneReport, Queue,
    ReconcileReport, Registry, RescueReport, Status, Store, ZERO_CHILDREN_REASON,
};
use serde_json::{Value, json};
use tokio::sync::Barrier;

use super::lifecycle::fast_worker;

/// Rounds of each race in [`two_instances_race_every_transition`].
const ROUNDS: usize = 4;

/// The instances of one case, each with the name its failures are reported under.
type Instances<'a> = [(&'static str, &'a Arc<dyn Store>)];

/// Each child's id, state and attempts, as one instance reads them.
type ChildStates = Vec<(OperationId, Status, u32)>;

/// Every attempt a handler ran: the operation, the attempt, the worker's instance.
type Runs = Arc<Mutex<Vec<(OperationId, u32, &'static str)>>>;

fn claim_request(worker: &str, limit: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.into(),
        limit,
        lease,
        kinds: None,
    }
}

/// Claims through `store`, recording `name` as the worker id, with a 30 s lease.
async fn claim_on(store: &Arc<dyn Store>, name: &str, limit: usize) -> Vec<ClaimedOperation> {
    store
        .claim(&claim_request(name, limit, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("claim through {name} failed: {e}"))
}

fn completion(claimed: &ClaimedOperation, outcome: Outcome) -> Completion {
    Completion {
        id: claimed.operation.id,
        lease_token: claimed.lease_token,
        outcome,
    }
}

/// Records one outcome through `store` and returns whether it applied.
async fn finish_on(
    store: &Arc<dyn Store>,
    name: &str,
    claimed: &ClaimedOperation,
    outcome: Outcome,
) -> Applied {
    store
        .complete(&[completion(claimed, outcome)])
        .await
        .unwrap_or_else(|e| panic!("complete through {name} failed: {e}"))[0]
}

async fn get_on(store: &Arc<dyn Store>, name: &str, id: OperationId) -> Option<Operation> {
    store
        .get(id)
        .await
        .unwrap_or_else(|e| panic!("get through {name} failed: {e}"))
}

async fn status_on(store: &Arc<dyn Store>, name: &str, id: OperationId) -> Status {
    get_on(store, name, id)
        .await
        .unwrap_or_else(|| panic!("{id} is not stored (read through {name})"))
        .status
}

/// A batch of `n` children of kind `kind`, their payloads numbered.
fn batch(kind: &str, n: usize, tag: Value) -> NewBatch {
    NewBatch::new("batch").children(
        (0..n).map(|i| NewOperation::new(kind, json!({ "tag": tag.clone(), "index": i }))),
    )
}

async fn submit(queue: &Queue, name: &str, batch: NewBatch) -> fascicle_api::BatchReceipt {
    queue
        .submit_batch(batch)
        .await
        .unwrap_or_else(|e| panic!("submit through {name} failed: {e}"))
}

/// Checks `parent` through every instance: its counters equal a recount of its children's
/// rows, it is terminal exactly when they all are (with the outcome
/// [`parent_outcome`](fascicle_api::parent_outcome) gives), and every instance reads the
/// same parent and the same state of every child. Returns the parent as the first reads it.
async fn assert_consistent(instances: &Instances<'_>, parent: OperationId, at: &str) -> Operation {
    let mut first: Option<(Operation, ChildStates)> = None;
    for (name, store) in instances {
        let children = store
            .children_of(parent)
            .await
            .unwrap_or_else(|e| panic!("{at}: children_of through {name} failed: {e}"));
        let mut counted = ChildCounters {
            total: children.len() as u64,
            ..ChildCounters::default()
        };
        for child in &children {
            match child.status {
                Status::Completed => counted.completed += 1,
                Status::Failed => counted.failed += 1,
                Status::Cancelled => counted.cancelled += 1,
                _ => {}
            }
        }
        let stored = get_on(store, name, parent)
            .await
            .unwrap_or_else(|| panic!("{at}: parent {parent} is gone (read through {name})"));
        assert_eq!(
            stored.children,
            Some(counted),
            "{at}: the parent's counters disagree with its children's rows (through {name})"
        );
        let all_terminal = children.iter().all(|c| c.status.is_terminal());
        assert_eq!(
            stored.status.is_terminal(),
            all_terminal,
            "{at}: parent {:?} with children {:?} (through {name})",
            stored.status,
            children.iter().map(|c| c.status).collect::<Vec<_>>()
        );
        if all_terminal {
            assert_eq!(
                Some(stored.status),
                fascicle_api::parent_outcome(&counted),
                "{at}: through {name}"
            );
        }
        let states: Vec<_> = children
            .iter()
            .map(|c| (c.id, c.status, c.attempts))
            .collect();
        match &first {
            None => first = Some((stored, states)),
            Some((parent_first, states_first)) => {
                assert_eq!(
                    (stored.status, stored.children, &states),
                    (parent_first.status, parent_first.children, states_first),
                    "{at}: {name} reads another state than {}",
                    instances[0].0
                );
            }
        }
    }
    first.expect("at least one instance").0
}

/// Every instance reads the same statistics.
async fn assert_same_stats(instances: &Instances<'_>, at: &str) {
    let mut first = None;
    for (name, store) in instances {
        let stats = store
            .stats()
            .await
            .unwrap_or_else(|e| panic!("{at}: stats through {name} failed: {e}"));
        match &first {
            None => first = Some(stats),
            Some(first) => assert_eq!(&stats, first, "{at}: {name} counts otherwise"),
        }
    }
}

/// Ten batches of twenty children submitted through one instance, a worker on each of
/// two instances draining them at once (the `fast_worker` settings, 30 s leases): every
/// child runs exactly once, on one worker, and is recorded by it; every batch completes
/// with counters equal to its children's rows through both instances; the two workers'
/// reports add up to the total, and both did part of it.
pub async fn two_instances_drain_one_queue_exactly_once(store: Arc<dyn Store>) {
    const BATCHES: usize = 10;
    const CHILDREN: usize = 20;
    const TOTAL: usize = BATCHES * CHILDREN;
    let a = store;
    let b = crate::twin().await;
    let queue = Queue::new(Arc::clone(&a));
    let mut receipts = Vec::new();
    for i in 0..BATCHES {
        receipts.push(submit(&queue, "instance A", batch("drain", CHILDREN, json!(i))).await);
    }
    let children: HashSet<OperationId> = receipts
        .iter()
        .flat_map(|r| r.child_ids.iter().copied())
        .collect();
    assert_eq!(children.len(), TOTAL);

    let runs: Runs = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for (name, instance) in [("instance-a", &a), ("instance-b", &b)] {
        let mut registry = Registry::new();
        let runs = Arc::clone(&runs);
        registry.register("drain", move |_: Value, ctx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.lock().unwrap().push((ctx.id, ctx.attempt, name));
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, HandlerError>(json!({ "ran_on": name }))
            }
        });
        let mut stop = stop_rx.clone();
        let worker = fast_worker(instance, registry)
            .id(name)
            .concurrency(4)
            .claim_batch(4);
        workers.push((
            name,
            tokio::spawn(worker.run(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })),
        ));
    }
    // Watched through B, which submitted nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut open = 0;
        for receipt in &receipts {
            if !status_on(&b, "instance B", receipt.parent_id)
                .await
                .is_terminal()
            {
                open += 1;
            }
        }
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} of {BATCHES} batches still open after 20 s with a worker on each instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut reports = HashMap::new();
    for (name, handle) in workers {
        let report = handle
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the worker on {name} failed: {e}"));
        reports.insert(name, report);
    }

    let runs = runs.lock().unwrap().clone();
    let mut ran: HashMap<OperationId, Vec<(u32, &str)>> = HashMap::new();
    for (id, attempt, name) in &runs {
        ran.entry(*id).or_default().push((*attempt, name));
    }
    let twice: Vec<_> = ran.iter().filter(|(_, r)| r.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "operations ran more than once (with 30 s leases none may): {twice:?}"
    );
    assert_eq!(
        ran.keys().copied().collect::<HashSet<_>>(),
        children,
        "the handlers ran other operations than the batches' children"
    );
    assert!(
        ran.values().all(|r| r[0].0 == 1),
        "an operation ran on an attempt other than its first"
    );
    for (name, report) in &reports {
        let on_it = runs.iter().filter(|(_, _, n)| n == name).count() as u64;
        assert_eq!(
            (report.claimed, report.completed),
            (on_it, on_it),
            "the report of the worker on {name} disagrees with its handler's runs: {report:?}"
        );
        assert_eq!(
            (
                report.failed,
                report.retried,
                report.cancelled,
                report.lease_lost,
                report.released,
                report.rescued,
                report.unrecorded,
                report.reconciled
            ),
            (0, 0, 0, 0, 0, 0, 0, 0),
            "the worker on {name}: {report:?}"
        );
        assert!(
            on_it > 0,
            "the worker on {name} ran nothing: the two instances did not share the work"
        );
    }
    assert_eq!(
        reports.values().map(|r| r.completed).sum::<u64>(),
        TOTAL as u64,
        "the reports do not add up: {reports:?}"
    );

    let instances: &Instances<'_> = &[("instance A", &a), ("instance B", &b)];
    for receipt in &receipts {
        let parent = assert_consistent(instances, receipt.parent_id, "after the drain").await;
        assert_eq!(parent.status, Status::Completed);
        let counters = parent.children.unwrap();
        assert_eq!(
            counters,
            ChildCounters {
                total: CHILDREN as u64,
                completed: CHILDREN as u64,
                failed: 0,
                cancelled: 0
            }
        );
        assert_eq!(parent.result, Some(fascicle_api::parent_summary(&counters)));
        for child in b.children_of(receipt.parent_id).await.unwrap() {
            let ran_on = ran[&child.id][0].1;
            assert_eq!(
                (child.status, child.attempts, child.result),
                (Status::Completed, 1, Some(json!({ "ran_on": ran_on }))),
                "child {}: not recorded once by the worker that ran it",
                child.id
            );
        }
    }
    assert_same_stats(instances, "after the drain").await;
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.kinds["drain"].completed, TOTAL as u64, "{stats:?}");
    assert_eq!(
        (stats.batches.completed, stats.batches.open),
        (BATCHES as u64, 0),
        "{stats:?}"
    );
}

/// Every transition raced across instances, on three of them (the case's store and two
/// twins, opened at once — two pools connecting and migrating one schema together):
/// submits through two at once, claims from two (never one operation twice),
/// completions through another instance than the claimer, a cancel through B while A
/// completes the batch's running children, `retry_batch` through A while B records a
/// sibling's completion, rescue of expired leases through all three while late
/// completions land, reconcile through all three while a batch's last child completes,
/// prune through all three while a live batch's children complete — with the invariants
/// checked through every instance after each, and every report summed across them.
pub async fn two_instances_race_every_transition(store: Arc<dyn Store>) {
    let a = store;
    let (b, c) = tokio::join!(crate::twin(), crate::twin());
    let instances: &Instances<'_> = &[("instance A", &a), ("instance B", &b), ("instance C", &c)];
    claims_and_completions_cross(&a, &b, instances).await;
    cancel_through_one_while_the_other_completes(&a, &b, instances).await;
    retry_batch_through_one_while_the_other_completes(&a, &b, instances).await;
    rescue_through_all_while_late_completions_land(instances).await;
    reconcile_through_all_while_a_last_child_completes(instances).await;
    prune_through_all_while_a_live_batch_completes(instances).await;
    assert_same_stats(instances, "at the end").await;
}

/// Submits through A and B at once, claims from both at once until nothing is left, and
/// records each claim's outcome through the instance that did not claim it.
async fn claims_and_completions_cross(
    a: &Arc<dyn Store>,
    b: &Arc<dyn Store>,
    instances: &Instances<'_>,
) {
    const CHILDREN: usize = 10;
    let (queue_a, queue_b) = (Queue::new(Arc::clone(a)), Queue::new(Arc::clone(b)));
    let (r0, r1, r2, r3) = tokio::join!(
        submit(&queue_a, "instance A", batch("cross", CHILDREN, json!(0))),
        submit(&queue_b, "instance B", batch("cross", CHILDREN, json!(1))),
        submit(&queue_a, "instance A", batch("cross", CHILDREN, json!(2))),
        submit(&queue_b, "instance B", batch("cross", CHILDREN, json!(3))),
    );
    let receipts = [r0, r1, r2, r3];
    let all: HashSet<OperationId> = receipts
        .iter()
        .flat_map(|r| r.child_ids.iter().copied())
        .collect();

    let all_children = all.len();
    let barrier = Arc::new(Barrier::new(2));
    let claimers: Vec<_> = [("instance A", a), ("instance B", b)]
        .into_iter()
        .map(|(name, store)| {
            let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut held = Vec::new();
                barrier.wait().await;
                // Bounded, and yielding: a store that hands out held operations again
                // must fail the case below, not spin here.
                while held.len() <= all_children {
                    let got = claim_on(&store, name, 3).await;
                    if got.is_empty() {
                        break;
                    }
                    held.extend(got);
                    tokio::task::yield_now().await;
                }
                held
            })
        })
        .collect();
    let mut held = Vec::new();
    for claimer in claimers {
        held.push(claimer.await.unwrap());
    }
    let (by_a, by_b) = (held.remove(0), held.remove(0));
    let mut seen = HashSet::new();
    for claimed in by_a.iter().chain(&by_b) {
        assert!(
            seen.insert(claimed.operation.id),
            "{} was claimed twice, once through each instance",
            claimed.operation.id
        );
        assert_eq!(claimed.operation.attempts, 1);
    }
    assert_eq!(seen, all, "the two claimers did not take every child");
    for claimed in &by_a {
        let op = get_on(b, "instance B", claimed.operation.id).await.unwrap();
        assert_eq!(
            (op.status, op.worker_id.as_deref()),
            (Status::Processing, Some("instance A"))
        );
    }
    for receipt in &receipts {
        assert_consistent(instances, receipt.parent_id, "after the claims").await;
    }

    // Batch 1 gets a failed child, batch 2 a cancelled one; 0 and 3 complete.
    let outcome_of = |claimed: &ClaimedOperation| {
        let payload = claimed
            .operation
            .payload
            .as_ref()
            .expect("a child's payload");
        match (payload["tag"].as_u64(), payload["index"].as_u64()) {
            (Some(1), Some(3)) => Outcome::Failed("boom".into()),
            (Some(2), Some(5)) => Outcome::Cancelled("stop".into()),
            _ => Outcome::Completed(json!(payload["index"])),
        }
    };
    let barrier = Arc::new(Barrier::new(2));
    let completers: Vec<_> = [("instance B", b, by_a), ("instance A", a, by_b)]
        .into_iter()
        .map(|(name, store, claims)| {
            let (store, barrier) = (Arc::clone(store), Arc::clone(&barrier));
            let outcomes: Vec<Outcome> = claims.iter().map(outcome_of).collect();
            tokio::spawn(async move {
                barrier.wait().await;
                for (claimed, outcome) in claims.iter().zip(outcomes) {
                    let applied = finish_on(&store, name, claimed, outcome).await;
                    assert_eq!(
                        applied,
                        Applied::Applied,
                        "{}'s completion through {name} was refused",
                        claimed.operation.id
                    );
                }
            })
        })
        .collect();
    for completer in completers {
        completer.await.unwrap();
    }
    for (receipt, expected) in receipts.iter().zip([
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
        Status::Completed,
    ]) {
        let parent =
            assert_consistent(instances, receipt.parent_id, "after the cross completions").await;
        assert_eq!(parent.status, expected, "batch {}", receipt.parent_id);
        assert_eq!(parent.children.unwrap().terminal(), CHILDREN as u64);
    }
}

/// A cancel of a batch through B while A records outcomes of its running children (a
/// success, a retryable failure, another success): every child ends in one state, the
/// cancel's report accounts for each child once.
async fn cancel_through_one_while_the_other_completes(
    a: &Arc<dyn Store>,
    b: &Arc<dyn Store>,
    instances: &Instances<'_>,
) {
    let queue = Queue::new(Arc::clone(a));
    for round in 0..ROUNDS {
        let at = format!("cancel round {round}");
        let receipt = submit(&queue, "instance A", batch("cancelled", 6, json!(round))).await;
        let running = claim_on(a, "instance A", 3).await;
        assert_eq!(running.len(), 3, "{at}");
        let barrier = Arc::new(Barrier::new(2));
        let cancel = {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            let parent = receipt.parent_id;
            tokio::spawn(async move {
                barrier.wait().await;
                b.cancel(parent).await
            })
        };
        let complete = {
            let (a, barrier) = (Arc::clone(a), Arc::clone(&barrier));
            let running = running.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut applied = Vec::new();
                for (claimed, outcome) in running.iter().zip([
                    Outcome::Completed(json!(0)),
                    Outcome::Retry {
                        error: "busy".into(),
                        run_at: Utc::now(),
                    },
                    Outcome::Completed(json!(2)),
                ]) {
                    applied.push(finish_on(&a, "instance A", claimed, outcome).await);
                }
                applied
            })
        };
        let report = cancel
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{at}: cancel through B failed: {e}"));
        let applied = complete.await.unwrap();
        assert_eq!(applied, [Applied::Applied; 3], "{at}");
        assert_eq!(
            report.cancelled + report.signalled + report.already_terminal,
            6,
            "{at}: the cancel counted a child twice or missed one: {report:?}"
        );
        assert!(
            (3..=4).contains(&report.cancelled),
            "{at}: {report:?} (three children were pending, and the retried one may be)"
        );
        for (claimed, expected) in
            running
                .iter()
                .zip([Status::Completed, Status::Cancelled, Status::Completed])
        {
            assert_eq!(
                status_on(b, "instance B", claimed.operation.id).await,
                expected,
                "{at}"
            );
        }
        let parent = assert_consistent(instances, receipt.parent_id, &at).await;
        assert_eq!(
            (parent.status, parent.children.unwrap()),
            (
                Status::Cancelled,
                ChildCounters {
                    total: 6,
                    completed: 2,
                    failed: 0,
                    cancelled: 4
                }
            ),
            "{at}"
        );
        assert!(
            claim_on(b, "instance B", 10).await.is_empty(),
            "{at}: a cancelled child was claimed"
        );
    }
}

/// `retry_batch` through A while B records the running sibling's completion: the
/// completion counts once, the retried child runs again and the batch completes.
async fn retry_batch_through_one_while_the_other_completes(
    a: &Arc<dyn Store>,
    b: &Arc<dyn Store>,
    instances: &Instances<'_>,
) {
    let queue = Queue::new(Arc::clone(b));
    for round in 0..ROUNDS {
        let at = format!("retry_batch round {round}");
        let receipt = submit(&queue, "instance B", batch("retried", 2, json!(round))).await;
        let claimed = claim_on(b, "instance B", 2).await;
        assert_eq!(claimed.len(), 2, "{at}");
        finish_on(b, "instance B", &claimed[0], Outcome::Failed("boom".into())).await;
        let barrier = Arc::new(Barrier::new(2));
        let retry = {
            let (a, barrier) = (Arc::clone(a), Arc::clone(&barrier));
            let parent = receipt.parent_id;
            tokio::spawn(async move {
                barrier.wait().await;
                a.retry_batch(parent).await
            })
        };
        let complete = {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            let running = claimed[1].clone();
            tokio::spawn(async move {
                barrier.wait().await;
                finish_on(
                    &b,
                    "instance B",
                    &running,
                    Outcome::Completed(json!("done")),
                )
                .await
            })
        };
        let retried = retry
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{at}: retry_batch through A failed: {e}"));
        assert_eq!(retried, 1, "{at}");
        assert_eq!(complete.await.unwrap(), Applied::Applied, "{at}");
        assert_eq!(
            status_on(b, "instance B", claimed[0].operation.id).await,
            Status::Pending,
            "{at}"
        );
        assert_eq!(
            status_on(a, "instance A", claimed[1].operation.id).await,
            Status::Completed,
            "{at}"
        );
        assert_consistent(instances, receipt.parent_id, &at).await;
        let again = claim_on(a, "instance A", 10).await;
        assert_eq!(again.len(), 1, "{at}");
        assert_eq!(
            (again[0].operation.id, again[0].operation.attempts),
            (claimed[0].operation.id, 1),
            "{at}"
        );
        finish_on(
            b,
            "instance B",
            &again[0],
            Outcome::Completed(json!("again")),
        )
        .await;
        let parent = assert_consistent(instances, receipt.parent_id, &at).await;
        assert_eq!(parent.status, Status::Completed, "{at}");
    }
}

/// Expired leases rescued through every instance at once while late completions of two
/// of them land through B: each child is rescued once or completed, never both, and the
/// rescue reports add up.
async fn rescue_through_all_while_late_completions_land(instances: &Instances<'_>) {
    let (a, b) = (instances[0].1, instances[1].1);
    let queue = Queue::new(Arc::clone(a));
    for round in 0..ROUNDS {
        let at = format!("rescue round {round}");
        // Children 0 and 1 have no attempt left, 2 and 3 have.
        let receipt = submit(
            &queue,
            "instance A",
            NewBatch::new("batch").children((0..4).map(|i| {
                NewOperation::new("rescued", json!({ "round": round, "index": i }))
                    .with_max_attempts(if i < 2 { 1 } else { 3 })
            })),
        )
        .await;
        let mut claimed = a
            .claim(&claim_request("instance A", 4, Duration::from_millis(50)))
            .await
            .unwrap_or_else(|e| panic!("{at}: claim through A failed: {e}"));
        claimed.sort_by_key(|c| {
            receipt
                .child_ids
                .iter()
                .position(|id| *id == c.operation.id)
        });
        assert_eq!(claimed.len(), 4, "{at}");
        tokio::time::sleep(Duration::from_millis(110)).await;
        let barrier = Arc::new(Barrier::new(instances.len() + 1));
        let rescuers: Vec<_> = instances
            .iter()
            .map(|(name, store)| {
                let (store, barrier, name) = (Arc::clone(store), Arc::clone(&barrier), *name);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .rescue_expired_leases()
                        .await
                        .unwrap_or_else(|e| panic!("rescue through {name} failed: {e}"))
                })
            })
            .collect();
        let late = [claimed[1].clone(), claimed[3].clone()];
        let completer = {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                b.complete(&late.map(|c| completion(&c, Outcome::Completed(json!("late")))))
                    .await
                    .unwrap_or_else(|e| panic!("the late completions through B failed: {e}"))
            })
        };
        let mut rescued = RescueReport::default();
        for rescuer in rescuers {
            let report = rescuer.await.unwrap();
            rescued.requeued += report.requeued;
            rescued.failed += report.failed;
            rescued.cancelled += report.cancelled;
        }
        let applied = completer.await.unwrap();
        let (late_1, late_3) = (
            applied[0] == Applied::Applied,
            applied[1] == Applied::Applied,
        );
        assert_eq!(
            (rescued.requeued, rescued.failed, rescued.cancelled),
            (1 + u64::from(!late_3), 1 + u64::from(!late_1), 0),
            "{at}: the rescues together counted a lease twice or missed one \
             (late completions applied: {applied:?})"
        );
        for (claimed, expected) in claimed.iter().zip([
            Status::Failed,
            if late_1 {
                Status::Completed
            } else {
                Status::Failed
            },
            Status::Pending,
            if late_3 {
                Status::Completed
            } else {
                Status::Pending
            },
        ]) {
            assert_eq!(
                status_on(b, "instance B", claimed.operation.id).await,
                expected,
                "{at}: {applied:?}"
            );
        }
        assert_consistent(instances, receipt.parent_id, &at).await;
        // What was re-queued runs again and the batch ends (failed: child 0 is).
        let again = claim_on(b, "instance B", 10).await;
        assert_eq!(again.len(), 1 + usize::from(!late_3), "{at}");
        for claimed in &again {
            assert_eq!(claimed.operation.attempts, 2, "{at}");
            assert_eq!(
                finish_on(a, "instance A", claimed, Outcome::Completed(json!("again"))).await,
                Applied::Applied
            );
        }
        let parent = assert_consistent(instances, receipt.parent_id, &at).await;
        assert_eq!(parent.status, Status::Failed, "{at}");
    }
}

/// The reconciler through every instance at once, over parents without children, a
/// stranded batch (its counters promise a child more than its rows, through the
/// fixture's tamper) and a live batch whose last child completes meanwhile: each
/// stranded parent is finalized exactly once, the live one by its completion alone.
async fn reconcile_through_all_while_a_last_child_completes(instances: &Instances<'_>) {
    let (a, b) = (instances[0].1, instances[1].1);
    let (queue_a, queue_b) = (Queue::new(Arc::clone(a)), Queue::new(Arc::clone(b)));
    for round in 0..ROUNDS {
        let at = format!("reconcile round {round}");
        let mut empty = Vec::new();
        for (name, store) in [("instance A", a), ("instance B", b)] {
            let parent = ParentRecord {
                id: OperationId::new(),
                kind: "batch".into(),
                metadata: Value::Null,
                children_total: 2,
                created_at: Utc::now(),
                plan: Default::default(),
                parent_id: None,
                dependents: Vec::new(),
            };
            let mut tx = store
                .begin()
                .await
                .unwrap_or_else(|e| panic!("{at}: begin through {name} failed: {e}"));
            tx.insert_parent(&parent).await.unwrap();
            tx.commit().await.unwrap();
            empty.push(parent.id);
        }
        let stranded = submit(&queue_a, "instance A", batch("stranded", 2, json!(round))).await;
        crate::tamper_children_total(stranded.parent_id, 3).await;
        for claimed in claim_on(b, "instance B", 10).await {
            finish_on(a, "instance A", &claimed, Outcome::Completed(json!(null))).await;
        }
        assert_eq!(
            status_on(b, "instance B", stranded.parent_id).await,
            Status::Pending,
            "{at}: the tamper did not strand the batch"
        );
        let live = submit(&queue_b, "instance B", batch("live", 1, json!(round))).await;
        let running = claim_on(a, "instance A", 1).await.remove(0);

        let barrier = Arc::new(Barrier::new(instances.len() + 1));
        let reconcilers: Vec<_> = instances
            .iter()
            .map(|(name, store)| {
                let (store, barrier, name) = (Arc::clone(store), Arc::clone(&barrier), *name);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .reconcile_orphan_parents()
                        .await
                        .unwrap_or_else(|e| panic!("reconcile through {name} failed: {e}"))
                })
            })
            .collect();
        let completer = {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                finish_on(
                    &b,
                    "instance B",
                    &running,
                    Outcome::Completed(json!("last")),
                )
                .await
            })
        };
        let mut report = ReconcileReport::default();
        for reconciler in reconcilers {
            let one = reconciler.await.unwrap();
            report.empty_parents_failed += one.empty_parents_failed;
            report.parents_finalized += one.parents_finalized;
        }
        assert_eq!(completer.await.unwrap(), Applied::Applied, "{at}");
        assert_eq!(
            (report.empty_parents_failed, report.parents_finalized),
            (2, 1),
            "{at}: the reconcilers together finalized a parent twice, missed one, or took \
             the live batch from its completion"
        );
        for id in &empty {
            let parent = get_on(b, "instance B", *id).await.unwrap();
            assert_eq!(
                (parent.status, parent.error.as_deref()),
                (Status::Failed, Some(ZERO_CHILDREN_REASON)),
                "{at}"
            );
        }
        let fixed = assert_consistent(instances, stranded.parent_id, &at).await;
        assert_eq!(
            (fixed.status, fixed.children.unwrap().total),
            (Status::Completed, 2),
            "{at}"
        );
        let finished = assert_consistent(instances, live.parent_id, &at).await;
        assert_eq!(finished.status, Status::Completed, "{at}");
        assert_eq!(
            finished.result,
            Some(fascicle_api::parent_summary(&finished.children.unwrap())),
            "{at}"
        );
        let again = futures_sum_reconcile(instances).await;
        assert_eq!(again, ReconcileReport::default(), "{at}: a second pass");
    }
}

async fn futures_sum_reconcile(instances: &Instances<'_>) -> ReconcileReport {
    let passes: Vec<_> = instances
        .iter()
        .map(|(name, store)| {
            let (store, name) = (Arc::clone(store), *name);
            tokio::spawn(async move {
                store
                    .reconcile_orphan_parents()
                    .await
                    .unwrap_or_else(|e| panic!("reconcile through {name} failed: {e}"))
            })
        })
        .collect();
    let mut sum = ReconcileReport::default();
    for pass in passes {
        let one = pass.await.unwrap();
        sum.empty_parents_failed += one.empty_parents_failed;
        sum.parents_finalized += one.parents_finalized;
    }
    sum
}

/// Prune through every instance at once, each round over two finished batches and two
/// finished stand-alone operations, while a child of a live batch completes through B —
/// its last child in the last round: the finished work is deleted once in all (the
/// reports add up to it), the live batch is kept whole until it is finished and then kept
/// or deleted whole.
async fn prune_through_all_while_a_live_batch_completes(instances: &Instances<'_>) {
    let (a, b) = (instances[0].1, instances[1].1);
    let (queue_a, queue_b) = (Queue::new(Arc::clone(a)), Queue::new(Arc::clone(b)));
    let later = || Utc::now() + chrono::Duration::hours(1);
    // Earlier races' finished work goes first, so each round's reports count its own.
    a.prune(later())
        .await
        .unwrap_or_else(|e| panic!("prune through A failed: {e}"));
    let live = submit(&queue_a, "instance A", batch("live", ROUNDS, json!("live"))).await;
    let mut running = claim_on(b, "instance B", ROUNDS).await;
    assert_eq!(running.len(), ROUNDS);
    let mut live_pruned = false;
    for round in 0..ROUNDS {
        let at = format!("prune round {round}");
        let mut finished = Vec::new();
        for (name, queue, canceller) in [("instance A", &queue_a, b), ("instance B", &queue_b, a)] {
            let receipt = submit(queue, name, batch("pruned", 3, json!(round))).await;
            canceller.cancel(receipt.parent_id).await.unwrap();
            let single = queue
                .submit(NewOperation::new(
                    "pruned_single",
                    json!({ "round": round }),
                ))
                .await
                .unwrap_or_else(|e| panic!("{at}: submit through {name} failed: {e}"));
            canceller.cancel(single.id).await.unwrap();
            finished.push(receipt.parent_id);
            finished.extend(receipt.child_ids);
            finished.push(single.id);
        }
        let cutoff = later();
        let barrier = Arc::new(Barrier::new(instances.len() + 1));
        let pruners: Vec<_> = instances
            .iter()
            .map(|(name, store)| {
                let (store, barrier, name) = (Arc::clone(store), Arc::clone(&barrier), *name);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .prune(cutoff)
                        .await
                        .unwrap_or_else(|e| panic!("prune through {name} failed: {e}"))
                })
            })
            .collect();
        let child = running.remove(0);
        let completer = {
            let (b, barrier) = (Arc::clone(b), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                finish_on(&b, "instance B", &child, Outcome::Completed(json!("live"))).await
            })
        };
        let mut pruned = PruneReport::default();
        for pruner in pruners {
            pruned.add(pruner.await.unwrap());
        }
        assert_eq!(completer.await.unwrap(), Applied::Applied, "{at}");
        let last = round == ROUNDS - 1;
        let live_parent = get_on(a, "instance A", live.parent_id).await;
        let live_children = b.children_of(live.parent_id).await.unwrap();
        if live_parent.is_none() {
            assert!(last, "{at}: the live batch was pruned before it finished");
            assert!(
                live_children.is_empty(),
                "{at}: a child outlived its pruned batch"
            );
            live_pruned = true;
        } else {
            assert_eq!(
                live_children.len(),
                ROUNDS,
                "{at}: a child of a kept batch was pruned"
            );
            assert_consistent(instances, live.parent_id, &at).await;
        }
        let (batches, operations) = if live_pruned {
            (3, 6 + 2 + ROUNDS)
        } else {
            (2, 8)
        };
        assert_eq!(
            (pruned.batches, pruned.operations),
            (batches, operations as u64),
            "{at}: the prunes together deleted a batch twice, missed one, or deleted part \
             of one"
        );
        for id in finished {
            for (name, store) in instances {
                assert!(
                    get_on(store, name, id).await.is_none(),
                    "{at}: {id} is still there (read through {name})"
                );
            }
        }
    }
    if !live_pruned {
        let parent = assert_consistent(instances, live.parent_id, "after the prunes").await;
        assert_eq!(parent.status, Status::Completed);
        let report = b.prune(later()).await.unwrap();
        assert_eq!(
            (report.batches, report.operations),
            (1, ROUNDS as u64),
            "the finished live batch is pruned whole"
        );
    }
    for (name, store) in instances {
        assert!(
            get_on(store, name, live.parent_id).await.is_none(),
            "the live batch is still there (read through {name})"
        );
    }
}
