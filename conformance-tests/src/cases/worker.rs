//! The worker runtime on every driver: outcomes a store cannot hold, refused
//! completions, the shutdown deadline, attempt timeouts, lease loss, stale heartbeat
//! replies, self-recorded completions and panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fascicle_api::{
    Applied, BackendErrorKind, Call, Completion, Error, HandlerError, Layer, Layered, NewOperation,
    OperationId, Outcome, Queue, Registry, Result, Status, Store, messages,
};
use serde_json::{Value, json};

use super::lifecycle::{fast_worker, run_until, status};

/// How a [`Meddling`] store changes its inner store's behaviour.
#[derive(Debug)]
enum Meddle {
    /// `complete` refuses (as invalid) any call recording this operation's success.
    RefuseSuccessOf(OperationId),
    /// `complete` answers a transient error while the flag is set.
    CompleteUnavailable(AtomicBool),
    /// `complete` answers a non-transient backend error (as a read-only or misconfigured
    /// database would) while the flag is set.
    CompleteBroken(AtomicBool),
    /// `complete` never answers (a stalled connection).
    CompleteHangs,
    /// Every heartbeat reaches the inner store this much later.
    SlowHeartbeats(Duration),
}

/// A real store with one behaviour changed, to put the worker in situations a healthy
/// store produces only rarely: the store seen through the [`Meddle`] as a [`Layer`].
type Meddling = Layered<Meddle>;

