//! Batches that go further than "run every child, then finish": what a batch does when a
//! child fails for good ([`FailurePolicy`]) and the operations it starts when it finishes
//! ([`Callback`]s), stored on the parent as its [`BatchPlan`].
//!
//! # The rules every driver applies
//!
//! - **Outcome.** [`FailurePolicy::outcome`] gives the state a parent takes once no child
//!   is open: `WaitAll` and `FailFast` as [`parent_outcome`](crate::parent_outcome);
//!   `IgnoreFailures` completes a batch whose children failed (they are still counted in
//!   its summary), and cancels one whose children were cancelled.
//! - **Error.** A failed `FailFast` batch carries the error of its *first* failed child
//!   (earliest `completed_at`, then submission order); a failed `WaitAll` batch the most
//!   common of its children's errors ([`most_common_error`](crate::most_common_error)).
//! - **Fail fast.** In the transaction where a child of a `FailFast` batch fails for good
//!   (`fail`, `rescue_exhausted`), every pending sibling is cancelled with
//!   [`messages::cancelled_by_fail_fast`](crate::messages::cancelled_by_fail_fast) naming
//!   that child (`fail_fast_cancel_pending`), and every running sibling is asked to stop
//!   (`fail_fast_request_cancel`). The parent finalizes when its last child is terminal,
//!   like any batch, so it is never terminal while a child still runs.
//! - **Callbacks.** In the transaction that finalizes a parent (`finalize_parent`,
//!   `reconcile_finalize`, `reconcile_empty`) the callbacks its outcome selects
//!   ([`CallbackOn::fires_on`]) are inserted as new stand-alone operations, each carrying
//!   a [`BatchInfo`] that its handler reads as [`Context::batch`](crate::Context::batch).
//!   A parent is finalized exactly once per round (its `pending` state is the guard), so a
//!   callback is never inserted before, never twice, and never lost. `retry_batch` opens a
//!   new round: the batch finalizes again and fires the callbacks of its new outcome.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::lifecycle::parent_outcome;
use crate::types::{ChildCounters, ChildRecord, OperationId, Status};

/// What a batch does when one of its children fails for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Every child runs to its end; the batch fails if any child failed. The default.
    #[default]
    WaitAll,
    /// The first child that fails for good cancels every pending sibling and asks the
    /// running ones to stop; the batch fails with that child's error.
    FailFast,
    /// Failed children are counted and reported; the batch completes.
    IgnoreFailures,
}

impl FailurePolicy {
    /// Every policy.
    pub const ALL: [FailurePolicy; 3] = [Self::WaitAll, Self::FailFast, Self::IgnoreFailures];

    /// The name drivers store (`wait_all`, `fail_fast`, `ignore_failures`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WaitAll => "wait_all",
            Self::FailFast => "fail_fast",
            Self::IgnoreFailures => "ignore_failures",
        }
    }

    /// The state a parent under this policy takes from its counters, or `None` while a
    /// child is still open.
    pub fn outcome(self, counters: &ChildCounters) -> Option<Status> {
        let outcome = parent_outcome(counters)?;
        Some(match (self, outcome) {
            (Self::IgnoreFailures, Status::Failed) if counters.cancelled > 0 => Status::Cancelled,
            (Self::IgnoreFailures, Status::Failed) => Status::Completed,
            (_, outcome) => outcome,
        })
    }

    /// The policy a driver reads back from its stored name; a missing value (rows written
    /// before policies existed) is `WaitAll`.
    pub fn from_stored(name: Option<&str>) -> crate::Result<Self> {
        name.map_or(Ok(Self::WaitAll), str::parse)
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailurePolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown failure policy `{s}`; expected wait_all, fail_fast or ignore_failures"
                ))
            })
    }
}

/// Which outcomes of its batch a callback fires on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackOn {
    /// The batch completed.
    Success,
    /// The batch failed.
    Failure,
    /// The batch ended, whatever its outcome (completed, failed or cancelled).
    Complete,
}

impl CallbackOn {
    /// Every trigger, in the order callbacks are inserted.
    pub const ALL: [CallbackOn; 3] = [Self::Success, Self::Failure, Self::Complete];

