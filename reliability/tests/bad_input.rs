//! Bad input on every driver: a typed error, nothing written, the store still usable.
//! (Per-field validation — sizes at and over the limit, NUL, depth, names — is in the
//! conformance suite; this covers whole-store inputs.)

use std::sync::Arc;

use fascicle::{Error, NewBatch, NewOperation, OperationId, Queue, Store};
use serde_json::json;

/// Every driver's store, on a fresh database; Postgres only with `DATABASE_URL`.
async fn stores(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    let mut stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
        ("memory", fascicle::connect("memory://").await.unwrap()),
        (
            "sqlite",
            fascicle::connect(&format!("sqlite://{}", dir.join("bad.db").display()))
                .await
                .unwrap(),
        ),
    ];
    match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => {
            let schema = format!("fascicle_b_{}", uuid::Uuid::new_v4().simple());
            let store = fascicle::postgres::PostgresStore::connect_with(
                fascicle::postgres::PostgresOptions::new(url).schema(schema),
            )
            .await
            .unwrap();
            stores.push(("postgres", Arc::new(store)));
        }
        None => assert!(
            std::env::var("REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "REQUIRE_POSTGRES=1 but DATABASE_URL is not set"
        ),
    }
    stores
}

async fn drop_postgres_schema(store: &Arc<dyn Store>) {
    if store.driver() != "postgres" {
        return;
    }
    // The store is behind `dyn Store`: reach the schema through a second connection.
    let url = std::env::var("DATABASE_URL").unwrap();
    let pool = fascicle::postgres::sqlx::PgPool::connect(&url)
        .await
        .unwrap();
    let schemas: Vec<String> = fascicle::postgres::sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'fascicle_b_%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for schema in schemas {
        let _ = fascicle::postgres::sqlx::query(fascicle::postgres::sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&pool)
        .await;
    }
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
    for (driver, store) in stores(dir.path()).await {
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
        drop_postgres_schema(&store).await;
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
