//! Model-based testing: random histories of submits (batches under every failure policy,
//! with chains of `after` / `after_any` dependencies, and trees: a nested batch, and one
//! nested in it, each under its own policy, the chain crossing their bounds), claims, outcomes, cancellations
//! (also of running operations), retries, releases, lease expiries, rescues,
//! reconciliations and prunes, with the store's invariants checked after every step
//! against a recount and a small reference model. [`check_lockstep`] runs one history
//! on several stores at once (the same ids on each) and requires the same state on all
//! of them after every step.
//!
//! ```ignore
//! proptest! {
//!     #[test]
//!     fn random_histories_keep_invariants(steps in fascicle_conformance::model::history(40)) {
//!         fascicle_conformance::model::check(|| async { Fixture::new(MyStore::new()) }, steps);
//!     }
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fascicle_api::{
    ChildCounters, ClaimRequest, ClaimedOperation, Completion, FailurePolicy, NewBatch,
    NewOperation, Operation, OperationId, Outcome, Queue, Status, Store,
};
use proptest::prelude::*;
use serde_json::json;

use crate::Fixture;

/// One step of a random history. Indices pick among what exists, modulo its count.
#[derive(Clone, Debug)]
pub enum Step {
    /// Submit a batch of `children` children (0: a stand-alone operation).
    Submit {
        /// How many children; 0 submits a stand-alone operation instead.
        children: usize,
        /// The batch's failure policy: 0 `WaitAll`, 1 `FailFast`, 2 `IgnoreFailures`.
        policy: u8,
        /// Child `i` (from 1) waits for child `i - 1` when bit `i - 1` is set, with
        /// `after_any` when bit `i + 3` is set too.
        deps: u8,
        /// Bit 0 set: the children from `split = (nest >> 1) % children` on (bit 7 set:
        /// the children before `split`, at least one) go into a nested batch under
        /// policy `(nest >> 3) % 3`; bit 6 set too: its last child goes into a batch
        /// nested in that one (when it has two or more). The dependency chain crosses
        /// the bounds either way: outer operations wait for nested ones, or the reverse.
        nest: u8,
    },
    /// Claim up to `limit`; with `short_lease` the lease expires at once.
    Claim {
        /// At most this many.
        limit: usize,
        /// Lease of zero length, to be rescued.
        short_lease: bool,
    },
    /// Finish the `pick`-th held claim with an outcome (0 completed, 1 failed, 2 retry,
    /// 3 cancelled).
    Finish {
        /// Which held claim.
        pick: usize,
        /// Which outcome.
        outcome: u8,
    },
    /// Cancel the `pick`-th known id (operation or batch).
    Cancel {
        /// Which id.
        pick: usize,
    },
    /// Retry the `pick`-th batch.
    RetryBatch {
        /// Which batch.
        pick: usize,
    },
    /// Rescue expired leases.
    Rescue,
    /// Reconcile stranded parents.
    Reconcile,
    /// Prune everything terminal (whole batches and stand-alone operations); later
    /// submissions may reuse what the store freed.
    Prune,
    /// Release the `pick`-th held claim (a worker shutting down).
    Release {
        /// Which held claim.
        pick: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..5, 0u8..3, any::<u8>(), any::<u8>())
            .prop_map(|(children, policy, deps, nest)| Step::Submit { children, policy, deps, nest }),
        3 => (1usize..6, any::<bool>()).prop_map(|(limit, short_lease)| Step::Claim { limit, short_lease }),
        4 => (any::<usize>(), 0u8..4).prop_map(|(pick, outcome)| Step::Finish { pick, outcome }),
        1 => any::<usize>().prop_map(|pick| Step::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Step::RetryBatch { pick }),
        1 => Just(Step::Rescue),
        1 => Just(Step::Reconcile),
        1 => Just(Step::Prune),
        1 => any::<usize>().prop_map(|pick| Step::Release { pick }),
    ]
}

/// A random history of up to `max_steps` steps.
pub fn history(max_steps: usize) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(step(), 1..max_steps)
}

/// What the reference model remembers.
#[derive(Default)]
struct Model {
    ids: BTreeSet<OperationId>,
    parents: BTreeMap<OperationId, Vec<OperationId>>,
    /// Each nested batch's outer batch.
    outer: BTreeMap<OperationId, OperationId>,
    held: Vec<ClaimedOperation>,
    /// Operations seen terminal; only a batch retry may reopen them.
    terminal: BTreeSet<OperationId>,
    /// Pruned operations: gone for good.
    pruned: BTreeSet<OperationId>,
    /// Operations whose cancel was requested while they ran: none may be `pending` again
    /// until a batch retry clears the request.
    cancel_requested: BTreeSet<OperationId>,
}