    /// The builder's name: `on_success`, `on_failure`, `on_complete`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "on_success",
            Self::Failure => "on_failure",
            Self::Complete => "on_complete",
        }
    }

    /// Whether a batch that ended `outcome` fires this callback.
    pub fn fires_on(self, outcome: Status) -> bool {
        match self {
            Self::Success => outcome == Status::Completed,
            Self::Failure => outcome == Status::Failed,
            Self::Complete => outcome.is_terminal(),
        }
    }
}

impl fmt::Display for CallbackOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A callback as stored on its batch's parent: the operation to insert when the batch
/// ends with an outcome it fires on. Validated at submit like any operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    /// When it fires.
    pub on: CallbackOn,
    /// The operation's kind.
    pub kind: String,
    /// The handler's input.
    pub payload: Value,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// At most one processing operation per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialization_key: Option<String>,
    /// Attempts before it fails for good.
    pub max_attempts: u32,
    /// How long one attempt may run, whole milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A batch's workflow settings, stored on its parent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// What a permanently failed child does to the batch.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// At most one per [`CallbackOn`], in [`CallbackOn::ALL`] order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callbacks: Vec<Callback>,
}

impl BatchPlan {
    /// Whether this is today's plain batch: `WaitAll`, no callback.
    pub fn is_plain(&self) -> bool {
        self.failure_policy == FailurePolicy::WaitAll && self.callbacks.is_empty()
    }

    /// The callbacks as drivers store them (a JSON array written by
    /// [`to_stored_text`](crate::to_stored_text), so a payload's whole floats read back as
    /// floats), or `None` when there is none.
    pub fn callbacks_json(&self) -> Option<String> {
        (!self.callbacks.is_empty()).then(|| {
            let value = serde_json::to_value(&self.callbacks).expect("callbacks serialize");
            crate::to_stored_text(&value)
        })
    }

    /// The policy name drivers store, or `None` for the default (`WaitAll`), so rows of
    /// plain batches look as they did before policies existed.
    pub fn policy_stored(&self) -> Option<&'static str> {
        (self.failure_policy != FailurePolicy::WaitAll).then(|| self.failure_policy.as_str())
    }

    /// A plan read back from a driver's two stored columns.
    pub fn from_stored(policy: Option<&str>, callbacks: Option<&str>) -> crate::Result<Self> {
        let callbacks = match callbacks {
            None => Vec::new(),
            Some(text) => serde_json::from_str(text).map_err(|e| Error::Storage {
                location: "a batch parent's callbacks".into(),
                reason: format!("the stored callbacks cannot be read: {e}"),
            })?,
        };
        Ok(Self {
            failure_policy: FailurePolicy::from_stored(policy)?,
            callbacks,
        })
    }
}

/// What a callback's handler learns of the batch that fired it
/// ([`Context::batch`](crate::Context::batch)): taken in the transaction that finalized
/// the batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchInfo {
    /// The batch (its parent's id).
    pub id: OperationId,
    /// The batch's kind.
    pub kind: String,
    /// How the batch ended.
    pub outcome: Status,
    /// Its children's outcomes.
    pub children: ChildCounters,
    /// The batch's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which callback of the batch this is.
    pub on: CallbackOn,
}

impl BatchInfo {
    /// As drivers store it on the callback's row (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("batch info serializes")
    }

    /// Read back from a driver's stored JSON.
    pub fn from_json(text: &str) -> crate::Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Storage {
            location: "a callback's batch".into(),
            reason: format!("the stored batch of a callback cannot be read: {e}"),
        })
    }
}

/// A batch that has just been finalized, as its driver knows it in the finalizing
/// transaction: what [`fire`] turns into callback operations.
#[derive(Clone, Copy, Debug)]
pub struct Finalized<'a> {
    /// The parent's id.
    pub id: OperationId,
    /// The parent's kind.
    pub kind: &'a str,
    /// The state it took.
    pub outcome: Status,
    /// Its counters.
    pub children: &'a ChildCounters,
    /// Its error.
    pub error: Option<&'a str>,
}

