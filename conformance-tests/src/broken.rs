//! Deliberately broken stores: the suite's self-test. A [`BrokenStore`] wraps a real
//! store (any `Arc<dyn Store>`) and breaks exactly one promise of the `Store` contract —
//! the [`BrokenPromise`] it is built with — while keeping every other one. Run the whole
//! suite ([`cases::ALL`](crate::cases::ALL)) against each and at least one case must
//! fail; [`BrokenPromise::caught_by`] names the cases written to catch it. The memory
//! driver's `tests/suite_self_test.rs` does exactly that for every promise in
//! [`BrokenPromise::ALL`], and a driver author can do the same over their own store.
//!
//! The write-side breaks are real: a late commit or an auto-commit goes through the
//! inner store's own transactions. A few read-side breaks (a parent shown finished one
//! child early, a child hidden as if pruned, a parent shown before its commit) change
//! what the wrapper reports instead, since a correct inner store cannot be made to
//! store that state through its API; to every caller the effect is the same.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use fascicle_api::chrono::{DateTime, Utc};
use fascicle_api::{
    Applied, CancelReport, Capabilities, ChildCounters, ChildRecord, ClaimRequest,
    ClaimedOperation, Completion, Counted, Lease, LeaseStatus, LeaseToken, Operation, OperationId,
    ParentRecord, PruneReport, ReconcileReport, RescueReport, Result, Stats, Status, Store,
    Transaction, parent_outcome, parent_summary,
};

/// How long a [`BrokenPromise::LateCommitOfADroppedTransaction`] waits before it
/// commits what should have been rolled back: long enough for a case that looks only
/// once, at once, to miss it.
pub const LATE_COMMIT_DELAY: Duration = Duration::from_millis(50);

/// The one promise a [`BrokenStore`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokenPromise {
    /// A transaction that is dropped (or whose commit fails) leaves no row behind —
    /// broken: its inserts are committed anyway, [`LATE_COMMIT_DELAY`] later, by a
    /// background task through the inner store. (An explicit rollback is honest.)
    LateCommitOfADroppedTransaction,
    /// A batch's parent becomes visible with its children, at the commit — broken: the
    /// parent is visible from `insert_parent` on and survives a failed or abandoned
    /// batch, as if auto-committed on its own connection (the bug fascicle exists to
    /// prevent). The drivers now refuse children of a committed parent, so the wrapper
    /// shows the parent to every reader instead of committing it separately.
    AutocommitParent,
    /// A stand-alone operation is invisible until its transaction commits and gone if it
    /// does not — broken: `insert_child` with `parent_id: None` commits it at once in a
    /// transaction of its own (rows inserted earlier in the same transaction are rolled
    /// back by the swap, as single-writer backends need).
    AutocommitStandalone,
    /// A cancel request reaches a running handler — broken: heartbeats never report
    /// `cancel_requested`.
    LostCancelRequest,
    /// Completions are fenced by the lease token — broken: the wrapper remembers the
    /// latest token it handed out per operation and substitutes it into every
    /// completion, so a rescued (stale) worker's outcome applies.
    UnfencedCompletion,
    /// A parent is finalized when its last child is terminal — broken: `get` reports a
    /// pending batch of two or more children as finished when all but one are terminal.
    OffByOneFinalization,
    /// Concurrent claimers never receive the same operation — broken: a claim also hands
    /// out (up to its limit) operations an earlier claim handed out that are still
    /// processing.
    DoubleClaim,
    /// A batch parent is never handed to a worker — broken: a claim with room to spare
    /// also returns pending parents (each once).
    ClaimReturnsParents,
    /// Statistics count parents as batches, never as work — broken: `stats` also counts
    /// every batch parent under its kind.
    ParentsCountedAsWork,
    /// Pruning deletes a batch only whole, once its parent is terminal — broken: `prune`
    /// also removes the terminal children of open batches (they vanish from `get` and
    /// `children_of`).
    PruneTearsOpenBatches,
    /// A paused kind is not claimed until it is resumed — broken: `pause` answers as if
    /// it paused the kind and does nothing.
    PauseIgnored,
    /// A running limit holds against racing claimers — broken: the limit is checked by
    /// reading the kind's `processing` count before the claim, outside its transaction
    /// (check, then act), as a wrapper around a store without limits would.
    RunningLimitCheckedBeforeTheClaim,
    /// A rate limit spaces a kind's starts — broken: `set_limit` stores the running limit
    /// and drops the rate.
    RateLimitIgnored,
    /// Racing submitters of one unique key insert one operation — broken: the key is
    /// checked (is an operation holding it still open?), then the operation inserted, a
    /// round trip apart, as a store without a unique index would.
    UniqueCheckedBeforeInsert,
    /// A pass advances a schedule only at the version it read — broken: any version
    /// advances it (a stale pass moves it back).
    ScheduleAdvancedAtAnyVersion,
    /// One candidate holds a role at a time — broken: `elect` looks the holder up, then
    /// takes the role a round trip later, answering from what it saw (racing candidates
    /// for a free role all win).
    ElectionCheckedBeforeTaking,
}

