//! Submitting operations and batches: validate → begin → parent → children → commit →
//! notify.

use std::collections::HashSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use chrono::Utc;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::notify::{Notifier, Submitted};
use crate::store::Store;
use crate::types::{
    BatchReceipt, ChildRecord, DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPT_TIMEOUT, NewBatch, NewOperation,
    OperationId, ParentRecord, Receipt,
};
use crate::workflow::{BatchPlan, Callback, CallbackOn};

/// How many children of a streamed batch ([`Queue::submit_batch_from`],
/// [`Queue::submit_batch_stream`]) are validated and handed to the store in one insert:
/// what bounds the memory such a submit holds, whatever the batch's size.
pub const STREAM_CHUNK: usize = 10_000;

/// An iterator seen as a stream that is always ready.
struct FromIter<I>(I);

// Never pinned structurally: the iterator is only ever reached through `&mut`.
impl<I> Unpin for FromIter<I> {}

impl<I: Iterator<Item = NewOperation>> futures_core::Stream for FromIter<I> {
    type Item = std::result::Result<NewOperation, std::convert::Infallible>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next().map(Ok))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Input limits enforced before anything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest serialized payload (or batch metadata) in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Most children in one batch. Default 1,000,000.
    pub max_children: usize,
    /// Longest kind or serialization key in bytes. Default 255.
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_children: 1_000_000,
            max_name_bytes: 255,
        }
    }
}

