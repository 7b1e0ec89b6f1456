//! Operation ids, statuses, new-batch values and the operation read model.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::Error;
use crate::workflow::{BatchInfo, BatchPlan, FailurePolicy};

/// The id of an operation or batch: a UUID, v7 (time ordered) when fascicle makes it.
///
/// Callers may supply their own id; submitting again with the same id returns the
/// existing operation instead of creating a duplicate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OperationId(Uuid);

impl OperationId {
    /// A new time-ordered (UUID v7) id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 bytes of the UUID, big-endian.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for OperationId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for OperationId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl From<OperationId> for Uuid {
    fn from(id: OperationId) -> Self {
        id.0
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperationId({})", self.0)
    }
}

impl FromStr for OperationId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(Self)
            .map_err(|e| Error::InvalidInput(format!("`{s}` is not an operation id (a UUID): {e}")))
    }
}

/// Where an operation is in its life.
///
/// `Pending` → `Processing` → `Completed` / `Failed` / `Cancelled`. A batch parent stays
/// `Pending` until its last child is terminal, then takes its terminal state exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting to be claimed (or, for a parent, waiting for its children).
    Pending,
    /// Claimed by a worker that holds a lease.
    Processing,
    /// Finished successfully.
    Completed,
    /// Finished with an error, or exhausted its attempts.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The lowercase name stored by the drivers.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether no further transition is possible.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown status `{s}`")))
    }
}

/// Default number of attempts an operation gets before it fails for good.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// One operation to enqueue: on its own with `Queue::submit`, or as a child of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct NewOperation {
    /// Caller-supplied id; `None` lets fascicle make a UUID v7.
    pub id: Option<OperationId>,
    /// Operation type, e.g. `retain`. Must be non-empty.
    pub kind: String,
    /// The handler's input. Must serialize within the queue's payload limit.
    pub payload: Value,
    /// Higher runs first among ready operations. Default 0.
    pub priority: i32,
    /// Not claimable before this instant; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    /// At most one operation with the same key is processing at any time.
    pub serialization_key: Option<String>,
    /// Attempts before the operation fails for good; `None` means [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: Option<u32>,
    /// How long one attempt may run before the worker stops it (a retryable failure);
    /// `None` leaves it to the worker's `attempt_timeout`.
    pub timeout: Option<std::time::Duration>,
    /// Operations of the same batch this one waits for ([`after`](Self::after),
    /// [`after_any`](Self::after_any)).
    pub after: Vec<Dependency>,
    /// A unique key ([`unique`](Self::unique)): a submit that collides with an operation
    /// holding the key returns that operation instead of inserting.
    pub unique: Option<Unique>,
}

/// A stand-alone operation's unique key and how long an operation holding it blocks
/// another submit with the same key ([`NewOperation::unique`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unique {
    /// The key: any name (not blank, at most the queue's name limit, no NUL), shared by
    /// every kind — include the kind in it to scope it to one.
    pub key: String,
    /// Which operations holding the key block a new submit.
    pub scope: UniqueScope,
}

/// Which operation holding a unique key blocks a new submit with the key: the scope of
/// the submit that asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UniqueScope {
    /// One that is `pending` or `processing` (the default): once it ended, the key is
    /// free again.
    #[default]
    Open,
    /// One that is `pending` or `processing`, or `completed` less than this long ago
    /// (failed and cancelled ones block nothing): "at most once per period".
    CompletedWithin(#[serde(with = "crate::flow::duration_micros")] std::time::Duration),
}

/// The longest [`UniqueScope::CompletedWithin`] period: ten years.
pub const MAX_UNIQUE_PERIOD: std::time::Duration =
    std::time::Duration::from_secs(3650 * 24 * 60 * 60);

impl UniqueScope {
    /// Whether an operation holding the key in `status`, completed at `completed_at`,
    /// blocks a submit at `now` with this scope. The one rule every driver applies.
    pub fn blocks(
        &self,
        status: Status,
        completed_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> bool {
        match (self, status) {
            (_, Status::Pending | Status::Processing) => true,
            (Self::CompletedWithin(period), Status::Completed) => completed_at.is_some_and(|at| {
                at > now - chrono::Duration::from_std(*period).unwrap_or(chrono::Duration::MAX)
            }),
            _ => false,
        }
    }

    /// The period in microseconds (`None` for [`Open`](Self::Open)), for SQL drivers.
    pub fn period_micros(&self) -> Option<i64> {
        match self {
            Self::Open => None,
            Self::CompletedWithin(period) => Some(period.as_micros() as i64),
        }
    }
}

/// One edge of a batch's dependency graph: the operation `id`, and whether the waiting
/// side runs whatever `id`'s outcome (`any`) or only once it completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dependency {
    /// The operation at the other end.
    pub id: OperationId,
    /// `true`: any terminal outcome releases the dependent (a `finally` step);
    /// `false`: only `completed` does, and a failed or cancelled dependency cancels it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any: bool,
}