impl BrokenPromise {
    /// Every broken promise, in the order of this enum.
    pub const ALL: &[BrokenPromise] = &[
        Self::LateCommitOfADroppedTransaction,
        Self::AutocommitParent,
        Self::AutocommitStandalone,
        Self::LostCancelRequest,
        Self::UnfencedCompletion,
        Self::OffByOneFinalization,
        Self::DoubleClaim,
        Self::ClaimReturnsParents,
        Self::ParentsCountedAsWork,
        Self::PruneTearsOpenBatches,
        Self::PauseIgnored,
        Self::RunningLimitCheckedBeforeTheClaim,
        Self::RateLimitIgnored,
        Self::UniqueCheckedBeforeInsert,
        Self::ScheduleAdvancedAtAnyVersion,
        Self::ElectionCheckedBeforeTaking,
    ];

    /// A short snake-case name, also the wrapper's [`Store::driver`].
    pub const fn name(self) -> &'static str {
        match self {
            Self::LateCommitOfADroppedTransaction => "late_commit_of_a_dropped_transaction",
            Self::AutocommitParent => "autocommit_parent",
            Self::AutocommitStandalone => "autocommit_standalone",
            Self::LostCancelRequest => "lost_cancel_request",
            Self::UnfencedCompletion => "unfenced_completion",
            Self::OffByOneFinalization => "off_by_one_finalization",
            Self::DoubleClaim => "double_claim",
            Self::ClaimReturnsParents => "claim_returns_parents",
            Self::ParentsCountedAsWork => "parents_counted_as_work",
            Self::PruneTearsOpenBatches => "prune_tears_open_batches",
            Self::PauseIgnored => "pause_ignored",
            Self::RunningLimitCheckedBeforeTheClaim => "running_limit_checked_before_the_claim",
            Self::RateLimitIgnored => "rate_limit_ignored",
            Self::UniqueCheckedBeforeInsert => "unique_checked_before_insert",
            Self::ScheduleAdvancedAtAnyVersion => "schedule_advanced_at_any_version",
            Self::ElectionCheckedBeforeTaking => "election_checked_before_taking",
        }
    }

    /// The promise of the `Store` contract that is broken, in one line.
    pub const fn promise(self) -> &'static str {
        match self {
            Self::LateCommitOfADroppedTransaction => {
                "a dropped or failed transaction leaves no row behind, not even later"
            }
            Self::AutocommitParent => {
                "a batch's parent is visible only with its children, after the commit"
            }
            Self::AutocommitStandalone => {
                "a stand-alone operation is visible only after its transaction commits"
            }
            Self::LostCancelRequest => "a cancel request reaches the running handler",
            Self::UnfencedCompletion => "a stale lease token's completion changes nothing",
            Self::OffByOneFinalization => "a parent is finalized only when its last child is",
            Self::DoubleClaim => "concurrent claimers never receive the same operation",
            Self::ClaimReturnsParents => "a batch parent is never handed to a worker",
            Self::ParentsCountedAsWork => "statistics never count parents as work",
            Self::PruneTearsOpenBatches => "prune deletes a batch only whole, once terminal",
            Self::PauseIgnored => "a paused kind is not claimed until it is resumed",
            Self::RunningLimitCheckedBeforeTheClaim => {
                "a running limit holds against racing claimers"
            }
            Self::RateLimitIgnored => "a rate limit spaces a kind's starts",
            Self::UniqueCheckedBeforeInsert => {
                "racing submitters of one unique key insert one operation"
            }
            Self::ScheduleAdvancedAtAnyVersion => {
                "a schedule advances only at the version its pass read"
            }
            Self::ElectionCheckedBeforeTaking => "one candidate holds a role at a time",
        }
    }

    /// The cases written to catch this break: each must fail on the broken store (others
    /// may fail too).
    pub const fn caught_by(self) -> &'static [&'static str] {
        match self {
            Self::LateCommitOfADroppedTransaction => &[
                "rollback_on_child_failure",
                "rollback_on_first_child_failure",
                "rollback_on_commit_failure",
                "dropped_transaction_rolls_back",
                "child_id_taken_by_another_batch_rolls_back",
                "large_batch_10k_children_commits_atomically",
                "standalone_rollback_on_commit_failure",
                "standalone_dropped_transaction_rolls_back",
                "submit_many_is_all_or_nothing",
                "streamed_batch_is_all_or_nothing",
            ],
            Self::AutocommitParent => &[
                "rollback_on_child_failure",
                "rollback_on_first_child_failure",
                "rollback_on_commit_failure",
                "dropped_transaction_rolls_back",
                "explicit_rollback",
                "uncommitted_rows_are_invisible_to_other_callers",
                "large_batch_10k_children_commits_atomically",
                "streamed_batch_is_all_or_nothing",
                "streamed_batch_is_invisible_until_its_commit",
            ],
            Self::AutocommitStandalone => &[
                "standalone_rollback_on_commit_failure",
                "standalone_dropped_transaction_rolls_back",
                "standalone_explicit_rollback",
                "standalone_uncommitted_is_invisible_to_get_stats_and_claim",
                "submit_many_is_all_or_nothing",
            ],
            Self::LostCancelRequest => &["cancel_batch_cascades"],
            Self::UnfencedCompletion => &["rescued_worker_cannot_complete"],
            Self::OffByOneFinalization => &["parent_completes_when_all_children_complete"],
            Self::DoubleClaim => &["claim_never_returns_parents", "serialization_key_exclusive"],
            Self::ClaimReturnsParents => &["claim_never_returns_parents"],
            Self::ParentsCountedAsWork => {
                &["stats_do_not_count_parents_as_work", "stats_breakdown"]
            }
            Self::PruneTearsOpenBatches => &["prune_removes_only_whole_terminal_batches"],
            Self::PauseIgnored => &["a_paused_kind_is_not_claimed_until_resumed"],
            Self::RunningLimitCheckedBeforeTheClaim => {
                &["a_running_limit_holds_against_racing_claimers"]
            }
            Self::RateLimitIgnored => &[
                "a_rate_limit_spaces_the_starts_of_its_kind",
                "a_rate_limit_holds_against_racing_claimers",
            ],
            Self::UniqueCheckedBeforeInsert => &["racing_unique_submits_insert_one"],
            Self::ScheduleAdvancedAtAnyVersion => &[
                "a_schedule_submits_one_operation_per_tick",
                "a_pass_that_read_before_a_change_does_not_undo_it",
            ],
            Self::ElectionCheckedBeforeTaking => &["racing_candidates_elect_one"],
        }
    }
}