/// The entry point for producers: submits operations and batches to a [`Store`] and
/// wakes workers through its [`Notifier`]s after each commit.
#[derive(Clone)]
pub struct Queue {
    store: Arc<dyn Store>,
    notifiers: Vec<Arc<dyn Notifier>>,
    limits: Limits,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("store", &self.store)
            .field("notifiers", &self.notifiers)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Queue {
    /// A queue over `store` with default limits and no notifier.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            notifiers: Vec::new(),
            limits: Limits::default(),
        }
    }

    /// Adds a notifier, called after every commit.
    pub fn with_notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifiers.push(notifier);
        self
    }

    /// Replaces the input limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Submits a batch atomically: the parent and every child become visible together,
    /// or — on any error before the commit — nothing is written and nothing notified.
    ///
    /// A caller-supplied parent id that is already stored returns the existing batch
    /// (`created == false`) at the cost of one look-up and one id-only read of its
    /// children: the new children are neither validated nor serialized, and no stored
    /// payload is read. A notifier failing after the commit does not lose the batch; the
    /// receipt says `notified == false`.
    pub async fn submit_batch(&self, batch: NewBatch) -> Result<BatchReceipt> {
        self.submit_tree(
            batch,
            None::<Pin<&mut FromIter<std::iter::Empty<NewOperation>>>>,
        )
        .await
    }

    /// Submits a batch whose children come from an iterator, in bounded memory: they are
    /// validated and handed to the store [`STREAM_CHUNK`] at a time, inside the one
    /// transaction of the batch, so a batch of a million children commits atomically
    /// without ever being held whole. Everything [`submit_batch`](Self::submit_batch)
    /// promises holds: the parent and every child become visible together at the commit,
    /// or — on any error, a refused child at any index included — nothing is written and
    /// nothing notified; a caller-supplied parent id already stored returns the existing
    /// batch without reading `children` at all.
    ///
    /// - `batch` gives the parent (id, kind, metadata, failure policy, callbacks) and may
    ///   hold children and nested batches of its own: its children come first, then the
    ///   iterator's, then the nested batches. The batch needs at least one child in all.
    /// - A streamed child cannot wait for another (`after`, `after_any`): dependencies
    ///   are checked over the whole tree, which a stream never is; submit such a batch
    ///   with `submit_batch`. Streamed children with caller ids are checked for repeats.
    /// - [`Limits::max_children`] counts the streamed children with the others.
    /// - The receipt lists every child id (16 bytes each: 16 MB for a million).
    ///
    /// ```
    /// # async fn demo(queue: fascicle::Queue) -> fascicle::Result<()> {
    /// use fascicle::{NewBatch, NewOperation, json};
    ///
    /// let children = (0..100_000).map(|i| NewOperation::new("resize", json!({ "image": i })));
    /// let receipt = queue
    ///     .submit_batch_from(NewBatch::new("resize_all"), children)
    ///     .await?;
    /// assert_eq!(receipt.child_ids.len(), 100_000);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn submit_batch_from<I>(&self, batch: NewBatch, children: I) -> Result<BatchReceipt>
    where
        I: IntoIterator<Item = NewOperation>,
        I::IntoIter: Send,
    {
        let mut stream = FromIter(children.into_iter());
        self.submit_tree(batch, Some(Pin::new(&mut stream))).await
    }

    /// [`submit_batch_from`](Self::submit_batch_from) for children read from a stream
    /// (a file, a cursor, a channel): the same chunks, the same single transaction. An
    /// item that is an error ends the submit with `InvalidInput` naming the child's index
    /// and the error, and nothing is written.
    pub async fn submit_batch_stream<S, E>(
        &self,
        batch: NewBatch,
        children: S,
    ) -> Result<BatchReceipt>
    where
        S: futures_core::Stream<Item = std::result::Result<NewOperation, E>> + Send,
        E: fmt::Display + Send,
    {
        let children = std::pin::pin!(children);
        self.submit_tree(batch, Some(children)).await
    }

    /// Submits a batch tree, with the root's `streamed` children after its own.
    async fn submit_tree<S, E>(
        &self,
        batch: NewBatch,
        mut streamed: Option<Pin<&mut S>>,
    ) -> Result<BatchReceipt>
    where
        S: futures_core::Stream<Item = std::result::Result<NewOperation, E>> + Send + ?Sized,
        E: fmt::Display + Send,
    {
        // A fresh UUID v7 cannot be taken yet: only a caller's id needs looking up.
        if let Some(id) = batch.id
            && let Some(existing) = self.existing_batch(id).await?
        {
            return Ok(existing);
        }
        let prepared = self.limits.prepare_tree(batch, streamed.is_some())?;
        let root = prepared.root().id;
        let mut tx = self.store.begin().await?;
        let mut streamed_ids = Vec::new();
        for (level, (parent, children)) in prepared.batches.iter().enumerate() {
            match tx.insert_parent(parent).await {
                Ok(()) => {}
                Err(Error::Conflict(reason)) if level == 0 => {
                    // Lost a race with an identical submit: theirs is the batch.
                    drop(tx);
                    return self
                        .existing_batch(root)
                        .await?
                        .ok_or(Error::Conflict(reason));
                }
                Err(e) => return Err(e),
            }
            tx.insert_children(children).await?;
            if level == 0
                && let Some(stream) = streamed.as_mut()
            {
                streamed_ids = self
                    .insert_streamed(&mut *tx, &prepared, stream.as_mut())
                    .await?;
            }
        }
        match tx.commit().await {
            Ok(()) => {}
            Err(Error::Conflict(reason)) => {
                // A store that checks ids at commit time: an identical submit got there
                // first, or a child id is taken (then there is no batch to return).
                return self
                    .existing_batch(root)
                    .await?
                    .ok_or(Error::Conflict(reason));
            }
            Err(e) => return Err(e),
        }

        // In insertion order: the root's own children, the streamed ones, the nested
        // batches' operations.
        let mut operation_ids = prepared.operation_ids();
        let own = prepared.batches[0].1.len();
        operation_ids.splice(own..own, streamed_ids.iter().copied());
        let submitted = Submitted {
            parent_id: Some(root),
            operation_ids,
        };
        let notified = self.notify(&submitted).await;
        drop(submitted);
        // The root's own children, the streamed ones, then its nested batches.
        let mut child_ids = prepared.child_ids();
        child_ids.splice(own..own, streamed_ids);
        Ok(BatchReceipt {
            parent_id: root,
            child_ids,
            created: true,
            notified,
        })
    }

    /// Validates and inserts the streamed children of `prepared`'s root, a chunk at a
    /// time, in `tx`; answers their ids in order.
    async fn insert_streamed<S, E>(
        &self,
        tx: &mut dyn crate::Transaction,
        prepared: &PreparedBatch,
        mut stream: Pin<&mut S>,
    ) -> Result<Vec<OperationId>>
    where
        S: futures_core::Stream<Item = std::result::Result<NewOperation, E>> + Send + ?Sized,
        E: fmt::Display + Send,
    {
        let root = prepared.root();
        // The tree's rows besides the root count against the limit with the streamed ones.
        let mut rows = prepared.rows() - 1;
        let mut seen: HashSet<OperationId> = prepared
            .batches
            .iter()
            .flat_map(|(p, c)| std::iter::once(p.id).chain(c.iter().map(|c| c.id)))
            .collect();
        let mut index = prepared.batches[0].1.len();
        let mut ids = Vec::new();
        let mut chunk: Vec<ChildRecord> =
            Vec::with_capacity(stream.size_hint().0.clamp(1, STREAM_CHUNK));
        while let Some(item) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
            let op = item.map_err(|e| {
                Error::InvalidInput(format!(
                    "child #{index} of batch `{}` could not be read from its stream, so nothing \
                     was submitted: {e}",
                    root.kind
                ))
            })?;
            rows += 1;
            if rows > self.limits.max_children {
                return Err(Error::InvalidInput(format!(
                    "batch `{}` has more than {} children (counting the operations and \
                     batches nested in it); the limit is {}",
                    root.kind, self.limits.max_children, self.limits.max_children
                )));
            }
            let caller_id = op.id;
            let what = Subject::Child(index);
            let record = self
                .limits
                .prepare_child(op, Some(root.id), root.created_at, what)?;
            if let Some(dependency) = record.after.first() {
                return Err(Error::InvalidInput(format!(
                    "{what} waits for {}: a streamed child cannot have dependencies (after, \
                     after_any), which are checked over the whole batch; submit it with \
                     submit_batch",
                    dependency.id
                )));
            }
            if caller_id.is_some() && !seen.insert(record.id) {
                return Err(Error::InvalidInput(format!(
                    "{what} repeats id {} already used in this batch; ids must be unique",
                    record.id
                )));
            }
            ids.push(record.id);
            chunk.push(record);
            if chunk.len() == STREAM_CHUNK {
                tx.insert_children(&chunk).await?;
                chunk.clear();
            }
            index += 1;
        }
        if !chunk.is_empty() {
            tx.insert_children(&chunk).await?;
        }
        if index == 0
            && !prepared
                .batches
                .iter()
                .any(|(p, _)| p.parent_id == Some(root.id))
        {
            return Err(Error::InvalidInput(format!(
                "batch `{}` has no children; a batch needs at least one child operation",
                root.kind
            )));
        }
        Ok(ids)
    }

    /// Submits one stand-alone operation (no parent). Idempotent on a caller-supplied id.
    pub async fn submit(&self, operation: NewOperation) -> Result<Receipt> {
        let now = Utc::now();
        let caller_id = operation.id.is_some();
        let unique = operation.unique.clone();
        let record = self.limits.prepare_operation(operation, None, now)?;
        if caller_id && self.store.get(record.id).await?.is_some() {
            return self.existing_operation(record.id).await;
        }
        if let Some(unique) = unique {
            return self.submit_unique(record, &unique).await;
        }
        let mut tx = self.store.begin().await?;
        match tx.insert_child(&record).await {
            Ok(()) => {}
            Err(Error::Conflict(_)) => {
                drop(tx);
                return self.existing_operation(record.id).await;
            }
            Err(e) => return Err(e),
        }
        match tx.commit().await {
            Ok(()) => {}
            // An idempotent submit racing its twin, in a store that checks ids at commit
            // (the memory store): the twin committed first.
            Err(Error::Conflict(_)) if caller_id => {
                return self.existing_operation(record.id).await;
            }
            Err(e) => return Err(e),
        }
        Ok(self.created(record.id).await)
    }

    /// Submits independent stand-alone operations in one transaction — all of them or, on
    /// any error before the commit, none — and notifies workers once after it. The
    /// operations go to the store in one bulk insert ([`Transaction::insert_children`]:
    /// one round trip per chunk on PostgreSQL), so a thousand operations cost about what
    /// one costs.
    ///
    /// - Every operation is validated before anything is written; one that
    ///   [`submit`](Self::submit) would refuse makes the whole call `InvalidInput`, naming
    ///   its index. At most [`Limits::max_children`] operations per call; an empty list is
    ///   answered with no receipt and no transaction.
    /// - The receipts are in the order of `operations`.
    /// - Idempotent per caller id, like `submit`: an operation whose id is already stored
    ///   (as an operation — stand-alone, or a batch's child — not a batch parent) is not
    ///   inserted again and its receipt says `created == false`; an id used by a batch
    ///   parent is a `Conflict` and nothing is written. The same caller id twice in one
    ///   call is `InvalidInput`. Found stored only after a first try conflicted, ids are
    ///   looked up one by one.
    /// - An operation with a unique key is inserted in the same transaction through
    ///   [`Transaction::insert_unique`] (one round trip each), in input order among the
    ///   others; when the key is held, its receipt carries the holder's id with
    ///   `created == false`. With a caller id too, the id is looked up first, as `submit`
    ///   does: stored, the receipt is that operation's, whoever holds the key now.
    /// - A submit racing another over the same ids or keys is tried again (at most three
    ///   more times) with what the first try found stored: each id is stored once, and
    ///   exactly one of the racers answers `created == true` for it.
    pub async fn submit_many(
        &self,
        operations: impl IntoIterator<Item = NewOperation>,
    ) -> Result<Vec<Receipt>> {
        let now = Utc::now();
        let mut records = Vec::new();
        // Each record's unique key, by index.
        let mut uniques: Vec<Option<crate::Unique>> = Vec::new();
        let mut caller_ids: std::collections::HashMap<OperationId, usize> =
            std::collections::HashMap::new();
        for (index, op) in operations.into_iter().enumerate() {
            if index == self.limits.max_children {
                return Err(Error::InvalidInput(format!(
                    "submit_many takes at most {} operations in one call (Limits::max_children); \
                     split them over several calls",
                    self.limits.max_children
                )));
            }
            let caller_id = op.id;
            let unique = op.unique.clone();
            let record = self
                .limits
                .prepare_operation(op, None, now)
                .map_err(|e| match e {
                    Error::InvalidInput(reason) => Error::InvalidInput(format!(
                        "submit_many: the operation at index {index} was refused, so none was \
                         submitted: {reason}"
                    )),
                    other => other,
                })?;
            if let Some(id) = caller_id
                && let Some(first) = caller_ids.insert(id, index)
            {
                return Err(Error::InvalidInput(format!(
                    "submit_many: the operations at index {first} and {index} have the same id \
                     {id}; an id names one operation, so none was submitted"
                )));
            }
            uniques.push(unique);
            records.push(record);
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }

        // Caller ids found already stored, by index: they are answered, not inserted.
        let mut stored = vec![false; records.len()];
        // An operation with both a caller id and a unique key is looked up by its id
        // first, as `submit` does: stored, it is the answer, whoever holds the key now.
        for (&id, &index) in &caller_ids {
            if uniques[index].is_some() {
                stored[index] = self.stored_standalone(id, index).await?;
            }
        }
        let mut tries = 0;
        let holders = loop {
            match self.try_submit_many(&records, &uniques, &stored).await {
                Ok(holders) => break holders,
                Err(Error::Conflict(reason)) if tries < 3 => {
                    tries += 1;
                    // Lost a race over an id (or, in a store that checks unique keys at
                    // commit, over a key: the next try finds the holder).
                    let mut found = false;
                    for (&id, &index) in &caller_ids {
                        if !stored[index] && self.stored_standalone(id, index).await? {
                            stored[index] = true;
                            found = true;
                        }
                    }
                    if !found && uniques.iter().all(Option::is_none) {
                        return Err(Error::Conflict(reason));
                    }
                }
                Err(e) => return Err(e),
            }
        };

        let created: Vec<OperationId> = records
            .iter()
            .enumerate()
            .filter(|(i, _)| !stored[*i] && !holders.contains_key(i))
            .map(|(_, r)| r.id)
            .collect();
        let notified = created.is_empty()
            || self
                .notify(&Submitted {
                    parent_id: None,
                    operation_ids: created,
                })
                .await;
        Ok(records
            .iter()
            .enumerate()
            .map(|(i, record)| match holders.get(&i) {
                Some(&holder) => Receipt {
                    id: holder,
                    created: false,
                    notified: true,
                },
                None if stored[i] => Receipt {
                    id: record.id,
                    created: false,
                    notified: true,
                },
                None => Receipt {
                    id: record.id,
                    created: true,
                    notified,
                },
            })
            .collect())
    }

    /// Whether `id` (the caller id of `submit_many`'s operation at `index`) is stored as an
    /// operation; a `Conflict` when a batch parent has it.
    async fn stored_standalone(&self, id: OperationId, index: usize) -> Result<bool> {
        match self.store.get(id).await? {
            Some(op) if op.is_parent() => Err(Error::Conflict(format!(
                "submit_many: id {id} (index {index}) is already used by a batch parent, not \
                 an operation; nothing was submitted"
            ))),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// One try of [`submit_many`](Self::submit_many): every record not already `stored`,
    /// the plain ones in one bulk insert, then the unique ones; committed. Answers the
    /// holders of the unique keys found held, by index.
    async fn try_submit_many(
        &self,
        records: &[ChildRecord],
        uniques: &[Option<crate::Unique>],
        stored: &[bool],
    ) -> Result<std::collections::HashMap<usize, OperationId>> {
        let mut tx = self.store.begin().await?;
        let mut holders = std::collections::HashMap::new();
        if uniques.iter().all(Option::is_none) && !stored.contains(&true) {
            // The common case: one bulk insert, with nothing to copy.
            tx.insert_children(records).await?;
        } else {
            // In input order, so that rows are stored (and claimed, among equals) in the
            // order given: the plain operations between two unique ones in one bulk
            // insert, each unique one on its own.
            let mut run: Vec<ChildRecord> = Vec::new();
            for (index, record) in records.iter().enumerate() {
                if stored[index] {
                    continue;
                }
                match &uniques[index] {
                    None => run.push(record.clone()),
                    Some(unique) => {
                        if !run.is_empty() {
                            tx.insert_children(&std::mem::take(&mut run)).await?;
                        }
                        if let Some(holder) = tx.insert_unique(record, unique).await? {
                            holders.insert(index, holder);
                        }
                    }
                }
            }
            if !run.is_empty() {
                tx.insert_children(&run).await?;
            }
        }
        tx.commit().await?;
        Ok(holders)
    }

    /// A stand-alone submit with a unique key: the store inserts it or answers the
    /// operation holding the key. A commit refused for a collision found only then (a
    /// store that checks keys at commit, like the memory store) is tried again: the second
    /// try finds the holder.
    async fn submit_unique(&self, record: ChildRecord, unique: &crate::Unique) -> Result<Receipt> {
        let mut tries = 0;
        loop {
            let mut tx = self.store.begin().await?;
            match tx.insert_unique(&record, unique).await {
                Ok(None) => {}
                Ok(Some(existing)) => {
                    drop(tx);
                    return Ok(Receipt {
                        id: existing,
                        created: false,
                        notified: true,
                    });
                }
                Err(Error::Conflict(_)) => {
                    drop(tx);
                    return self.existing_operation(record.id).await;
                }
                Err(e) => return Err(e),
            }
            match tx.commit().await {
                Ok(()) => break,
                Err(Error::Conflict(_)) if tries < 3 => tries += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(self.created(record.id).await)
    }

    /// The receipt of a stand-alone operation just committed, its workers notified.
    async fn created(&self, id: OperationId) -> Receipt {
        let submitted = Submitted {
            parent_id: None,
            operation_ids: vec![id],
        };
        let notified = self.notify(&submitted).await;
        Receipt {
            id,
            created: true,
            notified,
        }
    }

    async fn notify(&self, submitted: &Submitted) -> bool {
        let mut all_ok = true;
        for notifier in &self.notifiers {
            if let Err(error) = notifier.notify(submitted).await {
                all_ok = false;
                tracing::warn!(
                    %error,
                    operations = submitted.operation_ids.len(),
                    "notification after commit failed; polling workers will still find the operations"
                );
            }
        }
        all_ok
    }

    async fn existing_batch(&self, parent_id: OperationId) -> Result<Option<BatchReceipt>> {
        let Some(existing) = self.store.get(parent_id).await? else {
            return Ok(None);
        };
        if !existing.is_parent() {
            return Err(Error::Conflict(format!(
                "id {parent_id} is already used by a stand-alone operation of kind `{}`, not a batch",
                existing.kind
            )));
        }
        if let Some(outer) = existing.parent_id {
            return Err(Error::Conflict(format!(
                "id {parent_id} is already used by a batch nested in batch {outer}, not by a \
                 batch of its own"
            )));
        }
        let child_ids = self.store.child_ids_of(parent_id).await?;
        Ok(Some(BatchReceipt {
            parent_id,
            child_ids,
            created: false,
            notified: true,
        }))
    }

    async fn existing_operation(&self, id: OperationId) -> Result<Receipt> {
        match self.store.get(id).await? {
            Some(op) if !op.is_parent() => Ok(Receipt {
                id,
                created: false,
                notified: true,
            }),
            Some(_) => Err(Error::Conflict(format!(
                "id {id} is already used by a batch parent, not a stand-alone operation"
            ))),
            None => Err(Error::Conflict(format!(
                "id {id} conflicted on insert but is not stored"
            ))),
        }
    }
}

impl Limits {
    /// Validates a batch — with the batches nested in it — and resolves ids, defaults and
    /// timestamps: what [`Queue::submit_batch`] hands to a transaction, in the order to
    /// insert it. Drivers that enqueue inside a caller's own transaction use it to apply
    /// the same rules.
    pub fn prepare_batch(&self, batch: NewBatch) -> Result<PreparedBatch> {
        self.prepare_tree(batch, false)
    }

    /// [`prepare_batch`](Self::prepare_batch), for a root that may have no children of
    /// its own when `streamed` (its children come from a stream, checked as they come).
    fn prepare_tree(&self, batch: NewBatch, streamed: bool) -> Result<PreparedBatch> {
        let now = Utc::now();
        let mut tree = Tree {
            limits: self,
            now,
            seen: HashSet::new(),
            batches: Vec::new(),
            nodes: 0,
            streamed,
        };
        let root_id = batch.id.unwrap_or_default();
        tree.add(batch, root_id, None, 0)?;
        let mut prepared = PreparedBatch {
            batches: tree.batches,
        };
        link_dependencies(&mut prepared)?;
        Ok(prepared)
    }

    /// Validates one operation and resolves its id and defaults.
    pub fn prepare_operation(
        &self,
        op: NewOperation,
        parent_id: Option<OperationId>,
        now: chrono::DateTime<Utc>,
    ) -> Result<ChildRecord> {
        let record = self.prepare_child(op, parent_id, now, Subject::Operation)?;
        refuse_dependencies(&record, Subject::Operation)?;
        Ok(record)
    }

    /// Validates a batch callback like any operation; it takes no id and no `run_at`,
    /// which are set when it fires.
    fn prepare_callback(
        &self,
        on: CallbackOn,
        op: NewOperation,
        now: chrono::DateTime<Utc>,
    ) -> Result<Callback> {
        let what = Subject::Callback(on);
        if let Some(id) = op.id {
            return Err(Error::InvalidInput(format!(
                "{what} has id {id}: a callback's id is made when it fires (a retried batch \
                 fires again), so it cannot be chosen; remove with_id"
            )));
        }
        if op.run_at.is_some() {
            return Err(Error::InvalidInput(format!(
                "{what} has a run_at: a callback is ready when its batch ends; remove with_run_at"
            )));
        }
        let record = self.prepare_child(op, None, now, what)?;
        refuse_dependencies(&record, what)?;
        Ok(Callback {
            on,
            kind: record.kind,
            payload: record.payload,
            priority: record.priority,
            serialization_key: record.serialization_key,
            max_attempts: record.max_attempts,
            timeout_ms: record.timeout.map(|t| t.as_millis() as u64),
        })
    }

    fn prepare_child(
        &self,
        op: NewOperation,
        parent_id: Option<OperationId>,
        now: chrono::DateTime<Utc>,
        what: Subject,
    ) -> Result<ChildRecord> {
        validate_name(what, "kind", &op.kind, self.max_name_bytes)?;
        if let Some(unique) = &op.unique {
            if !matches!(what, Subject::Operation) {
                return Err(Error::InvalidInput(format!(
                    "{what} has a unique key: unique keys apply to stand-alone operations \
                     (a batch is wholly inserted or not at all); remove unique"
                )));
            }
            validate_name(what, "unique key", &unique.key, self.max_name_bytes)?;
            if let crate::UniqueScope::CompletedWithin(period) = unique.scope
                && (period < std::time::Duration::from_millis(1)
                    || period > crate::types::MAX_UNIQUE_PERIOD)
            {
                return Err(Error::InvalidInput(format!(
                    "{what}: the unique key's period must be between 1 ms and {} days, got \
                     {period:?}",
                    crate::types::MAX_UNIQUE_PERIOD.as_secs() / 86_400
                )));
            }
        }
        if let Some(key) = &op.serialization_key {
            validate_name(what, "serialization key", key, self.max_name_bytes)?;
        }
        let payload_json = serialize_json(what, "payload", &op.payload, self.max_payload_bytes)?;
        let max_attempts = op.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > i32::MAX as u32 {
            return Err(Error::InvalidInput(format!(
                "{what}: max_attempts must be between 1 and {}, got {max_attempts}",
                i32::MAX
            )));
        }
        if let Some(run_at) = op.run_at
            && !(earliest_run_at()..=latest_run_at()).contains(&run_at)
        {
            return Err(Error::InvalidInput(format!(
                "{what}: run_at {run_at} is out of range; it must be between {} and {}",
                earliest_run_at(),
                latest_run_at()
            )));
        }
        if let Some(timeout) = op.timeout
            && (timeout < std::time::Duration::from_millis(1) || timeout > MAX_ATTEMPT_TIMEOUT)
        {
            return Err(Error::InvalidInput(format!(
                "{what}: the attempt timeout must be between 1 ms and {} days, got {timeout:?}",
                MAX_ATTEMPT_TIMEOUT.as_secs() / 86_400
            )));
        }
        Ok(ChildRecord {
            id: op.id.unwrap_or_default(),
            parent_id,
            kind: op.kind,
            payload: op.payload,
            payload_json,
            priority: op.priority,
            run_at: op.run_at.unwrap_or(now),
            serialization_key: op.serialization_key,
            max_attempts,
            created_at: now,
            // Stored in whole milliseconds.
            timeout: op
                .timeout
                .map(|t| std::time::Duration::from_millis(t.as_millis() as u64)),
            after: op.after,
            dependents: Vec::new(),
        })
    }
}

/// A validated batch tree, ready to insert: every batch of it with its operations.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedBatch {
    /// The outermost batch first, then the nested ones depth-first in submission order: a
    /// batch always comes before the batches nested in it, so inserting them in this
    /// order inserts every parent before its children.
    pub batches: Vec<(ParentRecord, Vec<ChildRecord>)>,
}

impl PreparedBatch {
    /// The outermost batch.
    pub fn root(&self) -> &ParentRecord {
        &self.batches[0].0
    }

    /// The outermost batch's children in insertion order: its operations, then its
    /// nested batches (what a receipt lists).
    pub fn child_ids(&self) -> Vec<OperationId> {
        let root = self.root().id;
        let mut ids: Vec<OperationId> = self.batches[0].1.iter().map(|c| c.id).collect();
        ids.extend(
            self.batches
                .iter()
                .filter(|(p, _)| p.parent_id == Some(root))
                .map(|(p, _)| p.id),
        );
        ids
    }

    /// Every operation of the tree (what a notifier is told about).
    pub fn operation_ids(&self) -> Vec<OperationId> {
        self.batches
            .iter()
            .flat_map(|(_, children)| children.iter().map(|c| c.id))
            .collect()
    }

    /// How many rows the tree is: its batches and its operations.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|(_, c)| c.len() + 1).sum()
    }
}

/// The deepest nesting of batches ([`NewBatch::child_batch`]): a tree's outermost batch is
/// level 1, so a tree holds at most this many levels of batches. Finishing the last
/// operation of the deepest batch finalizes the levels above it in the same transaction,
/// one after the other.
pub const MAX_BATCH_DEPTH: usize = 16;

/// Walks a submitted tree, validating each batch and operation.
struct Tree<'a> {
    limits: &'a Limits,
    now: chrono::DateTime<Utc>,
    seen: HashSet<OperationId>,
    batches: Vec<(ParentRecord, Vec<ChildRecord>)>,
    /// Rows so far, against `max_children`.
    nodes: usize,
    /// The root's children come from a stream as well: it may have none of its own.
    streamed: bool,
}

