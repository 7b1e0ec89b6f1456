//! Fault-injecting wrappers: they make a real driver fail at a chosen step, so the
//! suite checks each driver's rollback, not only the queue's logic.

use std::sync::Arc;

use async_trait::async_trait;
use fascicle_api::{
    BackendErrorKind, ChildRecord, Error, Layer, Layered, Notifier, ParentRecord, Result, Store,
    Submitted, Transaction,
};

use crate::broken::{BrokenPromise, BrokenStore};

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

/// Wraps a store and injects the failures of a [`FaultPlan`] into its transactions:
/// the store seen through the plan as a [`Layer`] (`FaultyStore::new(inner, plan)`).
pub type FaultyStore = Layered<FaultPlan>;

impl Layer for FaultPlan {
    fn transaction(&self, inner: Box<dyn Transaction>) -> Box<dyn Transaction> {
        Box::new(FaultyTransaction {
            inner,
            plan: *self,
            children_seen: 0,
        })
    }
}

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
/// the suite's self-test, under a driver name of its own
/// ([`autocommit_parent_store`]).
pub type AutocommitParentStore = Layered<AutocommitParent>;

/// The layer of an [`AutocommitParentStore`]: it names the driver.
#[derive(Debug)]
pub struct AutocommitParent;

impl Layer for AutocommitParent {
    fn driver(&self) -> Option<&'static str> {
        Some("broken-autocommit-parent")
    }
}

/// `inner` with its parents committed on their own ([`AutocommitParentStore`]).
pub fn autocommit_parent_store(inner: Arc<dyn Store>) -> AutocommitParentStore {
    Layered::new(
        Arc::new(BrokenStore::new(inner, BrokenPromise::AutocommitParent)),
        AutocommitParent,
    )
}
