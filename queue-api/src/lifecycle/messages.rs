//! Every message the lifecycle stores in an operation's `error`, written once. Drivers
//! store these values; they never spell a message of their own.

/// The reason a reconciler gives a parent that has no child rows.
pub const ZERO_CHILDREN_REASON: &str = "no child operations were persisted; resubmit";

/// A pending operation cancelled before any worker ran it.
pub const CANCELLED_BEFORE_RUN: &str = "cancelled before it ran";

/// The outcome a worker records when a handler stopped because cancellation was asked.
pub const CANCELLATION_REQUESTED: &str = "cancellation requested";

/// A processing operation whose lease expired and that goes back to `pending`.
pub const LEASE_EXPIRED: &str = "lease expired; the worker probably crashed";

/// A processing operation whose worker released it (shutdown) after a cancel request:
/// it is cancelled instead of going back to `pending`.
pub const CANCELLED_AT_RELEASE: &str =
    "cancelled: cancellation was requested and its worker released it unfinished";

/// A processing operation whose lease expired after a cancel request: it is cancelled
/// instead of being retried.
pub const CANCELLED_AT_RESCUE: &str =
    "cancelled: cancellation was requested and its lease expired unfinished";

/// The error of an operation whose last allowed attempt's lease expired.
pub fn lease_expired_on_last_attempt(attempts: u32) -> String {
    format!("lease expired on attempt {attempts}, the last allowed; the worker probably crashed")
}

/// The error of an operation whose attempt asked for a retry after cancellation was
/// requested: it is cancelled, and the attempt's own error is kept beside the reason.
pub fn cancelled_instead_of_retry(attempt_error: &str) -> String {
    format!("cancelled: cancellation was requested; the last attempt failed with: {attempt_error}")
}

/// The error an operation gets when the outcome its handler produced cannot be stored
/// (it fails instead, so one bad result never holds back other completions).
pub fn unstorable_outcome(reason: &str) -> String {
    format!("the handler's outcome could not be stored: {reason}")
}

/// The retryable error of an attempt that ran past its timeout (its handler was dropped).
pub fn attempt_timed_out(timeout: std::time::Duration) -> String {
    format!("timed out after {timeout:?}; the handler was stopped")
}

/// Why a commit was refused: an insert of the transaction had failed (the caller went
/// on). The transaction is rolled back instead, so a batch never commits in part.
pub fn commit_after_failed_insert(reason: &str) -> String {
    format!(
        "the transaction was rolled back and nothing was written: an insert in it had failed ({reason})"
    )
}

/// Why a page of children was refused: its cursor is no child of the batch.
pub fn not_a_child(cursor: impl std::fmt::Display, parent: impl std::fmt::Display) -> String {
    format!(
        "{cursor} is not a child of batch {parent}: a page of children starts after one of \
         the batch's own children (the last of the previous page)"
    )
}

/// Why a child was refused: it names a parent that this transaction did not insert.
/// Children join a batch only in the transaction that creates it, so a committed batch's
/// counters always match its rows.
pub fn parent_not_in_this_transaction(
    child: impl std::fmt::Display,
    parent: impl std::fmt::Display,
) -> String {
    format!(
        "child {child} names parent {parent}, which was not inserted in this transaction; \
         children join a batch only in the transaction that creates it"
    )
}

/// A pending child of a `FailFast` batch, cancelled because its sibling `failed` failed
/// for good.
pub fn cancelled_by_fail_fast(failed: impl std::fmt::Display) -> String {
    format!("cancelled: sibling {failed} failed and the batch fails fast")
}

/// A waiting operation cancelled because an operation it needed completed ended
/// otherwise (`dependency_failed`).
pub fn cancelled_by_dependency(dependency: impl std::fmt::Display, ended: crate::Status) -> String {
    format!("cancelled: its dependency {dependency} ended {ended}")
}

/// Why `retry_batch` of `batch` is refused (`Error::Conflict`): it would re-queue
/// `operation`, which needs completed `dependency` — outside the batch's tree, so not
/// re-queued with it — that ended `ended`; the operation could never run.
pub fn retry_strands_a_dependent(
    batch: impl std::fmt::Display,
    operation: impl std::fmt::Display,
    dependency: impl std::fmt::Display,
    ended: crate::Status,
) -> String {
    format!(
        "batch {batch} cannot be retried: its operation {operation} waits for {dependency}, \
         which ended {ended} outside the batch and would not be retried with it; retry a \
         batch that holds both (the outermost batch of the tree does)"
    )
}

/// A unique insert ([`Transaction::insert_unique`](crate::Transaction::insert_unique)) of an
/// operation that names a parent.
pub fn unique_in_a_batch(id: impl std::fmt::Display) -> String {
    format!(
        "operation {id} has a unique key and a parent: unique keys apply to stand-alone \
         operations only"
    )
}

/// A schedule named in a pause or resume that is not stored.
pub fn no_such_schedule(name: &str) -> String {
    format!("no schedule is named {name:?} (`fascicle schedule list` shows them)")
}
