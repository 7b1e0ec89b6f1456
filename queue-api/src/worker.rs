//! The worker runtime: claims operations in batches, runs their handlers, heartbeats
//! their leases, records outcomes in batched transactions, rescues and reconciles
//! periodically, and shuts down gracefully.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::lifecycle::messages;
use crate::lifecycle::{
    Applied, ClaimRequest, ClaimedOperation, Completion, Lease, LeaseToken, Outcome, RetryPolicy,
};
use crate::notify::WakeSubscription;
use crate::queue::unstorable_json;
use crate::store::Store;
use crate::types::OperationId;

/// Why a handler failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// Worth another attempt (after a backoff), while attempts remain.
    Retryable(String),
    /// Retrying cannot help: the operation fails at once.
    Permanent(String),
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(error: impl fmt::Display) -> Self {
        Self::Retryable(error.to_string())
    }

    /// A permanent error.
    pub fn permanent(error: impl fmt::Display) -> Self {
        Self::Permanent(error.to_string())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable(e) | Self::Permanent(e) => f.write_str(e),
        }
    }
}

/// What a handler knows about the operation it runs.
#[derive(Clone, Debug)]
pub struct Context {
    /// The operation.
    pub id: OperationId,
    /// Its kind.
    pub kind: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The batch it belongs to.
    pub parent_id: Option<OperationId>,
    /// For a batch callback ([`NewBatch::on_success`](crate::NewBatch::on_success) and
    /// the others), the batch that fired it: its id, outcome, counters and error.
    pub batch: Option<crate::BatchInfo>,
    /// The token of this claim: a handler registered with
    /// [`Registry::register_recorded`] presents it when it records its own completion.
    pub lease_token: LeaseToken,
    cancel: Arc<CancelSignal>,
}

impl Context {
    /// The context of `claimed` run outside a [`Worker`] (by a custom runner or a
    /// test): it is never cancelled.
    pub fn detached(claimed: &ClaimedOperation) -> Self {
        let op = &claimed.operation;
        Self {
            id: op.id,
            kind: op.kind.clone(),
            attempt: op.attempts,
            max_attempts: op.max_attempts,
            parent_id: op.parent_id,
            batch: op.callback_for.clone(),
            lease_token: claimed.lease_token,
            cancel: Arc::default(),
        }
    }

    /// Whether cancellation was requested (or the lease was lost): the handler should
    /// stop and return an error.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_set()
    }

    /// Resolves when cancellation is requested.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.cancel.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// This attempt's successful completion with `result`, for a handler that records
    /// it itself (in the same transaction as its own writes) — see
    /// [`Registry::register_recorded`].
    pub fn completion(&self, result: Value) -> Completion {
        Completion {
            id: self.id,
            lease_token: self.lease_token,
            outcome: Outcome::Completed(result),
        }
    }

    /// Reports progress (for example `done` of `total` items) as a tracing event on the
    /// operation's span.
    pub fn progress(&self, done: u64, total: u64) {
        tracing::info!(operation = %self.id, done, total, "progress");
    }
}

/// What a handler produced: a result for the worker to record, or the proof that the
/// handler recorded its completion itself.
#[derive(Debug, PartialEq)]
enum Handled {
    Value(Value),
    Recorded(Applied),
}

/// One attempt's cancellation: a flag, and a wake-up for handlers awaiting it (lighter
/// than a channel; one is made per attempt).
#[derive(Debug, Default)]
struct CancelSignal {
    set: AtomicBool,
    notify: Notify,
}

impl CancelSignal {
    fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Handled, HandlerError>> + Send>>;
type ErasedHandler = Arc<dyn Fn(Value, Context) -> HandlerFuture + Send + Sync>;

/// Handlers by operation kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, ErasedHandler>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Registry {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`. The payload is deserialized into `P`; a payload
    /// that does not fit is a permanent failure. The handler's `Ok` value is stored as
    /// the operation's result.
    pub fn register<P, R, F, Fut>(&mut self, kind: impl Into<String>, handler: F) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(P, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, HandlerError>> + Send + 'static,
    {
        self.insert_erased(kind.into(), handler, |output: R| {
            take_as::<R, Value>(output)
                .or_else(|output| {
                    serde_json::to_value(output).map_err(|e| {
                        HandlerError::Permanent(format!("result cannot be serialized: {e}"))
                    })
                })
                .map(Handled::Value)
        })
    }

    /// Registers a handler that records its own successful completion, so that its
    /// writes and the operation's completion commit in **one** transaction (for example
    /// with `SqliteStore::transaction` + `fascicle_sqlite::complete_in`, or a Postgres
    /// transaction + `PostgresStore::complete_in`). It builds the completion with
    /// [`Context::completion`] and returns what the store answered: `Applied::LeaseLost`
    /// means its transaction must have been rolled back. An `Err` is recorded by the
    /// worker as usual (retry or failure), so the handler's transaction must not have
    /// committed anything when it returns one.
    pub fn register_recorded<P, F, Fut>(&mut self, kind: impl Into<String>, handler: F) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Applied, HandlerError>> + Send + 'static,
    {
        self.insert_erased(kind.into(), handler, |applied: Applied| {
            Ok(Handled::Recorded(applied))
        })
    }

    /// Stores `handler` for `kind` behind the payload decoding every handler shares;
    /// `finish` turns its `Ok` value into what the worker records.
    fn insert_erased<P, T, F, Fut>(
        &mut self,
        kind: String,
        handler: F,
        finish: fn(T) -> std::result::Result<Handled, HandlerError>,
    ) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        T: 'static,
        F: Fn(P, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |payload: Value, ctx: Context| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let input: P = decode_payload(payload, &ctx)?;
                finish(handler(input, ctx).await?)
            })
        });
        self.handlers.insert(kind, erased);
        self
    }

    /// The kinds with a handler, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}

/// The payload as the handler's input type; a mismatch is a permanent failure.
fn decode_payload<P: DeserializeOwned + 'static>(
    payload: Value,
    ctx: &Context,
) -> std::result::Result<P, HandlerError> {
    take_as(payload).or_else(|payload| {
        serde_json::from_value(payload).map_err(|e| {
            HandlerError::Permanent(format!(
                "payload does not match the `{}` handler's input: {e}",
                ctx.kind
            ))
        })
    })
}

