//! Bad input on every driver: a typed error, nothing written, the store still usable.
//! (Per-field validation — sizes at and over the limit, NUL, depth, names — is in the
//! conformance suite; this covers whole-store inputs.)

use std::sync::Arc;

use fascicle::postgres::PostgresStore;
use fascicle::{Error, NewBatch, NewOperation, OperationId, Queue, Store};
use serde_json::json;

/// Every driver's store, on a fresh database (Postgres only with `DATABASE_URL`), and
/// the Postgres store to drop afterwards.
async fn stores(
    dir: &std::path::Path,
) -> (Vec<(&'static str, Arc<dyn Store>)>, Option<PostgresStore>) {
    let mut stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
        ("memory", fascicle::connect("memory://").await.unwrap()),
        (
            "sqlite",
            fascicle::connect(&format!("sqlite://{}", dir.join("bad.db").display()))
                .await
                .unwrap(),
        ),
    ];
    let postgres = match fascicle_reliability::postgres_url("the PostgreSQL bad-input case") {
        Some(url) => Some(fascicle_reliability::fresh_postgres(&url, "fascicle_b", |o| o).await),
        None => None,
    };
    if let Some(store) = &postgres {
        stores.push(("postgres", Arc::new(store.clone())));
    }
    (stores, postgres)
}

fn big_batch(n: usize, poison_last: bool) -> NewBatch {
    NewBatch::new("big").children((0..n).map(|i| {
        let text = if poison_last && i == n - 1 {
            "nul\u{0}".to_string()
        } else {
            format!("document {i}")
        };
        NewOperation::new("retain", json!({ "i": i, "text": text }))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_store_inputs_get_typed_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (stores, postgres) = stores(dir.path()).await;
    for (driver, store) in stores {
        let queue = Queue::new(Arc::clone(&store));

        // 100,000 children whose last one is unstorable: refused, nothing written.
        let started = std::time::Instant::now();
        let refused = queue.submit_batch(big_batch(100_000, true)).await;
        assert!(
            matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("child #99999")),
            "{driver}: {refused:?}"
        );
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.work().total() + stats.batches.total(), 0, "{driver}");

        // 100,000 valid children: all of them, atomically.
        let receipt = queue.submit_batch(big_batch(100_000, false)).await.unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.work().ready, 100_000, "{driver}");
        assert_eq!(stats.batches.open, 1, "{driver}");
        let parent = store.get(receipt.parent_id).await.unwrap().unwrap();
        assert_eq!(parent.children.unwrap().total, 100_000);
        let elapsed = started.elapsed();

        // Malformed and unknown ids.
        for bad in [
            "",
            "not-a-uuid",
            "01939a8c-0000-7000-8000",
            "'; DROP TABLE x; --",
        ] {
            assert!(
                matches!(bad.parse::<OperationId>(), Err(Error::InvalidInput(_))),
                "{bad}"
            );
        }
        let unknown = OperationId::new();
        assert!(store.get(unknown).await.unwrap().is_none());
        assert!(
            matches!(store.cancel(unknown).await, Err(Error::NotFound(_))),
            "{driver}"
        );
        assert!(
            matches!(store.retry_batch(unknown).await, Err(Error::NotFound(_))),
            "{driver}"
        );

        // A kind no worker knows is valid work: stored, counted, waiting.
        queue
            .submit(NewOperation::new("no-such-handler", json!({})))
            .await
            .unwrap();
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.kinds["no-such-handler"].ready, 1, "{driver}");
        assert_eq!(stats.work().total(), 100_001, "{driver}");
        eprintln!(
            "RELIABILITY | bad input (100,000-child batch with an unstorable last child, malformed and unknown ids) | {driver} | 200,001 | 1 refused batch | 0 | 0 | - | {:.1}s",
            elapsed.as_secs_f64()
        );
    }
    if let Some(store) = postgres {
        fascicle_reliability::drop_schema(&store).await;
    }
}

#[tokio::test]
async fn bad_database_urls_are_typed_and_never_echo_passwords() {
    for url in ["", "mysql://root:hunter2@localhost/db", "sqlite://"] {
        let error = fascicle::connect(url).await.err().unwrap();
        assert!(matches!(error, Error::InvalidInput(_)), "{url}: {error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        // A role that does not exist, with a password: refused, redacted.
        let error = fascicle::connect("postgres://nosuchrole:hunter2@127.0.0.1:5432/test")
            .await
            .err()
            .unwrap();
        let text = format!("{error} {error:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            matches!(error, Error::Backend { .. } | Error::Storage { .. }),
            "{text}"
        );
    }
}