/// Runs `steps` on a fresh store from `factory`, checking the invariants after each.
pub fn check<Fac, FacFut>(factory: Fac, steps: Vec<Step>)
where
    Fac: FnOnce() -> FacFut,
    FacFut: Future<Output = Fixture>,
{
    crate::run_case("model", factory, move |store| {
        Box::pin(async move { run(store, steps).await })
    });
}

async fn run(store: Arc<dyn Store>, steps: Vec<Step>) {
    run_lockstep(vec![store], steps).await;
}

/// Runs `steps` on a fresh store from each factory at once, in lockstep: after every
/// step each store's invariants are checked, and every store must hold the same state
/// (status, attempts, counters, error, result of every operation) as the first.
pub fn check_lockstep<Fac, FacFut>(factories: Vec<Fac>, steps: Vec<Step>)
where
    Fac: FnOnce() -> FacFut,
    FacFut: Future<Output = Fixture>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime for the model");
    runtime.block_on(async move {
        let mut stores = Vec::new();
        let mut cleanups = Vec::new();
        for factory in factories {
            let (store, cleanup) = factory().await.into_parts();
            stores.push(store.expect("every store of a lockstep history must be available"));
            cleanups.extend(cleanup);
        }
        let outcome = tokio::spawn(run_lockstep(stores, steps)).await;
        for cleanup in cleanups {
            cleanup.await;
        }
        if let Err(join_error) = outcome {
            std::panic::resume_unwind(join_error.into_panic());
        }
    });
}

/// What two stores must agree on about one operation.
type Observed = (
    Status,
    u32,
    Option<ChildCounters>,
    Option<String>,
    Option<serde_json::Value>,
    u32,
);

async fn run_lockstep(stores: Vec<Arc<dyn Store>>, steps: Vec<Step>) {
    let queues: Vec<Queue> = stores.iter().map(|s| Queue::new(Arc::clone(s))).collect();
    let mut models: Vec<Model> = stores.iter().map(|_| Model::default()).collect();
    for (i, step) in steps.iter().enumerate() {
        // The same new ids for every store.
        let fresh: Vec<OperationId> = match step {
            Step::Submit { children, .. } => {
                (0..children + 3).map(|_| OperationId::new()).collect()
            }
            _ => Vec::new(),
        };
        let mut observed: Vec<BTreeMap<OperationId, Observed>> = Vec::new();
        for ((store, queue), model) in stores.iter().zip(&queues).zip(&mut models) {
            apply(store, queue, model, step, &fresh).await;
            let ops = verify(store, model).await.unwrap_or_else(|violation| {
                panic!(
                    "{} after step {i} ({step:?}): {violation}\nhistory: {steps:?}",
                    store.driver()
                )
            });
            for (id, op) in &ops {
                if op.status.is_terminal() {
                    model.terminal.insert(*id);
                    model.cancel_requested.remove(id);
                }
            }
            observed.push(
                ops.into_iter()
                    .map(|(id, op)| {
                        (
                            id,
                            (
                                op.status,
                                op.attempts,
                                op.children,
                                op.error,
                                op.result,
                                op.waiting_on,
                            ),
                        )
                    })
                    .collect(),
            );
        }
        for (store, state) in stores.iter().zip(&observed).skip(1) {
            if *state != observed[0] {
                let differ: Vec<_> = state
                    .iter()
                    .filter(|(id, o)| observed[0].get(id) != Some(o))
                    .map(|(id, o)| (id, o, observed[0].get(id)))
                    .collect();
                panic!(
                    "after step {i} ({step:?}) {} and {} differ: {differ:?}\nhistory: {steps:?}",
                    store.driver(),
                    stores[0].driver()
                );
            }
        }
    }
}

