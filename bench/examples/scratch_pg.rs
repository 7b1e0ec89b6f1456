//! scratch
use fascicle_api::{Limits, NewBatch, NewOperation, Store};
use serde_json::json;
use std::time::Instant;

fn batch(n: usize) -> NewBatch {
    NewBatch::new("batch_retain").children((0..n).map(|i| NewOperation::new("retain", json!({"document_id": format!("docs/{i:05}.txt"), "bank": "bench", "text": "The quick brown fox jumps over the lazy dog, twice over."}))))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let store = fascicle_postgres::PostgresStore::connect_with(
        fascicle_postgres::PostgresOptions::new("postgres://root@127.0.0.1/test")
            .schema("scratch_pg"),
    )
    .await
    .unwrap();
    for _ in 0..8 {
        sqlx::query("TRUNCATE scratch_pg.operations")
            .execute(store.pool())
            .await
            .unwrap();
        let b = batch(10_000);
        let t = Instant::now();
        let (p, c) = Limits::default()
            .prepare_batch(b)
            .unwrap()
            .batches
            .remove(0);
        let prep = t.elapsed();
        let _ = store.get(p.id).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        tx.insert_parent(&p).await.unwrap();
        let t1 = t.elapsed();
        tx.insert_children(&c).await.unwrap();
        let t2 = t.elapsed();
        tx.commit().await.unwrap();
        let t3 = t.elapsed();
        println!(
            "prep {:?} get+begin+parent {:?} children {:?} commit {:?}",
            prep,
            t1 - prep,
            t2 - t1,
            t3 - t2
        );
    }
    sqlx::query("DROP SCHEMA scratch_pg CASCADE")
        .execute(store.pool())
        .await
        .unwrap();
}