/// `value` as a `T` when it already is one (a handler taking or returning
/// `serde_json::Value`), so it is not taken apart and rebuilt; otherwise `value` back.
fn take_as<V: 'static, T: 'static>(value: V) -> std::result::Result<T, V> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<T>>() {
        Some(same) => Ok(same.take().expect("the slot was just filled")),
        None => Err(slot.expect("the slot was not taken")),
    }
}

/// What a worker did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkerReport {
    /// Operations claimed.
    pub claimed: u64,
    /// Attempts that completed.
    pub completed: u64,
    /// Attempts that failed for good.
    pub failed: u64,
    /// Attempts that will be retried.
    pub retried: u64,
    /// Attempts that stopped on cancellation.
    pub cancelled: u64,
    /// Completions refused because the lease was lost (rescued or cancelled).
    pub lease_lost: u64,
    /// Operations released back to `pending` at shutdown.
    pub released: u64,
    /// Expired leases rescued by this worker's maintenance.
    pub rescued: u64,
    /// Outcomes the store would not record even as a failure, or that could not be
    /// recorded before the shutdown deadline: their leases were released or left to
    /// expire, so the operations run again.
    pub unrecorded: u64,
    /// Stranded parents finalized by this worker's maintenance.
    pub reconciled: u64,
    /// Maintenance rounds this worker ran (as the elected maintainer, or without an
    /// election).
    pub maintained: u64,
    /// Operations its maintenance pruned ([`Worker::prune_finished_after`]).
    pub pruned: u64,
}

struct Running {
    token: LeaseToken,
    cancel: Arc<CancelSignal>,
    abort: tokio::task::AbortHandle,
    /// A batch child: recording its end may have finalized the batch and fired callbacks.
    in_batch: bool,
}

/// Runs handlers for claimed operations.
///
/// Each handler is first polled on the worker's own task, right after the claim: a
/// handler that finishes without waiting costs no task of its own. Like any async code,
/// a handler should therefore not block before its first `.await` (move CPU-heavy or
/// blocking work to `tokio::task::spawn_blocking`).
///
/// ```no_run
/// # async fn example(store: std::sync::Arc<dyn fascicle::Store>) -> fascicle::Result<()> {
/// use fascicle::serde_json::Value;
/// use fascicle::{HandlerError, Registry, Worker, json};
///
/// let mut registry = Registry::new();
/// registry.register("retain", |doc: Value, _ctx| async move {
///     Ok::<_, HandlerError>(json!({ "stored": doc }))
/// });
/// let report = Worker::new(store, registry)
///     .concurrency(8)
///     .claim_batch(32)
///     .run(tokio::time::sleep(std::time::Duration::from_secs(60)))
///     .await?;
/// # Ok(()) }
/// ```
pub struct Worker {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    id: String,
    concurrency: usize,
    claim_batch: usize,
    lease: Duration,
    poll_interval: Duration,
    maintenance_interval: Duration,
    /// Whether the maintenance runs only in the elected worker (the default).
    elect_maintainer: bool,
    /// The maintainer prunes what finished longer ago than this.
    prune_after: Option<Duration>,
    shutdown_timeout: Duration,
    retry: RetryPolicy,
    completion_linger: Duration,
    attempt_timeout: Option<Duration>,
    queue_depth_interval: Option<Duration>,
    /// Schedules declared in code, stored (upserted) when the worker starts.
    schedules: Vec<crate::Schedule>,
    /// How often this worker runs a scheduler pass; `None`: never.
    scheduler_interval: Option<Duration>,
    /// The limits its schedules' ticks are submitted under.
    limits: crate::Limits,
    wake: Option<WakeSubscription>,
    /// Notified when a recorded completion ended a batch child: the claiming loop looks
    /// again at once, so a callback its batch fired does not wait for the poll interval.
    batch_moved: Arc<Notify>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("concurrency", &self.concurrency)
            .field("claim_batch", &self.claim_batch)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker for the kinds in `registry`, with defaults: concurrency 64, claim batch
    /// 64, lease 30 s (heartbeat every third of it), poll every 1 s, maintenance every
    /// 15 s, shutdown timeout 30 s, completion linger 2 ms, [`RetryPolicy::default`].
    pub fn new(store: Arc<dyn Store>, registry: Registry) -> Self {
        Self {
            store,
            registry: Arc::new(registry),
            id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            concurrency: 64,
            claim_batch: 64,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            maintenance_interval: Duration::from_secs(15),
            elect_maintainer: true,
            prune_after: None,
            shutdown_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            completion_linger: Duration::from_millis(2),
            attempt_timeout: None,
            queue_depth_interval: None,
            schedules: Vec::new(),
            scheduler_interval: Some(Duration::from_secs(1)),
            limits: crate::Limits::default(),
            wake: None,
            batch_moved: Arc::default(),
        }
    }

    /// The id recorded on claimed operations.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Handlers running at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Most operations claimed in one round trip.
    pub fn claim_batch(mut self, n: usize) -> Self {
        self.claim_batch = n.max(1);
        self
    }