impl Tree<'_> {
    fn add(
        &mut self,
        batch: NewBatch,
        id: OperationId,
        parent_id: Option<OperationId>,
        depth: usize,
    ) -> Result<()> {
        let number = self.batches.len();
        let what = if number == 0 {
            Subject::Batch
        } else {
            Subject::Nested(number)
        };
        validate_name(what, "kind", &batch.kind, self.limits.max_name_bytes)?;
        if depth >= MAX_BATCH_DEPTH {
            return Err(Error::InvalidInput(format!(
                "{what} (`{}`) is nested {} levels deep; batches nest at most \
                 {MAX_BATCH_DEPTH} levels",
                batch.kind,
                depth + 1
            )));
        }
        if !self.seen.insert(id) {
            return Err(Error::InvalidInput(format!(
                "{what} repeats id {id} already used in this batch; ids must be unique"
            )));
        }
        let direct = batch.children.len() + batch.batches.len();
        if direct == 0 && !(number == 0 && self.streamed) {
            return Err(Error::InvalidInput(format!(
                "{what} `{}` has no children; a batch needs at least one child operation",
                batch.kind
            )));
        }
        self.nodes += direct;
        if self.nodes > self.limits.max_children {
            return Err(Error::InvalidInput(format!(
                "batch `{}` has more than {} children (counting the operations and batches \
                 nested in it); the limit is {}",
                self.batches
                    .first()
                    .map_or(batch.kind.as_str(), |(p, _)| p.kind.as_str()),
                self.limits.max_children,
                self.limits.max_children
            )));
        }
        serialize_json(
            what,
            "metadata",
            &batch.metadata,
            self.limits.max_payload_bytes,
        )?;
        let mut children = Vec::with_capacity(batch.children.len());
        for (index, child) in batch.children.into_iter().enumerate() {
            let what = if number == 0 {
                Subject::Child(index)
            } else {
                Subject::NestedChild(number, index)
            };
            let record = self.limits.prepare_child(child, Some(id), self.now, what)?;
            if !self.seen.insert(record.id) {
                return Err(Error::InvalidInput(format!(
                    "{what} repeats id {} already used in this batch; ids must be unique",
                    record.id
                )));
            }
            children.push(record);
        }
        let mut callbacks = Vec::new();
        for (on, callback) in [
            (CallbackOn::Success, batch.on_success),
            (CallbackOn::Failure, batch.on_failure),
            (CallbackOn::Complete, batch.on_complete),
        ] {
            if let Some(callback) = callback {
                callbacks.push(self.limits.prepare_callback(on, callback, self.now)?);
            }
        }
        self.batches.push((
            ParentRecord {
                id,
                kind: batch.kind,
                metadata: batch.metadata,
                children_total: direct as u64,
                created_at: self.now,
                plan: BatchPlan {
                    failure_policy: batch.failure_policy,
                    callbacks,
                },
                parent_id,
                dependents: Vec::new(),
            },
            children,
        ));
        for inner in batch.batches {
            let inner_id = inner.id.unwrap_or_default();
            self.add(inner, inner_id, Some(id), depth + 1)?;
        }
        Ok(())
    }
}