async fn apply(
    store: &Arc<dyn Store>,
    queue: &Queue,
    model: &mut Model,
    step: &Step,
    fresh: &[OperationId],
) {
    match *step {
        Step::Submit { children: 0, .. } => {
            let receipt = queue
                .submit(NewOperation::new("op", json!({})).with_id(fresh[0]))
                .await
                .unwrap();
            model.ids.insert(receipt.id);
        }
        Step::Submit {
            children,
            policy,
            deps,
            nest,
        } => {
            let policies = [
                FailurePolicy::WaitAll,
                FailurePolicy::FailFast,
                FailurePolicy::IgnoreFailures,
            ];
            let policy = policies[policy as usize % 3];
            let child = |i: usize| {
                let op = NewOperation::new("op", json!({ "i": i })).with_id(fresh[i + 1]);
                match (i, deps >> (i.max(1) - 1) & 1, deps >> (i + 3) & 1) {
                    (0, _, _) | (_, 0, _) => op,
                    (_, _, 0) => op.after(&[fresh[i]]),
                    _ => op.after_any(&[fresh[i]]),
                }
            };
            // Which children go into the nested batch (from `split` on), and into the
            // one nested in it (the last, when `deeper`).
            // Which children go into the nested batch (`nested`), and into the one
            // nested in it (its last, when `deeper`).
            let split = (nest as usize >> 1) % children;
            let nested = match (nest & 1, nest & 0x80) {
                (0, _) => 0..0,
                (_, 0) => split..children,
                _ => 0..split.max(1),
            };
            let deeper = !nested.is_empty() && nest & 0x40 != 0 && nested.len() >= 2;
            let (inner_id, deeper_id) = (fresh[children + 1], fresh[children + 2]);
            let inner_end = if deeper { nested.end - 1 } else { nested.end };
            let mut batch = NewBatch::new("batch")
                .with_id(fresh[0])
                .with_failure_policy(policy)
                .children((0..children).filter(|i| !nested.contains(i)).map(child));
            if !nested.is_empty() {
                let mut inner = NewBatch::new("inner")
                    .with_id(inner_id)
                    .with_failure_policy(policies[(nest as usize >> 3) % 3])
                    .children((nested.start..inner_end).map(child));
                if deeper {
                    inner = inner.child_batch(
                        NewBatch::new("deeper")
                            .with_id(deeper_id)
                            .child(child(nested.end - 1)),
                    );
                }
                batch = batch.child_batch(inner);
            }
            let receipt = queue.submit_batch(batch).await.unwrap();
            model.ids.insert(receipt.parent_id);
            model.ids.extend(fresh[1..=children].iter().copied());
            model.parents.insert(receipt.parent_id, receipt.child_ids);
            if !nested.is_empty() {
                model.ids.insert(inner_id);
                model.outer.insert(inner_id, receipt.parent_id);
                let mut inner: Vec<OperationId> = fresh[nested.start + 1..=inner_end].to_vec();
                if deeper {
                    inner.push(deeper_id);
                    model.ids.insert(deeper_id);
                    model.outer.insert(deeper_id, inner_id);
                    model.parents.insert(deeper_id, vec![fresh[nested.end]]);
                }
                model.parents.insert(inner_id, inner);
            }
        }
        Step::Claim { limit, short_lease } => {
            let claimed = store
                .claim(&ClaimRequest {
                    worker_id: "model".into(),
                    limit,
                    lease: if short_lease {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(600)
                    },
                    kinds: None,
                })
                .await
                .unwrap();
            for c in &claimed {
                assert!(
                    !c.operation.is_parent(),
                    "a parent was claimed: {:?}",
                    c.operation
                );
                assert!(
                    !model.parents.contains_key(&c.operation.id),
                    "a batch id was claimed"
                );
            }
            if short_lease {
                // Let the zero-length leases expire on every clock involved.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            model.held.extend(claimed);
        }
        Step::Finish { pick, outcome } => {
            if model.held.is_empty() {
                return;
            }
            let held = model.held.remove(pick % model.held.len());
            let outcome = match outcome {
                0 => Outcome::Completed(json!("done")),
                1 => Outcome::Failed("failed on purpose".into()),
                2 => Outcome::Retry {
                    error: "try again".into(),
                    run_at: fascicle_api::chrono::Utc::now(),
                },
                _ => Outcome::Cancelled("stopped".into()),
            };
            store
                .complete(&[Completion {
                    id: held.operation.id,
                    lease_token: held.lease_token,
                    outcome,
                }])
                .await
                .unwrap();
        }
        Step::Cancel { pick } => {
            if model.ids.is_empty() {
                return;
            }
            let id = *model.ids.iter().nth(pick % model.ids.len()).unwrap();
            store.cancel(id).await.unwrap();
            for target in model.tree_operations(id) {
                let op = store
                    .get(target)
                    .await
                    .unwrap()
                    .expect("known operations exist");
                if op.status == Status::Processing {
                    model.cancel_requested.insert(target);
                }
            }
        }
        Step::Release { pick } => {
            if model.held.is_empty() {
                return;
            }
            let held = model.held.remove(pick % model.held.len());
            store
                .release(&[fascicle_api::Lease {
                    id: held.operation.id,
                    token: held.lease_token,
                }])
                .await
                .unwrap();
        }
        Step::RetryBatch { pick } => {
            if model.parents.is_empty() {
                return;
            }
            let parent = *model
                .parents
                .keys()
                .nth(pick % model.parents.len())
                .unwrap();
            match store.retry_batch(parent).await {
                Ok(_) => {
                    // The tree's operations may be re-queued, its batches and the
                    // batches holding it reopened.
                    for op in model.tree_operations(parent) {
                        model.terminal.remove(&op);
                        model.cancel_requested.remove(&op);
                    }
                    for batch in model.tree_batches(parent) {
                        model.terminal.remove(&batch);
                    }
                    let mut at = model.outer.get(&parent).copied();
                    while let Some(outer) = at {
                        model.terminal.remove(&outer);
                        at = model.outer.get(&outer).copied();
                    }
                }
                Err(fascicle_api::Error::Conflict(_)) => {}
                Err(e) => panic!("retry_batch failed: {e}"),
            }
        }
        Step::Rescue => {
            store.rescue_expired_leases().await.unwrap();
        }
        Step::Reconcile => {
            store.reconcile_orphan_parents().await.unwrap();
        }
        Step::Prune => prune(store, model).await,
    }
}

/// Prunes with a cut-off after every completion, checks that exactly the terminal
/// batches (whole) and terminal stand-alone operations went, and forgets them.
async fn prune(store: &Arc<dyn Store>, model: &mut Model) {
    let mut terminal_before = BTreeSet::new();
    for id in &model.ids {
        let op = store
            .get(*id)
            .await
            .unwrap()
            .expect("known operations exist");
        if op.status.is_terminal() {
            terminal_before.insert(*id);
        }
    }
    let mut expected = BTreeSet::new();
    // Whole trees, from a terminal root only.
    for root in model
        .parents
        .keys()
        .filter(|p| !model.outer.contains_key(p))
    {
        if terminal_before.contains(root) {
            expected.extend(model.tree_batches(*root));
            expected.extend(model.tree_operations(*root));
        }
    }
    let children: BTreeSet<OperationId> = model.parents.values().flatten().copied().collect();
    for id in &terminal_before {
        if !model.parents.contains_key(id) && !children.contains(id) {
            expected.insert(*id);
        }
    }
    let cut_off = fascicle_api::chrono::Utc::now() + fascicle_api::chrono::Duration::hours(1);
    let report = store.prune(cut_off).await.unwrap();
    let mut gone = BTreeSet::new();
    for id in &model.ids {
        if store.get(*id).await.unwrap().is_none() {
            gone.insert(*id);
        }
    }
    assert_eq!(
        gone, expected,
        "prune removed other operations than the terminal batches and stand-alone ones"
    );
    let batches = model.parents.keys().filter(|p| gone.contains(p)).count() as u64;
    assert_eq!(report.batches, batches, "batches pruned: {report:?}");
    assert_eq!(
        report.operations,
        gone.len() as u64 - batches,
        "operations pruned: {report:?}"
    );
    // Claims in `held` whose operation went stay there: finishing them must change
    // nothing (the lease is gone with the row).
    model.ids.retain(|id| !gone.contains(id));
    model.pruned.extend(gone.iter().copied());
    model.parents.retain(|id, _| !gone.contains(id));
    model.outer.retain(|id, _| !gone.contains(id));
    model.terminal.retain(|id| !gone.contains(id));
}

impl Model {
    /// The batch `root` and every batch nested in it (a plain operation: none).
    fn tree_batches(&self, root: OperationId) -> Vec<OperationId> {
        let mut batches = Vec::new();
        let mut next = vec![root];
        while let Some(batch) = next.pop() {
            if let Some(children) = self.parents.get(&batch) {
                batches.push(batch);
                next.extend(children.iter().copied());
            }
        }
        batches
    }

    /// The operations of `id`'s tree (a plain operation: itself).
    fn tree_operations(&self, id: OperationId) -> Vec<OperationId> {
        if !self.parents.contains_key(&id) {
            return vec![id];
        }
        self.tree_batches(id)
            .iter()
            .flat_map(|b| self.parents[b].iter().copied())
            .filter(|c| !self.parents.contains_key(c))
            .collect()
    }
}

async fn verify(
    store: &Arc<dyn Store>,
    model: &Model,
) -> Result<BTreeMap<OperationId, Operation>, String> {
    let mut ops: BTreeMap<OperationId, Operation> = BTreeMap::new();
    for id in &model.ids {
        let op = store
            .get(*id)
            .await
            .unwrap()
            .ok_or_else(|| format!("operation {id} disappeared"))?;
        ops.insert(*id, op);
    }
    for id in &model.pruned {
        if let Some(op) = store.get(*id).await.unwrap() {
            return Err(format!("pruned operation {id} came back: {op:?}"));
        }
    }
    for id in &model.terminal {
        if !ops[id].status.is_terminal() {
            return Err(format!("{id} left a terminal state without a batch retry"));
        }
    }
    for id in &model.cancel_requested {
        if ops.get(id).is_some_and(|op| op.status == Status::Pending) {
            return Err(format!(
                "{id} is pending again although its cancel was requested while it ran"
            ));
        }
    }
    for op in ops.values() {
        // An operation that ran waited for what it needed completed, and that stays
        // completed (a batch retry re-queues only failed and cancelled children).
        if matches!(op.status, Status::Processing | Status::Completed) {
            for dependency in op.after.iter().filter(|d| !d.any) {
                if ops.get(&dependency.id).map(|d| d.status) != Some(Status::Completed) {
                    return Err(format!(
                        "{} is {} although its dependency {} is not completed",
                        op.id, op.status, dependency.id
                    ));
                }
            }
        }
        // A pending operation never needs completed a dependency that ended otherwise:
        // that ending cancelled it (a retry that would re-queue it so is refused).
        if op.status == Status::Pending {
            for dependency in op.after.iter().filter(|d| !d.any) {
                if let Some(d) = ops.get(&dependency.id)
                    && matches!(d.status, Status::Failed | Status::Cancelled)
                {
                    return Err(format!(
                        "{} is pending, waiting for {} which ended {}: it can never run",
                        op.id, dependency.id, d.status
                    ));
                }
            }
        }
        // A pending operation counts every dependency it needs completed that is not
        // (exactly, when it has no after_any ones; an after_any one that ended released
        // it, and stays so until a batch retry re-queues the operation itself).
        if op.status == Status::Pending {
            let status = |id| {
                ops.get(id)
                    .map_or(Status::Completed, |d: &Operation| d.status)
            };
            let strict_open = op
                .after
                .iter()
                .filter(|d| !d.any && status(&d.id) != Status::Completed)
                .count();
            let any = op.after.iter().filter(|d| d.any).count();
            let waiting = op.waiting_on as usize;
            if waiting < strict_open || waiting > strict_open + any {
                return Err(format!(
                    "{} waits for {waiting} but {strict_open} of its dependencies it needs \
                     completed are open (and {any} after_any)",
                    op.id
                ));
            }
        }
    }
    let mut expected = fascicle_api::Stats::default();
    for op in ops.values() {
        expected.count(
            fascicle_api::Counted {
                kind: &op.kind,
                status: op.status,
                is_parent: op.is_parent(),
                scheduled: op.status == Status::Pending
                    && op.run_at > fascicle_api::chrono::Utc::now(),
                waiting: op.status == Status::Pending && op.waiting_on > 0,
            },
            1,
        );
    }
    for (parent, children) in &model.parents {
        let stored: Vec<OperationId> = store
            .children_of(*parent)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        if &stored != children {
            return Err(format!("children of {parent} changed: {stored:?}"));
        }
        let mut recount = ChildCounters {
            total: children.len() as u64,
            ..ChildCounters::default()
        };
        for child in children {
            match ops[child].status {
                Status::Completed => recount.completed += 1,
                Status::Failed => recount.failed += 1,
                Status::Cancelled => recount.cancelled += 1,
                _ => {}
            }
        }
        let p = &ops[parent];
        if p.children != Some(recount) {
            return Err(format!(
                "parent {parent} counters {:?} differ from a recount {recount:?}",
                p.children
            ));
        }
        let policy = p
            .plan
            .as_ref()
            .map_or(FailurePolicy::WaitAll, |plan| plan.failure_policy);
        let want = policy.outcome(&recount).unwrap_or(Status::Pending);
        if p.status != want {
            return Err(format!(
                "parent {parent} is {} but its children say {want} ({recount:?})",
                p.status
            ));
        }
    }
    let stats = store.stats().await.unwrap();
    // Scheduled vs ready depends on the instant of each read; compare the rest exactly.
    let strip = |mut s: fascicle_api::Stats| {
        for k in s.kinds.values_mut() {
            k.ready += k.scheduled;
            k.scheduled = 0;
        }
        s
    };
    if strip(stats.clone()) != strip(expected.clone()) {
        return Err(format!(
            "stats {stats:?} differ from a recount {expected:?}"
        ));
    }
    Ok(ops)
}