#[async_trait]
impl Layer for Meddle {
    async fn before(&self, call: &Call<'_>) -> Result<()> {
        match (self, call) {
            (Meddle::RefuseSuccessOf(id), Call::Complete(completions))
                if completions
                    .iter()
                    .any(|c| c.id == *id && matches!(c.outcome, Outcome::Completed(_))) =>
            {
                Err(Error::InvalidInput(format!(
                    "the store refuses the result of {id}"
                )))
            }
            (Meddle::CompleteUnavailable(down), Call::Complete(_))
                if down.load(Ordering::SeqCst) =>
            {
                Err(Error::backend(
                    "meddling",
                    BackendErrorKind::Connection,
                    "the database is unreachable",
                ))
            }
            (Meddle::CompleteBroken(broken), Call::Complete(_))
                if broken.load(Ordering::SeqCst) =>
            {
                Err(Error::backend(
                    "meddling",
                    BackendErrorKind::Other,
                    "permission denied for table operations",
                ))
            }
            (Meddle::CompleteHangs, Call::Complete(_)) => std::future::pending().await,
            (Meddle::SlowHeartbeats(delay), Call::Heartbeat(..)) => {
                tokio::time::sleep(*delay).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn meddling(store: &Arc<dyn Store>, meddle: Meddle) -> Arc<dyn Store> {
    Arc::new(Meddling::new(Arc::clone(store), meddle))
}

async fn submit_numbered(queue: &Queue, kind: &str, n: usize) -> Vec<OperationId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            queue
                .submit(NewOperation::new(kind, json!({ "i": i })).with_max_attempts(1))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

fn all_terminal(store: &Arc<dyn Store>, ids: &[OperationId]) -> super::lifecycle::BoxedCheck {
    let (store, ids) = (Arc::clone(store), ids.to_vec());
    Box::pin(async move {
        for id in ids {
            if !status(&store, id).await.is_terminal() {
                return false;
            }
        }
        true
    })
}

/// A handler's result that no backend can store (a string holding U+0000, which
/// PostgreSQL's `jsonb` refuses) fails that one operation with a readable error; the
/// other operations are recorded as usual, and an error text holding U+0000 is stored
/// with the character replaced.
pub async fn unstorable_outcomes_fail_alone(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "mixed", 20).await;
    let mut registry = Registry::new();
    registry.register("mixed", |input: Value, _| async move {
        match input["i"].as_u64() {
            Some(3) => Ok(json!("a result with \u{0} inside")),
            Some(7) => Err(HandlerError::permanent("an error with \u{0} inside")),
            _ => Ok(json!("fine")),
        }
    });
    let check = Arc::clone(&store);
    let check_ids = ids.clone();
    let report = run_until(fast_worker(&store, registry), move || {
        all_terminal(&check, &check_ids)
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let op = store.get(*id).await.unwrap().unwrap();
        match i {
            3 => {
                assert_eq!(op.status, Status::Failed);
                let error = op.error.unwrap();
                assert!(
                    error.starts_with(&messages::unstorable_outcome("")) && error.contains("NUL"),
                    "{error}"
                );
                assert_eq!(op.result, None);
            }
            7 => {
                assert_eq!(op.status, Status::Failed);
                assert_eq!(op.error.as_deref(), Some("an error with \u{FFFD} inside"));
            }
            _ => assert_eq!(
                (op.status, op.result),
                (Status::Completed, Some(json!("fine"))),
                "operation {i}"
            ),
        }
    }
    assert_eq!((report.completed, report.failed), (18, 2));
}

/// The store refuses one completion (as invalid): that operation fails with the
/// refusal as its error, and the completions batched with it are recorded all the same.
pub async fn a_refused_completion_never_holds_back_the_others(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "work", 20).await;
    let poisoned = ids[5];
    let refusing = meddling(&store, Meddle::RefuseSuccessOf(poisoned));
    let mut registry = Registry::new();
    registry.register("work", |_: Value, _| async move {
        // One await, so completions reach the recorder and share its transactions.
        tokio::task::yield_now().await;
        Ok::<_, HandlerError>(json!("done"))
    });
    let check = Arc::clone(&store);
    let check_ids = ids.clone();
    let report = run_until(
        fast_worker(&refusing, registry).completion_linger(Duration::from_millis(20)),
        move || all_terminal(&check, &check_ids),
    )
    .await;
    let op = store.get(poisoned).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Failed);
    let error = op.error.unwrap();
    assert!(error.contains("the store refuses the result"), "{error}");
    for id in ids.iter().filter(|id| **id != poisoned) {
        assert_eq!(status(&store, *id).await, Status::Completed);
    }
    assert_eq!((report.completed, report.failed), (19, 1));
}

/// The store cannot record completions at all (it is down for writes): shutdown still
/// returns within its timeout plus a round trip, releasing the operations whose outcomes
/// it could not record, so they run again.
pub async fn the_shutdown_deadline_holds_while_completions_cannot_be_recorded(
    store: Arc<dyn Store>,
) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "work", 3).await;
    let down = meddling(&store, Meddle::CompleteUnavailable(AtomicBool::new(true)));
    let mut registry = Registry::new();
    let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
    registry.register("work", move |_: Value, _| {
        let ran = ran_tx.clone();
        async move {
            let _ = ran.send(());
            tokio::task::yield_now().await;
            Ok::<_, HandlerError>(json!("done"))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = fast_worker(&down, registry).shutdown_timeout(Duration::from_millis(300));
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), ran_rx.recv())
            .await
            .expect("the handlers never ran");
    }
    // Let the recorder fail and retry a few times.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = tokio::time::Instant::now();
    let _ = stop_tx.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run() ignored its shutdown timeout while the store refused completions")
        .unwrap()
        .unwrap();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 300 ms timeout"
    );
    assert_eq!((report.unrecorded, report.released), (3, 3), "{report:?}");
    for id in ids {
        let op = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (op.status, op.attempts),
            (Status::Pending, 0),
            "an unrecorded attempt must be released without spending it"
        );
    }
}