/// The earliest `run_at` a submit accepts: 0001-01-01 UTC (any instant in the past means
/// "ready now"; earlier ones are outside what every backend stores).
pub fn earliest_run_at() -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp(-62_135_596_800, 0).expect("0001-01-01 is an instant")
}

/// The latest `run_at` a submit accepts: 9999-12-31 23:59:59 UTC.
pub fn latest_run_at() -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31 is an instant")
}

/// Dependencies exist only among the children of one batch.
fn refuse_dependencies(record: &ChildRecord, what: Subject) -> Result<()> {
    match record.after.first() {
        None => Ok(()),
        Some(dependency) => Err(Error::InvalidInput(format!(
            "{what} waits for {}: dependencies (after, after_any) are only between the \
             children of one batch",
            dependency.id
        ))),
    }
}

/// How many ids a refusal names at most.
const NAMED_IDS: usize = 10;

/// The longest chain of dependencies a batch may hold (operations each waiting for the one
/// before): a failure cancels down a chain one link after another in one transaction.
pub const MAX_DEPENDENCY_DEPTH: usize = 100;

/// Where a node of a tree's dependency graph is: an operation (batch, index) or a nested
/// batch.
#[derive(Clone, Copy)]
enum Node {
    Operation(usize, usize),
    Batch(usize),
}