/// The callback operations a batch's finalization inserts, in [`CallbackOn::ALL`] order:
/// each a stand-alone operation (ready at `now`, a fresh id), with the [`BatchInfo`] it
/// carries. Drivers insert exactly these rows in the finalizing transaction.
pub fn fire(
    callbacks: &[Callback],
    batch: Finalized<'_>,
    now: DateTime<Utc>,
) -> Vec<(ChildRecord, BatchInfo)> {
    callbacks
        .iter()
        .filter(|c| c.on.fires_on(batch.outcome))
        .map(|c| {
            let record = ChildRecord {
                id: OperationId::new(),
                parent_id: None,
                kind: c.kind.clone(),
                payload_json: crate::to_stored_text(&c.payload),
                payload: c.payload.clone(),
                priority: c.priority,
                run_at: now,
                serialization_key: c.serialization_key.clone(),
                max_attempts: c.max_attempts,
                created_at: now,
                timeout: c.timeout_ms.map(Duration::from_millis),
                after: Vec::new(),
                dependents: Vec::new(),
            };
            let info = BatchInfo {
                id: batch.id,
                kind: batch.kind.to_owned(),
                outcome: batch.outcome,
                children: *batch.children,
                error: batch.error.map(str::to_owned),
                on: c.on,
            };
            (record, info)
        })
        .collect()
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
    fn each_policy_decides_the_outcome() {
        use FailurePolicy::*;
        let mixed = counters(3, 2, 1, 0);
        assert_eq!(WaitAll.outcome(&mixed), Some(Status::Failed));
        assert_eq!(FailFast.outcome(&mixed), Some(Status::Failed));
        assert_eq!(IgnoreFailures.outcome(&mixed), Some(Status::Completed));
        let cancelled = counters(3, 1, 1, 1);
        assert_eq!(IgnoreFailures.outcome(&cancelled), Some(Status::Cancelled));
        assert_eq!(WaitAll.outcome(&cancelled), Some(Status::Failed));
        for policy in FailurePolicy::ALL {
            assert_eq!(policy.outcome(&counters(3, 2, 0, 0)), None);
            assert_eq!(
                policy.outcome(&counters(2, 2, 0, 0)),
                Some(Status::Completed)
            );
            assert_eq!(policy.as_str().parse::<FailurePolicy>().unwrap(), policy);
        }
        assert!("fail-fast".parse::<FailurePolicy>().is_err());
        assert_eq!(FailurePolicy::from_stored(None).unwrap(), WaitAll);
    }

    #[test]
    fn callbacks_fire_on_their_outcomes_only() {
        use CallbackOn::*;
        assert!(Success.fires_on(Status::Completed) && !Success.fires_on(Status::Failed));
        assert!(Failure.fires_on(Status::Failed) && !Failure.fires_on(Status::Cancelled));
        for outcome in [Status::Completed, Status::Failed, Status::Cancelled] {
            assert!(Complete.fires_on(outcome));
        }
        assert!(!Complete.fires_on(Status::Pending));
    }

    #[test]
    fn fire_builds_the_selected_callbacks_with_their_batch() {
        let callback = |on| Callback {
            on,
            kind: format!("cb_{on}"),
            payload: serde_json::json!({ "on": on.as_str() }),
            priority: 3,
            serialization_key: None,
            max_attempts: 2,
            timeout_ms: Some(1500),
        };
        let callbacks: Vec<Callback> = CallbackOn::ALL.into_iter().map(callback).collect();
        let c = counters(2, 1, 1, 0);
        let id = OperationId::new();
        let now = Utc::now();
        let fired = fire(
            &callbacks,
            Finalized {
                id,
                kind: "b",
                outcome: Status::Failed,
                children: &c,
                error: Some("boom"),
            },
            now,
        );
        let ons: Vec<CallbackOn> = fired.iter().map(|(_, info)| info.on).collect();
        assert_eq!(ons, [CallbackOn::Failure, CallbackOn::Complete]);
        let (record, info) = &fired[0];
        assert_eq!(record.parent_id, None);
        assert_eq!(record.kind, "cb_on_failure");
        assert_eq!(
            record.payload_json,
            serde_json::to_string(&record.payload).unwrap()
        );
        assert_eq!(record.timeout, Some(Duration::from_millis(1500)));
        assert_eq!((record.run_at, record.max_attempts), (now, 2));
        assert_eq!(info.id, id);
        assert_eq!(info.error.as_deref(), Some("boom"));
        assert_eq!(BatchInfo::from_json(&info.to_json()).unwrap(), *info);
        let plan = BatchPlan {
            failure_policy: FailurePolicy::FailFast,
            callbacks,
        };
        let back =
            BatchPlan::from_stored(plan.policy_stored(), plan.callbacks_json().as_deref()).unwrap();
        assert_eq!(back, plan);
        assert!(BatchPlan::default().is_plain());
        assert_eq!(BatchPlan::default().policy_stored(), None);
    }
}
