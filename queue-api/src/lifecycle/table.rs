//! The lifecycle as data: every state change an operation or a batch parent can make,
//! one [`Transition`] each, in [`TRANSITIONS`].
//!
//! This table is the rule. Each driver translates every row into its own atomic
//! statements, in a function named after the row (`retry`, `retry_after_cancel`, …); the
//! memory driver applies the field effects with [`Transition::apply`]. The conformance
//! suite maps every row to the cases that check it, and fails when a row has none.
//!
//! # Lock order
//!
//! Parent before child, always: a batch's parent row is the batch's lock. A driver that
//! locks rows (PostgreSQL) takes the parents' locks first, in id order, then the
//! children's. Two transactions that touch the same batch therefore never wait on each
//! other in opposite orders.
//!
//! # Cancellation
//!
//! A cancel request on a processing operation sets `cancel_requested` and lasts until
//! the operation is terminal: the attempt may still complete or fail for good, but any
//! way back to `pending` (a retryable outcome, a release at shutdown, a rescue of an
//! expired lease) ends it `cancelled` instead. Only `retry_batch` clears the flag, on
//! purpose.
//!
//! # Clock
//!
//! Every instant a transition compares or writes (`run_at`, lease expiry, timestamps)
//! comes from one clock per store: the database server's on PostgreSQL, the process's on
//! SQLite and memory.

use crate::types::Status;

/// What must hold for a transition to change a row (besides its `from` states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Nothing more: the transition is not made on behalf of an attempt.
    None,
    /// The row is `processing` under the lease token the caller presents.
    LeaseToken,
    /// The row is `processing` and its lease has expired.
    LeaseExpired,
}

/// What a transition does to `attempts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempts {
    /// Unchanged.
    Keep,
    /// One more: a claim starts an attempt.
    Increment,
    /// One fewer, never below zero: a released attempt did not count.
    Decrement,
    /// Back to zero: a retried batch starts afresh.
    Reset,
}

/// What a transition does to the `cancel_requested` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelFlag {
    /// Unchanged (it lasts until the operation is terminal).
    Keep,
    /// Set: the running handler is asked to stop.
    Set,
    /// Cleared, deliberately (`retry_batch`).
    Clear,
}

/// When a transition applies with respect to a pending cancel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenCancelRequested {
    /// Either way.
    Any,
    /// Only when no cancel was requested.
    No,
    /// Only when a cancel was requested.
    Yes,
}

/// What a transition does to the lease (worker id, lease token, expiry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEffect {
    /// Unchanged.
    Keep,
    /// A new token, the claiming worker and a fresh expiry.
    Take,
    /// The expiry moves forward.
    Extend,
    /// Worker, token and expiry cleared.
    Drop,
}

/// What a transition does to `run_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAt {
    /// Unchanged.
    Keep,
    /// The store's clock now.
    Now,
    /// The instant the outcome names (a retry's backoff).
    Given,
}

/// What a transition stores in `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorEffect {
    /// Unchanged.
    Keep,
    /// Cleared.
    Clear,
    /// The text the caller gives (a handler's error, or one of the
    /// [`messages`](super::messages) built from it).
    Given,
    /// This constant (from [`messages`](super::messages)).
    Message(&'static str),
}

/// What a transition does to the parent of the row it changes (or, for a parent row,
/// to the parent itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentEffect {
    /// Nothing.
    None,
    /// The child became terminal: its outcome is added to the parent's counters in the
    /// same transaction (O(1)), and when no child is left open the parent is finalized
    /// ([`FINALIZE_PARENT`]).
    CountTerminal,
    /// The child left a terminal state (`retry_batch`): its outcome is taken off the
    /// counters and the parent is `pending` again.
    Uncount,
    /// This row is the parent; its counters are recounted from its children's rows.
    Recount,
}