impl fmt::Display for BrokenPromise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the wrapper remembers to break its promise.
#[derive(Debug, Default)]
struct Memo {
    /// The latest lease token handed out per operation ([`BrokenPromise::UnfencedCompletion`]).
    latest_token: HashMap<OperationId, LeaseToken>,
    /// Claims handed out and possibly still held ([`BrokenPromise::DoubleClaim`]).
    handed_out: Vec<ClaimedOperation>,
    /// Parents committed through this wrapper, with their kinds.
    parents: Vec<(OperationId, String)>,
    /// Parents already handed to a worker ([`BrokenPromise::ClaimReturnsParents`]).
    parents_claimed: HashSet<OperationId>,
    /// Rows hidden as if pruned ([`BrokenPromise::PruneTearsOpenBatches`]).
    pruned: HashSet<OperationId>,
    /// The limits as set, where the inner store keeps less of them
    /// ([`BrokenPromise::RunningLimitCheckedBeforeTheClaim`], [`BrokenPromise::RateLimitIgnored`]).
    limits: std::collections::BTreeMap<String, fascicle_api::KindLimit>,
    /// The operation that last took each unique key
    /// ([`BrokenPromise::UniqueCheckedBeforeInsert`]).
    unique: HashMap<String, OperationId>,
    /// Parents shown before (or without) their commit ([`BrokenPromise::AutocommitParent`]).
    phantoms: HashMap<OperationId, Operation>,
}

