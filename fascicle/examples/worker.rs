//! A batch submitted atomically, drained by a worker, on the in-process memory store.
//!
//! ```sh
//! cargo run -p fascicle --example worker --features memory
//! ```

use std::sync::Arc;
use std::time::Duration;

use fascicle::memory::MemoryStore;
use fascicle::{
    HandlerError, InProcessWaker, NewBatch, NewOperation, Queue, Registry, Status, Store, Worker,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Retain {
    document: String,
}

#[tokio::main]
async fn main() -> fascicle::Result<()> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let waker = InProcessWaker::new();
    let queue = Queue::new(store.clone()).with_notifier(Arc::new(waker.clone()));

    let mut registry = Registry::new();
    registry.register("retain", |input: Retain, ctx| async move {
        if input.document.is_empty() {
            return Err(HandlerError::permanent("empty document name"));
        }
        Ok(serde_json::json!({ "stored": input.document, "attempt": ctx.attempt }))
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(store.clone(), registry)
        .concurrency(8)
        .claim_batch(16)
        .lease(Duration::from_secs(30))
        .wake_on(waker.subscribe());
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let receipt = queue
        .submit_batch(
            NewBatch::new("batch_retain")
                .children(["a.txt", "b.txt", "c.txt"].map(|doc| {
                    NewOperation::new("retain", serde_json::json!({ "document": doc }))
                })),
        )
        .await?;

    loop {
        let parent = store
            .get(receipt.parent_id)
            .await?
            .expect("the batch exists");
        if parent.status.is_terminal() {
            assert_eq!(parent.status, Status::Completed);
            println!(
                "batch {} {}: {}",
                parent.id,
                parent.status,
                parent.result.unwrap()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    let report = running.await.expect("worker task")?;
    println!("worker: {} completed", report.completed);
    Ok(())
}
