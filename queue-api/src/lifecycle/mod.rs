//! The worker-side vocabulary: claims, leases, outcomes, and the shared rules every
//! driver applies inside its own transactions (how a parent's state follows from its
//! children, how long a retry waits).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::types::{ChildCounters, Operation, OperationId, Status};

pub mod messages;
pub mod table;

pub use messages::ZERO_CHILDREN_REASON;

/// Proof of ownership of a claimed operation. A new token is drawn at every claim, so a
/// worker whose lease expired and was rescued can no longer change the operation: every
/// write names the token it expects (fencing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(Uuid);

impl LeaseToken {
    /// A fresh random token.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Wraps a stored token.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", self.0)
    }
}

/// The longest lease a claim or a heartbeat may ask for: 7 days, as the longest attempt
/// timeout ([`MAX_ATTEMPT_TIMEOUT`](crate::MAX_ATTEMPT_TIMEOUT)). A zero lease is allowed
/// (it expires at once).
pub const MAX_LEASE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Refuses a lease longer than [`MAX_LEASE`] with `InvalidInput` naming it: every store
/// checks the `lease` of a claim and of a heartbeat so, before anything changes (a lease
/// of years would overflow an instant or wrap around to one in the past).
pub fn validate_lease(lease: Duration) -> crate::Result<()> {
    if lease > MAX_LEASE {
        return Err(crate::Error::InvalidInput(format!(
            "a lease of {lease:?} is longer than the longest allowed, {} days",
            MAX_LEASE.as_secs() / 86_400
        )));
    }
    Ok(())
}

/// What a worker asks for when it claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Recorded on each claimed operation.
    pub worker_id: String,
    /// At most this many operations.
    pub limit: usize,
    /// How long the lease lasts before a rescuer may take the operation back.
    pub lease: Duration,
    /// Only these kinds; `None` means any kind.
    pub kinds: Option<Vec<String>>,
}

/// An operation handed to a worker, with the token its completion must present.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedOperation {
    /// The operation as claimed: `processing`, `attempts` already counting this attempt.
    pub operation: Operation,
    /// The lease token of this claim.
    pub lease_token: LeaseToken,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Success, with the handler's result.
    Completed(Value),
    /// A retryable failure: back to `pending`, not claimable before `run_at`.
    Retry {
        /// The error of this attempt.
        error: String,
        /// When it may run again.
        run_at: DateTime<Utc>,
    },
    /// A permanent failure (or attempts exhausted).
    Failed(String),
    /// The handler stopped because cancellation was requested.
    Cancelled(String),
}

/// One finished attempt, to be recorded by [`Store::complete`](crate::Store::complete).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The operation.
    pub id: OperationId,
    /// The token of the claim this attempt ran under.
    pub lease_token: LeaseToken,
    /// How it ended.
    pub outcome: Outcome,
}

/// What became of one [`Completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Recorded.
    Applied,
    /// The lease was lost (rescued, released or cancelled): nothing was changed.
    LeaseLost,
}

/// One lease a worker holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The operation.
    pub id: OperationId,
    /// The token of its claim.
    pub token: LeaseToken,
}

/// The state of a lease after a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The lease is still held (and was extended).
    pub held: bool,
    /// Somebody asked to cancel the operation; the handler should stop.
    pub cancel_requested: bool,
}

/// What a rescue pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescueReport {
    /// Expired leases put back to `pending`.
    pub requeued: u64,
    /// Expired leases past `max_attempts`, now `failed`.
    pub failed: u64,
    /// Expired leases of operations whose cancel was requested, now `cancelled`.
    #[serde(default)]
    pub cancelled: u64,
}

/// What a reconcile pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Parents with no child at all, now `failed` with [`ZERO_CHILDREN_REASON`].
    pub empty_parents_failed: u64,
    /// Parents whose children were all terminal, now finalized.
    pub parents_finalized: u64,
}

/// What a cancellation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReport {
    /// Pending operations now `cancelled`.
    pub cancelled: u64,
    /// Processing operations asked to stop (their handlers see the signal).
    pub signalled: u64,
    /// Operations already terminal, left as they were.
    pub already_terminal: u64,
}