/// A real store with one [`BrokenPromise`] broken. See the [module](self) documentation.
pub struct BrokenStore {
    inner: Arc<dyn Store>,
    promise: BrokenPromise,
    memo: Arc<Mutex<Memo>>,
}

impl fmt::Debug for BrokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokenStore")
            .field("promise", &self.promise)
            .field("inner", &self.inner)
            .finish()
    }
}

impl BrokenStore {
    /// Wraps `inner`, breaking `promise`.
    pub fn new(inner: Arc<dyn Store>, promise: BrokenPromise) -> Self {
        Self {
            inner,
            promise,
            memo: Arc::default(),
        }
    }

    /// Another instance of this broken store over `inner` (a second instance of the same
    /// backend): it breaks the same promise with the same memory, as a second process of
    /// one broken driver would — a limit set through one is checked (wrongly) by both.
    pub fn sharing(&self, inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            promise: self.promise,
            memo: Arc::clone(&self.memo),
        }
    }

    /// The promise this store breaks.
    pub fn promise(&self) -> BrokenPromise {
        self.promise
    }

    fn memo(&self) -> MutexGuard<'_, Memo> {
        lock(&self.memo)
    }

    fn known_parents(&self) -> Vec<(OperationId, String)> {
        self.memo().parents.clone()
    }

    /// The read-side breaks, applied to one row read from the inner store.
    fn doctor(&self, op: Option<Operation>, id: OperationId) -> Option<Operation> {
        match self.promise {
            BrokenPromise::PruneTearsOpenBatches if self.memo().pruned.contains(&id) => None,
            BrokenPromise::AutocommitParent if op.is_none() => {
                self.memo().phantoms.get(&id).cloned()
            }
            BrokenPromise::OffByOneFinalization => op.map(finish_one_early),
            _ => op,
        }
    }
}

fn lock(memo: &Mutex<Memo>) -> MutexGuard<'_, Memo> {
    memo.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pending parent with all but one of its (two or more) children terminal, reported
/// as if the last one had completed too.
fn finish_one_early(mut op: Operation) -> Operation {
    if let Some(counters) = op.children
        && op.status == Status::Pending
        && counters.total > 1
        && counters.terminal() + 1 == counters.total
    {
        let as_if = ChildCounters {
            completed: counters.completed + 1,
            ..counters
        };
        op.status = parent_outcome(&as_if).unwrap_or(Status::Completed);
        op.result = Some(parent_summary(&as_if));
        op.completed_at = Some(Utc::now());
    }
    op
}

fn phantom_of(parent: &ParentRecord) -> Operation {
    Operation {
        id: parent.id,
        kind: parent.kind.clone(),
        status: Status::Pending,
        payload: None,
        metadata: Some(parent.metadata.clone()),
        parent_id: None,
        priority: 0,
        serialization_key: None,
        attempts: 0,
        max_attempts: 0,
        run_at: parent.created_at,
        worker_id: None,
        lease_expires_at: None,
        children: Some(ChildCounters {
            total: parent.children_total,
            ..ChildCounters::default()
        }),
        error: None,
        result: None,
        created_at: parent.created_at,
        updated_at: parent.created_at,
        completed_at: None,
        timeout: None,
        plan: Some(parent.plan.clone()),
        callback_for: None,
        after: Vec::new(),
        waiting_on: 0,
    }
}