/// A handler that hangs is stopped at the attempt timeout: a retryable failure "timed
/// out after …", then the next attempt runs; on the last attempt it fails for good.
pub async fn attempt_timeout_stops_a_hung_handler(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let once = queue
        .submit(NewOperation::new("hang_once", json!({})).with_max_attempts(3))
        .await
        .unwrap()
        .id;
    let always = queue
        .submit(NewOperation::new("hang_always", json!({})).with_max_attempts(1))
        .await
        .unwrap()
        .id;
    let mut registry = Registry::new();
    registry.register("hang_once", |_: Value, ctx| async move {
        if ctx.attempt == 1 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok::<_, HandlerError>(json!(ctx.attempt))
    });
    registry.register("hang_always", |_: Value, _| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, HandlerError>(json!("never"))
    });
    let check = Arc::clone(&store);
    let worker = fast_worker(&store, registry).attempt_timeout(Duration::from_millis(200));
    let report = run_until(worker, move || all_terminal(&check, &[once, always])).await;
    let op = store.get(once).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.attempts, op.result),
        (Status::Completed, 2, Some(json!(2)))
    );
    let op = store.get(always).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Failed);
    let error = op.error.unwrap();
    assert!(
        error.starts_with(&messages::attempt_timed_out(Duration::from_millis(200))),
        "{error}"
    );
    assert_eq!((report.completed, report.failed, report.retried), (1, 1, 1));
}

/// A lease lost while the handler runs (here: the attempt was recorded under its token
/// by someone else) reaches the handler through `ctx.cancelled()`, and the worker's own
/// late completion changes nothing.
pub async fn lease_loss_reaches_the_handler(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = queue
        .submit(NewOperation::new("long", json!({})))
        .await
        .unwrap()
        .id;
    let (token_tx, mut token_rx) = tokio::sync::mpsc::unbounded_channel();
    let (told_tx, mut told_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register("long", move |_: Value, ctx| {
        let (token_tx, told_tx) = (token_tx.clone(), told_tx.clone());
        async move {
            let _ = token_tx.send(ctx.lease_token);
            match tokio::time::timeout(Duration::from_secs(10), ctx.cancelled()).await {
                Ok(()) => {
                    let _ = told_tx.send(());
                    Err(HandlerError::retryable("stopped: lease lost"))
                }
                Err(_) => Ok(json!("never told")),
            }
        }
    });
    // Heartbeats every 100 ms.
    let worker = fast_worker(&store, registry).lease(Duration::from_millis(300));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    let token = tokio::time::timeout(Duration::from_secs(10), token_rx.recv())
        .await
        .expect("the handler never ran")
        .unwrap();
    let applied = store
        .complete(&[Completion {
            id,
            lease_token: token,
            outcome: Outcome::Completed(json!("by someone else")),
        }])
        .await
        .unwrap();
    assert_eq!(applied, [Applied::Applied]);
    tokio::time::timeout(Duration::from_secs(10), told_rx.recv())
        .await
        .expect("the handler was never told its lease was lost");
    let _ = stop_tx.send(());
    let report = handle.await.unwrap().unwrap();
    assert_eq!(
        (report.lease_lost, report.completed),
        (1, 0),
        "the worker's late completion must be refused: {report:?}"
    );
    let op = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.result),
        (Status::Completed, Some(json!("by someone else")))
    );
}

/// A heartbeat reply about an attempt that has since ended (the operation was retried
/// and claimed again by the same worker) does not cancel the new attempt.
pub async fn a_stale_heartbeat_reply_does_not_cancel_a_new_attempt(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = queue
        .submit(NewOperation::new("twice", json!({})).with_max_attempts(3))
        .await
        .unwrap()
        .id;
    // Heartbeats every 200 ms (lease 600 ms), each answered 300 ms late: the reply to a
    // heartbeat sent during attempt 1 arrives while attempt 2 runs.
    let slow = meddling(&store, Meddle::SlowHeartbeats(Duration::from_millis(300)));
    let mut registry = Registry::new();
    registry.register("twice", |_: Value, ctx| async move {
        if ctx.attempt == 1 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            return Err(HandlerError::retryable("first attempt fails"));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        Ok(json!({ "cancelled": ctx.is_cancelled() }))
    });
    let worker = fast_worker(&slow, registry)
        .lease(Duration::from_millis(600))
        .maintenance_interval(Duration::from_secs(3600))
        .retry_policy(fascicle_api::RetryPolicy {
            base: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
        });
    let check = Arc::clone(&store);
    run_until(worker, move || all_terminal(&check, &[id])).await;
    let op = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.attempts, op.result),
        (Status::Completed, 2, Some(json!({ "cancelled": false }))),
        "a reply about attempt 1 cancelled attempt 2"
    );
}

