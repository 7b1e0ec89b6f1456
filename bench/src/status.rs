//! Scenario `status`: what `fascicle status <batch>` reads for a batch of N children
//! (1,000,000; 100,000 with `--quick`) — the parent and the first page of 100 children
//! (`Store::children_page`) — beside reading every child (`children_of`, what it read
//! before), in the same run on the same batch. Target ≤ 100 ms (issue #17).

use std::sync::Arc;
use std::time::Instant;

use fascicle_api::{NewBatch, NewOperation, OperationId, Queue, Store};
use serde_json::json;

use crate::drain::{Fresh, fresh_postgres, fresh_sqlite};
use crate::{Args, Measurement, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PAGE: usize = 100;

fn size(args: &Args) -> usize {
    if args.quick { 100_000 } else { 1_000_000 }
}

async fn batch(store: &Arc<dyn Store>, n: usize) -> Result<OperationId, BoxError> {
    let receipt = Queue::new(Arc::clone(store))
        .submit_batch_from(
            NewBatch::new("huge"),
            (0..n).map(|i| NewOperation::new("noop", json!({ "i": i }))),
        )
        .await?;
    Ok(receipt.parent_id)
}

/// The status read: the parent, then the first page of children.
async fn status_read(store: &Arc<dyn Store>, parent: OperationId) -> Result<f64, BoxError> {
    let start = Instant::now();
    let op = store.get(parent).await?.ok_or("the batch vanished")?;
    let page = store.children_page(parent, None, PAGE).await?;
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(page.len(), PAGE);
    assert!(op.children.is_some_and(|c| c.total as usize > PAGE));
    Ok(elapsed)
}

async fn every_child(
    store: &Arc<dyn Store>,
    parent: OperationId,
    n: usize,
) -> Result<f64, BoxError> {
    let start = Instant::now();
    let all = store.children_of(parent).await?;
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(all.len(), n);
    Ok(elapsed)
}

async fn run(
    args: &Args,
    driver: &'static str,
    make: impl AsyncFn() -> Fresh,
) -> Result<Vec<Measurement>, BoxError> {
    let n = size(args);
    let (store, cleanup) = make().await?;
    let parent = batch(&store, n).await?;
    let (mut page, mut all) = (Vec::new(), Vec::new());
    // Warm: the first read of each pays for the cache.
    status_read(&store, parent).await?;
    for _ in 0..3 {
        page.push(status_read(&store, parent).await?);
        all.push(every_child(&store, parent, n).await?);
        for _ in 0..3 {
            page.push(status_read(&store, parent).await?);
        }
    }
    cleanup();
    Ok(vec![Measurement {
        scenario: format!("status of a {n}-child batch: the parent and its first {PAGE} children"),
        driver,
        unit: "ms",
        samples: page,
        baseline_name: Some("every child read (children_of)".into()),
        baseline_samples: all,
        target: Some(Target::AtMost { value: 100.0 }),
    }])
}

pub(crate) async fn sqlite(args: &Args) -> Result<Vec<Measurement>, BoxError> {
    run(args, "sqlite", fresh_sqlite).await
}

pub(crate) async fn postgres(args: &Args, url: &str) -> Result<Vec<Measurement>, BoxError> {
    let url = url.to_string();
    run(args, "postgres", async move || fresh_postgres(&url).await).await
}