#[async_trait]
impl Store for BrokenStore {
    fn driver(&self) -> &'static str {
        self.promise.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        Ok(Box::new(BrokenTransaction {
            inner: Some(self.inner.begin().await?),
            store: Arc::clone(&self.inner),
            promise: self.promise,
            memo: Arc::clone(&self.memo),
            parents: Vec::new(),
            children: Vec::new(),
            finished: false,
        }))
    }

    async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
        let op = self.inner.get(id).await?;
        Ok(self.doctor(op, id))
    }

    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
        let mut children = self.inner.children_of(parent_id).await?;
        if self.promise == BrokenPromise::PruneTearsOpenBatches {
            let memo = self.memo();
            children.retain(|c| !memo.pruned.contains(&c.id));
        }
        Ok(children)
    }

    async fn stats(&self) -> Result<Stats> {
        let mut stats = self.inner.stats().await?;
        match self.promise {
            BrokenPromise::ParentsCountedAsWork => {
                for (id, kind) in self.known_parents() {
                    if let Some(parent) = self.inner.get(id).await? {
                        let counted = Counted {
                            kind: &kind,
                            status: parent.status,
                            is_parent: false,
                            scheduled: false,
                            waiting: false,
                        };
                        stats.count(counted, 1);
                    }
                }
            }
            BrokenPromise::AutocommitParent => {
                let phantoms: Vec<Operation> = self.memo().phantoms.values().cloned().collect();
                for phantom in phantoms {
                    let counted = Counted {
                        kind: &phantom.kind,
                        status: phantom.status,
                        is_parent: true,
                        scheduled: false,
                        waiting: false,
                    };
                    stats.count(counted, 1);
                }
            }
            _ => {}
        }
        Ok(stats)
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
        let mut request = std::borrow::Cow::Borrowed(request);
        let limited = match request.kinds.as_deref() {
            Some([kind]) if self.promise == BrokenPromise::RunningLimitCheckedBeforeTheClaim => {
                let max = self.memo().limits.get(kind).and_then(|l| l.running);
                max.map(|max| (kind.clone(), max))
            }
            _ => None,
        };
        if let Some((kind, max)) = limited {
            // Check: the kind's processing count now…
            let running = self
                .inner
                .stats()
                .await?
                .kinds
                .get(&kind)
                .map_or(0, |k| k.processing);
            // …then act, a round trip later.
            tokio::task::yield_now().await;
            let room = (u64::from(max).saturating_sub(running)) as usize;
            if room == 0 {
                return Ok(Vec::new());
            }
            request.to_mut().limit = request.limit.min(room);
        }
        let request = &*request;
        let mut claimed = self.inner.claim(request).await?;
        match self.promise {
            BrokenPromise::UnfencedCompletion => {
                let mut memo = self.memo();
                for c in &claimed {
                    memo.latest_token.insert(c.operation.id, c.lease_token);
                }
            }
            BrokenPromise::DoubleClaim => {
                let earlier = self.memo().handed_out.clone();
                let checked: HashSet<OperationId> =
                    earlier.iter().map(|c| c.operation.id).collect();
                let mut still_held = Vec::new();
                for c in earlier {
                    let op = self.inner.get(c.operation.id).await?;
                    if op.is_some_and(|op| {
                        op.status == Status::Processing && op.attempts == c.operation.attempts
                    }) {
                        still_held.push(c);
                    }
                }
                let room = request.limit.saturating_sub(claimed.len());
                let wanted = |c: &&ClaimedOperation| {
                    request
                        .kinds
                        .as_ref()
                        .is_none_or(|kinds| kinds.contains(&c.operation.kind))
                        && !claimed.iter().any(|f| f.operation.id == c.operation.id)
                };
                let again: Vec<ClaimedOperation> = still_held
                    .iter()
                    .filter(wanted)
                    .take(room)
                    .cloned()
                    .collect();
                {
                    let mut memo = self.memo();
                    let held: HashSet<OperationId> =
                        still_held.iter().map(|c| c.operation.id).collect();
                    // Keep what is still held and what other claims added meanwhile.
                    memo.handed_out.retain(|c| {
                        held.contains(&c.operation.id) || !checked.contains(&c.operation.id)
                    });
                    memo.handed_out.extend(claimed.iter().cloned());
                }
                claimed.extend(again);
            }
            BrokenPromise::ClaimReturnsParents => {
                for (id, kind) in self.known_parents() {
                    if claimed.len() >= request.limit {
                        break;
                    }
                    if request.kinds.as_ref().is_some_and(|k| !k.contains(&kind))
                        || self.memo().parents_claimed.contains(&id)
                    {
                        continue;
                    }
                    let Some(mut parent) = self.inner.get(id).await? else {
                        continue;
                    };
                    if parent.status != Status::Pending {
                        continue;
                    }
                    self.memo().parents_claimed.insert(id);
                    let now = Utc::now();
                    parent.status = Status::Processing;
                    parent.attempts += 1;
                    parent.worker_id = Some(request.worker_id.clone());
                    parent.lease_expires_at =
                        fascicle_api::chrono::Duration::from_std(request.lease)
                            .ok()
                            .map(|lease| now + lease);
                    claimed.push(ClaimedOperation {
                        operation: parent,
                        lease_token: LeaseToken::new(),
                    });
                }
            }
            _ => {}
        }
        Ok(claimed)
    }

    async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>> {
        if self.promise != BrokenPromise::UnfencedCompletion {
            return self.inner.complete(completions).await;
        }
        let unfenced: Vec<Completion> = {
            let memo = self.memo();
            completions
                .iter()
                .map(|c| Completion {
                    lease_token: memo
                        .latest_token
                        .get(&c.id)
                        .copied()
                        .unwrap_or(c.lease_token),
                    ..c.clone()
                })
                .collect()
        };
        self.inner.complete(&unfenced).await
    }

    async fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<LeaseStatus>> {
        let mut beats = self.inner.heartbeat(leases, lease).await?;
        if self.promise == BrokenPromise::LostCancelRequest {
            for beat in &mut beats {
                beat.cancel_requested = false;
            }
        }
        Ok(beats)
    }

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        self.inner.release(leases).await
    }

    async fn rescue_expired_leases(&self) -> Result<RescueReport> {
        self.inner.rescue_expired_leases().await
    }

    async fn reconcile_orphan_parents(&self) -> Result<ReconcileReport> {
        self.inner.reconcile_orphan_parents().await
    }

    async fn cancel(&self, id: OperationId) -> Result<CancelReport> {
        self.inner.cancel(id).await
    }

    async fn retry_batch(&self, parent_id: OperationId) -> Result<u64> {
        self.inner.retry_batch(parent_id).await
    }

    async fn pause(&self, kind: &str) -> Result<bool> {
        if self.promise == BrokenPromise::PauseIgnored {
            fascicle_api::validate_kind(kind)?;
            return Ok(true);
        }
        self.inner.pause(kind).await
    }

    async fn resume(&self, kind: &str) -> Result<bool> {
        if self.promise == BrokenPromise::PauseIgnored {
            fascicle_api::validate_kind(kind)?;
            return Ok(true);
        }
        self.inner.resume(kind).await
    }

    async fn put_schedule(
        &self,
        schedule: &fascicle_api::Schedule,
        now: fascicle_api::chrono::DateTime<fascicle_api::chrono::Utc>,
    ) -> Result<bool> {
        self.inner.put_schedule(schedule, now).await
    }

    async fn remove_schedule(&self, name: &str) -> Result<bool> {
        self.inner.remove_schedule(name).await
    }

    async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool> {
        self.inner.pause_schedule(name, paused).await
    }

    async fn schedules(&self) -> Result<Vec<fascicle_api::StoredSchedule>> {
        self.inner.schedules().await
    }

    async fn due_schedules(
        &self,
        now: fascicle_api::chrono::DateTime<fascicle_api::chrono::Utc>,
    ) -> Result<Vec<fascicle_api::StoredSchedule>> {
        self.inner.due_schedules(now).await
    }

    async fn advance_schedule(
        &self,
        name: &str,
        version: i64,
        last_tick: fascicle_api::chrono::DateTime<fascicle_api::chrono::Utc>,
        next_tick: fascicle_api::chrono::DateTime<fascicle_api::chrono::Utc>,
    ) -> Result<bool> {
        let version = if self.promise == BrokenPromise::ScheduleAdvancedAtAnyVersion {
            // Whatever version the pass read: the one stored now.
            self.inner
                .schedules()
                .await?
                .into_iter()
                .find(|s| s.schedule.name == name)
                .map_or(version, |s| s.version)
        } else {
            version
        };
        self.inner
            .advance_schedule(name, version, last_tick, next_tick)
            .await
    }

    async fn set_limit(
        &self,
        kind: &str,
        limit: fascicle_api::KindLimit,
    ) -> Result<fascicle_api::KindLimit> {
        let kept = match self.promise {
            BrokenPromise::RunningLimitCheckedBeforeTheClaim => fascicle_api::KindLimit {
                running: None,
                ..limit
            },
            BrokenPromise::RateLimitIgnored => fascicle_api::KindLimit {
                rate: None,
                ..limit
            },
            _ => return self.inner.set_limit(kind, limit).await,
        };
        fascicle_api::validate_limit(kind, &limit)?;
        self.inner.set_limit(kind, kept).await?;
        let mut memo = self.memo();
        let previous = if limit.is_none() {
            memo.limits.remove(kind)
        } else {
            memo.limits.insert(kind.to_owned(), limit)
        };
        Ok(previous.unwrap_or_default())
    }

    async fn limits(&self) -> Result<std::collections::BTreeMap<String, fascicle_api::KindLimit>> {
        match self.promise {
            BrokenPromise::RunningLimitCheckedBeforeTheClaim | BrokenPromise::RateLimitIgnored => {
                Ok(self.memo().limits.clone())
            }
            _ => self.inner.limits().await,
        }
    }

    async fn prune(&self, completed_before: DateTime<Utc>) -> Result<PruneReport> {
        let mut report = self.inner.prune(completed_before).await?;
        if self.promise == BrokenPromise::PruneTearsOpenBatches {
            for (id, _) in self.known_parents() {
                let Some(parent) = self.inner.get(id).await? else {
                    continue;
                };
                if parent.status.is_terminal() {
                    continue;
                }
                for child in self.inner.children_of(id).await? {
                    let finished = child.completed_at.is_some_and(|at| at < completed_before);
                    if child.status.is_terminal() && finished && self.memo().pruned.insert(child.id)
                    {
                        report.operations += 1;
                    }
                }
            }
        }
        Ok(report)
    }

    async fn elect(&self, role: &str, candidate: &str, term: Duration) -> Result<bool> {
        if self.promise == BrokenPromise::ElectionCheckedBeforeTaking {
            let holder = self.inner.leader(role).await?;
            let free = holder.is_none() || holder.as_deref() == Some(candidate);
            // The round trip between the look-up and the take.
            tokio::task::yield_now().await;
            self.inner.elect(role, candidate, term).await?;
            return Ok(free);
        }
        self.inner.elect(role, candidate, term).await
    }

    async fn resign(&self, role: &str, candidate: &str) -> Result<bool> {
        self.inner.resign(role, candidate).await
    }

    async fn leader(&self, role: &str) -> Result<Option<String>> {
        self.inner.leader(role).await
    }
}

