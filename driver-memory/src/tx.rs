//! Staged writes, applied all together on commit.

use std::collections::{HashMap, HashSet};

use fascicle_api::{ChildRecord, Error, InsertHealth, OperationId, ParentRecord, Result, Unique};

use crate::store::MemoryStore;

/// A memory transaction: rows are staged here, invisible to everyone, until commit
/// applies them under the store's lock in one step. Dropping it discards them.
#[derive(Debug)]
pub(crate) struct MemoryTransaction {
    store: MemoryStore,
    /// Parents and children in insertion order (a nested batch's parent row is one of its
    /// outer batch's children).
    staged: Vec<Staged>,
    staged_ids: HashSet<OperationId>,
    /// Children inserted per parent of this transaction: the parents' `children_total`.
    children_per_parent: HashMap<OperationId, u64>,
    /// Unique keys this transaction takes, checked again on commit under the lock.
    unique: Vec<(OperationId, Unique)>,
    health: InsertHealth,
}

impl MemoryTransaction {
    pub(crate) fn new(store: MemoryStore) -> Self {
        Self {
            store,
            staged: Vec::new(),
            staged_ids: HashSet::new(),
            children_per_parent: HashMap::new(),
            unique: Vec::new(),
            health: InsertHealth::default(),
        }
    }

    fn claim_id(&mut self, id: OperationId) -> Result<()> {
        if self.staged_ids.contains(&id) || self.store.lock().contains(&id) {
            return Err(Error::Conflict(format!("operation id {id} already exists")));
        }
        self.staged_ids.insert(id);
        Ok(())
    }

    /// Counts `children` into their parents, which must all have been inserted by this
    /// transaction (checked before anything is counted).
    fn join_parents(&mut self, children: &[ChildRecord]) -> Result<()> {
        fascicle_api::check_batch_membership(children, |p| {
            self.children_per_parent.contains_key(p)
        })?;
        for parent in children.iter().filter_map(|c| c.parent_id) {
            *self.children_per_parent.entry(parent).or_default() += 1;
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Staged {
    Parent(ParentRecord),
    Child(ChildRecord),
}

impl MemoryTransaction {
    async fn insert_parent_unchecked(&mut self, parent: &ParentRecord) -> Result<()> {
        fascicle_api::check_parent_membership(parent, |p| {
            self.children_per_parent.contains_key(p)
        })?;
        self.claim_id(parent.id)?;
        if let Some(outer) = parent.parent_id {
            *self.children_per_parent.entry(outer).or_default() += 1;
        }
        self.children_per_parent.insert(parent.id, 0);
        self.staged.push(Staged::Parent(parent.clone()));
        Ok(())
    }

    async fn insert_child_unchecked(&mut self, child: &ChildRecord) -> Result<()> {
        self.join_parents(std::slice::from_ref(child))?;
        self.claim_id(child.id)?;
        self.staged.push(Staged::Child(child.clone()));
        Ok(())
    }

    async fn insert_children_unchecked(&mut self, children: &[ChildRecord]) -> Result<()> {
        self.join_parents(children)?;
        {
            let state = self.store.lock();
            for child in children {
                if state.contains(&child.id) || !self.staged_ids.insert(child.id) {
                    return Err(Error::Conflict(format!(
                        "operation id {} already exists",
                        child.id
                    )));
                }
            }
        }
        self.staged
            .extend(children.iter().cloned().map(Staged::Child));
        Ok(())
    }

    async fn insert_unique_unchecked(
        &mut self,
        child: &ChildRecord,
        unique: &Unique,
    ) -> Result<Option<OperationId>> {
        fascicle_api::check_standalone(child)?;
        let now = chrono::Utc::now();
        if let Some(holder) = self.store.lock().unique_holder(unique, now) {
            return Ok(Some(holder));
        }
        if let Some((other, _)) = self.unique.iter().find(|(_, u)| u.key == unique.key) {
            return Ok(Some(*other));
        }
        self.insert_child_unchecked(child).await?;
        self.unique.push((child.id, unique.clone()));
        Ok(None)
    }

    async fn commit_unchecked(self: Box<Self>) -> Result<()> {
        let store = self.store.clone();
        let mut state = store.lock();
        // The memory store's unique index: a key another transaction took since it was
        // checked refuses the commit, writing nothing.
        let now = chrono::Utc::now();
        for (id, unique) in &self.unique {
            if let Some(holder) = state.unique_holder(unique, now) {
                return Err(Error::Conflict(format!(
                    "unique key {:?} of operation {id} was taken by operation {holder}, \
                     committed first",
                    unique.key
                )));
            }
        }
        // Check every id before writing any row, so a conflict with a transaction that
        // committed after we staged leaves the store untouched.
        if let Some(taken) = self.staged_ids.iter().find(|id| state.contains(id)) {
            return Err(Error::Conflict(format!(
                "operation id {taken} was committed by another transaction first"
            )));
        }
        let this = *self;
        for staged in this.staged {
            match staged {
                Staged::Parent(parent) => {
                    let total = this.children_per_parent[&parent.id];
                    state.apply_parent(&parent, total);
                }
                Staged::Child(child) => state.apply_child(child),
            }
        }
        for (id, unique) in this.unique {
            state.unique.insert(unique.key, id);
        }
        Ok(())
    }

    async fn rollback_unchecked(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

fascicle_api::checked_transaction!(MemoryTransaction);
