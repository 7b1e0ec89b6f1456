//! Fault-injecting wrappers: they make a real driver fail at a chosen step, so the
//! suite checks each driver's rollback, not only the queue's logic.

use std::sync::Arc;

use async_trait::async_trait;
use fascicle_api::chrono::{DateTime, Utc};
use fascicle_api::{
    Applied, BackendErrorKind, CancelReport, Capabilities, ChildRecord, ClaimRequest,
    ClaimedOperation, Completion, Error, Lease, LeaseStatus, Notifier, Operation, OperationId,
    ParentRecord, PruneReport, ReconcileReport, RescueReport, Result, Stats, Store, Submitted,
    Transaction,
};

use crate::broken::{BrokenPromise, BrokenStore};

/// Implements `Store` for a wrapper: the given methods (`driver`, `begin`) plus every
/// other method forwarded to `self.inner`.
macro_rules! wrapping_store {
    ($ty:ty { $($own:item)* }) => {
        #[async_trait]
        impl Store for $ty {
        $($own)*

        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }

        async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
            self.inner.get(id).await
        }

        async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
            self.inner.children_of(parent_id).await
        }

        async fn stats(&self) -> Result<Stats> {
            self.inner.stats().await
        }

        async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
            self.inner.claim(request).await
        }

        async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>> {
            self.inner.complete(completions).await
        }

        async fn heartbeat(
            &self,
            leases: &[Lease],
            lease: std::time::Duration,
        ) -> Result<Vec<LeaseStatus>> {
            self.inner.heartbeat(leases, lease).await
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

        async fn prune(&self, completed_before: DateTime<Utc>) -> Result<PruneReport> {
            self.inner.prune(completed_before).await
        }

        async fn pause(&self, kind: &str) -> Result<bool> {
            self.inner.pause(kind).await
        }

        async fn resume(&self, kind: &str) -> Result<bool> {
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
            self.inner
                .advance_schedule(name, version, last_tick, next_tick)
                .await
        }

        async fn set_limit(&self, kind: &str, limit: fascicle_api::KindLimit) -> Result<fascicle_api::KindLimit> {
            self.inner.set_limit(kind, limit).await
        }

        async fn limits(&self) -> Result<std::collections::BTreeMap<String, fascicle_api::KindLimit>> {
            self.inner.limits().await
        }
        }
    };
}

/// Where a [`FaultyStore`] fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail the k-th child inserted in a transaction (1-based), after the first k-1
    /// reached the driver.
    pub fail_child: Option<usize>,
    /// Fail the commit: the driver's transaction is dropped uncommitted.
    pub fail_commit: bool,
}

fn injected(what: &str) -> Error {
    Error::backend(
        "fault-injection",
        BackendErrorKind::Injected,
        format!("injected failure: {what}"),
    )
}

/// Wraps a store and injects the failures of a [`FaultPlan`] into its transactions.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, plan: FaultPlan) -> Self {
        Self { inner, plan }
    }
}

wrapping_store!(FaultyStore {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        Ok(Box::new(FaultyTransaction {
            inner: self.inner.begin().await?,
            plan: self.plan,
            children_seen: 0,
        }))
    }

});

struct FaultyTransaction {
    inner: Box<dyn Transaction>,
    plan: FaultPlan,
    children_seen: usize,
}

#[async_trait]
impl Transaction for FaultyTransaction {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        self.inner.insert_parent(parent).await
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        self.children_seen += 1;
        if self.plan.fail_child == Some(self.children_seen) {
            return Err(injected(&format!(
                "insert of child #{}",
                self.children_seen
            )));
        }
        self.inner.insert_child(child).await
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        let first = self.children_seen + 1;
        match self.plan.fail_child {
            Some(k) if (first..first + children.len()).contains(&k) => {
                let before = k - first;
                if before > 0 {
                    self.inner.insert_children(&children[..before]).await?;
                }
                self.children_seen = k;
                Err(injected(&format!("insert of child #{k}")))
            }
            _ => {
                self.children_seen += children.len();
                self.inner.insert_children(children).await
            }
        }
    }

    async fn insert_unique(
        &mut self,
        child: &ChildRecord,
        unique: &fascicle_api::Unique,
    ) -> Result<Option<fascicle_api::OperationId>> {
        self.children_seen += 1;
        if self.plan.fail_child == Some(self.children_seen) {
            return Err(injected(&format!(
                "insert of child #{}",
                self.children_seen
            )));
        }
        self.inner.insert_unique(child, unique).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        if self.plan.fail_commit {
            drop(self.inner);
            return Err(injected("commit"));
        }
        self.inner.commit().await
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        self.inner.rollback().await
    }
}

/// A notifier that always fails, for checking that a failed notification loses nothing.
#[derive(Debug, Default)]
pub struct FailingNotifier;

#[async_trait]
impl Notifier for FailingNotifier {
    async fn notify(&self, _submitted: &Submitted) -> Result<()> {
        Err(injected("notification"))
    }
}

/// A deliberately broken store reproducing the bug fascicle exists to prevent: the
/// parent is visible outside the batch's transaction (from `insert_parent` on, and after
/// the batch failed), as if committed on its own connection. The suite must catch it
/// (`rollback_on_child_failure` fails). It is [`BrokenStore`] with
/// [`BrokenPromise::AutocommitParent`], one of the [`broken`](crate::broken) stores of
/// the suite's self-test.
#[derive(Debug)]
pub struct AutocommitParentStore {
    inner: Arc<dyn Store>,
}

impl AutocommitParentStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner: Arc::new(BrokenStore::new(inner, BrokenPromise::AutocommitParent)),
        }
    }
}

wrapping_store!(AutocommitParentStore {
    fn driver(&self) -> &'static str {
        "broken-autocommit-parent"
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        self.inner.begin().await
    }
});