/// What a transition sets off in the same transaction, besides its own row and its
/// parent's counters (see [`crate::workflow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing more.
    Nothing,
    /// When the parent's policy is `FailFast`: its pending siblings take
    /// [`FAIL_FAST_CANCEL_PENDING`] and its running ones [`FAIL_FAST_REQUEST_CANCEL`].
    FailFastSiblings,
    /// The parent's callbacks that its outcome selects are inserted as new operations
    /// ([`fire`](crate::workflow::fire)).
    FireCallbacks,
    /// The operations of the batch that wait for this one are released: each waits for
    /// one dependency fewer — or, for a dependent that needs it completed and it ended
    /// otherwise, takes [`DEPENDENCY_FAILED`]. O(1) per edge. Before `FailFastSiblings`
    /// when a row has both: a dependent of the failed child is cancelled as its
    /// dependent, the other pending siblings by the fail-fast step.
    ReleaseDependents,
    /// A nested batch ([`NewBatch::child_batch`](crate::NewBatch::child_batch)) that
    /// ended: its outcome is added to the counters of the batch holding it exactly like an
    /// operation's ([`ParentEffect::CountTerminal`]) — which finalizes that batch when it
    /// was its last open child, and under `FailFast` a failed nested batch cancels its
    /// siblings.
    CountIntoOuterBatch,
}

/// Which rows a transition applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Operations (children and stand-alone operations): rows with a payload.
    Operations,
    /// Batch parents: rows without a payload, never claimed.
    Parents,
}

/// One state change, as data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The row's name; each driver's function for it bears the same name.
    pub name: &'static str,
    /// What starts it.
    pub trigger: &'static str,
    /// Operations or parents.
    pub rows: Rows,
    /// The states it leaves from; a row in any other state is left unchanged.
    pub from: &'static [Status],
    /// The state it arrives in; `None` when the row is deleted (prune).
    pub to: Option<Status>,
    /// What else must hold.
    pub fence: Fence,
    /// The cancel-request guard.
    pub when_cancel_requested: WhenCancelRequested,
    /// Effect on `attempts`.
    pub attempts: Attempts,
    /// Effect on `cancel_requested`.
    pub cancel_requested: CancelFlag,
    /// Effect on the lease.
    pub lease: LeaseEffect,
    /// Effect on `run_at`.
    pub run_at: RunAt,
    /// Effect on `error`.
    pub error: ErrorEffect,
    /// Effect on the parent's counters.
    pub parent: ParentEffect,
    /// What else happens in the same transaction.
    pub then: &'static [Then],
}

use ErrorEffect as E;
use Status::{Cancelled, Completed, Failed, Pending, Processing};

const TERMINAL: &[Status] = &[Completed, Failed, Cancelled];

/// The defaults every row starts from: nothing changes.
const NOTHING: Transition = Transition {
    name: "",
    trigger: "",
    rows: Rows::Operations,
    from: &[],
    to: None,
    fence: Fence::None,
    when_cancel_requested: WhenCancelRequested::Any,
    attempts: Attempts::Keep,
    cancel_requested: CancelFlag::Keep,
    lease: LeaseEffect::Keep,
    run_at: RunAt::Keep,
    error: E::Keep,
    parent: ParentEffect::None,
    then: &[],
};

/// A ready operation is handed to a worker — never one of a paused kind
/// ([`Store::pause`](crate::Store::pause)), read in the claim's own statement, and never
/// more of a limited kind than its room ([`KindLimit::room`](crate::KindLimit::room),
/// counted inside the claim's transaction).
pub const CLAIM: Transition = Transition {
    name: "claim",
    trigger: "Store::claim",
    from: &[Pending],
    to: Some(Processing),
    attempts: Attempts::Increment,
    lease: LeaseEffect::Take,
    ..NOTHING
};

/// The holder extends its lease (and learns of a cancel request).
pub const HEARTBEAT: Transition = Transition {
    name: "heartbeat",
    trigger: "Store::heartbeat",
    from: &[Processing],
    to: Some(Processing),
    fence: Fence::LeaseToken,
    lease: LeaseEffect::Extend,
    ..NOTHING
};

