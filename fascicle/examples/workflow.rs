//! A workflow on the in-process memory store: a small DAG of steps (fetch, then two
//! resizes in a nested batch, then assemble, and a clean-up that runs whatever happens)
//! with a failure policy and a callback, all submitted in one transaction. Each step becomes claimable
//! in the transaction that finishes its last dependency; the callback is inserted in the
//! one that finishes the batch, and reads the batch's outcome. Prints the order the steps
//! ran in.
//!
//! ```sh
//! cargo run -p fascicle --example workflow --features memory
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle::memory::MemoryStore;
use fascicle::{
    Context, FailurePolicy, HandlerError, InProcessWaker, NewBatch, NewOperation, OperationId,
    Queue, Registry, Store, Worker,
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
    registry.register("step", move |input: Value, _ctx: Context| {
        let steps = Arc::clone(&steps);
        async move {
            let name = input["name"].as_str().unwrap_or_default().to_owned();
            // Work takes a while: the order below comes from the dependencies alone.
            tokio::time::sleep(Duration::from_millis(5)).await;
            steps.lock().unwrap().push(name.clone());
            Ok::<_, HandlerError>(json!({ "done": name }))
        }
    });
    let callbacks = Arc::clone(&order);
    registry.register("publish_album", move |input: Value, ctx: Context| {
        let callbacks = Arc::clone(&callbacks);
        async move {
            // A callback knows the batch that fired it: id, outcome, counters, error.
            let batch = ctx.batch.expect("a callback reads its batch");
            callbacks.lock().unwrap().push(format!(
                "publish album {} after batch {} {} ({} of {} children completed)",
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

    // Ids chosen here, so that steps can name what they wait for.
    let [fetch, resizes, small, large, assemble, clean_up] = [(); 6].map(|_| OperationId::new());
    let step = |id, name: &str| NewOperation::new("step", json!({ "name": name })).with_id(id);
    let receipt = queue
        .submit_batch(
            NewBatch::new("album")
                .child(step(clean_up, "clean up").after_any(&[assemble]))
                // A nested batch ends when its children have: `assemble` waits for it.
                .child(step(assemble, "assemble").after(&[resizes]))
                .child(step(fetch, "fetch"))
                .child_batch(
                    NewBatch::new("resizes")
                        .with_id(resizes)
                        .child(step(large, "resize large").after(&[fetch]))
                        .child(step(small, "resize small").after(&[fetch])),
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
        if order.lock().unwrap().len() == 6 {
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
    assert_eq!(order.len(), 6, "five steps and the callback");
    let at = |name: &str| order.iter().position(|s| s.starts_with(name)).unwrap();
    assert_eq!(at("fetch"), 0);
    assert!(at("resize small") < at("assemble") && at("resize large") < at("assemble"));
    assert_eq!(at("clean up"), 4);
    assert!(
        order[5].starts_with("publish album"),
        "the callback ran last"
    );
    Ok(())
}
