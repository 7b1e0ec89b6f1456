//! The in-process store: committed state behind one mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Utc;
use fascicle_api::{
    BatchStats, Capabilities, ChildCounters, ChildRecord, Operation, OperationId, ParentRecord,
    Result, Stats, Status, Store, Transaction,
};

use crate::tx::MemoryTransaction;

pub(crate) const DRIVER: &str = "memory";

/// A real, in-process implementation of [`Store`]: transactions stage their writes and
/// apply them all at once on commit. Not durable: everything is gone with the process.
///
/// Clones share the same data.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    rows: HashMap<OperationId, Row>,
    children: HashMap<OperationId, Vec<OperationId>>,
    next_seq: u64,
}

#[derive(Debug, Clone)]
struct Row {
    seq: u64,
    op: Operation,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied commit: commits
        // check everything before changing anything, so the state is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    pub(crate) fn contains(&self, id: &OperationId) -> bool {
        self.rows.contains_key(id)
    }

    pub(crate) fn apply_parent(&mut self, parent: &ParentRecord) {
        let op = Operation {
            id: parent.id,
            kind: parent.kind.clone(),
            status: Status::Pending,
            payload: None,
            metadata: Some(parent.metadata.clone()),
            parent_id: None,
            priority: 0,
            serialization_key: None,
            attempts: 0,
            max_attempts: 0,
            run_at: parent.created_at,
            worker_id: None,
            lease_expires_at: None,
            children: Some(ChildCounters {
                total: parent.children_total,
                ..ChildCounters::default()
            }),
            error: None,
            result: None,
            created_at: parent.created_at,
            updated_at: parent.created_at,
            completed_at: None,
        };
        self.insert(op);
    }

    pub(crate) fn apply_child(&mut self, child: ChildRecord) {
        let op = Operation {
            id: child.id,
            kind: child.kind,
            status: Status::Pending,
            payload: Some(child.payload),
            metadata: None,
            parent_id: child.parent_id,
            priority: child.priority,
            serialization_key: child.serialization_key,
            attempts: 0,
            max_attempts: child.max_attempts,
            run_at: child.run_at,
            worker_id: None,
            lease_expires_at: None,
            children: None,
            error: None,
            result: None,
            created_at: child.created_at,
            updated_at: child.created_at,
            completed_at: None,
        };
        if let Some(parent) = child.parent_id {
            self.children.entry(parent).or_default().push(child.id);
        }
        self.insert(op);
    }

    fn insert(&mut self, op: Operation) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.rows.insert(op.id, Row { seq, op });
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            uses_observation_sources_table: false,
        }
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        Ok(Box::new(MemoryTransaction::new(self.clone())))
    }

    async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
        Ok(self.lock().rows.get(&id).map(|row| row.op.clone()))
    }

    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
        let state = self.lock();
        let mut rows: Vec<&Row> = state
            .children
            .get(&parent_id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.rows.get(id))
            .collect();
        rows.sort_by_key(|row| row.seq);
        Ok(rows.into_iter().map(|row| row.op.clone()).collect())
    }

    async fn stats(&self) -> Result<Stats> {
        let now = Utc::now();
        let state = self.lock();
        let mut stats = Stats::default();
        for row in state.rows.values() {
            let op = &row.op;
            if op.is_parent() {
                count_batch(&mut stats.batches, op.status);
                continue;
            }
            let kind = stats.kinds.entry(op.kind.clone()).or_default();
            match op.status {
                Status::Pending if op.run_at > now => kind.scheduled += 1,
                Status::Pending => kind.ready += 1,
                Status::Processing => kind.processing += 1,
                Status::Completed => kind.completed += 1,
                Status::Failed => kind.failed += 1,
                Status::Cancelled => kind.cancelled += 1,
            }
        }
        Ok(stats)
    }
}

fn count_batch(batches: &mut BatchStats, status: Status) {
    match status {
        Status::Pending | Status::Processing => batches.open += 1,
        Status::Completed => batches.completed += 1,
        Status::Failed => batches.failed += 1,
        Status::Cancelled => batches.cancelled += 1,
    }
}
