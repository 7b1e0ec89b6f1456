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

use fascicle::{
    Applied, BatchReceipt, Capabilities, ClaimedOperation, Context, Driver, Error, HandlerError,
    InProcessWaker, Limits, NewBatch, NewOperation, OperationId, Queue, Receipt, Registry, Result,
    Status, Store,
};
use serde::{Deserialize, Serialize};

pub use bank::{BankCounts, ConsolidateReport, RetainReport};
pub use documents::{Document, read_documents, split_units, terms};

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

    /// The id of the consolidation that follows `batch`.
    pub fn consolidation_id(batch: OperationId) -> OperationId {
        let mut bytes = *batch.as_uuid().as_bytes();
        for (b, mask) in bytes.iter_mut().zip(*b"fascicle-consol.") {
            *b ^= mask;
        }
        OperationId::from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }

    /// Submits a consolidation: after `batch` (with the id derived from it, so a second
    /// submit returns the first), or on its own.
    pub async fn submit_consolidation(&self, after_batch: Option<OperationId>) -> Result<Receipt> {
        let payload = serde_json::json!(ConsolidatePayload { after_batch });
        let mut operation = NewOperation::new(CONSOLIDATE_KIND, payload).with_max_attempts(5);
        if let Some(batch) = after_batch {
            operation = operation.with_id(Self::consolidation_id(batch));
        }
        self.queue.submit(operation).await
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
        let parent = store
            .get(batch)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no batch with id {batch}")))?;
        let Some(counters) = parent.children else {
            return Err(Error::InvalidInput(format!(
                "{batch} is a `{}` operation, not a batch",
                parent.kind
            )));
        };
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
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::new();
        let bank = self.clone();
        registry.register_recorded(RETAIN_KIND, move |payload: RetainPayload, ctx: Context| {
            let bank = bank.clone();
            async move {
                let parent = ctx.parent_id;
                let done = bank
                    .backend
                    .run(Work::Retain(payload.documents), Some(ctx))
                    .await
                    .map_err(handler_error)?;
                if let (Done::Completed, Some(parent)) = (done, parent) {
                    bank.after_child(parent).await;
                }
                Ok(done.applied())
            }
        });
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
    /// means the claim was no longer valid and nothing was written.
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
        Ok(done.applied())
    }

    /// After a child completed: if its batch is now finished, submit the batch's
    /// consolidation (idempotently). A failure here is logged; `retain --wait` and a
    /// later consolidation pick up whatever is left unconsolidated.
    async fn after_child(&self, batch: OperationId) {
        match self.queue.store().get(batch).await {
            Ok(Some(parent)) if parent.status.is_terminal() => {
                if let Err(error) = self.submit_consolidation(Some(batch)).await {
                    tracing::warn!(%error, %batch, "submitting the batch's consolidation failed");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, %batch, "reading the batch failed"),
        }
    }
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