/// A handler registered with `register_recorded` records its own completion; the
/// worker counts it and records nothing more.
pub async fn a_recorded_handler_completes_once(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "self", 3).await;
    let mut registry = Registry::new();
    let recorder = Arc::clone(&store);
    registry.register_recorded("self", move |input: Value, ctx| {
        let store = Arc::clone(&recorder);
        async move {
            let applied = store
                .complete(&[ctx.completion(json!({ "recorded": input["i"] }))])
                .await
                .map_err(HandlerError::retryable)?;
            Ok(applied[0])
        }
    });
    let check = Arc::clone(&store);
    let check_ids = ids.clone();
    let report = run_until(fast_worker(&store, registry), move || {
        all_terminal(&check, &check_ids)
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let op = store.get(*id).await.unwrap().unwrap();
        assert_eq!(
            (op.status, op.attempts, op.result),
            (Status::Completed, 1, Some(json!({ "recorded": i })))
        );
    }
    assert_eq!((report.completed, report.lease_lost), (3, 0));
}

/// A panicking handler costs an attempt, never the worker: the panic is recorded as a
/// retryable error with its message, and on the last attempt the operation fails.
pub async fn handler_panics_are_retried_then_fail(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let flaky = queue
        .submit(NewOperation::new("flaky", json!({})).with_max_attempts(3))
        .await
        .unwrap()
        .id;
    let broken = queue
        .submit(NewOperation::new("broken", json!({})).with_max_attempts(2))
        .await
        .unwrap()
        .id;
    let mut registry = Registry::new();
    registry.register("flaky", |_: Value, ctx| async move {
        if ctx.attempt == 1 {
            panic!("index out of bounds on the first try");
        }
        Ok::<_, HandlerError>(json!(ctx.attempt))
    });
    registry.register("broken", |_: Value, _| async move {
        tokio::task::yield_now().await;
        if true {
            panic!("always broken");
        }
        Ok::<_, HandlerError>(Value::Null)
    });
    let check = Arc::clone(&store);
    let report = run_until(fast_worker(&store, registry), move || {
        all_terminal(&check, &[flaky, broken])
    })
    .await;
    let a = store.get(flaky).await.unwrap().unwrap();
    assert_eq!(
        (a.status, a.attempts, a.result),
        (Status::Completed, 2, Some(json!(2)))
    );
    let b = store.get(broken).await.unwrap().unwrap();
    assert_eq!((b.status, b.attempts), (Status::Failed, 2));
    let error = b.error.unwrap();
    assert!(error.contains("handler panicked: always broken"), "{error}");
    assert_eq!((report.completed, report.failed, report.retried), (1, 1, 2));
}

