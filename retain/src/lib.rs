#![doc = include_str!("../README.md")]

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "memory")))]
compile_error!("fascicle-retain needs at least one driver feature: sqlite, postgres or memory");

mod backend;
mod bank;
mod documents;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fascicle::{
    Applied, BatchReceipt, Capabilities, ClaimedOperation, Context, Driver, Error, HandlerError,
    InProcessWaker, Limits, NewBatch, NewOperation, Operation, OperationId, Queue, Receipt,
    Registry, Result, Status, Store,
};
use serde::{Deserialize, Serialize};

pub use bank::{BankCounts, ConsolidateReport, RetainReport};
pub use documents::{Document, documents_from_jsonl, read_documents, split_units, terms};

use backend::{Backend, Done};
use bank::{Work, WorkReport};

/// Kind of the batch parent.
pub const BATCH_KIND: &str = "batch_retain";
/// Kind of a child retaining some documents.
pub const RETAIN_KIND: &str = "retain";
/// Kind of the consolidation.
pub const CONSOLIDATE_KIND: &str = "consolidate";

/// How a retain batch is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetainOptions {
    /// Documents per child operation; default 4. A child also stops taking documents
    /// at about 1 MiB of text (a larger document goes alone, up to 64 MiB).
    pub documents_per_child: usize,
    /// Attempts per child; default 5.
    pub max_attempts: u32,
}