    /// Lease length; heartbeats extend it every third of it. Clamped to between 30 ms and
    /// [`MAX_LEASE`](crate::MAX_LEASE) (7 days).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.clamp(Duration::from_millis(30), crate::MAX_LEASE);
        self
    }

    /// How often to look for work when no notification arrives.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How often the maintenance runs: rescuing expired leases, reconciling stranded
    /// parents, pruning ([`prune_finished_after`](Self::prune_finished_after)) and
    /// publishing the queue depth ([`queue_depth_interval`](Self::queue_depth_interval)).
    ///
    /// It runs in one worker at a time of all those sharing the store: the holder of
    /// [`MAINTENANCE_ROLE`](crate::MAINTENANCE_ROLE) ([`Store::elect`]), for a term of
    /// half the interval, renewed every fifth of it (the others read who holds it as
    /// often). A round runs in a task of its own, so the term is renewed while it runs;
    /// a maintainer that loses the role stops its round. When the maintainer stops, it
    /// resigns and the next worker takes over at its next try; when it dies, its term
    /// runs out and another takes over — within seven tenths of an interval either way
    /// — and runs the maintenance at once if a round is due. Give the workers of a store
    /// the same interval: the holder's term is half of its own. The worker's
    /// [`id`](Self::id) must then be a name (not blank, at most 255 bytes, no NUL), else
    /// [`run`](Self::run) is `InvalidInput`. On a store without elections (`Unsupported`)
    /// every worker maintains, as with
    /// [`without_maintenance_election`](Self::without_maintenance_election).
    pub fn maintenance_interval(mut self, interval: Duration) -> Self {
        self.maintenance_interval = interval;
        self
    }

    /// How long shutdown waits for running handlers before releasing them.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Backoff between attempts.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long the completion recorder waits after the first finished attempt for others
    /// to join the same transaction (default 2 ms): one commit for many completions.
    pub fn completion_linger(mut self, linger: Duration) -> Self {
        self.completion_linger = linger;
        self
    }

    /// Stops an attempt that runs longer than `timeout` (none by default): its handler
    /// future is dropped and the attempt is a retryable failure "timed out after …"
    /// (failed for good when it was the last attempt allowed).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Runs the maintenance in this worker whatever the others do, without an election
    /// (each round is safe beside another's: every change it makes is fenced).
    pub fn without_maintenance_election(mut self) -> Self {
        self.elect_maintainer = false;
        self
    }

    /// Lets the maintainer prune, each round, the terminal operations and whole batches
    /// that finished more than `age` ago ([`Store::prune`]; off by default, as
    /// `fascicle prune` is). At least 1 s.
    pub fn prune_finished_after(mut self, age: Duration) -> Self {
        self.prune_after = Some(age.max(Duration::from_secs(1)));
        self
    }

    /// Publishes the gauge `fascicle_queue_depth{kind, state}` from [`Store::stats`] every
    /// `interval` (off by default: `stats` counts every row). Only the elected
    /// maintainer publishes it, so it may be enabled on every worker.
    pub fn queue_depth_interval(mut self, interval: Duration) -> Self {
        self.queue_depth_interval = Some(interval);
        self
    }

    /// Declares a schedule ([`schedule`](crate::schedule)): stored when the worker starts —
    /// a new one created, one stored already updated, keeping its pause and its last tick
    /// — so every process that declares it runs the same one. An invalid schedule makes
    /// [`run`](Self::run) return `InvalidInput` before anything is claimed.
    pub fn schedule(mut self, schedule: crate::Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// How often this worker runs a scheduler pass over the store's due schedules (every
    /// second by default). Every worker may run it — a tick is one operation however many
    /// do — so a deployment needs no scheduler process of its own.
    pub fn scheduler_interval(mut self, interval: Duration) -> Self {
        self.scheduler_interval = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// The [`Limits`](crate::Limits) the schedules are checked and their ticks submitted
    /// under (the defaults unless set): give the ones the application's `Queue` uses.
    pub fn limits(mut self, limits: crate::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs no scheduler pass in this worker (others sharing the store may).
    pub fn without_scheduler(mut self) -> Self {
        self.scheduler_interval = None;
        self
    }

    /// Wakes the worker as soon as something is submitted (in-process notifications).
    pub fn wake_on(mut self, subscription: WakeSubscription) -> Self {
        self.wake = Some(subscription);
        self
    }

    /// Runs until `shutdown` resolves, then stops claiming, waits up to the shutdown
    /// timeout for running handlers and releases what is left to `pending` without
    /// spending an attempt.
    ///
    /// It returns within about twice the shutdown timeout (at least the timeout plus two
    /// seconds), even when the store is down or hangs: after the deadline the completions
    /// still waiting are tried once more and the leases left are released, each step
    /// bounded by the shutdown timeout (at least 1 s); outcomes that cannot be recorded by
    /// then are released or left to expire, and counted in [`WorkerReport::unrecorded`].
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<WorkerReport> {
        if self.elect_maintainer {
            let (_, term) = maintenance_rhythm(self.maintenance_interval);
            crate::validate_election(crate::MAINTENANCE_ROLE, &self.id, term).map_err(|e| match e {
                Error::InvalidInput(reason) => Error::InvalidInput(format!(
                    "worker id {:?} cannot stand for the maintenance ({reason}): give Worker::id a \
                     name (not blank, at most 255 bytes, no NUL), or use \
                     without_maintenance_election()",
                    self.id
                )),
                other => other,
            })?;
        }
        let queue = crate::Queue::new(Arc::clone(&self.store)).with_limits(self.limits);
        for schedule in &self.schedules {
            crate::schedule::put(&queue, schedule).await?;
        }
        let report = Arc::new(Mutex::new(WorkerReport::default()));
        let running: Arc<Mutex<HashMap<OperationId, Running>>> = Arc::default();
        let freed = Arc::new(Notify::new());
        // Handlers still running; capacity frees as soon as a handler returns, while its
        // completion is recorded in the background (its lease stays in `running` until then).
        let active = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let (stop_tx, stop_rx) = watch::channel(false);
        // Set at the shutdown deadline: the recorder stops retrying what the store refuses
        // for now.
        let (give_up_tx, give_up_rx) = watch::channel(false);

        let mut completer = tokio::spawn(record_completions(
            Arc::clone(&self.store),
            done_rx,
            Arc::clone(&running),
            LoopWake {
                freed: Arc::clone(&freed),
                batch_moved: Arc::clone(&self.batch_moved),
            },
            Arc::clone(&report),
            self.completion_linger,
            give_up_rx,
        ));
        let heartbeat = tokio::spawn(heartbeat_leases(
            Arc::clone(&self.store),
            Arc::clone(&running),
            self.lease,
            stop_rx.clone(),
        ));
        let maintaining = Arc::new(AtomicBool::new(false));
        let stood = Arc::new(AtomicBool::new(false));
        let maintenance = tokio::spawn(maintain(
            Maintenance {
                store: Arc::clone(&self.store),
                every: self.maintenance_interval,
                report: Arc::clone(&report),
                candidate: self.elect_maintainer.then(|| self.id.clone()),
                prune_after: self.prune_after,
                maintaining: Arc::clone(&maintaining),
                stood: Arc::clone(&stood),
            },
            stop_rx.clone(),
        ));
        let queue_depth = self.queue_depth_interval.map(|every| {
            tokio::spawn(publish_queue_depth(
                Arc::clone(&self.store),
                every,
                Arc::clone(&maintaining),
                stop_rx.clone(),
            ))
        });

        let scheduler = self
            .scheduler_interval
            .map(|every| tokio::spawn(run_schedules(queue, every, stop_rx.clone())));

        let kinds = self.registry.kinds();
        let mut shutdown = std::pin::pin!(shutdown);
        // Claim when at least half a batch of slots is free (or nothing runs): one round
        // trip for many operations instead of one per finished handler.
        let threshold = (self.concurrency.min(self.claim_batch) / 2).max(1);
        loop {
            let running_now = active.load(Ordering::SeqCst);
            let free = self.concurrency.saturating_sub(running_now);
            let mut claimed_full_batch = false;
            let mut ended_batch_children = false;
            let room = free >= threshold || (free > 0 && running_now == 0);
            if room {
                let request = ClaimRequest {
                    worker_id: self.id.clone(),
                    limit: free.min(self.claim_batch),
                    lease: self.lease,
                    kinds: Some(kinds.clone()),
                };
                match self.store.claim(&request).await {
                    Ok(claimed) => {
                        claimed_full_batch = claimed.len() == request.limit;
                        report.lock().expect("report").claimed += claimed.len() as u64;
                        metrics::counter!("fascicle_claimed_total").increment(claimed.len() as u64);
                        let mut finished = Vec::new();
                        ended_batch_children =
                            claimed.iter().any(|c| c.operation.parent_id.is_some());
                        for op in claimed {
                            finished.extend(
                                self.spawn_handler(
                                    op, &running, &done_tx, &active, &freed, &report,
                                ),
                            );
                        }
                        // Outcomes of handlers that finished on their first poll are
                        // recorded here in one transaction; if that fails, the recorder
                        // task takes them over and retries.
                        ended_batch_children &= !finished.is_empty();
                        if !finished.is_empty() {
                            match self.store.complete(&finished).await {
                                Ok(results) => tally(&report, &finished, &results),
                                Err(error) => {
                                    tracing::warn!(%error, "recording completions failed; handing them to the recorder");
                                    for completion in finished {
                                        let _ = done_tx.send(completion);
                                    }
                                }
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, worker = %self.id, "claim failed; retrying after the poll interval");
                    }
                }
            }
            if claimed_full_batch || ended_batch_children {
                // More work is likely waiting (or a batch just ended and fired its
                // callbacks); claim again unless asked to stop.
                if futures_poll_ready(&mut shutdown) {
                    break;
                }
                continue;
            }
            let wake = async {
                match self.wake.as_mut() {
                    Some(sub) => sub.woken().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = wake => {}
                () = self.batch_moved.notified() => {}
                () = freed.notified(), if !room => {}
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }

        // Graceful shutdown: stop claiming, let handlers finish within the timeout.
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        loop {
            if running.lock().expect("running set").is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, freed.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let left: Vec<(OperationId, Running)> =
            running.lock().expect("running set").drain().collect();
        let mut leases: Vec<Lease> = left
            .iter()
            .map(|(id, r)| {
                r.cancel.set();
                r.abort.abort();
                Lease {
                    id: *id,
                    token: r.token,
                }
            })
            .collect();
        let _ = stop_tx.send(true);
        drop(done_tx);
        // The recorder writes what is queued; past the deadline it tries each batch once
        // more and hands back what the store would not take.
        // Each step after the deadline gets this long at most: a store that hangs (a
        // stalled connection) cannot hold shutdown back.
        let grace = self.shutdown_timeout.max(Duration::from_secs(1));
        let unrecorded = match tokio::time::timeout_at(deadline, &mut completer).await {
            Ok(finished) => finished.unwrap_or_default(),
            Err(_) => {
                let _ = give_up_tx.send(true);
                match tokio::time::timeout(grace, &mut completer).await {
                    Ok(finished) => finished.unwrap_or_default(),
                    Err(_) => {
                        // What it still held is not known here: those leases expire and
                        // a rescuer takes the operations back.
                        completer.abort();
                        tracing::warn!(
                            "recording completions did not finish after the shutdown deadline; their leases are left to expire"
                        );
                        Vec::new()
                    }
                }
            }
        };
        for c in unrecorded {
            if !leases
                .iter()
                .any(|l| l.id == c.id && l.token == c.lease_token)
            {
                leases.push(Lease {
                    id: c.id,
                    token: c.lease_token,
                });
            }
        }
        if !leases.is_empty() {
            match tokio::time::timeout(grace, self.store.release(&leases)).await {
                Ok(Ok(released)) => report.lock().expect("report").released += released,
                // The leases expire and a rescuer takes the operations back.
                Ok(Err(error)) => tracing::warn!(%error, "releasing leases at shutdown failed"),
                Err(_) => tracing::warn!("releasing leases at shutdown did not finish in time"),
            }
        }
        // Background calls in flight (a heartbeat, a rescue, a statistics query) are not
        // waited for.
        heartbeat.abort();
        maintenance.abort();
        let _ = heartbeat.await;
        let _ = maintenance.await;
        if stood.load(Ordering::SeqCst) {
            // The next worker takes over at its next try, not when the term runs out.
            let resign = self.store.resign(crate::MAINTENANCE_ROLE, &self.id);
            match tokio::time::timeout(grace, resign).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "resigning the maintenance failed"),
                Err(_) => tracing::warn!("resigning the maintenance did not finish in time"),
            }
        }
        if let Some(scheduler) = scheduler {
            scheduler.abort();
            let _ = scheduler.await;
        }
        if let Some(queue_depth) = queue_depth {
            queue_depth.abort();
            let _ = queue_depth.await;
        }
        let report = *report.lock().expect("report");
        Ok(report)
    }

    fn spawn_handler(
        &self,
        claimed: ClaimedOperation,
        running: &Arc<Mutex<HashMap<OperationId, Running>>>,
        done: &mpsc::UnboundedSender<Completion>,
        active: &Arc<AtomicUsize>,
        freed: &Arc<Notify>,
        report: &Arc<Mutex<WorkerReport>>,
    ) -> Option<Completion> {
        let op = claimed.operation;
        let token = claimed.lease_token;
        let in_batch = op.parent_id.is_some();
        let Some(handler) = self.registry.handlers.get(&op.kind) else {
            // Claims ask only for registered kinds; a driver that ignored the filter gets
            // the operation failed rather than silently dropped.
            return Some(Completion {
                id: op.id,
                lease_token: token,
                outcome: Outcome::Failed(format!(
                    "no handler is registered for kind `{}`",
                    op.kind
                )),
            });
        };
        let span =
            tracing::info_span!("operation", id = %op.id, kind = %op.kind, attempt = op.attempts);
        let cancel = Arc::new(CancelSignal::default());
        let ctx = Context {
            id: op.id,
            kind: op.kind,
            attempt: op.attempts,
            max_attempts: op.max_attempts,
            parent_id: op.parent_id,
            batch: op.callback_for,
            lease_token: token,
            cancel: Arc::clone(&cancel),
        };
        let retry = self.retry;
        let payload = op.payload.unwrap_or(Value::Null);
        let attempt = op.attempts;
        let max_attempts = op.max_attempts;
        let id = op.id;
        let cancelled = Arc::clone(&cancel);
        let timeout = op.timeout.or(self.attempt_timeout);
        let started = tokio::time::Instant::now();
        let mut attempt_future = CatchUnwind(handler(payload, ctx));
        // Fast path: poll the handler once right here. One that finishes without waiting
        // (many do) costs no task at all; its outcome goes straight to the recorder.
        let first = {
            let _entered = span.enter();
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            Pin::new(&mut attempt_future).poll(&mut cx)
        };
        if let std::task::Poll::Ready(finished) = first {
            return match outcome_of(finished, &cancelled, attempt, max_attempts, &retry) {
                Finished::Record(outcome) => Some(Completion {
                    id,
                    lease_token: token,
                    outcome,
                }),
                Finished::Recorded(applied) => {
                    tally_recorded(report, applied);
                    None
                }
            };
        }
        let (report, running_set) = (Arc::clone(report), Arc::clone(running));
        let batch_moved = Arc::clone(&self.batch_moved);
        let done = done.clone();
        // Hold the lock while spawning so the task cannot finish before it is recorded.
        let mut running = running.lock().expect("running set");
        active.fetch_add(1, Ordering::SeqCst);
        let (active, freed) = (Arc::clone(active), Arc::clone(freed));
        // The rest of the attempt runs as one task, its panics caught by `CatchUnwind`.
        // Aborting the task at shutdown stops the handler and sends no outcome (the
        // lease is released instead).
        let task = tokio::spawn(
            async move {
                let finished = match timeout {
                    None => attempt_future.await,
                    Some(limit) => tokio::time::timeout_at(started + limit, attempt_future)
                        .await
                        .unwrap_or_else(|_| {
                            Ok(Err(HandlerError::Retryable(messages::attempt_timed_out(
                                limit,
                            ))))
                        }),
                };
                active.fetch_sub(1, Ordering::SeqCst);
                freed.notify_one();
                match outcome_of(finished, &cancelled, attempt, max_attempts, &retry) {
                    Finished::Record(outcome) => {
                        let _ = done.send(Completion {
                            id,
                            lease_token: token,
                            outcome,
                        });
                    }
                    Finished::Recorded(applied) => {
                        tally_recorded(&report, applied);
                        if in_batch {
                            batch_moved.notify_one();
                        }
                        let mut running = running_set.lock().expect("running set");
                        if running.get(&id).is_some_and(|r| r.token == token) {
                            running.remove(&id);
                        }
                        drop(running);
                        freed.notify_one();
                    }
                }
            }
            .instrument(span),
        );
        let abort = task.abort_handle();
        running.insert(
            id,
            Running {
                token,
                cancel,
                abort,
                in_batch,
            },
        );
        None
    }
}

/// What is left to do about a finished attempt.
enum Finished {
    /// Record this outcome.
    Record(Outcome),
    /// The handler recorded its completion itself.
    Recorded(Applied),
}

/// How an attempt ended, from what its handler returned (or the panic it raised).
fn outcome_of(
    finished: std::thread::Result<std::result::Result<Handled, HandlerError>>,
    cancelled: &CancelSignal,
    attempt: u32,
    max_attempts: u32,
    retry: &RetryPolicy,
) -> Finished {
    Finished::Record(storable(match finished {
        Ok(Ok(Handled::Recorded(applied))) => return Finished::Recorded(applied),
        Ok(Ok(Handled::Value(value))) => Outcome::Completed(value),
        Ok(Err(_)) | Err(_) if cancelled.is_set() => {
            Outcome::Cancelled(messages::CANCELLATION_REQUESTED.into())
        }
        Ok(Err(HandlerError::Permanent(error))) => Outcome::Failed(error),
        Ok(Err(HandlerError::Retryable(error))) => {
            retry_or_fail(error, attempt, max_attempts, retry)
        }
        Err(panic) => retry_or_fail(
            format!("handler panicked: {}", panic_text(panic.as_ref())),
            attempt,
            max_attempts,
            retry,
        ),
    }))
}

/// The longest error text recorded; a longer one is cut (at a character boundary).
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// `outcome` as every store can hold it: a result no backend can store (the rule submit
/// applies to payloads) fails the operation with a readable reason instead, and error
/// texts lose their NUL characters and are cut to [`MAX_ERROR_BYTES`].
fn storable(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Completed(value) => match unstorable_json(&value) {
            Some(reason) => Outcome::Failed(messages::unstorable_outcome(&format!(
                "the result cannot be stored: {reason}"
            ))),
            None => Outcome::Completed(value),
        },
        Outcome::Failed(error) => Outcome::Failed(storable_text(error)),
        Outcome::Cancelled(reason) => Outcome::Cancelled(storable_text(reason)),
        Outcome::Retry { error, run_at } => Outcome::Retry {
            error: storable_text(error),
            run_at,
        },
    }
}

/// Error text every store can hold: NUL becomes U+FFFD, and it is cut to
/// [`MAX_ERROR_BYTES`].
fn storable_text(mut text: String) -> String {
    if text.contains('\0') {
        text = text.replace('\0', "\u{FFFD}");
    }
    if text.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("… (cut)");
    }
    text
}

fn retry_or_fail(error: String, attempt: u32, max_attempts: u32, retry: &RetryPolicy) -> Outcome {
    if attempt >= max_attempts {
        Outcome::Failed(format!(
            "{error} (attempt {attempt} of {max_attempts}; no attempts left)"
        ))
    } else {
        let wait = chrono::Duration::from_std(retry.backoff(attempt)).unwrap_or_default();
        Outcome::Retry {
            error,
            run_at: Utc::now() + wait,
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Resolves to the inner future's output, or to the panic it raised while polled.
/// (Handler futures are already boxed, so it holds them as they are.)
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = Pin::new(&mut self.0);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(output)) => std::task::Poll::Ready(Ok(output)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Whether a pinned future is already complete, without waiting.
fn futures_poll_ready<F: Future<Output = ()>>(future: &mut Pin<&mut F>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    future.as_mut().poll(&mut cx).is_ready()
}

const COMPLETION_BATCH: usize = 256;

/// Counts recorded outcomes into the report and the metrics.
fn tally(report: &Mutex<WorkerReport>, batch: &[Completion], results: &[Applied]) {
    // Counted locally, then added to the report and the metrics once per batch.
    let mut add = WorkerReport::default();
    for (completion, applied) in batch.iter().zip(results) {
        let counter = match (applied, &completion.outcome) {
            (Applied::LeaseLost, _) => &mut add.lease_lost,
            (_, Outcome::Completed(_)) => &mut add.completed,
            (_, Outcome::Failed(_)) => &mut add.failed,
            (_, Outcome::Retry { .. }) => &mut add.retried,
            (_, Outcome::Cancelled(_)) => &mut add.cancelled,
        };
        *counter += 1;
    }
    let mut guard = report.lock().expect("report");
    let report = &mut *guard;
    for (total, n, name) in [
        (
            &mut report.lease_lost,
            add.lease_lost,
            "fascicle_lease_lost_total",
        ),
        (
            &mut report.completed,
            add.completed,
            "fascicle_completed_total",
        ),
        (&mut report.failed, add.failed, "fascicle_failed_total"),
        (&mut report.retried, add.retried, "fascicle_retried_total"),
        (
            &mut report.cancelled,
            add.cancelled,
            "fascicle_cancelled_total",
        ),
    ] {
        if n > 0 {
            *total += n;
            metrics::counter!(name).increment(n);
        }
    }
}

/// Counts a completion a handler recorded itself (always a success, see
/// [`Registry::register_recorded`]).
fn tally_recorded(report: &Mutex<WorkerReport>, applied: Applied) {
    let mut report = report.lock().expect("report");
    if applied == Applied::LeaseLost {
        report.lease_lost += 1;
        metrics::counter!("fascicle_lease_lost_total").increment(1);
    } else {
        report.completed += 1;
        metrics::counter!("fascicle_completed_total").increment(1);
    }
}

/// What the recorder wakes the claiming loop with: capacity freed, and a batch child
/// ended (its batch may have fired callbacks).
struct LoopWake {
    freed: Arc<Notify>,
    batch_moved: Arc<Notify>,
}

/// Records finished attempts in batched transactions until the channel closes; returns
/// the completions it could not record (the caller releases their leases).
async fn record_completions(
    store: Arc<dyn Store>,
    mut done: mpsc::UnboundedReceiver<Completion>,
    running: Arc<Mutex<HashMap<OperationId, Running>>>,
    wake: LoopWake,
    report: Arc<Mutex<WorkerReport>>,
    linger: Duration,
    mut give_up: watch::Receiver<bool>,
) -> Vec<Completion> {
    let LoopWake { freed, batch_moved } = wake;
    let mut batch = Vec::with_capacity(COMPLETION_BATCH);
    let mut unrecorded = Vec::new();
    while done.recv_many(&mut batch, COMPLETION_BATCH).await > 0 {
        // Let the attempts finishing right behind this one share its transaction.
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < COMPLETION_BATCH {
            let room = COMPLETION_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, done.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let results = record(&*store, &mut batch, &mut give_up).await;
        let (mut recorded, mut applied) = (Vec::new(), Vec::new());
        for (completion, result) in batch.drain(..).zip(results) {
            match result {
                Some(a) => {
                    recorded.push(completion);
                    applied.push(a);
                }
                None => unrecorded.push(completion),
            }
        }
        tally(&report, &recorded, &applied);
        let mut moved_a_batch = false;
        {
            let mut running = running.lock().expect("running set");
            moved_a_batch |= recorded
                .iter()
                .any(|c| running.get(&c.id).is_some_and(|r| r.in_batch));
            // Unrecorded ones leave the set too: no more heartbeats, so their leases
            // expire and a rescuer takes the operations back if nobody releases them.
            for completion in recorded.iter().chain(&unrecorded) {
                if running
                    .get(&completion.id)
                    .is_some_and(|r| r.token == completion.lease_token)
                {
                    running.remove(&completion.id);
                }
            }
        }
        if moved_a_batch {
            // A batch may have ended and fired callbacks: the claiming loop looks again.
            batch_moved.notify_one();
        }
        // One waiter (the claiming loop); a stored permit also covers a loop not yet waiting.
        freed.notify_one();
    }
    if !unrecorded.is_empty() {
        report.lock().expect("report").unrecorded += unrecorded.len() as u64;
        metrics::counter!("fascicle_unrecorded_total").increment(unrecorded.len() as u64);
    }
    unrecorded
}

/// Records `batch`, isolating what the store refuses: any error but a refusal is retried
/// with backoff (until `give_up`); a refused batch (`Error::InvalidInput`: the store
/// cannot hold an outcome) is split and its completions recorded one by one; a refused
/// completion is recorded as its operation's failure instead (its outcome in `batch` is
/// replaced, so it is counted as what was stored). Per completion: what the store
/// answered, or `None` when it could not be recorded.
async fn record(
    store: &dyn Store,
    batch: &mut [Completion],
    give_up: &mut watch::Receiver<bool>,
) -> Vec<Option<Applied>> {
    let refused = match complete_retrying(store, batch, give_up).await {
        Ok(results) => return results.into_iter().map(Some).collect(),
        Err(None) => return vec![None; batch.len()],
        Err(Some(refused)) => refused,
    };
    if *give_up.borrow() {
        return vec![None; batch.len()];
    }
    if batch.len() > 1 {
        let mut results = Vec::with_capacity(batch.len());
        for one in batch.chunks_mut(1) {
            results.extend(Box::pin(record(store, one, give_up)).await);
        }
        return results;
    }
    tracing::error!(id = %batch[0].id, error = %refused, "the store refused an outcome; recording a failure instead");
    let failure = Outcome::Failed(storable_text(messages::unstorable_outcome(
        &refused.to_string(),
    )));
    if batch[0].outcome == failure {
        return vec![None];
    }
    batch[0].outcome = failure;
    match complete_retrying(store, batch, give_up).await {
        Ok(results) => results.into_iter().map(Some).collect(),
        Err(error) => {
            if let Some(error) = error {
                tracing::error!(id = %batch[0].id, %error, "the store refused the failure too; the lease is left to expire");
            }
            vec![None]
        }
    }
}

/// `store.complete(batch)`, retried with backoff on every error but a refusal of the
/// outcomes themselves (`Error::InvalidInput`). An unavailable, locked, read-only or
/// misconfigured store is waited for: an outcome is never turned into a failure because
/// the store had trouble. `Err(None)` when `give_up` was set (or the worker is gone)
/// before it succeeded; `Err(Some(error))` when the store refused.
async fn complete_retrying(
    store: &dyn Store,
    batch: &[Completion],
    give_up: &mut watch::Receiver<bool>,
) -> std::result::Result<Vec<Applied>, Option<Error>> {
    let mut wait = Duration::from_millis(50);
    loop {
        match store.complete(batch).await {
            Ok(results) => return Ok(results),
            Err(error @ Error::InvalidInput(_)) => return Err(Some(error)),
            Err(error) => {
                // The outcomes are safe to write again: each names its lease token.
                if error.is_transient() {
                    tracing::warn!(%error, "recording completions failed; retrying");
                } else {
                    tracing::error!(%error, "recording completions failed; retrying until the store recovers");
                }
                if *give_up.borrow() {
                    return Err(None);
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    // Set, or the worker is gone: give up either way.
                    _ = give_up.changed() => return Err(None),
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn heartbeat_leases(
    store: Arc<dyn Store>,
    running: Arc<Mutex<HashMap<OperationId, Running>>>,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = lease / 3;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
        let leases: Vec<Lease> = running
            .lock()
            .expect("running set")
            .iter()
            .map(|(id, r)| Lease {
                id: *id,
                token: r.token,
            })
            .collect();
        if leases.is_empty() {
            continue;
        }
        match store.heartbeat(&leases, lease).await {
            Ok(statuses) => {
                let running = running.lock().expect("running set");
                for (l, status) in leases.iter().zip(statuses) {
                    // Matched by lease token too: a reply about an attempt that has
                    // since ended must not cancel a new attempt of the same operation.
                    if (!status.held || status.cancel_requested)
                        && let Some(r) = running.get(&l.id)
                        && r.token == l.token
                    {
                        r.cancel.set();
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
    }
}

/// The maintenance's rhythm for an interval: a try for the role every fifth of it, a term
/// of half of it (at least three tries, at most [`MAX_LEASE`](crate::MAX_LEASE)) — so a
/// holder renews twice or more per term, and a dead holder's role is taken within
/// seven tenths of an interval.
fn maintenance_rhythm(every: Duration) -> (Duration, Duration) {
    let tick = (every / 5).max(Duration::from_millis(10));
    let term = (every / 2).max(tick * 3).min(crate::MAX_LEASE);
    (tick, term)
}

/// What the maintenance task needs.
struct Maintenance {
    store: Arc<dyn Store>,
    every: Duration,
    report: Arc<Mutex<WorkerReport>>,
    /// This worker's id, to stand for [`MAINTENANCE_ROLE`](crate::MAINTENANCE_ROLE);
    /// `None`: maintain without an election.
    candidate: Option<String>,
    prune_after: Option<Duration>,
    /// Whether this worker is the maintainer now.
    maintaining: Arc<AtomicBool>,
    /// Whether it may hold the role (it stood for it): it resigns at shutdown.
    stood: Arc<AtomicBool>,
}

impl Maintenance {
    /// Stands for the role — renews it when holding it; when not, looks at the holder
    /// first (a read) and stands only when there is none — and updates `maintaining`.
    async fn stand(&mut self, term: Duration) {
        let Some(candidate) = self.candidate.clone() else {
            self.set_maintaining(true);
            return;
        };
        let role = crate::MAINTENANCE_ROLE;
        let held = if self.maintaining.load(Ordering::SeqCst) {
            self.store.elect(role, &candidate, term).await
        } else {
            match self.store.leader(role).await {
                Ok(Some(holder)) if holder != candidate => Ok(false),
                Ok(_) => {
                    self.stood.store(true, Ordering::SeqCst);
                    self.store.elect(role, &candidate, term).await
                }
                Err(e) => Err(e),
            }
        };
        let held = match held {
            Ok(held) => held,
            Err(Error::Unsupported { .. }) => {
                tracing::info!(
                    driver = self.store.driver(),
                    "the store holds no elections: this worker maintains without one"
                );
                self.candidate = None;
                self.stood.store(false, Ordering::SeqCst);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "standing for the maintenance failed; not maintaining until it succeeds");
                false
            }
        };
        self.set_maintaining(held);
    }

    fn set_maintaining(&self, held: bool) {
        if self.maintaining.swap(held, Ordering::SeqCst) != held {
            let worker = self.candidate.clone().unwrap_or_default();
            tracing::info!(
                %worker,
                "{}",
                if held {
                    "this worker now runs the maintenance"
                } else {
                    "another worker runs the maintenance now"
                }
            );
            metrics::gauge!("fascicle_maintainer", "worker" => worker).set(if held {
                1.0
            } else {
                0.0
            });
        }
    }

    /// One round: rescue, reconcile, prune.
    async fn round(
        store: Arc<dyn Store>,
        report: Arc<Mutex<WorkerReport>>,
        prune_after: Option<Duration>,
    ) {
        match store.rescue_expired_leases().await {
            Ok(rescued) => {
                let n = rescued.requeued + rescued.failed + rescued.cancelled;
                report.lock().expect("report").rescued += n;
                metrics::counter!("fascicle_rescued_total").increment(n);
            }
            Err(error) => tracing::warn!(%error, "rescuing expired leases failed"),
        }
        match store.reconcile_orphan_parents().await {
            Ok(reconciled) => {
                report.lock().expect("report").reconciled +=
                    reconciled.empty_parents_failed + reconciled.parents_finalized;
            }
            Err(error) => tracing::warn!(%error, "reconciling parents failed"),
        }
        if let Some(age) = prune_after {
            let before =
                Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            match store.prune(before).await {
                Ok(pruned) => {
                    let n = pruned.operations;
                    report.lock().expect("report").pruned += n;
                    metrics::counter!("fascicle_pruned_total").increment(n);
                }
                Err(error) => tracing::warn!(%error, "pruning failed"),
            }
        }
        report.lock().expect("report").maintained += 1;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn maintain(mut m: Maintenance, mut stop: watch::Receiver<bool>) {
    // Stand for the role five times an interval; start a round when one is due. The
    // round runs in a task of its own, so that the term is renewed while it runs, and it
    // is stopped when the role is lost (its open transaction rolls back) or the worker
    // stops. The first round is one interval after the start, as a worker always did.
    let (tick, term) = maintenance_rhythm(m.every);
    let tick = if m.candidate.is_some() { tick } else { m.every };
    let mut last_round = tokio::time::Instant::now();
    let mut running: Option<AbortOnDrop> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(tick) => {}
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = m.stand(term) => {}
        }
        if !m.maintaining.load(Ordering::SeqCst) {
            // Lost the role: a round still running stops here.
            running = None;
            continue;
        }
        if running.as_ref().is_some_and(|r| !r.0.is_finished()) || last_round.elapsed() < m.every {
            continue;
        }
        last_round = tokio::time::Instant::now();
        running = Some(AbortOnDrop(tokio::spawn(Maintenance::round(
            Arc::clone(&m.store),
            Arc::clone(&m.report),
            m.prune_after,
        ))));
    }
    drop(running);
    m.set_maintaining(false);
}

/// The scheduler pass of a worker, every `every` until stopped
/// ([`schedule::run_due`](crate::schedule::run_due)).
async fn run_schedules(queue: crate::Queue, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        match crate::schedule::run_due(&queue, chrono::Utc::now()).await {
            Ok(pass) if pass.submitted > 0 => {
                metrics::counter!("fascicle_scheduled_total").increment(pass.submitted);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "a scheduler pass failed; trying again"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

async fn publish_queue_depth(
    store: Arc<dyn Store>,
    every: Duration,
    maintaining: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    // The kinds this worker published: zeroed when another worker takes over.
    let mut published: std::collections::BTreeSet<String> = Default::default();
    loop {
        // Published by the maintainer only: one `stats` per interval for a deployment.
        if maintaining.load(Ordering::SeqCst) {
            match store.stats().await {
                Ok(stats) => {
                    for (kind, k) in &stats.kinds {
                        metrics::gauge!("fascicle_queue_depth", "kind" => kind.clone(), "state" => "ready")
                            .set(k.ready as f64);
                        metrics::gauge!("fascicle_queue_depth", "kind" => kind.clone(), "state" => "processing")
                            .set(k.processing as f64);
                        published.insert(kind.clone());
                    }
                }
                Err(error) => tracing::warn!(%error, "reading queue depth failed"),
            }
        } else {
            for kind in std::mem::take(&mut published) {
                for state in ["ready", "processing"] {
                    metrics::gauge!("fascicle_queue_depth", "kind" => kind.clone(), "state" => state)
                        .set(0.0);
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_as_passes_values_of_the_same_type_through_and_returns_others() {
        assert_eq!(
            take_as::<Value, Value>(serde_json::json!({ "a": 1 })),
            Ok(serde_json::json!({ "a": 1 }))
        );
        assert_eq!(
            take_as::<Value, String>(serde_json::json!("text")),
            Err(serde_json::json!("text"))
        );
    }

    #[test]
    fn typed_handlers_still_deserialize_and_reject_mismatched_payloads() {
        #[derive(serde::Deserialize)]
        struct Input {
            n: u32,
        }
        let mut registry = Registry::new();
        registry.register("double", |input: Input, _| async move {
            Ok::<_, HandlerError>(input.n * 2)
        });
        let handler = registry.handlers["double"].clone();
        let ctx = Context {
            id: OperationId::new(),
            kind: "double".into(),
            attempt: 1,
            max_attempts: 1,
            parent_id: None,
            batch: None,
            lease_token: LeaseToken::new(),
            cancel: Arc::default(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ok = runtime.block_on(handler(serde_json::json!({ "n": 21 }), ctx.clone()));
        assert_eq!(ok, Ok(Handled::Value(serde_json::json!(42))));
        let err = runtime.block_on(handler(serde_json::json!({ "m": 1 }), ctx));
        assert!(
            matches!(&err, Err(HandlerError::Permanent(m)) if m.contains("does not match the `double` handler's input")),
            "{err:?}"
        );
    }
}