/// What a prune did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Operations deleted (stand-alone ones and children of deleted batches).
    pub operations: u64,
    /// Batch parents deleted.
    pub batches: u64,
}

impl PruneReport {
    /// Adds what another chunk deleted.
    pub fn add(&mut self, other: PruneReport) {
        self.operations += other.operations;
        self.batches += other.batches;
    }

    /// Whether nothing was deleted.
    pub fn is_empty(&self) -> bool {
        self.operations == 0 && self.batches == 0
    }
}

/// About how many rows one transaction of [`Store::prune`](crate::Store::prune) deletes:
/// whole batches (a larger batch alone) and stand-alone operations, so that a prune of a
/// long history never holds a lock that workers wait on for long.
pub const PRUNE_CHUNK_ROWS: u64 = 5_000;

/// The terminal state a parent takes from its counters, or `None` while a child is still
/// open: all completed → `completed`; any failed → `failed`; otherwise (the rest were
/// cancelled) → `cancelled`.
pub fn parent_outcome(counters: &ChildCounters) -> Option<Status> {
    if counters.total == 0 || counters.terminal() < counters.total {
        return None;
    }
    Some(if counters.failed > 0 {
        Status::Failed
    } else if counters.cancelled > 0 {
        Status::Cancelled
    } else {
        Status::Completed
    })
}

/// The result a finalized parent carries: its children's outcome counts.
pub fn parent_summary(counters: &ChildCounters) -> Value {
    json!({
        "children": counters.total,
        "completed": counters.completed,
        "failed": counters.failed,
        "cancelled": counters.cancelled,
    })
}

/// The representative error of a failed batch, from its failed children's errors: the
/// most common one; ties go to the error that sorts first, so every driver agrees.
pub fn most_common_error<'a>(errors: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    for error in errors {
        *counts.entry(error).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(error, n)| representative_error(error, n))
}

/// A failed batch's error, from its most common child error shared by `n` children
/// (for drivers that pick the error in the database: ties go to the error that sorts
/// first, bytewise).
pub fn representative_error(error: &str, n: u64) -> String {
    if n > 1 {
        format!("{error} ({n} children failed with this error)")
    } else {
        error.to_string()
    }
}

/// Exponential backoff with jitter between attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt. Default 1 s.
    pub base: Duration,
    /// Longest wait. Default 10 min.
    pub max: Duration,
    /// Fraction of the wait drawn at random (0 = none, 1 = up to the whole wait). Default 0.25.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
            jitter: 0.25,
        }
    }
}

impl RetryPolicy {
    /// The wait after attempt number `attempt` (1 for the first attempt) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return raw;
        }
        // Draw from the random bits of a fresh v4 UUID: no extra dependency.
        let random = (Uuid::new_v4().as_u128() >> 64) as u64 as f64 / u64::MAX as f64;
        raw.mul_f64(1.0 - jitter * random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(total: u64, completed: u64, failed: u64, cancelled: u64) -> ChildCounters {
        ChildCounters {
            total,
            completed,
            failed,
            cancelled,
        }
    }

    #[test]
    fn parent_state_follows_its_children() {
        assert_eq!(parent_outcome(&counters(3, 2, 0, 0)), None);
        assert_eq!(
            parent_outcome(&counters(3, 3, 0, 0)),
            Some(Status::Completed)
        );
        assert_eq!(parent_outcome(&counters(3, 1, 1, 1)), Some(Status::Failed));
        assert_eq!(
            parent_outcome(&counters(3, 1, 0, 2)),
            Some(Status::Cancelled)
        );
        assert_eq!(parent_outcome(&counters(0, 0, 0, 0)), None);
    }

    #[test]
    fn the_most_common_error_wins_and_ties_are_stable() {
        assert_eq!(
            most_common_error(["b", "a", "b"]).as_deref(),
            Some("b (2 children failed with this error)")
        );
        assert_eq!(most_common_error(["z", "a"]).as_deref(), Some("a"));
        assert_eq!(most_common_error([]), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(3), Duration::from_millis(400));
        assert_eq!(policy.backoff(30), Duration::from_secs(1));
        let jittered = RetryPolicy {
            jitter: 0.5,
            ..policy
        }
        .backoff(2);
        assert!(jittered <= Duration::from_millis(200) && jittered >= Duration::from_millis(100));
    }
}