impl Dependency {
    /// Whether a dependency in `status` has released the operation waiting for it: by
    /// completing, or — for an `any` edge — by ending in any way. The one rule the
    /// drivers' releases and `retry_batch`'s recount apply.
    pub fn released_by(&self, status: Status) -> bool {
        status == Status::Completed || (self.any && status.is_terminal())
    }

    /// A list as drivers store it: a JSON array, or `None` for an empty list.
    pub fn list_json(list: &[Dependency]) -> Option<String> {
        (!list.is_empty()).then(|| serde_json::to_string(list).expect("dependencies serialize"))
    }

    /// A list read back from [`list_json`](Self::list_json)'s text (`None`: empty).
    pub fn list_from_json(text: Option<&str>) -> crate::Result<Vec<Dependency>> {
        match text {
            None => Ok(Vec::new()),
            Some(text) => serde_json::from_str(text).map_err(|e| Error::Storage {
                location: "an operation's dependencies".into(),
                reason: format!("the stored dependencies cannot be read: {e}"),
            }),
        }
    }
}

impl NewOperation {
    /// An operation of `kind` with `payload` and default settings.
    pub fn new(kind: impl Into<String>, payload: Value) -> Self {
        Self {
            id: None,
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            serialization_key: None,
            max_attempts: None,
            timeout: None,
            after: Vec::new(),
            unique: None,
        }
    }

    /// Makes the operation unique by `key` while an operation holding the key is
    /// `pending` or `processing`: a submit that collides inserts nothing and returns the
    /// existing operation's id with `created: false` — under any number of racing
    /// submitters, on every driver, by the store's own uniqueness (a unique key table).
    /// Stand-alone operations only; a batch child with a key is refused.
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique = Some(Unique {
            key: key.into(),
            scope: UniqueScope::Open,
        });
        self
    }

    /// Like [`unique`](Self::unique), and an operation that completed with the key less
    /// than `period` ago blocks too (at most [`MAX_UNIQUE_PERIOD`]).
    pub fn unique_within(mut self, key: impl Into<String>, period: std::time::Duration) -> Self {
        self.unique = Some(Unique {
            key: key.into(),
            scope: UniqueScope::CompletedWithin(period),
        });
        self
    }

    /// Not claimable until every operation in `ids` — children of the same batch, given
    /// their ids with [`with_id`](Self::with_id) — has completed. When one of them fails
    /// or is cancelled, this operation is cancelled with a reason naming it. Checked at
    /// submit: unknown ids, ids outside the batch and cycles are refused, naming the ids.
    pub fn after(mut self, ids: &[OperationId]) -> Self {
        self.after
            .extend(ids.iter().map(|&id| Dependency { id, any: false }));
        self
    }

    /// Not claimable until every operation in `ids` has ended, whatever its outcome
    /// (completed, failed or cancelled): a `finally` step.
    pub fn after_any(mut self, ids: &[OperationId]) -> Self {
        self.after
            .extend(ids.iter().map(|&id| Dependency { id, any: true }));
        self
    }

    /// Uses a caller-supplied id (idempotent submit).
    pub fn with_id(mut self, id: OperationId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the priority (higher first).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Schedules the operation for later: not claimable before `run_at`, which must lie
    /// between [`earliest_run_at`](crate::earliest_run_at) and
    /// [`latest_run_at`](crate::latest_run_at) (the years 1 to 9999).
    pub fn with_run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }

    /// Sets the serialization key.
    pub fn with_serialization_key(mut self, key: impl Into<String>) -> Self {
        self.serialization_key = Some(key.into());
        self
    }

    /// Sets the maximum number of attempts.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Stops an attempt that runs longer than `timeout` (between 1 ms and
    /// [`MAX_ATTEMPT_TIMEOUT`]): its handler future is dropped and the attempt is a
    /// retryable failure "timed out after …". Overrides the worker's `attempt_timeout`.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// The longest per-operation attempt timeout ([`NewOperation::with_timeout`]): 7 days.