/// The transaction of a [`BrokenStore`]: forwards to the inner store's transaction and
/// records what reached it.
struct BrokenTransaction {
    inner: Option<Box<dyn Transaction>>,
    store: Arc<dyn Store>,
    promise: BrokenPromise,
    memo: Arc<Mutex<Memo>>,
    /// Parents and children the inner transaction accepted.
    parents: Vec<ParentRecord>,
    children: Vec<ChildRecord>,
    /// Committed or rolled back (not merely dropped).
    finished: bool,
}

impl BrokenTransaction {
    fn open(&mut self) -> &mut Box<dyn Transaction> {
        self.inner
            .as_mut()
            .expect("a broken transaction lost its inner transaction")
    }

    /// [`BrokenPromise::AutocommitStandalone`]: commits `child` on its own, then opens
    /// a fresh transaction for whatever follows.
    async fn autocommit(&mut self, child: &ChildRecord) -> Result<()> {
        if let Some(open) = self.inner.take() {
            open.rollback().await?;
        }
        let mut own = self.store.begin().await?;
        let inserted = own.insert_child(child).await;
        match inserted {
            Ok(()) => own.commit().await?,
            Err(_) => own.rollback().await?,
        }
        self.inner = Some(self.store.begin().await?);
        inserted
    }
}

