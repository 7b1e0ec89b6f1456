// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod capabilities;
mod error;
pub mod flow;
mod json;
pub mod layer;
mod lifecycle;
#[cfg(any(test, feature = "mock"))]
mod mocking;
mod notify;
mod queue;
pub mod schedule;
mod store;
mod types;
mod worker;
pub mod workflow;

pub use capabilities::Capabilities;
pub use error::{BackendErrorKind, BoxError, Error, Result};
pub use flow::{KindLimit, RateLimit, validate_limit};
pub use json::to_stored_text;
pub use layer::{Call, Layer, Layered};
pub use lifecycle::{
    Applied, CancelReport, ClaimRequest, ClaimedOperation, Completion, Lease, LeaseStatus,
    LeaseToken, Outcome, PRUNE_CHUNK_ROWS, PruneReport, ReconcileReport, RescueReport, RetryPolicy,
    ZERO_CHILDREN_REASON, most_common_error, parent_outcome, parent_summary, representative_error,
};
pub use lifecycle::{MAX_LEASE, validate_lease};
pub use lifecycle::{messages, table};
pub use notify::{InProcessWaker, InlineExecutor, Notifier, Submitted, WakeSubscription};
pub use queue::{
    Limits, MAINTENANCE_ROLE, MAX_BATCH_DEPTH, MAX_DEPENDENCY_DEPTH, MAX_JSON_DEPTH, PreparedBatch,
    Queue, STREAM_CHUNK, earliest_run_at, latest_run_at, validate_election, validate_kind,
};
pub use schedule::{CatchUp, Schedule, StoredSchedule, Timing};
pub use store::{
    InsertHealth, Store, Transaction, check_batch_membership, check_parent_membership,
    check_standalone,
};
pub use types::{
    BatchReceipt, BatchStats, ChildCounters, ChildRecord, Counted, DEFAULT_MAX_ATTEMPTS,
    Dependency, KindStats, MAX_ATTEMPT_TIMEOUT, MAX_UNIQUE_PERIOD, NewBatch, NewOperation,
    Operation, OperationId, ParentRecord, Receipt, Stats, Status, Unique, UniqueScope,
};
pub use worker::{Context, HandlerError, Registry, Worker, WorkerReport};
pub use workflow::{BatchInfo, BatchPlan, Callback, CallbackOn, FailurePolicy};

/// The mockall this crate's mocks are generated with: use it (`fascicle::mockall::Sequence`,
/// `mockall::predicate::*`) rather than a `mockall` of your own, whose version may differ.
#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use mockall;
#[cfg(any(test, feature = "mock"))]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use notify::MockNotifier;
#[cfg(any(test, feature = "mock"))]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub use store::{MockStore, MockTransaction};

pub use async_trait::async_trait;
pub use chrono;
/// The `Stream` trait [`Queue::submit_batch_stream`] reads a batch's children from.
pub use futures_core::Stream;
/// The `metrics` facade the worker's counters and gauges go through: install a recorder
/// built on this version.
pub use metrics;
pub use serde_json;
pub use uuid;