pub const MAX_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A batch to enqueue atomically: one parent status row plus its children.
#[derive(Clone, Debug, PartialEq)]
pub struct NewBatch {
    /// Caller-supplied parent id; resubmitting it returns the existing batch.
    pub id: Option<OperationId>,
    /// The parent's kind, e.g. `batch_retain`.
    pub kind: String,
    /// Free-form description of the batch kept on the parent (the parent has no payload).
    pub metadata: Value,
    /// The child operations; at least one.
    pub children: Vec<NewOperation>,
    /// What a child that fails for good does to the batch. Default `WaitAll`.
    pub failure_policy: FailurePolicy,
    /// Inserted when the batch completes.
    pub on_success: Option<NewOperation>,
    /// Inserted when the batch fails.
    pub on_failure: Option<NewOperation>,
    /// Inserted when the batch ends, whatever its outcome.
    pub on_complete: Option<NewOperation>,
    /// Batches nested in this one ([`child_batch`](Self::child_batch)): each is one
    /// child of this batch, which counts its outcome when it ends.
    pub batches: Vec<NewBatch>,
}

impl NewBatch {
    /// A batch of `kind` with no children yet.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            id: None,
            kind: kind.into(),
            metadata: Value::Null,
            children: Vec::new(),
            failure_policy: FailurePolicy::WaitAll,
            on_success: None,
            on_failure: None,
            on_complete: None,
            batches: Vec::new(),
        }
    }

    /// Adds a batch as one child of this one (a nested batch, up to
    /// [`MAX_BATCH_DEPTH`](crate::MAX_BATCH_DEPTH) levels). The whole tree is submitted in
    /// one transaction. The inner batch runs its children under its own failure policy
    /// and callbacks; when it ends, its outcome counts into this batch's counters exactly
    /// like an operation's, in the same transaction. Operations anywhere in the tree may
    /// wait for it ([`NewOperation::after`]) given its id ([`with_id`](Self::with_id)).
    /// It is inserted after this batch's operations: the receipt's `child_ids` lists the
    /// operations, then the nested batches.
    pub fn child_batch(mut self, batch: NewBatch) -> Self {
        self.batches.push(batch);
        self
    }

    /// Uses a caller-supplied parent id (idempotent submit).
    pub fn with_id(mut self, id: OperationId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the parent's metadata.
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Adds one child.
    pub fn child(mut self, child: NewOperation) -> Self {
        self.children.push(child);
        self
    }

    /// Adds several children.
    pub fn children(mut self, children: impl IntoIterator<Item = NewOperation>) -> Self {
        self.children.extend(children);
        self
    }

    /// Sets what a child that fails for good does to the batch
    /// ([`FailurePolicy`](crate::FailurePolicy); `WaitAll` unless set).
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// The operation to insert, in the transaction that finalizes the batch, when the
    /// batch completes. Its handler reads the batch in
    /// [`Context::batch`](crate::Context::batch). One per batch (a second call replaces
    /// the first); it takes no id and no `run_at` (both are set when it fires).
    pub fn on_success(mut self, callback: NewOperation) -> Self {
        self.on_success = Some(callback);
        self
    }

    /// Like [`on_success`](Self::on_success), when the batch fails.
    pub fn on_failure(mut self, callback: NewOperation) -> Self {
        self.on_failure = Some(callback);
        self
    }

    /// Like [`on_success`](Self::on_success), when the batch ends whatever its outcome
    /// (completed, failed or cancelled).
    pub fn on_complete(mut self, callback: NewOperation) -> Self {
        self.on_complete = Some(callback);
        self
    }
}

/// A batch parent as handed to [`Transaction::insert_parent`](crate::Transaction::insert_parent):
/// ids resolved, validated, timestamps set.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentRecord {
    /// The parent's id.
    pub id: OperationId,
    /// The parent's kind.
    pub kind: String,
    /// The batch metadata.
    pub metadata: Value,
    /// How many children the batch has; the driver stores it as the parent's
    /// `children_total` counter.
    pub children_total: u64,
    /// Creation instant.
    pub created_at: DateTime<Utc>,
    /// Failure policy and callbacks; [`BatchPlan::default`] for a plain batch.
    pub plan: BatchPlan,
    /// For a nested batch, the batch it is a child of (inserted before it, in the same
    /// transaction); `None` for a tree's outermost batch.
    pub parent_id: Option<OperationId>,
    /// Operations of the tree that wait for this nested batch to end
    /// ([`NewOperation::after`]); released when it is finalized, like an operation's.
    pub dependents: Vec<Dependency>,
}