impl Default for RetainOptions {
    fn default() -> Self {
        Self {
            documents_per_child: 4,
            max_attempts: 5,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RetainPayload {
    documents: Vec<Document>,
}

#[derive(Serialize, Deserialize)]
struct ConsolidatePayload {
    #[serde(default)]
    after_batch: Option<OperationId>,
    /// The round of `after_batch` it follows: when the batch finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_finished_at: Option<DateTime<Utc>>,
}

/// Where a retain batch stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchSummary {
    /// The batch.
    pub batch_id: OperationId,
    /// The parent's status.
    pub status: Status,
    /// Children in the batch.
    pub children: u64,
    /// Children completed.
    pub completed: u64,
    /// Children failed.
    pub failed: u64,
    /// Children cancelled.
    pub cancelled: u64,
    /// The parent's error (the most common child error) if it failed.
    pub error: Option<String>,
    /// The completed children's reports, added up.
    pub retained: RetainReport,
}

/// The memory bank of one store, and the handlers of its operation kinds.
#[derive(Clone, Debug)]
pub struct MemoryBank {
    backend: Arc<dyn Backend>,
    queue: Queue,
    waker: InProcessWaker,
}

impl MemoryBank {
    /// Opens the store `url` names (see [`fascicle::connect`]) and its bank.
    pub async fn open(url: &str) -> Result<Self> {
        Self::new(fascicle::open(url).await?).await
    }

    /// The bank of an opened store; creates the bank's tables if they are missing.
    pub async fn new(driver: Driver) -> Result<Self> {
        let backend: Arc<dyn Backend> = match driver {
            #[cfg(feature = "sqlite")]
            Driver::Sqlite(store) => Arc::new(sqlite::SqliteBackend::new(store)),
            #[cfg(feature = "postgres")]
            Driver::Postgres(store) => Arc::new(postgres::PostgresBackend::new(store)),
            #[cfg(feature = "memory")]
            Driver::Memory(store) => Arc::new(memory::MemoryBackend::new(store)),
            #[allow(unreachable_patterns)]
            other => {
                let driver = other.store().driver();
                return Err(Error::InvalidInput(format!(
                    "this build of fascicle-retain has no memory bank for the {driver} driver; enable its cargo feature `{driver}`"
                )));
            }
        };
        backend.migrate().await?;
        let waker = InProcessWaker::new();
        let queue = Queue::new(backend.store())
            .with_notifier(Arc::new(waker.clone()))
            .with_limits(Limits {
                max_payload_bytes: MAX_CHILD_PAYLOAD,
                ..Limits::default()
            });
        Ok(Self {
            backend,
            queue,
            waker,
        })
    }

    /// The queue store.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(self.queue.store())
    }

    /// Woken when this bank submits work; subscribe in-process workers to it.
    pub fn waker(&self) -> &InProcessWaker {
        &self.waker
    }

    /// The store's capabilities (which source layout the bank uses).
    pub fn capabilities(&self) -> Capabilities {
        self.queue.store().capabilities()
    }

    /// How many rows the bank holds.
    pub async fn counts(&self) -> Result<BankCounts> {
        self.backend.counts().await
    }

    /// Submits one `batch_retain` batch for `documents`, atomically.
    pub async fn submit(
        &self,
        documents: Vec<Document>,
        options: &RetainOptions,
    ) -> Result<BatchReceipt> {
        if options.documents_per_child == 0 {
            return Err(Error::InvalidInput(
                "documents per child must be at least 1".into(),
            ));
        }
        if documents.is_empty() {
            return Err(Error::InvalidInput(
                "there are no documents to retain".into(),
            ));
        }
        let total = documents.len();
        let mut children = Vec::with_capacity(total.div_ceil(options.documents_per_child));
        let mut chunk: Vec<Document> = Vec::new();
        let mut chunk_bytes = 0;
        for document in documents {
            let bytes = document.text.len();
            // A child takes at most K documents and about CHILD_TEXT_BUDGET of text; a
            // document larger than that goes alone.
            if !chunk.is_empty()
                && (chunk.len() == options.documents_per_child
                    || chunk_bytes + bytes > CHILD_TEXT_BUDGET)
            {
                children.push(retain_child(std::mem::take(&mut chunk), options)?);
                chunk_bytes = 0;
            }
            chunk_bytes += bytes;
            chunk.push(document);
        }
        if !chunk.is_empty() {
            children.push(retain_child(chunk, options)?);
        }
        self.queue
            .submit_batch(
                NewBatch::new(BATCH_KIND)
                    .with_metadata(serde_json::json!({ "documents": total }))
                    .children(children),
            )
            .await
    }

    /// The id of the consolidation that follows the round of `batch` that finished at
    /// `finished_at` (the parent's `completed_at`).
    ///
    /// A batch is consolidated once per *round*: from its submission (or its last
    /// `retry_batch`) to its terminal state. The instant it reached that state is the
    /// same for every reader of that round and changes with every round (`retry_batch`
    /// clears it; the next finish sets a later one), so children racing to submit the
    /// consolidation of one round submit one operation, and a retried batch gets a new one.
    pub fn consolidation_id(batch: OperationId, finished_at: DateTime<Utc>) -> OperationId {
        let mut bytes = *batch.as_uuid().as_bytes();
        for (b, mask) in bytes.iter_mut().zip(*b"fascicle-consol.") {
            *b ^= mask;
        }
        // Microseconds: what every store keeps. Mixed (bijectively) into the low half, so
        // two rounds of one batch never share an id; the high half keeps the batch's time
        // and randomness, so rounds of different batches do not either.
        let round = mix64(finished_at.timestamp_micros() as u64);
        for (b, r) in bytes[8..].iter_mut().zip(round.to_be_bytes()) {
            *b ^= r;
        }
        OperationId::from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }

    /// The id of the consolidation of `batch`'s current round, once the batch is finished
    /// (`None` while it is open); see [`consolidation_id`](Self::consolidation_id).
    pub async fn consolidation_of(&self, batch: OperationId) -> Result<Option<OperationId>> {
        let parent = self.batch(batch).await?;
        Ok(round_of(&parent).map(|finished_at| Self::consolidation_id(batch, finished_at)))
    }

    /// Submits a consolidation: after `batch`'s current round (with the id derived from
    /// it, so a second submit returns the first), or on its own. A consolidation covers
    /// every unit not yet consolidated, whichever batch retained it. After a batch that
    /// is still open (or open again after `retry_batch`) it is `Error::Conflict`.
    pub async fn submit_consolidation(&self, after_batch: Option<OperationId>) -> Result<Receipt> {
        let Some(batch) = after_batch else {
            return self.submit_consolidate(None).await;
        };
        let parent = self.batch(batch).await?;
        if round_of(&parent).is_none() {
            return Err(Error::Conflict(format!(
                "batch {batch} is still open: its consolidation follows its last child"
            )));
        }
        self.submit_consolidate(Some(&parent)).await
    }

    /// Submits the consolidation of `batch`'s current round if the batch is finished and
    /// at least one of its children completed (retained its documents), whatever the
    /// others' outcome; `Ok(None)` otherwise. Idempotent per round: the handlers call it
    /// when a child's attempt ends, and an operator's cancel of the batch's last open
    /// children should call it too (`fascicle cancel` does).
    pub async fn consolidate_if_finished(&self, batch: OperationId) -> Result<Option<Receipt>> {
        let parent = self.batch(batch).await?;
        let retained = parent.children.is_some_and(|c| c.completed > 0);
        if round_of(&parent).is_none() || !retained {
            return Ok(None);
        }
        self.submit_consolidate(Some(&parent)).await.map(Some)
    }

    async fn submit_consolidate(&self, after: Option<&Operation>) -> Result<Receipt> {
        let payload = ConsolidatePayload {
            after_batch: after.map(|parent| parent.id),
            batch_finished_at: after.and_then(round_of),
        };
        let mut operation =
            NewOperation::new(CONSOLIDATE_KIND, serde_json::json!(payload)).with_max_attempts(5);
        if let (Some(batch), Some(finished_at)) = (payload.after_batch, payload.batch_finished_at) {
            operation = operation.with_id(Self::consolidation_id(batch, finished_at));
        }
        self.queue.submit(operation).await
    }

    /// The batch parent `batch`.
    async fn batch(&self, batch: OperationId) -> Result<Operation> {
        let parent = self
            .queue
            .store()
            .get(batch)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no batch with id {batch}")))?;
        if parent.children.is_none() {
            return Err(Error::InvalidInput(format!(
                "{batch} is a `{}` operation, not a batch",
                parent.kind
            )));
        }
        Ok(parent)
    }

    /// Retains `documents` now, outside the queue, in one transaction.
    pub async fn retain_now(&self, documents: Vec<Document>) -> Result<RetainReport> {
        match self.backend.run(Work::Retain(documents), None).await? {
            Done::Written(WorkReport::Retain(report)) => Ok(report),
            other => unreachable!("a retain without an operation wrote {other:?}"),
        }
    }

    /// Consolidates now, outside the queue, in one transaction.
    pub async fn consolidate_now(&self) -> Result<ConsolidateReport> {
        match self.backend.run(Work::Consolidate, None).await? {
            Done::Written(WorkReport::Consolidate(report)) => Ok(report),
            other => unreachable!("a consolidation without an operation wrote {other:?}"),
        }
    }

    /// Where a retain batch stands, with its completed children's reports added up.
    pub async fn batch_summary(&self, batch: OperationId) -> Result<BatchSummary> {
        let store = self.queue.store();
        let parent = self.batch(batch).await?;
        let counters = parent.children.unwrap_or_default();
        let mut retained = RetainReport::default();
        if parent.status.is_terminal() {
            for child in store.children_of(batch).await? {
                if let Some(report) = child
                    .result
                    .and_then(|r| serde_json::from_value::<RetainReport>(r).ok())
                {
                    retained.add(&report);
                }
            }
        }
        Ok(BatchSummary {
            batch_id: batch,
            status: parent.status,
            children: counters.total,
            completed: counters.completed,
            failed: counters.failed,
            cancelled: counters.cancelled,
            error: parent.error,
            retained,
        })
    }

    /// Handlers for `retain` and `consolidate`, each recording its completion in the
    /// transaction of its writes.
    ///
    /// When a `retain` attempt ends its batch, the batch's consolidation is submitted
    /// ([`consolidate_if_finished`](Self::consolidate_if_finished)). A successful attempt
    /// records its own completion, so it checks its batch right after. Any other end —
    /// an error, a panic, a timeout, a lost lease — is recorded by the worker (or a
    /// rescuer) only after the handler is gone, and no handler runs after the batch's
    /// last child; so the attempt leaves behind a follow-up that waits until that
    /// outcome is stored and then checks the batch. (Simpler than the alternatives: a
    /// handler recording its own failure would be counted as a success by the worker,
    /// and a wrapper around the store would not see which batches a rescue finished.)
    /// Either way the check reads the batch after the child's own outcome is stored, so
    /// of the children finishing last at least one sees the batch finished, and the id
    /// derived from the round makes however many of them see it submit one
    /// consolidation.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::new();
        let bank = self.clone();
        registry.register_recorded(
            RETAIN_KIND,
            move |payload: serde_json::Value, ctx: Context| {
                let bank = bank.clone();
                async move {
                    let mut end = AttemptEnd::new(&bank, &ctx);
                    // Decoded here, not by the registry, so that a payload that fails the
                    // child for good also leaves its follow-up behind.
                    let payload: RetainPayload = serde_json::from_value(payload).map_err(|e| {
                        HandlerError::permanent(format!(
                            "payload does not match the `{RETAIN_KIND}` handler's input: {e}"
                        ))
                    })?;
                    let parent = ctx.parent_id;
                    let done = bank
                        .backend
                        .run(Work::Retain(payload.documents), Some(ctx))
                        .await
                        .map_err(handler_error)?;
                    if let Done::Completed = done {
                        end.disarm();
                        if let Some(parent) = parent {
                            bank.after_child(parent).await;
                        }
                    }
                    Ok(done.applied())
                }
            },
        );
        let bank = self.clone();
        registry.register_recorded(
            CONSOLIDATE_KIND,
            move |_: ConsolidatePayload, ctx: Context| {
                let bank = bank.clone();
                async move {
                    let done = bank
                        .backend
                        .run(Work::Consolidate, Some(ctx))
                        .await
                        .map_err(handler_error)?;
                    Ok(done.applied())
                }
            },
        );
        registry
    }