#[async_trait]
impl Transaction for BrokenTransaction {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        self.open().insert_parent(parent).await?;
        self.parents.push(parent.clone());
        if self.promise == BrokenPromise::AutocommitParent {
            lock(&self.memo)
                .phantoms
                .insert(parent.id, phantom_of(parent));
        }
        Ok(())
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        if self.promise == BrokenPromise::AutocommitStandalone && child.parent_id.is_none() {
            return self.autocommit(child).await;
        }
        self.open().insert_child(child).await?;
        self.children.push(child.clone());
        Ok(())
    }

    async fn insert_unique(
        &mut self,
        child: &ChildRecord,
        unique: &fascicle_api::Unique,
    ) -> Result<Option<OperationId>> {
        if self.promise == BrokenPromise::UniqueCheckedBeforeInsert {
            // Check…
            let holder = lock(&self.memo).unique.get(&unique.key).copied();
            if let Some(holder) = holder
                && let Some(op) = self.store.get(holder).await?
                && unique.scope.blocks(op.status, op.completed_at, Utc::now())
            {
                return Ok(Some(holder));
            }
            // …then insert, a round trip later.
            tokio::task::yield_now().await;
            self.open().insert_child(child).await?;
            self.children.push(child.clone());
            lock(&self.memo).unique.insert(unique.key.clone(), child.id);
            return Ok(None);
        }
        let existing = self.open().insert_unique(child, unique).await?;
        if existing.is_none() {
            self.children.push(child.clone());
        }
        Ok(existing)
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        if self.promise == BrokenPromise::AutocommitStandalone
            && children.iter().any(|c| c.parent_id.is_none())
        {
            for child in children {
                self.insert_child(child).await?;
            }
            return Ok(());
        }
        self.open().insert_children(children).await?;
        self.children.extend_from_slice(children);
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        let inner = self.inner.take().expect("committed twice");
        let committed = inner.commit().await;
        let mut memo = lock(&self.memo);
        match &committed {
            Ok(()) => {
                for parent in &self.parents {
                    memo.parents.push((parent.id, parent.kind.clone()));
                    memo.phantoms.remove(&parent.id);
                }
            }
            Err(_) if self.promise == BrokenPromise::LateCommitOfADroppedTransaction => {
                drop(memo);
                self.commit_late();
            }
            Err(_) => {}
        }
        committed
    }

    async fn rollback(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        match self.inner.take() {
            Some(inner) => inner.rollback().await,
            None => Ok(()),
        }
    }
}

impl BrokenTransaction {
    /// [`BrokenPromise::LateCommitOfADroppedTransaction`]: rolls the inner transaction
    /// back (so a single-writer backend is free), then commits what it held a little
    /// later, in the background.
    fn commit_late(&mut self) {
        drop(self.inner.take());
        let parents = std::mem::take(&mut self.parents);
        let children = std::mem::take(&mut self.children);
        if parents.is_empty() && children.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&self.store);
        runtime.spawn(async move {
            tokio::time::sleep(LATE_COMMIT_DELAY).await;
            let Ok(mut tx) = store.begin().await else {
                return;
            };
            for parent in &parents {
                if tx.insert_parent(parent).await.is_err() {
                    return;
                }
            }
            if !children.is_empty() && tx.insert_children(&children).await.is_err() {
                return;
            }
            let _ = tx.commit().await;
        });
    }
}

impl Drop for BrokenTransaction {
    fn drop(&mut self) {
        if !self.finished && self.promise == BrokenPromise::LateCommitOfADroppedTransaction {
            self.commit_late();
        }
    }
}
