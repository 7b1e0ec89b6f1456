//! A store wrapped by a [`Layer`]: every call of the [`Store`] and [`Transaction`] API
//! forwarded to the inner store, with the layer's hooks around it — for metrics,
//! tracing, fault injection and tests — without forwarding any method by hand.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use fascicle::{Call, Error, Layer, Layered, Result, Store};
//!
//! /// Counts failed calls, and refuses every claim while `draining` is set.
//! #[derive(Debug, Default)]
//! struct Guard {
//!     failures: AtomicU64,
//!     draining: std::sync::atomic::AtomicBool,
//! }
//!
//! #[fascicle::async_trait]
//! impl Layer for Guard {
//!     async fn before(&self, call: &Call<'_>) -> Result<()> {
//!         match call {
//!             Call::Claim(_) if self.draining.load(Ordering::SeqCst) => {
//!                 Err(Error::Conflict("this process is draining: no claims".into()))
//!             }
//!             _ => Ok(()),
//!         }
//!     }
//!
//!     fn after(&self, _call: &Call<'_>, outcome: std::result::Result<(), &Error>, _: std::time::Duration) {
//!         if outcome.is_err() {
//!             self.failures.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! }
//!
//! fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
//!     Arc::new(Layered::new(inner, Guard::default()))
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::flow::KindLimit;
use crate::lifecycle::{
    Applied, CancelReport, ClaimRequest, ClaimedOperation, Completion, Lease, LeaseStatus,
    PruneReport, ReconcileReport, RescueReport,
};
use crate::schedule::{Schedule, StoredSchedule};
use crate::store::{Store, Transaction};
use crate::types::{ChildRecord, Operation, OperationId, ParentRecord, Stats, Unique};

