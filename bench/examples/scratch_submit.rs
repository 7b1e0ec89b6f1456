//! scratch
use fascicle_api::{Limits, NewBatch, NewOperation, Queue, Store};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn batch(n: usize) -> NewBatch {
    NewBatch::new("batch_retain").children((0..n).map(|i| NewOperation::new("retain", json!({"document_id": format!("docs/{i:05}.txt"), "bank": "bench", "text": "The quick brown fox jumps over the lazy dog, twice over."}))))
}

async fn manual(store: Arc<dyn Store>) -> std::time::Duration {
    let b = batch(10_000);
    let t = Instant::now();
    let (p, c) = Limits::default()
        .prepare_batch(b)
        .unwrap()
        .batches
        .remove(0);
    let _ = store.get(p.id).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&p).await.unwrap();
    tx.insert_children(&c).await.unwrap();
    tx.commit().await.unwrap();
    drop(c);
    t.elapsed()
}

async fn queue(store: Arc<dyn Store>) -> std::time::Duration {
    let b = batch(10_000);
    let t = Instant::now();
    let q = Queue::new(store);
    let fut = q.submit_batch(b);
    eprintln!("future built {:?}", t.elapsed());
    let r = fut.await.unwrap();
    eprintln!("awaited {:?}", t.elapsed());
    drop(r);
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    for i in 0..6 {
        let s1: Arc<dyn Store> = Arc::new(
            fascicle_sqlite::SqliteStore::open_temporary()
                .await
                .unwrap(),
        );
        let s2: Arc<dyn Store> = Arc::new(
            fascicle_sqlite::SqliteStore::open_temporary()
                .await
                .unwrap(),
        );
        if i % 2 == 0 {
            println!("manual {:?} queue {:?}", manual(s1).await, queue(s2).await);
        } else {
            let q = queue(s2).await;
            println!("queue {:?} manual {:?}", q, manual(s1).await);
        }
    }
}
