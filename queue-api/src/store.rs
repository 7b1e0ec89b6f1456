//! The `Store` and `Transaction` traits every driver implements.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::flow::KindLimit;
use crate::lifecycle::{
    Applied, CancelReport, ClaimRequest, ClaimedOperation, Completion, Lease, LeaseStatus,
    PruneReport, ReconcileReport, RescueReport,
};
use crate::types::{ChildRecord, Operation, OperationId, ParentRecord, Stats};

/// Durable storage for operations and batches.
///
/// # Contract
///
/// - [`begin`](Store::begin) opens a [`Transaction`]. Nothing inserted through it is
///   visible to [`get`](Store::get), [`children_of`](Store::children_of),
///   [`stats`](Store::stats) or any other caller until
///   [`commit`](Transaction::commit) has returned `Ok`.
/// - A transaction that is dropped, rolled back, or whose commit fails leaves no row
///   behind: a batch is wholly visible or absent.
/// - An id that is already stored is refused with `Error::Conflict` by
///   `insert_parent` / `insert_child` (at the latest on commit); it never duplicates.
/// - A batch parent has no payload and is never handed to a worker.
/// - Driver failures are mapped into [`Error`](crate::Error); a busy database is an
///   `Error::Backend` whose [`is_transient`](crate::Error::is_transient) is true.
///
/// # Transactions
///
/// A transaction owns its connection until it is committed, rolled back or dropped.
/// Dropping it without committing rolls it back, like sqlx's `Transaction`.
///
/// # Capabilities
///
/// [`capabilities`](Store::capabilities) is synchronous and returns the same value for
/// the life of the store. An operation a driver does not support answers
/// `Error::Unsupported`, never a silent no-op.
///
/// # Implementing a driver
///
/// Implement this trait and [`Transaction`], then run the shared behaviour suite from
/// your driver's `tests/` with one call of `fascicle_conformance::suite!` (crate
/// `fascicle-conformance`). Policy — validation, idempotency, notification order — lives
/// in [`Queue`](crate::Queue); a driver supplies only atomic primitives. `docs/DRIVER_KIT.md`
/// lists the shared rules and helpers a driver uses. To wrap a store (metrics, tracing,
/// fault injection) rather than implement one, see [`Layered`](crate::Layered).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// The driver's name, e.g. `"sqlite"`.
    fn driver(&self) -> &'static str;

    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// Opens a transaction.
    async fn begin(&self) -> Result<Box<dyn Transaction>>;

    /// Reads one operation or parent by id.
    async fn get(&self, id: OperationId) -> Result<Option<Operation>>;

    /// The children of a batch, in the order they were inserted.
    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>>;

    /// The ids of a batch's children, in insertion order, without their payloads: what an
    /// idempotent resubmit returns. The provided version reads
    /// [`children_of`](Store::children_of); a driver should override it with a query that
    /// reads the ids alone.
    async fn child_ids_of(&self, parent_id: OperationId) -> Result<Vec<OperationId>> {
        Ok(self
            .children_of(parent_id)
            .await?
            .into_iter()
            .map(|child| child.id)
            .collect())
    }

    /// A page of a batch's children, in insertion order: at most `limit`, from the one
    /// after `after` (a child of this batch: the last of the previous page), or from the
    /// first. An `after` that is not a child of `parent_id` is `InvalidInput`. Drivers
    /// answer it by keyset — an index walk from the cursor, never a scan of the batch or
    /// an `OFFSET` — so a page of a million-child batch costs what a page costs; the
    /// provided version reads [`children_of`](Store::children_of) and is only correct.
    async fn children_page(
        &self,
        parent_id: OperationId,
        after: Option<OperationId>,
        limit: usize,
    ) -> Result<Vec<Operation>> {
        let children = self.children_of(parent_id).await?;
        let start = match after {
            None => 0,
            Some(cursor) => {
                children
                    .iter()
                    .position(|child| child.id == cursor)
                    .ok_or_else(|| {
                        crate::Error::InvalidInput(crate::messages::not_a_child(cursor, parent_id))
                    })?
                    + 1
            }
        };
        Ok(children.into_iter().skip(start).take(limit).collect())
    }

    /// Queue depth by kind, with batch parents reported separately.
    async fn stats(&self) -> Result<Stats>;

    /// Claims up to `request.limit` ready operations: `pending`, with a payload (never a
    /// parent), `run_at` reached, of the requested kinds, highest `priority` first then
    /// earliest `run_at` then submission order; never one whose serialization key is held
    /// by a `processing` operation, and at most one per key. Each becomes `processing`
    /// with a new lease token, `attempts + 1`, and a lease of `request.lease`.
    /// Concurrent claimers never receive the same operation.
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>>;

    /// Records finished attempts in one transaction. Each applies only if the operation
    /// is still `processing` under the given lease token; otherwise it is
    /// [`Applied::LeaseLost`] and changes nothing. A terminal outcome updates the
    /// parent's counters in the same transaction and, when it was the last open child,
    /// finalizes the parent by [`parent_outcome`](crate::parent_outcome) — exactly once.
    async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>>;

    /// Extends held leases by `lease` from now and reports, per lease, whether it is
    /// still held and whether cancellation was requested.
    async fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<LeaseStatus>>;

    /// Returns held operations to `pending` without spending an attempt (graceful
    /// shutdown). Returns how many were released.
    async fn release(&self, leases: &[Lease]) -> Result<u64>;

    /// Puts `processing` operations whose lease expired back to `pending`, or fails them
    /// (aggregating into their parent) once `attempts` reached `max_attempts`.
    async fn rescue_expired_leases(&self) -> Result<RescueReport>;

    /// Drives stranded parents to a terminal state: a parent with no child rows fails with
    /// [`ZERO_CHILDREN_REASON`](crate::ZERO_CHILDREN_REASON); a pending parent whose
    /// children are all terminal gets its counters recounted and is finalized.
    async fn reconcile_orphan_parents(&self) -> Result<ReconcileReport>;

    /// Cancels an operation or a whole batch: pending operations become `cancelled`
    /// (aggregating into their parent), processing ones are asked to stop, terminal ones
    /// stay. `Error::NotFound` if the id does not exist.
    async fn cancel(&self, id: OperationId) -> Result<CancelReport>;

    /// Re-queues a batch's failed and cancelled children (attempts reset) and reopens
    /// the parent. `Error::Conflict` when there is nothing to retry, `Error::NotFound`
    /// when the batch does not exist. Returns how many children were re-queued.
    async fn retry_batch(&self, parent_id: OperationId) -> Result<u64>;

    /// Pauses `kind` (issue #15, flow control): from the moment this returns no claim hands
    /// out an operation of that kind, on any worker or process sharing the store, until
    /// [`resume`](Store::resume); running attempts finish, pending operations stay
    /// pending (and counted as ready or scheduled). Returns `true` when it was not paused
    /// before. `Error::InvalidInput` for a kind that is not a valid name
    /// ([`validate_kind`](crate::validate_kind)).
    async fn pause(&self, kind: &str) -> Result<bool>;

    /// Resumes a paused `kind`: its ready operations are claimable again. Returns `true`
    /// when it was paused.
    async fn resume(&self, kind: &str) -> Result<bool>;

    /// Sets the flow control of `kind` ([`KindLimit`]; see [`flow`](crate::flow)): from
    /// the moment this returns, no claim on any worker or process sharing the store starts
    /// more operations of the kind than the limit allows, counted inside the claim's
    /// transaction. [`KindLimit::default()`] clears it. Returns the limit it replaced
    /// (the default when there was none). `Error::InvalidInput` for a limit
    /// [`validate_limit`](crate::validate_limit) refuses; nothing is stored then.
    async fn set_limit(&self, kind: &str, limit: KindLimit) -> Result<KindLimit>;

    /// Every kind's limit, by kind.
    async fn limits(&self) -> Result<BTreeMap<String, KindLimit>>;

    /// Stores `schedule` ([`schedule`](crate::schedule), validated by the caller): a new
    /// one unpaused, anchored at `now` (its first tick is the first after `now`) and due at
    /// once; one stored already gets the new definition, keeps its pause and its last
    /// tick, and is due at once (the next pass plans it anew). Bumps the version. Returns
    /// `true` when it is new.
    async fn put_schedule(&self, schedule: &crate::Schedule, now: DateTime<Utc>) -> Result<bool>;

    /// Deletes a schedule (the operations it submitted stay). Returns whether it existed.
    async fn remove_schedule(&self, name: &str) -> Result<bool>;

    /// Pauses (`true`) or resumes a schedule: a paused one is not run by any pass; resumed,
    /// the ticks it missed follow its catch-up. Bumps the version. Returns whether it
    /// changed; `Error::NotFound` when there is no such schedule.
    async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool>;

    /// Every schedule, by name.
    async fn schedules(&self) -> Result<Vec<crate::StoredSchedule>>;

    /// The unpaused schedules whose next tick is at or before `now`. Every worker calls it
    /// each second: its cost should not grow with the schedules not due (the SQL drivers
    /// read an index of next ticks; memory filters its map).
    async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<crate::StoredSchedule>>;

    /// Advances a schedule a pass planned: sets its last and next tick and bumps its
    /// version, only if its version is still `version` (returns `false`, changing
    /// nothing, otherwise: another pass or a change came first).
    async fn advance_schedule(
        &self,
        name: &str,
        version: i64,
        last_tick: DateTime<Utc>,
        next_tick: DateTime<Utc>,
    ) -> Result<bool>;

    /// Deletes terminal operations that finished before `completed_before`. A batch goes
    /// only as a whole, once its parent is terminal; a child is never deleted alone. It
    /// deletes in transactions of about [`PRUNE_CHUNK_ROWS`](crate::PRUNE_CHUNK_ROWS)
    /// rows (whole batches, a larger batch alone), so workers never wait on it for long.
    /// The PostgreSQL driver then vacuums the table when it deleted a chunk's worth or
    /// more, so that new rows can reuse the space before autovacuum's next visit (not
    /// behind a transaction pooler).
    async fn prune(&self, completed_before: DateTime<Utc>) -> Result<PruneReport>;

    /// Takes or keeps `role` (such as [`MAINTENANCE_ROLE`](crate::MAINTENANCE_ROLE)) for
    /// `candidate` until `term` from now on the store's clock, when the role is free, its
    /// holder's term has run out, or `candidate` holds it already; answers whether
    /// `candidate` holds it now. At most one candidate holds a role at any instant, across
    /// every process on the database: racing candidates elect one. A holder keeps the role
    /// by calling again before its term ends. `role` and `candidate` are names (not empty,
    /// at most 255 bytes, no NUL) and `term` lies between 1 ms and
    /// [`MAX_LEASE`](crate::MAX_LEASE) ([`validate_election`](crate::validate_election)),
    /// else `InvalidInput`. The provided version is `Unsupported`: a worker on such a
    /// store runs its maintenance without an election, as every worker did before.
    async fn elect(&self, role: &str, candidate: &str, term: Duration) -> Result<bool> {
        crate::validate_election(role, candidate, term)?;
        Err(Error::unsupported("elect", self.driver()))
    }

    /// Gives `role` up if `candidate` holds it, so that the next candidate takes it at
    /// once instead of after the term; answers whether it held it.
    async fn resign(&self, role: &str, candidate: &str) -> Result<bool> {
        crate::validate_election(role, candidate, Duration::from_millis(1))?;
        Err(Error::unsupported("resign", self.driver()))
    }

    /// Who holds `role` now (a term not run out), if anyone.
    async fn leader(&self, role: &str) -> Result<Option<String>> {
        crate::validate_election(role, "-", Duration::from_millis(1))?;
        Err(Error::unsupported("leader", self.driver()))
    }
}