/// A child (or stand-alone) operation as handed to
/// [`Transaction::insert_child`](crate::Transaction::insert_child).
#[derive(Clone, Debug, PartialEq)]
pub struct ChildRecord {
    /// The operation's id.
    pub id: OperationId,
    /// The batch parent, `None` for a stand-alone operation.
    pub parent_id: Option<OperationId>,
    /// The operation's kind.
    pub kind: String,
    /// The handler's input.
    pub payload: Value,
    /// `payload` serialized as compact JSON, as validated: SQL drivers store this text
    /// instead of serializing the payload again. Must equal
    /// [`to_stored_text(&payload)`](crate::to_stored_text).
    pub payload_json: String,
    /// Higher runs first.
    pub priority: i32,
    /// Not claimable before this instant.
    pub run_at: DateTime<Utc>,
    /// At most one processing operation per key.
    pub serialization_key: Option<String>,
    /// Attempts before it fails for good (≥ 1).
    pub max_attempts: u32,
    /// Creation instant.
    pub created_at: DateTime<Utc>,
    /// How long one attempt may run ([`NewOperation::with_timeout`]), whole milliseconds.
    pub timeout: Option<std::time::Duration>,
    /// The operations of its batch it waits for; it is stored waiting on
    /// `after.len()` of them and not claimable before that count is zero.
    pub after: Vec<Dependency>,
    /// The operations of its batch that wait for it (the reverse edges, with their
    /// mode): when it ends, each is released (its count goes down by one) or, for a
    /// dependent that needs it completed, cancelled.
    pub dependents: Vec<Dependency>,
}

/// A parent's child counters, kept up to date in O(1) per child transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildCounters {
    /// Children in the batch.
    pub total: u64,
    /// Children that completed.
    pub completed: u64,
    /// Children that failed for good.
    pub failed: u64,
    /// Children that were cancelled.
    pub cancelled: u64,
}

impl ChildCounters {
    /// Children that reached a terminal state.
    pub fn terminal(&self) -> u64 {
        self.completed + self.failed + self.cancelled
    }
}

/// A stored operation or batch parent, as read back from a store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Its id.
    pub id: OperationId,
    /// Its kind.
    pub kind: String,
    /// Its status.
    pub status: Status,
    /// The handler input; `None` exactly for batch parents.
    pub payload: Option<Value>,
    /// The batch metadata (parents only).
    pub metadata: Option<Value>,
    /// The batch this operation belongs to.
    pub parent_id: Option<OperationId>,
    /// Higher runs first.
    pub priority: i32,
    /// At most one processing operation per key.
    pub serialization_key: Option<String>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Not claimable before this instant.
    pub run_at: DateTime<Utc>,
    /// The worker holding the lease, while processing.
    pub worker_id: Option<String>,
    /// When the current lease runs out, while processing.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Child counters (parents only).
    pub children: Option<ChildCounters>,
    /// The last error.
    pub error: Option<String>,
    /// The handler's result (or, for a parent, the summary of its children).
    pub result: Option<Value>,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it reached a terminal state.
    pub completed_at: Option<DateTime<Utc>>,
    /// How long one attempt may run ([`NewOperation::with_timeout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<std::time::Duration>,
    /// A batch parent's failure policy and callbacks (parents only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<BatchPlan>,
    /// For a callback, the batch that fired it (what its handler reads in
    /// [`Context::batch`](crate::Context::batch)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_for: Option<BatchInfo>,
    /// The operations of its batch it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Dependency>,
    /// How many of them have not released it yet; it is not claimable before this is 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waiting_on: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Operation {
    /// Whether this is a batch parent (an aggregator that is never executed).
    pub fn is_parent(&self) -> bool {
        self.payload.is_none()
    }
}

/// Queue depth of one operation kind. Parents are never counted here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Pending and claimable now.
    pub ready: u64,
    /// Pending but waiting for dependencies of its batch ([`NewOperation::after`]).
    #[serde(default)]
    pub waiting: u64,
    /// Pending but not before a later `run_at` (scheduled or waiting out a retry backoff).
    pub scheduled: u64,
    /// Held by a worker.
    pub processing: u64,
    /// Completed.
    pub completed: u64,
    /// Failed for good.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl KindStats {
    /// Operations not yet terminal.
    pub fn outstanding(&self) -> u64 {
        self.ready + self.waiting + self.scheduled + self.processing
    }

    /// Every operation counted.
    pub fn total(&self) -> u64 {
        self.outstanding() + self.completed + self.failed + self.cancelled
    }
}

