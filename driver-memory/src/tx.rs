//! Staged writes, applied all together on commit.

use std::collections::HashSet;

use async_trait::async_trait;
use fascicle_api::{ChildRecord, Error, OperationId, ParentRecord, Result, Transaction};

use crate::store::MemoryStore;

/// A memory transaction: rows are staged here, invisible to everyone, until commit
/// applies them under the store's lock in one step. Dropping it discards them.
#[derive(Debug)]
pub(crate) struct MemoryTransaction {
    store: MemoryStore,
    parents: Vec<ParentRecord>,
    children: Vec<ChildRecord>,
    staged_ids: HashSet<OperationId>,
}

impl MemoryTransaction {
    pub(crate) fn new(store: MemoryStore) -> Self {
        Self {
            store,
            parents: Vec::new(),
            children: Vec::new(),
            staged_ids: HashSet::new(),
        }
    }

    fn claim_id(&mut self, id: OperationId) -> Result<()> {
        if self.staged_ids.contains(&id) || self.store.lock().contains(&id) {
            return Err(Error::Conflict(format!("operation id {id} already exists")));
        }
        self.staged_ids.insert(id);
        Ok(())
    }
}

#[async_trait]
impl Transaction for MemoryTransaction {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        self.claim_id(parent.id)?;
        self.parents.push(parent.clone());
        Ok(())
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        if let Some(parent) = child.parent_id
            && !self.staged_ids.contains(&parent)
            && !self.store.lock().contains(&parent)
        {
            return Err(Error::NotFound(format!(
                "parent {parent} of child {} does not exist",
                child.id
            )));
        }
        self.claim_id(child.id)?;
        self.children.push(child.clone());
        Ok(())
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        {
            let state = self.store.lock();
            for child in children {
                if let Some(parent) = child.parent_id
                    && !self.staged_ids.contains(&parent)
                    && !state.contains(&parent)
                {
                    return Err(Error::NotFound(format!(
                        "parent {parent} of child {} does not exist",
                        child.id
                    )));
                }
                if state.contains(&child.id) || !self.staged_ids.insert(child.id) {
                    return Err(Error::Conflict(format!(
                        "operation id {} already exists",
                        child.id
                    )));
                }
            }
        }
        self.children.extend_from_slice(children);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let store = self.store.clone();
        let mut state = store.lock();
        // Check every id before writing any row, so a conflict with a transaction that
        // committed after we staged leaves the store untouched.
        if let Some(taken) = self.staged_ids.iter().find(|id| state.contains(id)) {
            return Err(Error::Conflict(format!(
                "operation id {taken} was committed by another transaction first"
            )));
        }
        let this = *self;
        for parent in &this.parents {
            state.apply_parent(parent);
        }
        for child in this.children {
            state.apply_child(child);
        }
        Ok(())
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