/// For driver authors: remembers that an insert of a transaction failed, so that the
/// transaction can no longer commit — a caller that ignores an insert's error and commits
/// gets the transaction rolled back, never a batch in part.
#[derive(Debug, Default)]
pub struct InsertHealth {
    failed: Option<String>,
}

impl InsertHealth {
    /// Passes `result` through, remembering an error.
    pub fn track<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(error) = &result {
            self.failed.get_or_insert_with(|| error.to_string());
        }
        result
    }

    /// `Ok` while no insert failed; else the `InvalidInput` a commit must return (after
    /// rolling back).
    pub fn check(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(reason) => Err(crate::Error::InvalidInput(
                crate::messages::commit_after_failed_insert(reason),
            )),
        }
    }
}

/// For driver authors: refuses, before anything is written, children that name a parent
/// this transaction did not insert (`inserted_here` answers for a parent id): children join
/// a batch only in the transaction that creates it.
pub fn check_batch_membership(
    children: &[crate::ChildRecord],
    inserted_here: impl Fn(&crate::OperationId) -> bool,
) -> Result<()> {
    for child in children {
        if let Some(parent) = child.parent_id
            && !inserted_here(&parent)
        {
            return Err(crate::Error::InvalidInput(
                crate::messages::parent_not_in_this_transaction(child.id, parent),
            ));
        }
    }
    Ok(())
}