/// Checks a tree's dependency graph — every dependency another operation or nested batch
/// of the same tree, none twice, no cycle (a batch ends after its children, so waiting for
/// a batch one is inside of is a cycle too), no chain longer than
/// [`MAX_DEPENDENCY_DEPTH`] — and fills in each node's `dependents` (the reverse edges). A
/// tree without dependencies costs one pass over its operations.
fn link_dependencies(tree: &mut PreparedBatch) -> Result<()> {
    if tree
        .batches
        .iter()
        .all(|(_, children)| children.iter().all(|c| c.after.is_empty()))
    {
        return Ok(());
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: std::collections::HashMap<OperationId, usize> = Default::default();
    let mut batch_node: std::collections::HashMap<OperationId, usize> = Default::default();
    for (b, (parent, children)) in tree.batches.iter().enumerate() {
        if b > 0 {
            index.insert(parent.id, nodes.len());
            batch_node.insert(parent.id, nodes.len());
            nodes.push(Node::Batch(b));
        }
        for (j, child) in children.iter().enumerate() {
            index.insert(child.id, nodes.len());
            nodes.push(Node::Operation(b, j));
        }
    }
    let root = tree.root().id;
    let id_of = |node: Node| match node {
        Node::Operation(b, j) => tree.batches[b].1[j].id,
        Node::Batch(b) => tree.batches[b].0.id,
    };
    let container = |node: Node| match node {
        Node::Operation(b, _) => Some(tree.batches[b].0.id),
        Node::Batch(b) => tree.batches[b].0.parent_id,
    };
    // (from, to, any): `to` waits for `from`. The implicit edges (a node to the nested
    // batch holding it) are `None`: they take part in the cycle and depth checks only.
    let mut edges: Vec<(usize, usize, Option<bool>)> = Vec::new();
    for (i, &node) in nodes.iter().enumerate() {
        if let Some(&holder) = container(node).and_then(|c| batch_node.get(&c)) {
            edges.push((i, holder, None));
        }
        let Node::Operation(b, j) = node else {
            continue;
        };
        let child = &tree.batches[b].1[j];
        let what = if b == 0 {
            Subject::Child(j)
        } else {
            Subject::NestedChild(b, j)
        };
        let mut seen = HashSet::with_capacity(child.after.len());
        for dependency in &child.after {
            if dependency.id == child.id {
                return Err(Error::InvalidInput(format!(
                    "{what} ({}) waits for itself",
                    child.id
                )));
            }
            if dependency.id == root {
                return Err(Error::InvalidInput(format!(
                    "{what} ({}) waits for {root}, the batch it belongs to, which cannot \
                     end before it does",
                    child.id
                )));
            }
            let Some(&from) = index.get(&dependency.id) else {
                return Err(Error::InvalidInput(format!(
                    "{what} ({}) waits for {}, which is not an operation of this batch \
                     (a dependency must be another operation or nested batch of the same \
                     tree, given its id with with_id)",
                    child.id, dependency.id
                )));
            };
            if !seen.insert(dependency.id) {
                return Err(Error::InvalidInput(format!(
                    "{what} ({}) lists {} twice among its dependencies",
                    child.id, dependency.id
                )));
            }
            edges.push((from, i, Some(dependency.any)));
        }
    }
    // Kahn's algorithm: what is never freed lies on, or behind, a cycle.
    let mut waiting = vec![0usize; nodes.len()];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for &(from, to, _) in &edges {
        out[from].push(to);
        waiting[to] += 1;
    }
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    // The longest chain of dependencies ending at each node (1 for one without).
    let mut depth = vec![1usize; nodes.len()];
    let mut freed = 0;
    while let Some(i) = ready.pop() {
        freed += 1;
        if depth[i] > MAX_DEPENDENCY_DEPTH {
            return Err(Error::InvalidInput(format!(
                "{} ends a chain of more than {MAX_DEPENDENCY_DEPTH} operations each \
                 waiting for the one before; the longest chain a batch may hold is \
                 {MAX_DEPENDENCY_DEPTH}",
                id_of(nodes[i])
            )));
        }
        for &to in &out[i] {
            depth[to] = depth[to].max(depth[i] + 1);
            waiting[to] -= 1;
            if waiting[to] == 0 {
                ready.push(to);
            }
        }
    }
    if freed < nodes.len() {
        let stuck: Vec<String> = (0..nodes.len())
            .filter(|&i| waiting[i] > 0)
            .map(|i| id_of(nodes[i]).to_string())
            .collect();
        let more = stuck.len().saturating_sub(NAMED_IDS);
        return Err(Error::InvalidInput(format!(
            "the batch's dependencies form a cycle: these operations are on it or wait for \
             it, and could never run: {}{}",
            stuck[..stuck.len().min(NAMED_IDS)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )));
    }
    let ids: Vec<OperationId> = nodes.iter().map(|&node| id_of(node)).collect();
    for (from, to, any) in edges {
        let Some(any) = any else { continue };
        let edge = crate::types::Dependency { id: ids[to], any };
        match nodes[from] {
            Node::Operation(b, j) => tree.batches[b].1[j].dependents.push(edge),
            Node::Batch(b) => tree.batches[b].0.dependents.push(edge),
        }
    }
    Ok(())
}

/// Checks a kind named outside a submit (a pause, a resume) by the rules a submit applies
/// with the default [`Limits`]: not blank, at most 255 bytes, no NUL.
pub fn validate_kind(kind: &str) -> Result<()> {
    validate_name(
        Subject::Kind,
        "name",
        kind,
        Limits::default().max_name_bytes,
    )
}

/// The role whose holder runs a worker's periodic maintenance (rescue, reconcile, prune,
/// queue-depth statistics): one worker of all those on a database
/// ([`Store::elect`]).
pub const MAINTENANCE_ROLE: &str = "maintenance";

/// Checks the arguments of [`Store::elect`], [`Store::resign`] and [`Store::leader`]:
/// `role` and `candidate` are names like a kind (not blank, at most 255 bytes, no NUL)
/// and `term` lies between 1 ms and [`MAX_LEASE`](crate::MAX_LEASE).
pub fn validate_election(role: &str, candidate: &str, term: std::time::Duration) -> Result<()> {
    let max = Limits::default().max_name_bytes;
    validate_name(Subject::Role, "name", role, max)?;
    validate_name(Subject::Candidate, "name", candidate, max)?;
    if term < std::time::Duration::from_millis(1) {
        return Err(Error::InvalidInput(format!(
            "a term of {term:?} is too short to hold role `{role}`; it must be at least 1 ms"
        )));
    }
    crate::validate_lease(term)
}

/// Checks a schedule's name like a kind's.
pub(crate) fn validate_schedule_name(name: &str) -> Result<()> {
    validate_name(
        Subject::Schedule,
        "name",
        name,
        Limits::default().max_name_bytes,
    )
}

fn validate_name(subject: Subject, field: &str, name: &str, max_bytes: usize) -> Result<()> {
    let what = Described(subject, field);
    if name.trim().is_empty() {
        return Err(Error::InvalidInput(format!("{what} is empty")));
    }
    if name.len() > max_bytes {
        return Err(Error::InvalidInput(format!(
            "{what} is {} bytes long; the limit is {max_bytes}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::InvalidInput(format!(
            "{what} contains a NUL character, which no backend can store"
        )));
    }
    Ok(())
}

/// What a validation message is about; formatted only when there is an error, so a
/// valid batch of 100,000 children allocates no message text.
#[derive(Clone, Copy, Debug)]
enum Subject {
    Batch,
    Kind,
    Child(usize),
    /// The n-th nested batch of a tree (depth-first, from 1).
    Nested(usize),
    /// Child #i of the n-th nested batch.
    NestedChild(usize, usize),
    Operation,
    Callback(CallbackOn),
    Schedule,
    Role,
    Candidate,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch => f.write_str("batch"),
            Self::Kind => f.write_str("kind"),
            Self::Child(index) => write!(f, "child #{index}"),
            Self::Nested(batch) => write!(f, "nested batch #{batch}"),
            Self::NestedChild(batch, index) => write!(f, "child #{index} of nested batch #{batch}"),
            Self::Operation => f.write_str("operation"),
            Self::Callback(on) => write!(f, "callback {on}"),
            Self::Schedule => f.write_str("schedule"),
            Self::Role => f.write_str("role"),
            Self::Candidate => f.write_str("candidate"),
        }
    }
}

