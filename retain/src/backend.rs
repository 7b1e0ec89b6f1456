//! One memory bank per driver, behind one object-safe interface.

use std::sync::Arc;

use async_trait::async_trait;
use fascicle::{Applied, Context, Result, Store};

use crate::bank::{BankCounts, Work, WorkReport};

/// What a unit of work did, and whether its operation's completion was recorded with it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Done {
    /// Written; there was no operation to complete.
    Written(WorkReport),
    /// Written, and the operation completed (with the report as its result) in the
    /// same transaction.
    Completed,
    /// The operation's lease was lost: nothing was written.
    LeaseLost,
}

impl Done {
    /// What the worker is told.
    pub(crate) fn applied(&self) -> Applied {
        match self {
            Self::LeaseLost => Applied::LeaseLost,
            Self::Written(_) | Self::Completed => Applied::Applied,
        }
    }
}

#[async_trait]
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    /// The queue store the bank lives next to.
    fn store(&self) -> Arc<dyn Store>;
    /// Creates the bank's tables if they are missing.
    async fn migrate(&self) -> Result<()>;
    /// Runs `work` in one transaction; with `ctx`, the operation is completed (with the
    /// report as its result) in the same transaction, and a lost lease writes nothing.
    async fn run(&self, work: Work, ctx: Option<Context>) -> Result<Done>;
    /// Row counts.
    async fn counts(&self) -> Result<BankCounts>;
}