/// For driver authors: refuses a unique insert
/// ([`Transaction::insert_unique`]) of an operation that names a parent — unique keys
/// apply to stand-alone operations only.
pub fn check_standalone(child: &crate::ChildRecord) -> Result<()> {
    match child.parent_id {
        Some(_) => Err(crate::Error::InvalidInput(
            crate::messages::unique_in_a_batch(child.id),
        )),
        None => Ok(()),
    }
}

/// For driver authors: refuses a nested batch's parent row
/// ([`ParentRecord::parent_id`](crate::ParentRecord::parent_id)) whose outer batch this
/// transaction did not insert, like [`check_batch_membership`] for children.
pub fn check_parent_membership(
    parent: &crate::ParentRecord,
    inserted_here: impl Fn(&crate::OperationId) -> bool,
) -> Result<()> {
    match parent.parent_id {
        Some(outer) if !inserted_here(&outer) => Err(crate::Error::InvalidInput(
            crate::messages::parent_not_in_this_transaction(parent.id, outer),
        )),
        _ => Ok(()),
    }
}

/// For driver authors: implements [`Transaction`] for a type that has an
/// [`InsertHealth`] field `health` and the inherent methods `insert_parent_unchecked`,
/// `insert_child_unchecked`, `insert_children_unchecked`, `insert_unique_unchecked`,
/// `commit_unchecked` and
/// `rollback_unchecked` (the driver's own steps): every insert's error is remembered, and
/// a commit after one rolls back and returns `Error::InvalidInput` — one rule for every
/// driver.
#[macro_export]
macro_rules! checked_transaction {
    ($ty:ty) => {
        #[$crate::async_trait]
        impl $crate::Transaction for $ty {
            async fn insert_parent(&mut self, parent: &$crate::ParentRecord) -> $crate::Result<()> {
                let result = self.insert_parent_unchecked(parent).await;
                self.health.track(result)
            }

            async fn insert_child(&mut self, child: &$crate::ChildRecord) -> $crate::Result<()> {
                let result = self.insert_child_unchecked(child).await;
                self.health.track(result)
            }

            async fn insert_children(
                &mut self,
                children: &[$crate::ChildRecord],
            ) -> $crate::Result<()> {
                let result = self.insert_children_unchecked(children).await;
                self.health.track(result)
            }

            async fn insert_unique(
                &mut self,
                child: &$crate::ChildRecord,
                unique: &$crate::Unique,
            ) -> $crate::Result<::core::option::Option<$crate::OperationId>> {
                let result = self.insert_unique_unchecked(child, unique).await;
                self.health.track(result)
            }

            async fn commit(self: Box<Self>) -> $crate::Result<()> {
                // After a failed insert the transaction rolls back: never a batch in part.
                if let Err(refused) = self.health.check() {
                    let _ = self.rollback_unchecked().await;
                    return Err(refused);
                }
                self.commit_unchecked().await
            }

            async fn rollback(self: Box<Self>) -> $crate::Result<()> {
                self.rollback_unchecked().await
            }
        }
    };
}