struct Described<'a>(Subject, &'a str);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Rejects payloads over the size limit and strings holding NUL, which PostgreSQL's
/// `jsonb` cannot store, so every driver refuses the same input the same way. Returns
/// the serialized text, so SQL drivers need not serialize the payload a second time.
fn serialize_json(
    subject: Subject,
    field: &str,
    value: &Value,
    max_bytes: usize,
) -> Result<String> {
    let what = Described(subject, field);
    match scan(value) {
        Some(Unstorable::Nul) => {
            return Err(Error::InvalidInput(format!(
                "{what} contains a NUL character (\\u0000), which no backend can store"
            )));
        }
        Some(Unstorable::TooDeep) => {
            return Err(Error::InvalidInput(format!(
                "{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; \
                 it could not be read back"
            )));
        }
        None => {}
    }
    let text = crate::to_stored_text(value);
    if text.len() > max_bytes {
        return Err(Error::InvalidInput(format!(
            "{what} is {} bytes serialized; the limit is {max_bytes}",
            text.len()
        )));
    }
    Ok(text)
}

/// Why no backend could store `value` and read it back, or `None` when every backend
/// can: the rule submit applies to payloads, also applied to handlers' results.
pub(crate) fn unstorable_json(value: &Value) -> Option<String> {
    match scan(value)? {
        Unstorable::Nul => Some("it contains a NUL character (\\u0000)".into()),
        Unstorable::TooDeep => Some(format!(
            "it nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
        )),
    }
}

