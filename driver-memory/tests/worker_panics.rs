//! A panicking handler costs an attempt, never the worker: the panic is caught, recorded
//! as a retryable error, and the operation runs again.

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::{NewOperation, Queue, Registry, RetryPolicy, Status, Store, Worker};
use fascicle_memory::MemoryStore;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_then_failed_with_its_message() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let queue = Queue::new(Arc::clone(&store));
    let flaky = queue
        .submit(NewOperation::new("flaky", json!({})).with_max_attempts(3))
        .await
        .unwrap();
    let broken = queue
        .submit(NewOperation::new("broken", json!({})).with_max_attempts(2))
        .await
        .unwrap();
    let mut registry = Registry::new();
    registry.register("flaky", |_: Value, ctx| async move {
        if ctx.attempt == 1 {
            panic!("index out of bounds on the first try");
        }
        Ok::<_, fascicle_api::HandlerError>(json!(ctx.attempt))
    });
    registry.register("broken", |_: Value, _| async move {
        if true {
            panic!("always broken");
        }
        Ok::<_, fascicle_api::HandlerError>(Value::Null)
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(Arc::clone(&store), registry)
        .poll_interval(Duration::from_millis(10))
        .retry_policy(RetryPolicy {
            base: Duration::from_millis(10),
            max: Duration::from_millis(20),
            jitter: 0.0,
        });
    let handle = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = store.get(flaky.id).await.unwrap().unwrap();
        let b = store.get(broken.id).await.unwrap().unwrap();
        if a.status.is_terminal() && b.status.is_terminal() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    let report = handle.await.unwrap().unwrap();
    let a = store.get(flaky.id).await.unwrap().unwrap();
    assert_eq!(
        (a.status, a.attempts, a.result),
        (Status::Completed, 2, Some(json!(2)))
    );
    let b = store.get(broken.id).await.unwrap().unwrap();
    assert_eq!((b.status, b.attempts), (Status::Failed, 2));
    let error = b.error.unwrap();
    assert!(error.contains("handler panicked: always broken"), "{error}");
    assert_eq!((report.completed, report.failed, report.retried), (1, 1, 2));
}