/// One call of the [`Store`] or [`Transaction`] API with its arguments, as a [`Layer`]
/// sees it. [`name`](Call::name) is the method's name (`"claim"`,
/// `"transaction.commit"`).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
#[allow(missing_docs)] // Each variant is the method of the same name.
pub enum Call<'a> {
    Begin,
    Get(OperationId),
    ChildrenOf(OperationId),
    ChildIdsOf(OperationId),
    ChildrenPage(OperationId, Option<OperationId>, usize),
    Stats,
    Claim(&'a ClaimRequest),
    Complete(&'a [Completion]),
    Heartbeat(&'a [Lease], Duration),
    Release(&'a [Lease]),
    RescueExpiredLeases,
    ReconcileOrphanParents,
    Cancel(OperationId),
    RetryBatch(OperationId),
    Pause(&'a str),
    Resume(&'a str),
    SetLimit(&'a str, &'a KindLimit),
    Limits,
    PutSchedule(&'a Schedule, DateTime<Utc>),
    RemoveSchedule(&'a str),
    PauseSchedule(&'a str, bool),
    Schedules,
    DueSchedules(DateTime<Utc>),
    AdvanceSchedule {
        name: &'a str,
        version: i64,
        last_tick: DateTime<Utc>,
        next_tick: DateTime<Utc>,
    },
    Prune(DateTime<Utc>),
    Elect(&'a str, &'a str, Duration),
    Resign(&'a str, &'a str),
    Leader(&'a str),
    InsertParent(&'a ParentRecord),
    InsertChild(&'a ChildRecord),
    InsertChildren(&'a [ChildRecord]),
    InsertUnique(&'a ChildRecord, &'a Unique),
    Commit,
    Rollback,
}

impl Call<'_> {
    /// The method's name: the [`Store`] method's (`"claim"`), or `"transaction."` and the
    /// [`Transaction`] method's (`"transaction.insert_children"`).
    pub fn name(&self) -> &'static str {
        match self {
            Call::Begin => "begin",
            Call::Get(_) => "get",
            Call::ChildrenOf(_) => "children_of",
            Call::ChildIdsOf(_) => "child_ids_of",
            Call::ChildrenPage(..) => "children_page",
            Call::Stats => "stats",
            Call::Claim(_) => "claim",
            Call::Complete(_) => "complete",
            Call::Heartbeat(..) => "heartbeat",
            Call::Release(_) => "release",
            Call::RescueExpiredLeases => "rescue_expired_leases",
            Call::ReconcileOrphanParents => "reconcile_orphan_parents",
            Call::Cancel(_) => "cancel",
            Call::RetryBatch(_) => "retry_batch",
            Call::Pause(_) => "pause",
            Call::Resume(_) => "resume",
            Call::SetLimit(..) => "set_limit",
            Call::Limits => "limits",
            Call::PutSchedule(..) => "put_schedule",
            Call::RemoveSchedule(_) => "remove_schedule",
            Call::PauseSchedule(..) => "pause_schedule",
            Call::Schedules => "schedules",
            Call::DueSchedules(_) => "due_schedules",
            Call::AdvanceSchedule { .. } => "advance_schedule",
            Call::Prune(_) => "prune",
            Call::Elect(..) => "elect",
            Call::Resign(..) => "resign",
            Call::Leader(_) => "leader",
            Call::InsertParent(_) => "transaction.insert_parent",
            Call::InsertChild(_) => "transaction.insert_child",
            Call::InsertChildren(_) => "transaction.insert_children",
            Call::InsertUnique(..) => "transaction.insert_unique",
            Call::Commit => "transaction.commit",
            Call::Rollback => "transaction.rollback",
        }
    }

    /// Whether the call may write (every call but the reads: `get`, `children_of`,
    /// `child_ids_of`, `children_page`, `stats`, `limits`, `schedules`, `due_schedules`,
    /// `leader`).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Call::Get(_)
                | Call::ChildrenOf(_)
                | Call::ChildIdsOf(_)
                | Call::ChildrenPage(..)
                | Call::Stats
                | Call::Limits
                | Call::Schedules
                | Call::DueSchedules(_)
                | Call::Leader(_)
        )
    }
}

/// Hooks around every call of a [`Layered`] store. Every hook has a default that does
/// nothing, so a layer implements only what it needs.
#[async_trait]
pub trait Layer: Send + Sync + fmt::Debug + 'static {
    /// Runs before each call. An error returned here is the call's answer and the inner
    /// store is not called (fault injection, a read-only guard, a circuit breaker); it may
    /// also wait (a slow or stalled backend, for tests).
    async fn before(&self, call: &Call<'_>) -> Result<()> {
        let _ = call;
        Ok(())
    }

    /// Runs after each call the inner store answered, with how it went and how long it
    /// took (metrics, logs). Not called when [`before`](Layer::before) refused the call.
    fn after(&self, call: &Call<'_>, outcome: std::result::Result<(), &Error>, elapsed: Duration) {
        let _ = (call, outcome, elapsed);
    }

    /// The span the inner store's call runs in (none by default).
    fn span(&self, call: &Call<'_>) -> tracing::Span {
        let _ = call;
        tracing::Span::none()
    }

    /// Wraps each transaction the inner store begins, inside the layer's own hooks (which
    /// see every call made on it): for a change of behaviour per insert that
    /// [`before`](Layer::before) cannot express. The transaction as it is by default.
    fn transaction(&self, inner: Box<dyn Transaction>) -> Box<dyn Transaction> {
        inner
    }

    /// The driver name the layered store reports, instead of the inner store's.
    fn driver(&self) -> Option<&'static str> {
        None
    }
}

/// A store that forwards every call to `inner`, with `layer`'s hooks around each — the
/// transactions it begins included. See the [module](crate::layer) for an example.
pub struct Layered<L> {
    inner: Arc<dyn Store>,
    layer: Arc<L>,
}

impl<L: Layer> Layered<L> {
    /// `inner` seen through `layer`.
    pub fn new(inner: Arc<dyn Store>, layer: L) -> Self {
        Self {
            inner,
            layer: Arc::new(layer),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

impl<L: fmt::Debug> fmt::Debug for Layered<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// Runs `call` on the inner store (`inner`, not started before the layer's `before` let
/// it) with the layer's hooks around it.
async fn hooked<L: Layer, T>(
    layer: &L,
    call: Call<'_>,
    inner: impl Future<Output = Result<T>>,
) -> Result<T> {
    layer.before(&call).await?;
    let span = layer.span(&call);
    let start = Instant::now();
    let outcome = inner.instrument(span).await;
    layer.after(&call, outcome.as_ref().map(|_| ()), start.elapsed());
    outcome
}

#[async_trait]
impl<L: Layer> Store for Layered<L> {
    fn driver(&self) -> &'static str {
        self.layer.driver().unwrap_or_else(|| self.inner.driver())
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        let inner = hooked(&*self.layer, Call::Begin, self.inner.begin()).await?;
        Ok(Box::new(LayeredTransaction {
            inner: self.layer.transaction(inner),
            layer: Arc::clone(&self.layer),
        }))
    }

    async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
        hooked(&*self.layer, Call::Get(id), self.inner.get(id)).await
    }

    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
        let call = Call::ChildrenOf(parent_id);
        hooked(&*self.layer, call, self.inner.children_of(parent_id)).await
    }

    async fn child_ids_of(&self, parent_id: OperationId) -> Result<Vec<OperationId>> {
        let call = Call::ChildIdsOf(parent_id);
        hooked(&*self.layer, call, self.inner.child_ids_of(parent_id)).await
    }

    async fn children_page(
        &self,
        parent_id: OperationId,
        after: Option<OperationId>,
        limit: usize,
    ) -> Result<Vec<Operation>> {
        let call = Call::ChildrenPage(parent_id, after, limit);
        let page = self.inner.children_page(parent_id, after, limit);
        hooked(&*self.layer, call, page).await
    }

    async fn stats(&self) -> Result<Stats> {
        hooked(&*self.layer, Call::Stats, self.inner.stats()).await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
        hooked(
            &*self.layer,
            Call::Claim(request),
            self.inner.claim(request),
        )
        .await
    }

    async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>> {
        let call = Call::Complete(completions);
        hooked(&*self.layer, call, self.inner.complete(completions)).await
    }

    async fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<LeaseStatus>> {
        let call = Call::Heartbeat(leases, lease);
        hooked(&*self.layer, call, self.inner.heartbeat(leases, lease)).await
    }

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        hooked(
            &*self.layer,
            Call::Release(leases),
            self.inner.release(leases),
        )
        .await
    }

    async fn rescue_expired_leases(&self) -> Result<RescueReport> {
        let call = Call::RescueExpiredLeases;
        hooked(&*self.layer, call, self.inner.rescue_expired_leases()).await
    }

    async fn reconcile_orphan_parents(&self) -> Result<ReconcileReport> {
        let call = Call::ReconcileOrphanParents;
        hooked(&*self.layer, call, self.inner.reconcile_orphan_parents()).await
    }

    async fn cancel(&self, id: OperationId) -> Result<CancelReport> {
        hooked(&*self.layer, Call::Cancel(id), self.inner.cancel(id)).await
    }

    async fn retry_batch(&self, parent_id: OperationId) -> Result<u64> {
        let call = Call::RetryBatch(parent_id);
        hooked(&*self.layer, call, self.inner.retry_batch(parent_id)).await
    }

    async fn pause(&self, kind: &str) -> Result<bool> {
        hooked(&*self.layer, Call::Pause(kind), self.inner.pause(kind)).await
    }

    async fn resume(&self, kind: &str) -> Result<bool> {
        hooked(&*self.layer, Call::Resume(kind), self.inner.resume(kind)).await
    }

    async fn set_limit(&self, kind: &str, limit: KindLimit) -> Result<KindLimit> {
        let call = Call::SetLimit(kind, &limit);
        hooked(&*self.layer, call, self.inner.set_limit(kind, limit)).await
    }

    async fn limits(&self) -> Result<BTreeMap<String, KindLimit>> {
        hooked(&*self.layer, Call::Limits, self.inner.limits()).await
    }

    async fn put_schedule(&self, schedule: &Schedule, now: DateTime<Utc>) -> Result<bool> {
        let call = Call::PutSchedule(schedule, now);
        hooked(&*self.layer, call, self.inner.put_schedule(schedule, now)).await
    }

    async fn remove_schedule(&self, name: &str) -> Result<bool> {
        let call = Call::RemoveSchedule(name);
        hooked(&*self.layer, call, self.inner.remove_schedule(name)).await
    }

    async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool> {
        let call = Call::PauseSchedule(name, paused);
        hooked(&*self.layer, call, self.inner.pause_schedule(name, paused)).await
    }

    async fn schedules(&self) -> Result<Vec<StoredSchedule>> {
        hooked(&*self.layer, Call::Schedules, self.inner.schedules()).await
    }

    async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<StoredSchedule>> {
        let call = Call::DueSchedules(now);
        hooked(&*self.layer, call, self.inner.due_schedules(now)).await
    }

    async fn advance_schedule(
        &self,
        name: &str,
        version: i64,
        last_tick: DateTime<Utc>,
        next_tick: DateTime<Utc>,
    ) -> Result<bool> {
        let call = Call::AdvanceSchedule {
            name,
            version,
            last_tick,
            next_tick,
        };
        let inner = self
            .inner
            .advance_schedule(name, version, last_tick, next_tick);
        hooked(&*self.layer, call, inner).await
    }

    async fn prune(&self, completed_before: DateTime<Utc>) -> Result<PruneReport> {
        let call = Call::Prune(completed_before);
        hooked(&*self.layer, call, self.inner.prune(completed_before)).await
    }

    async fn elect(&self, role: &str, candidate: &str, term: Duration) -> Result<bool> {
        let call = Call::Elect(role, candidate, term);
        hooked(&*self.layer, call, self.inner.elect(role, candidate, term)).await
    }

    async fn resign(&self, role: &str, candidate: &str) -> Result<bool> {
        let call = Call::Resign(role, candidate);
        hooked(&*self.layer, call, self.inner.resign(role, candidate)).await
    }

    async fn leader(&self, role: &str) -> Result<Option<String>> {
        hooked(&*self.layer, Call::Leader(role), self.inner.leader(role)).await
    }
}

/// A transaction begun through a [`Layered`] store: the layer's hooks around each call.
struct LayeredTransaction<L> {
    inner: Box<dyn Transaction>,
    layer: Arc<L>,
}

#[async_trait]
impl<L: Layer> Transaction for LayeredTransaction<L> {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        let call = Call::InsertParent(parent);
        hooked(&*self.layer, call, self.inner.insert_parent(parent)).await
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        let call = Call::InsertChild(child);
        hooked(&*self.layer, call, self.inner.insert_child(child)).await
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        let call = Call::InsertChildren(children);
        hooked(&*self.layer, call, self.inner.insert_children(children)).await
    }

    async fn insert_unique(
        &mut self,
        child: &ChildRecord,
        unique: &Unique,
    ) -> Result<Option<OperationId>> {
        let call = Call::InsertUnique(child, unique);
        hooked(&*self.layer, call, self.inner.insert_unique(child, unique)).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let Self { inner, layer } = *self;
        hooked(&*layer, Call::Commit, inner.commit()).await
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        let Self { inner, layer } = *self;
        hooked(&*layer, Call::Rollback, inner.rollback()).await
    }
}