/// `NewOperation::with_timeout` is stored with the operation and overrides the worker's
/// `attempt_timeout` either way: a short one stops a hung attempt on a worker that has
/// none, a long one lets an attempt outlive the worker's shorter default. Timeouts
/// outside 1 ms ..= 7 days are refused and nothing is written.
pub async fn per_operation_timeout_overrides_the_worker(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    for bad in [
        Duration::ZERO,
        fascicle_api::MAX_ATTEMPT_TIMEOUT + Duration::from_secs(1),
    ] {
        let refused = queue
            .submit(NewOperation::new("slow", json!({})).with_timeout(bad))
            .await;
        assert!(
            matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("attempt timeout")),
            "{refused:?}"
        );
    }
    assert_eq!(store.stats().await.unwrap().work().total(), 0);

    let short = queue
        .submit(
            NewOperation::new("hang_once", json!({}))
                .with_max_attempts(3)
                .with_timeout(Duration::from_millis(150)),
        )
        .await
        .unwrap()
        .id;
    let long = queue
        .submit(NewOperation::new("slow", json!({})).with_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .id;
    let stored = store.get(short).await.unwrap().unwrap();
    assert_eq!(stored.timeout, Some(Duration::from_millis(150)));
    assert_eq!(
        store.get(long).await.unwrap().unwrap().timeout,
        Some(Duration::from_secs(5))
    );

    let mut registry = Registry::new();
    registry.register("hang_once", |_: Value, ctx| async move {
        if ctx.attempt == 1 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok::<_, HandlerError>(json!(ctx.attempt))
    });
    registry.register("slow", |_: Value, ctx| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok::<_, HandlerError>(json!(ctx.attempt))
    });
    // The worker's own default (200 ms) would stop `slow`; its 5 s timeout wins. The
    // 150 ms one of `hang_once` is what stops its first attempt.
    let check = Arc::clone(&store);
    let worker = fast_worker(&store, registry).attempt_timeout(Duration::from_millis(200));
    run_until(worker, move || all_terminal(&check, &[short, long])).await;
    let op = store.get(short).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.attempts, op.result),
        (Status::Completed, 2, Some(json!(2)))
    );
    let op = store.get(long).await.unwrap().unwrap();
    assert_eq!(
        (op.status, op.attempts, op.result),
        (Status::Completed, 1, Some(json!(1))),
        "the operation's own timeout must override the worker's"
    );
}

/// The store fails every completion for a while with a non-transient backend error (a
/// read-only or misconfigured database, not an outcome it cannot hold): the outcomes are
/// kept and recorded once it recovers — a success is never turned into a failure because
/// the store had trouble.
pub async fn a_store_in_trouble_never_turns_success_into_failure(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "work", 5).await;
    let broken = Arc::new(Meddling::new(
        Arc::clone(&store),
        Meddle::CompleteBroken(AtomicBool::new(true)),
    ));
    let mut registry = Registry::new();
    registry.register("work", |_: Value, _| async move {
        tokio::task::yield_now().await;
        Ok::<_, HandlerError>(json!("done"))
    });
    let store_dyn: Arc<dyn Store> = broken.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(fast_worker(&store_dyn, registry).run(async {
        let _ = stop_rx.await;
    }));
    // Let the recorder meet the broken store a few times.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for id in &ids {
        assert_ne!(
            status(&store, *id).await,
            Status::Failed,
            "a successful attempt was recorded as a failure while the store was in trouble"
        );
    }
    if let Meddle::CompleteBroken(flag) = broken.layer() {
        flag.store(false, Ordering::SeqCst);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !all_terminal(&store, &ids).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recorded after recovery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    let report = handle.await.unwrap().unwrap();
    for id in &ids {
        assert_eq!(status(&store, *id).await, Status::Completed);
    }
    assert_eq!((report.completed, report.failed), (5, 0));
}

/// The store stops answering completions altogether (a stalled connection): shutdown
/// still returns — within about twice its timeout — and the operations whose outcomes
/// it could not record are released to run again.
pub async fn the_shutdown_deadline_holds_while_the_store_hangs(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit_numbered(&queue, "work", 3).await;
    let hung = meddling(&store, Meddle::CompleteHangs);
    let mut registry = Registry::new();
    let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
    registry.register("work", move |_: Value, _| {
        let ran = ran_tx.clone();
        async move {
            let _ = ran.send(());
            tokio::task::yield_now().await;
            Ok::<_, HandlerError>(json!("done"))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = fast_worker(&hung, registry).shutdown_timeout(Duration::from_millis(300));
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), ran_rx.recv())
            .await
            .expect("the handlers never ran");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = tokio::time::Instant::now();
    let _ = stop_tx.send(());
    let report = tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("run() hung on a store that does not answer")
        .unwrap()
        .unwrap();
    let took = asked.elapsed();
    // 300 ms to the deadline, then at most 1 s for the recorder and 1 s for the release.
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert_eq!(report.released, 3, "{report:?}");
    for id in ids {
        assert_eq!(status(&store, id).await, Status::Pending);
    }
}