/// The attempt succeeded (`Outcome::Completed`); the result is stored and an earlier
/// attempt's error cleared.
pub const COMPLETE: Transition = Transition {
    name: "complete",
    trigger: "Store::complete with Outcome::Completed",
    from: &[Processing],
    to: Some(Completed),
    fence: Fence::LeaseToken,
    lease: LeaseEffect::Drop,
    error: E::Clear,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// The attempt failed for good (`Outcome::Failed`).
pub const FAIL: Transition = Transition {
    name: "fail",
    trigger: "Store::complete with Outcome::Failed",
    from: &[Processing],
    to: Some(Failed),
    fence: Fence::LeaseToken,
    lease: LeaseEffect::Drop,
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents, Then::FailFastSiblings],
    ..NOTHING
};

/// The handler stopped on a cancel request (`Outcome::Cancelled`).
pub const STOP_CANCELLED: Transition = Transition {
    name: "stop_cancelled",
    trigger: "Store::complete with Outcome::Cancelled",
    from: &[Processing],
    to: Some(Cancelled),
    fence: Fence::LeaseToken,
    lease: LeaseEffect::Drop,
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// The attempt failed and may run again (`Outcome::Retry`), no cancel requested.
pub const RETRY: Transition = Transition {
    name: "retry",
    trigger: "Store::complete with Outcome::Retry",
    from: &[Processing],
    to: Some(Pending),
    fence: Fence::LeaseToken,
    when_cancel_requested: WhenCancelRequested::No,
    lease: LeaseEffect::Drop,
    run_at: RunAt::Given,
    error: E::Given,
    ..NOTHING
};

/// A retryable outcome after a cancel request: cancelled, not re-queued. The error is
/// [`cancelled_instead_of_retry`](super::messages::cancelled_instead_of_retry).
pub const RETRY_AFTER_CANCEL: Transition = Transition {
    name: "retry_after_cancel",
    trigger: "Store::complete with Outcome::Retry, cancel requested",
    from: &[Processing],
    to: Some(Cancelled),
    fence: Fence::LeaseToken,
    when_cancel_requested: WhenCancelRequested::Yes,
    lease: LeaseEffect::Drop,
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// The worker gives an unfinished attempt back at shutdown; it does not count.
pub const RELEASE: Transition = Transition {
    name: "release",
    trigger: "Store::release",
    from: &[Processing],
    to: Some(Pending),
    fence: Fence::LeaseToken,
    when_cancel_requested: WhenCancelRequested::No,
    attempts: Attempts::Decrement,
    lease: LeaseEffect::Drop,
    ..NOTHING
};

/// A release after a cancel request: cancelled, not re-queued.
pub const RELEASE_AFTER_CANCEL: Transition = Transition {
    name: "release_after_cancel",
    trigger: "Store::release, cancel requested",
    from: &[Processing],
    to: Some(Cancelled),
    fence: Fence::LeaseToken,
    when_cancel_requested: WhenCancelRequested::Yes,
    lease: LeaseEffect::Drop,
    error: E::Message(super::messages::CANCELLED_AT_RELEASE),
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// An expired lease with attempts left goes back to `pending`, ready now.
pub const RESCUE: Transition = Transition {
    name: "rescue",
    trigger: "Store::rescue_expired_leases, attempts < max_attempts",
    from: &[Processing],
    to: Some(Pending),
    fence: Fence::LeaseExpired,
    when_cancel_requested: WhenCancelRequested::No,
    lease: LeaseEffect::Drop,
    run_at: RunAt::Now,
    error: E::Message(super::messages::LEASE_EXPIRED),
    ..NOTHING
};

/// An expired lease on the last allowed attempt fails the operation. The error is
/// [`lease_expired_on_last_attempt`](super::messages::lease_expired_on_last_attempt).
pub const RESCUE_EXHAUSTED: Transition = Transition {
    name: "rescue_exhausted",
    trigger: "Store::rescue_expired_leases, attempts >= max_attempts",
    from: &[Processing],
    to: Some(Failed),
    fence: Fence::LeaseExpired,
    when_cancel_requested: WhenCancelRequested::No,
    lease: LeaseEffect::Drop,
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents, Then::FailFastSiblings],
    ..NOTHING
};

/// An expired lease after a cancel request: cancelled, whatever attempts remain.
pub const RESCUE_AFTER_CANCEL: Transition = Transition {
    name: "rescue_after_cancel",
    trigger: "Store::rescue_expired_leases, cancel requested",
    from: &[Processing],
    to: Some(Cancelled),
    fence: Fence::LeaseExpired,
    when_cancel_requested: WhenCancelRequested::Yes,
    lease: LeaseEffect::Drop,
    error: E::Message(super::messages::CANCELLED_AT_RESCUE),
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// `cancel` on a pending operation (alone, or in a cancelled batch: a batch's cancel takes
/// every pending operation of it and of the batches nested in it in one step, then
/// releases the dependents left pending outside it).
pub const CANCEL_PENDING: Transition = Transition {
    name: "cancel_pending",
    trigger: "Store::cancel",
    from: &[Pending],
    to: Some(Cancelled),
    error: E::Message(super::messages::CANCELLED_BEFORE_RUN),
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// `cancel` on a processing operation: its handler is asked to stop.
pub const REQUEST_CANCEL: Transition = Transition {
    name: "request_cancel",
    trigger: "Store::cancel",
    from: &[Processing],
    to: Some(Processing),
    cancel_requested: CancelFlag::Set,
    ..NOTHING
};

/// A pending operation of a `FailFast` batch one of whose children failed for good: every
/// pending operation of the batch — and of the batches nested in it — is cancelled in
/// the failing child's transaction, in one step. The error is
/// [`cancelled_by_fail_fast`](super::messages::cancelled_by_fail_fast), naming that child.
/// The dependents left pending after the step (outside the batch) are released then.
pub const FAIL_FAST_CANCEL_PENDING: Transition = Transition {
    name: "fail_fast_cancel_pending",
    trigger: "a sibling's fail or rescue_exhausted (or a nested batch failing), FailurePolicy::FailFast",
    from: &[Pending],
    to: Some(Cancelled),
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// A waiting operation whose dependency (one it needs completed) failed or was
/// cancelled: cancelled in that transition's transaction, with
/// [`cancelled_by_dependency`](super::messages::cancelled_by_dependency) naming it; its own
/// dependents are released in turn.
pub const DEPENDENCY_FAILED: Transition = Transition {
    name: "dependency_failed",
    trigger: "a terminal transition of a dependency that did not complete",
    from: &[Pending],
    to: Some(Cancelled),
    error: E::Given,
    parent: ParentEffect::CountTerminal,
    then: &[Then::ReleaseDependents],
    ..NOTHING
};

/// A running operation of a `FailFast` batch (or of a batch nested in it) one of whose
/// children failed for good: asked to stop, in the failing child's transaction.
pub const FAIL_FAST_REQUEST_CANCEL: Transition = Transition {
    name: "fail_fast_request_cancel",
    trigger: "a sibling's fail or rescue_exhausted (or a nested batch failing), FailurePolicy::FailFast",
    from: &[Processing],
    to: Some(Processing),
    cancel_requested: CancelFlag::Set,
    ..NOTHING
};

/// A child whose outcome made its parent's counters complete: the parent takes the
/// state its [`FailurePolicy::outcome`](crate::FailurePolicy::outcome) gives, exactly
/// once, and its callbacks for that outcome are inserted. A nested batch then releases
/// what waits for it and counts into the batch holding it.
pub const FINALIZE_PARENT: Transition = Transition {
    name: "finalize_parent",
    trigger: "the last open child's terminal transition, in its transaction",
    rows: Rows::Parents,
    from: &[Pending],
    to: None,
    error: E::Given,
    then: PARENT_ENDS,
    ..NOTHING
};

/// What every way a batch ends sets off.
const PARENT_ENDS: &[Then] = &[
    Then::FireCallbacks,
    Then::ReleaseDependents,
    Then::CountIntoOuterBatch,
];

/// A pending parent with no child rows fails with [`ZERO_CHILDREN_REASON`](super::messages::ZERO_CHILDREN_REASON).
pub const RECONCILE_EMPTY: Transition = Transition {
    name: "reconcile_empty",
    trigger: "Store::reconcile_orphan_parents",
    rows: Rows::Parents,
    from: &[Pending],
    to: Some(Failed),
    error: E::Message(super::messages::ZERO_CHILDREN_REASON),
    parent: ParentEffect::Recount,
    then: PARENT_ENDS,
    ..NOTHING
};

/// A pending parent whose children are all terminal: counters recounted, then finalized.
pub const RECONCILE_FINALIZE: Transition = Transition {
    name: "reconcile_finalize",
    trigger: "Store::reconcile_orphan_parents",
    rows: Rows::Parents,
    from: &[Pending],
    to: None,
    error: E::Given,
    parent: ParentEffect::Recount,
    then: PARENT_ENDS,
    ..NOTHING
};

/// `retry_batch`: a failed or cancelled operation of the batch, or of a batch nested in
/// it, starts afresh.
pub const RETRY_BATCH_CHILD: Transition = Transition {
    name: "retry_batch_child",
    trigger: "Store::retry_batch",
    from: &[Failed, Cancelled],
    to: Some(Pending),
    attempts: Attempts::Reset,
    cancel_requested: CancelFlag::Clear,
    run_at: RunAt::Now,
    error: E::Clear,
    parent: ParentEffect::Uncount,
    ..NOTHING
};

/// `retry_batch`: the batch reopens — with every batch nested in it that has an operation
/// to re-queue, and every batch holding it — from any state (a child may be re-queued
/// while the batch is still pending); each one's counters are recounted from its
/// children.
pub const RETRY_BATCH_PARENT: Transition = Transition {
    name: "retry_batch_parent",
    trigger: "Store::retry_batch",
    rows: Rows::Parents,
    from: &[Pending, Completed, Failed, Cancelled],
    to: Some(Pending),
    error: E::Clear,
    parent: ParentEffect::Recount,
    ..NOTHING
};

/// `prune`: a terminal stand-alone operation, or a terminal outermost batch with its
/// whole tree, is deleted. A child (or a nested batch) is never deleted alone.
pub const PRUNE: Transition = Transition {
    name: "prune",
    trigger: "Store::prune",
    from: TERMINAL,
    to: None,
    ..NOTHING
};

/// Every transition, in lifecycle order.
pub const TRANSITIONS: &[Transition] = &[
    CLAIM,
    HEARTBEAT,
    COMPLETE,
    FAIL,
    STOP_CANCELLED,
    RETRY,
    RETRY_AFTER_CANCEL,
    RELEASE,
    RELEASE_AFTER_CANCEL,
    RESCUE,
    RESCUE_EXHAUSTED,
    RESCUE_AFTER_CANCEL,
    CANCEL_PENDING,
    REQUEST_CANCEL,
    FAIL_FAST_CANCEL_PENDING,
    FAIL_FAST_REQUEST_CANCEL,
    DEPENDENCY_FAILED,
    FINALIZE_PARENT,
    RECONCILE_EMPTY,
    RECONCILE_FINALIZE,
    RETRY_BATCH_CHILD,
    RETRY_BATCH_PARENT,
    PRUNE,
];

/// The transition an attempt's way back to `pending` takes: `normal` when no cancel
/// was requested, `after_cancel` when one was. One rule for retry, release and rescue.
pub const fn back_to_pending(
    cancel_requested: bool,
    normal: Transition,
    after_cancel: Transition,
) -> Transition {
    if cancel_requested {
        after_cancel
    } else {
        normal
    }
}

/// The transition an expired lease takes: cancelled when a cancel was requested, failed
/// on the last allowed attempt, back to `pending` otherwise.
pub const fn rescue_of(cancel_requested: bool, attempts: u32, max_attempts: u32) -> Transition {
    if cancel_requested {
        RESCUE_AFTER_CANCEL
    } else if attempts >= max_attempts {
        RESCUE_EXHAUSTED
    } else {
        RESCUE
    }
}

impl Transition {
    /// Whether a row in `status`, with `cancel_requested`, may take this transition
    /// (the fence aside).
    pub fn applies_to(&self, status: Status, cancel_requested: bool) -> bool {
        self.from.contains(&status)
            && match self.when_cancel_requested {
                WhenCancelRequested::Any => true,
                WhenCancelRequested::No => !cancel_requested,
                WhenCancelRequested::Yes => cancel_requested,
            }
    }

    /// Whether it ends the row's life (a terminal state).
    pub fn is_terminal(&self) -> bool {
        self.to.is_some_and(Status::is_terminal)
    }

    /// Applies the field effects to `row` (an interpreter for stores that keep rows in
    /// memory). `given_error` is the text for [`ErrorEffect::Given`]. The lease's new
    /// token and expiry and the parent's counters are the caller's.
    pub fn apply(&self, row: &mut impl LifecycleRow, given_error: Option<String>) {
        if let Some(to) = self.to {
            row.set_status(to);
        }
        match self.attempts {
            Attempts::Keep => {}
            Attempts::Increment => row.set_attempts(row.attempts() + 1),
            Attempts::Decrement => row.set_attempts(row.attempts().saturating_sub(1)),
            Attempts::Reset => row.set_attempts(0),
        }
        match self.cancel_requested {
            CancelFlag::Keep => {}
            CancelFlag::Set => row.set_cancel_requested(true),
            CancelFlag::Clear => row.set_cancel_requested(false),
        }
        if self.lease == LeaseEffect::Drop {
            row.drop_lease();
        }
        match self.error {
            E::Keep => {}
            E::Clear => row.set_error(None),
            E::Given => row.set_error(given_error),
            E::Message(message) => row.set_error(Some(message.to_owned())),
        }
    }
}

/// The fields of a stored row that [`Transition::apply`] changes.
pub trait LifecycleRow {
    /// Current attempts.
    fn attempts(&self) -> u32;
    /// Sets the status.
    fn set_status(&mut self, status: Status);
    /// Sets attempts.
    fn set_attempts(&mut self, attempts: u32);
    /// Sets the cancel flag.
    fn set_cancel_requested(&mut self, requested: bool);
    /// Clears worker, lease token and expiry.
    fn drop_lease(&mut self);
    /// Sets the error.
    fn set_error(&mut self, error: Option<String>);
}

/// The state machine as a Mermaid diagram, generated from [`TRANSITIONS`] (operations
/// only; a parent follows its children). `docs/LIFECYCLE.md` embeds it, and a test keeps
/// the two the same.
pub fn mermaid_diagram() -> String {
    let mut out = String::from("stateDiagram-v2\n    [*] --> pending: submit\n");
    for t in TRANSITIONS.iter().filter(|t| t.rows == Rows::Operations) {
        let Some(to) = t.to else {
            for from in t.from {
                out.push_str(&format!("    {from} --> [*]: {}\n", t.name));
            }
            continue;
        };
        for from in t.from {
            out.push_str(&format!("    {from} --> {to}: {}\n", t.name));
        }
    }
    out
}

/// Every row of [`TRANSITIONS`] as a Markdown table (for `docs/LIFECYCLE.md`, kept
/// the same by a test).
pub fn markdown_table() -> String {
    fn states(states: &[Status]) -> String {
        states
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
    let mut out = String::from(
        "| transition | rows | from | to | fence | if cancel requested | attempts | cancel flag | lease | run_at | error | parent | then |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for t in TRANSITIONS {
        let to = match (t.to, t.rows) {
            (Some(to), _) => to.as_str().to_owned(),
            (None, Rows::Parents) => "its children's outcome".to_owned(),
            (None, Rows::Operations) => "(deleted)".to_owned(),
        };
        let error = match t.error {
            E::Message(m) => format!("`{m}`"),
            other => format!("{other:?}"),
        };
        out.push_str(&format!(
            "| `{}` | {:?} | {} | {} | {:?} | {:?} | {:?} | {:?} | {:?} | {:?} | {} | {:?} | {:?} |\n",
            t.name,
            t.rows,
            states(t.from),
            to,
            t.fence,
            t.when_cancel_requested,
            t.attempts,
            t.cancel_requested,
            t.lease,
            t.run_at,
            error,
            t.parent,
            t.then,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: &[Status] = &[Pending, Processing];

    #[test]
    fn the_lifecycle_document_shows_this_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/LIFECYCLE.md");
        let mut doc = std::fs::read_to_string(path).unwrap_or_default();
        if std::env::var_os("FASCICLE_REGENERATE_DOCS").is_some() {
            // The diagram's code block and the table (up to the next blank line), rewritten.
            let start = doc.find("```mermaid\n").expect("a mermaid block") + 11;
            let end = start + doc[start..].find("```").expect("the block ends");
            doc.replace_range(start..end, &mermaid_diagram());
            let start = doc.find("| transition |").expect("a table");
            let end = start + doc[start..].find("\n\n").expect("the table ends") + 1;
            doc.replace_range(start..end, &markdown_table());
            std::fs::write(path, &doc).unwrap();
        }
        for (what, generated) in [("diagram", mermaid_diagram()), ("table", markdown_table())] {
            assert!(
                doc.contains(&generated),
                "docs/LIFECYCLE.md does not show the current {what} (FASCICLE_REGENERATE_DOCS=1 \
                 rewrites it); replace it with:\n\n{generated}"
            );
        }
    }

    #[test]
    fn names_are_unique_and_every_row_changes_something() {
        let mut names: Vec<&str> = TRANSITIONS.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TRANSITIONS.len());
        for t in TRANSITIONS {
            assert!(!t.from.is_empty(), "{} leaves from no state", t.name);
            assert!(!t.trigger.is_empty(), "{} has no trigger", t.name);
        }
    }

    #[test]
    fn no_way_back_to_pending_survives_a_cancel_request() {
        for t in TRANSITIONS.iter().filter(|t| t.from.contains(&Processing)) {
            if t.to == Some(Pending) {
                assert_eq!(
                    t.when_cancel_requested,
                    WhenCancelRequested::No,
                    "{} re-queues a cancelled operation",
                    t.name
                );
            }
            assert_ne!(
                t.cancel_requested,
                CancelFlag::Clear,
                "{} forgets a cancel request",
                t.name
            );
        }
        for (normal, after) in [
            (RETRY, RETRY_AFTER_CANCEL),
            (RELEASE, RELEASE_AFTER_CANCEL),
            (RESCUE, RESCUE_AFTER_CANCEL),
        ] {
            assert_eq!(back_to_pending(false, normal, after), normal);
            assert_eq!(back_to_pending(true, normal, after).to, Some(Cancelled));
        }
        assert_eq!(rescue_of(true, 5, 5), RESCUE_AFTER_CANCEL);
        assert_eq!(rescue_of(false, 5, 5), RESCUE_EXHAUSTED);
        assert_eq!(rescue_of(false, 1, 5), RESCUE);
    }

    #[test]
    fn every_permanent_failure_fails_fast_and_every_parent_ending_fires_callbacks() {
        for t in TRANSITIONS {
            let fails = t.rows == Rows::Operations && t.to == Some(Failed);
            let then = |what| t.then.contains(&what);
            assert_eq!(fails, then(Then::FailFastSiblings), "{}", t.name);
            let parent_ends = t.rows == Rows::Parents && t.to.is_none_or(Status::is_terminal);
            assert_eq!(parent_ends, then(Then::FireCallbacks), "{}", t.name);
            // Every way an operation or a batch ends releases what waits for it, and every
            // way a batch ends counts into the batch holding it.
            let ends = t.is_terminal() || parent_ends;
            assert_eq!(ends, then(Then::ReleaseDependents), "{}", t.name);
            assert_eq!(parent_ends, then(Then::CountIntoOuterBatch), "{}", t.name);
        }
    }

    #[test]
    fn every_terminal_operation_transition_counts_into_its_parent() {
        for t in TRANSITIONS
            .iter()
            .filter(|t| t.rows == Rows::Operations && t.is_terminal())
        {
            assert_eq!(t.parent, ParentEffect::CountTerminal, "{}", t.name);
            assert!(t.from.iter().all(|s| OPEN.contains(s)), "{}", t.name);
        }
    }
}
