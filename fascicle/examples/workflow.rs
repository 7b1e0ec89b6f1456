//! A workflow on the in-process memory store: a batch of steps with a failure policy and
//! callbacks, submitted in one transaction; the callback its outcome selects is inserted
//! in the transaction that finishes the last step, and reads the batch's outcome.
//!
//! ```sh
//! cargo run -p fascicle --example workflow --features memory
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle::memory::MemoryStore;
use fascicle::{
    Context, FailurePolicy, HandlerError, InProcessWaker, NewBatch, NewOperation, Queue, Registry,
    Store, Worker,
};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> fascicle::Result<()> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let waker = InProcessWaker::new();
    let queue = Queue::new(store.clone()).with_notifier(Arc::new(waker.clone()));
    let order = Arc::new(Mutex::new(Vec::<String>::new()));

    let mut registry = Registry::new();
    let steps = Arc::clone(&order);
    registry.register("resize", move |input: Value, _ctx: Context| {
        let steps = Arc::clone(&steps);
        async move {
            steps
                .lock()
                .unwrap()
                .push(format!("resize {}", input["image"]));
            Ok::<_, HandlerError>(json!({ "resized": input["image"] }))
        }
    });
    let callbacks = Arc::clone(&order);
    registry.register("publish_album", move |input: Value, ctx: Context| {
        let callbacks = Arc::clone(&callbacks);
        async move {
            // A callback knows the batch that fired it: id, outcome, counters, error.
            let batch = ctx.batch.expect("a callback reads its batch");
            callbacks.lock().unwrap().push(format!(
                "publish album {} after batch {} {} ({} of {} steps completed)",
                input["album"],
                batch.id,
                batch.outcome,
                batch.children.completed,
                batch.children.total
            ));
            Ok::<_, HandlerError>(json!(null))
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(store.clone(), registry)
        .concurrency(4)
        .wake_on(waker.subscribe());
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let receipt = queue
        .submit_batch(
            NewBatch::new("album")
                .children(
                    ["cover.png", "p1.png", "p2.png"]
                        .map(|image| NewOperation::new("resize", json!({ "image": image }))),
                )
                // The first step that fails for good cancels the rest.
                .with_failure_policy(FailurePolicy::FailFast)
                .on_success(NewOperation::new(
                    "publish_album",
                    json!({ "album": "summer" }),
                )),
        )
        .await?;

    // Wait for the callback: it runs after the last step, once.
    for _ in 0..500 {
        if order.lock().unwrap().len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    running.await.expect("worker task")?;

    let order = order.lock().unwrap().clone();
    println!("batch {} ran, in this order:", receipt.parent_id);
    for (i, step) in order.iter().enumerate() {
        println!("  {}. {step}", i + 1);
    }
    assert_eq!(order.len(), 4, "three steps and the callback");
    assert!(
        order[3].starts_with("publish album"),
        "the callback ran last"
    );
    Ok(())
}