/// Batch parents by status, reported apart from the work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Parents whose children are not all terminal yet.
    pub open: u64,
    /// Parents whose children all completed.
    pub completed: u64,
    /// Parents with at least one failed child.
    pub failed: u64,
    /// Parents whose remaining children were cancelled.
    pub cancelled: u64,
}

impl BatchStats {
    /// Every parent counted.
    pub fn total(&self) -> u64 {
        self.open + self.completed + self.failed + self.cancelled
    }
}

/// Queue statistics: work per kind, batches separately.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Work (children and stand-alone operations) by kind.
    pub kinds: BTreeMap<String, KindStats>,
    /// Batch parents, never counted as work.
    pub batches: BatchStats,
    /// The kinds paused ([`Store::pause`](crate::Store::pause)), whether or not they
    /// have operations.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub paused: std::collections::BTreeSet<String>,
}

/// Which statistics bucket a group of rows belongs to; drivers read these facts from
/// storage and [`Stats::count`] applies the one classification every driver shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted<'a> {
    /// The rows' kind.
    pub kind: &'a str,
    /// Their status.
    pub status: Status,
    /// They are batch parents (no payload).
    pub is_parent: bool,
    /// Pending with a `run_at` still in the future.
    pub scheduled: bool,
    /// Pending and waiting for dependencies (counted before `scheduled`).
    pub waiting: bool,
}

impl Stats {
    /// Adds `n` rows: parents to `batches` (never as work), other rows to their kind.
    pub fn count(&mut self, rows: Counted<'_>, n: u64) {
        if rows.is_parent {
            match rows.status {
                Status::Pending | Status::Processing => self.batches.open += n,
                Status::Completed => self.batches.completed += n,
                Status::Failed => self.batches.failed += n,
                Status::Cancelled => self.batches.cancelled += n,
            }
            return;
        }
        let kind = match self.kinds.get_mut(rows.kind) {
            Some(kind) => kind,
            None => self.kinds.entry(rows.kind.to_string()).or_default(),
        };
        match rows.status {
            Status::Pending if rows.waiting => kind.waiting += n,
            Status::Pending if rows.scheduled => kind.scheduled += n,
            Status::Pending => kind.ready += n,
            Status::Processing => kind.processing += n,
            Status::Completed => kind.completed += n,
            Status::Failed => kind.failed += n,
            Status::Cancelled => kind.cancelled += n,
        }
    }

    /// All kinds added up.
    pub fn work(&self) -> KindStats {
        self.kinds
            .values()
            .fold(KindStats::default(), |mut acc, k| {
                acc.ready += k.ready;
                acc.waiting += k.waiting;
                acc.scheduled += k.scheduled;
                acc.processing += k.processing;
                acc.completed += k.completed;
                acc.failed += k.failed;
                acc.cancelled += k.cancelled;
                acc
            })
    }
}

/// What a submit returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchReceipt {
    /// The parent's id.
    pub parent_id: OperationId,
    /// The children's ids, in insertion order: the batch's operations in submission
    /// order, then its nested batches ([`NewBatch::child_batch`]).
    pub child_ids: Vec<OperationId>,
    /// `false` when the id was already taken and the existing batch was returned.
    pub created: bool,
    /// `false` when a notifier failed after commit; the rows are stored and polling
    /// workers will still find them.
    pub notified: bool,
}

/// What a stand-alone submit returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The operation's id.
    pub id: OperationId,
    /// `false` when the id was already taken and the existing operation was returned.
    pub created: bool,
    /// `false` when a notifier failed after commit.
    pub notified: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_its_name() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>().unwrap(), status);
        }
        assert!("running".parse::<Status>().is_err());
        assert!(Status::Cancelled.is_terminal() && !Status::Processing.is_terminal());
    }

    #[test]
    fn operation_id_parses_and_rejects_garbage() {
        let id = OperationId::new();
        assert_eq!(id.to_string().parse::<OperationId>().unwrap(), id);
        let err = "not-a-uuid".parse::<OperationId>().unwrap_err();
        assert!(err.to_string().contains("not-a-uuid"), "{err}");
    }
}