    /// Runs a claimed `retain` or `consolidate` operation here, as a worker would, and
    /// records its completion in the transaction of its writes. `Applied::LeaseLost`
    /// means the claim was no longer valid and nothing was written. A completed `retain`
    /// child that finished its batch submits the batch's consolidation; a caller that
    /// records a failure itself (on an `Err`) should call
    /// [`consolidate_if_finished`](Self::consolidate_if_finished) after it.
    pub async fn run_claimed(&self, claimed: &ClaimedOperation) -> Result<Applied> {
        let op = &claimed.operation;
        let payload = op.payload.clone().unwrap_or_default();
        let work = match op.kind.as_str() {
            RETAIN_KIND => Work::Retain(
                serde_json::from_value::<RetainPayload>(payload)
                    .map_err(|e| Error::InvalidInput(format!("not a retain payload: {e}")))?
                    .documents,
            ),
            CONSOLIDATE_KIND => Work::Consolidate,
            other => {
                return Err(Error::InvalidInput(format!(
                    "`{other}` is not an operation of the memory bank"
                )));
            }
        };
        let done = self
            .backend
            .run(work, Some(Context::detached(claimed)))
            .await?;
        if let (Done::Completed, Some(parent)) = (done, op.parent_id)
            && op.kind == RETAIN_KIND
        {
            self.after_child(parent).await;
        }
        Ok(done.applied())
    }