/// An open write transaction on a [`Store`]. Rolled back on drop.
///
/// # Contract
///
/// Rows inserted here are invisible to every other caller until
/// [`commit`](Transaction::commit) returns `Ok`; after a failed commit, an explicit
/// [`rollback`](Transaction::rollback) or a drop, none of them exist. Once an insert has
/// failed, `commit` rolls back and returns `Error::InvalidInput`. A child names a parent
/// inserted by the same transaction, or none.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Transaction: Send {
    /// Inserts a batch parent (no payload). Its `children_total` is the number of children
    /// this transaction inserts for it, whatever the record says.
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()>;

    /// Inserts one child or stand-alone operation.
    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()>;

    /// Inserts many children. The provided version calls
    /// [`insert_child`](Transaction::insert_child) for each; a driver should override it
    /// with a bulk statement (one round trip where it can). `MockTransaction` (feature
    /// `mock`) mocks this method itself, like every other: expect `insert_children`, not
    /// one `insert_child` per child (`MockTransaction::expecting_one_batch` does).
    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        for child in children {
            self.insert_child(child).await?;
        }
        Ok(())
    }

    /// Inserts a stand-alone operation (no parent) with a unique key
    /// ([`NewOperation::unique`](crate::NewOperation::unique)), unless an operation
    /// holding the key blocks it by `unique.scope`
    /// ([`UniqueScope::blocks`](crate::UniqueScope::blocks)): then nothing is inserted and
    /// that operation's id is returned. Racing submitters of one key insert one operation:
    /// the store's own uniqueness decides (a unique index, or a check at commit that
    /// refuses the commit with `Error::Conflict`). An operation whose key blocks nothing
    /// any more (ended, pruned) hands the key over. The provided version answers
    /// `Error::Unsupported`.
    async fn insert_unique(
        &mut self,
        child: &ChildRecord,
        unique: &crate::Unique,
    ) -> Result<Option<crate::OperationId>> {
        let _ = (child, unique);
        Err(crate::Error::unsupported("insert_unique", "this"))
    }

    /// Makes every row inserted visible at once.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// Discards every row inserted.
    async fn rollback(self: Box<Self>) -> Result<()>;
}

impl fmt::Debug for dyn Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Transaction")
    }
}