/// How deep a payload may nest: JSON parsers that read it back (serde_json, and so
/// every driver) stop at 128 levels, and serializing deeper values recurses as deep.
pub const MAX_JSON_DEPTH: usize = 100;

enum Unstorable {
    Nul,
    TooDeep,
}

/// What no backend could store and read back, found without recursion.
fn scan(value: &Value) -> Option<Unstorable> {
    let mut stack = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return Some(Unstorable::Nul),
            Value::Array(_) | Value::Object(_) if depth >= MAX_JSON_DEPTH => {
                return Some(Unstorable::TooDeep);
            }
            Value::Array(items) => stack.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => {
                for (k, v) in map {
                    if k.contains('\0') {
                        return Some(Unstorable::Nul);
                    }
                    stack.push((v, depth + 1));
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mockall::Sequence;
    use serde_json::json;

    use super::*;
    use crate::error::BackendErrorKind;
    use crate::notify::MockNotifier;
    use crate::store::{MockStore, MockTransaction};
    use crate::types::NewOperation;

    fn three_children() -> NewBatch {
        NewBatch::new("batch_retain")
            .children((0..3).map(|i| NewOperation::new("retain", json!({ "n": i }))))
    }

    #[tokio::test]
    async fn submit_calls_begin_parent_children_commit_then_notify_in_order() {
        let mut seq = Sequence::new();
        let mut store = MockStore::new();
        store
            .expect_get()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Ok(None));
        let slot = Arc::new(std::sync::Mutex::new(None::<MockTransaction>));
        let taken = Arc::clone(&slot);
        store
            .expect_begin()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move || {
                let tx = taken.lock().unwrap().take().expect("begin called twice");
                Ok(Box::new(tx))
            });
        let mut tx = MockTransaction::new();
        tx.expect_insert_parent()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|p| {
                assert_eq!(p.children_total, 3);
                Ok(())
            });
        tx.expect_insert_children()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|children| {
                assert_eq!(children.len(), 3);
                Ok(())
            });
        tx.expect_commit()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|| Ok(()));
        tx.expect_rollback().never();
        *slot.lock().unwrap() = Some(tx);
        let mut notifier = MockNotifier::new();
        notifier
            .expect_notify()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|s| {
                assert_eq!(s.operation_ids.len(), 3);
                Ok(())
            });

        let queue = Queue::new(Arc::new(store)).with_notifier(Arc::new(notifier));
        // A caller-supplied id: the queue first checks it is not taken.
        let receipt = queue
            .submit_batch(three_children().with_id(OperationId::new()))
            .await
            .unwrap();
        assert!(receipt.created && receipt.notified);
        assert_eq!(receipt.child_ids.len(), 3);
    }

    #[tokio::test]
    async fn failing_child_insert_means_no_commit_and_no_notify() {
        let mut store = MockStore::new();
        store.expect_get().returning(|_| Ok(None));
        let mut tx = MockTransaction::new();
        tx.expect_insert_parent().times(1).returning(|_| Ok(()));
        tx.expect_insert_children().times(1).returning(|_| {
            Err(Error::backend(
                "mock",
                BackendErrorKind::Connection,
                "connection reset while inserting child #2",
            ))
        });
        tx.expect_commit().never();
        let mut tx = Some(tx);
        store
            .expect_begin()
            .times(1)
            .returning(move || Ok(Box::new(tx.take().expect("begin called twice"))));
        let mut notifier = MockNotifier::new();
        notifier.expect_notify().never();

        let queue = Queue::new(Arc::new(store)).with_notifier(Arc::new(notifier));
        let err = queue.submit_batch(three_children()).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[tokio::test]
    async fn invalid_batch_never_reaches_the_store() {
        let mut store = MockStore::new();
        store.expect_begin().never();
        store.expect_get().never();
        let queue = Queue::new(Arc::new(store));
        let err = queue
            .submit_batch(NewBatch::new("batch_retain"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
}