    /// After a child's attempt ended (its outcome stored): if its batch is now finished,
    /// submit the batch's consolidation for this round (idempotently). A failure here is
    /// logged; `retain --wait`, `work --exit-when-idle` and any later consolidation
    /// (each covers every unit not yet consolidated) pick up whatever is left.
    async fn after_child(&self, batch: OperationId) {
        if let Err(error) = self.consolidate_if_finished(batch).await {
            tracing::warn!(%error, %batch, "submitting the batch's consolidation failed");
        }
    }

    /// Waits until the attempt `attempt` of `child` (a child of `batch`) has its outcome
    /// stored, then checks the batch, as [`after_child`](Self::after_child). Returns
    /// without checking when the child is pending again (a retry, or a release: a later
    /// attempt ends it) or held by a later attempt (which checks for itself).
    async fn after_attempt(&self, child: OperationId, attempt: u32, batch: OperationId) {
        let store = self.queue.store();
        let give_up = tokio::time::Instant::now() + FOLLOW_UP_FOR;
        let mut wait = Duration::from_millis(5);
        loop {
            tokio::time::sleep(wait).await;
            match store.get(child).await {
                Ok(Some(op)) if op.status.is_terminal() => return self.after_child(batch).await,
                // Not recorded yet.
                Ok(Some(op)) if op.status == Status::Processing && op.attempts == attempt => {}
                Ok(_) => return,
                Err(error) => tracing::warn!(%error, %child, "reading the child failed"),
            }
            if tokio::time::Instant::now() >= give_up {
                tracing::warn!(%child, %batch, "the attempt's outcome was not stored in time; not checking its batch");
                return;
            }
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
}

/// How long the follow-up of an attempt that did not record its own completion waits for
/// its outcome to be stored (the worker records it within milliseconds, or retries
/// through a store outage).
const FOLLOW_UP_FOR: Duration = Duration::from_secs(120);

/// The end of a `retain` attempt that did not record its own completion.
///
/// Armed while the attempt runs; disarmed only when the handler recorded the child's
/// completion itself (it then checks its batch at once). Dropped armed — the handler
/// returned an error, panicked, lost its lease, or was stopped by a timeout or a
/// shutdown — it spawns [`MemoryBank::after_attempt`]: whatever the worker records
/// (failed for good, cancelled, to be retried, released) is stored only after the
/// handler is gone, and when it is the batch's last transition no handler runs after it.
/// Checking on every such end rather than predicting which are final keeps it simple and
/// race-free (a cancellation can arrive after the handler returned); a follow-up that
/// finds the child pending again stops at once.
struct AttemptEnd {
    follow: Option<(MemoryBank, OperationId, u32, OperationId)>,
}

impl AttemptEnd {
    fn new(bank: &MemoryBank, ctx: &Context) -> Self {
        Self {
            follow: ctx
                .parent_id
                .map(|batch| (bank.clone(), ctx.id, ctx.attempt, batch)),
        }
    }

    fn disarm(&mut self) {
        self.follow = None;
    }
}

impl Drop for AttemptEnd {
    fn drop(&mut self) {
        let Some((bank, child, attempt, batch)) = self.follow.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { bank.after_attempt(child, attempt, batch).await });
            }
            Err(_) => {
                tracing::warn!(%child, %batch, "no runtime to follow the attempt up; its batch is not checked");
            }
        }
    }
}

/// The round of a finished batch: when it reached its terminal state; `None` while open.
fn round_of(parent: &Operation) -> Option<DateTime<Utc>> {
    parent
        .status
        .is_terminal()
        .then(|| parent.completed_at.unwrap_or(parent.updated_at))
}

/// A bijective 64-bit mix (the SplitMix64 finalizer), stable across builds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// About how much document text one `retain` child carries.
const CHILD_TEXT_BUDGET: usize = 1024 * 1024;

/// The largest payload the bank submits: one document alone may be this large.
const MAX_CHILD_PAYLOAD: usize = 64 * 1024 * 1024;

fn retain_child(documents: Vec<Document>, options: &RetainOptions) -> Result<NewOperation> {
    let payload = serde_json::to_value(RetainPayload { documents })
        .map_err(|e| Error::InvalidInput(format!("documents cannot be encoded: {e}")))?;
    Ok(NewOperation::new(RETAIN_KIND, payload).with_max_attempts(options.max_attempts))
}

fn handler_error(error: Error) -> HandlerError {
    if error.is_transient() {
        HandlerError::retryable(error)
    } else {
        HandlerError::permanent(error)
    }
}
