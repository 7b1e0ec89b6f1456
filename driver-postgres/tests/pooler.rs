//! Behind PgBouncer in transaction pooling mode (issue #17): the whole conformance suite
//! runs through a pooler with `PostgresOptions::transaction_pooler(true)`, workers drain
//! through it woken by `LISTEN` on a direct connection (or by polling when there is
//! none), and — the control that shows the pooler really lends connections per
//! transaction — a store without the option fails there.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fascicle_api::{
    Error, HandlerError, InProcessWaker, NewOperation, Queue, Registry, Store, Worker,
};
use fascicle_postgres::{PostgresOptions, PostgresStore, sqlx};
use serde_json::{Value, json};

use common::pooler;

mod conformance {
    fascicle_conformance::suite!(crate::common::pooler::fixture());
}

/// A pooler of `pool_size` server connections that lets no unknown startup parameter
/// through, as PgBouncer's defaults do.
fn strict(pool_size: u32) -> pooler::Config {
    pooler::Config {
        pool_size,
        lenient: false,
    }
}

/// Closes `store`'s pool, then drops its schema through a direct connection.
async fn clean_up(store: &PostgresStore, database_url: &str) {
    store.pool().close().await;
    let direct = common::direct_store(database_url, store.schema()).await;
    common::drop_schema(&direct).await;
}

/// The test database and a pooler in front of it, or `None` after a skip line.
async fn database_and_pooler(config: pooler::Config) -> Option<(common::Database, pooler::Pooler)> {
    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return None;
        }
    };
    match pooler::start(&database.url, config) {
        Ok(pooler) => Some((database, pooler)),
        Err(reason) => {
            common::announce_skip(&reason);
            None
        }
    }
}

/// Without `transaction_pooler`, the store's named statements meet server connections
/// that other clients prepared theirs on: `prepared statement … already exists` (or
/// `does not exist`) — or, worse, another client's statement of the same name runs with
/// our parameters (sqlx then panics decoding a row of the wrong shape). The pooler here ignores sqlx's `extra_float_digits` startup
/// parameter, so the store connects and the statements are what fails. (If this ever
/// passes, the pooler under test is not lending connections per transaction and the
/// suite above proves nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_a_store_fails_behind_a_transaction_pooler() {
    let config = pooler::Config {
        pool_size: 2,
        lenient: true,
    };
    let Some((database, pooler)) = database_and_pooler(config).await else {
        return;
    };
    let schema = common::fresh_schema();
    let direct = common::direct_store(&database.url, &schema).await;
    // The schema exists (migrated directly), so connecting runs only the version check.
    let mut failures = Vec::new();
    for _ in 0..3 {
        let options = PostgresOptions::new(&pooler.url)
            .schema(schema.clone())
            .max_connections(4);
        let naive = tokio::spawn(PostgresStore::connect_with(options)).await;
        let naive = match naive {
            Ok(Ok(naive)) => naive,
            Ok(Err(e)) => {
                failures.push(e.to_string());
                continue;
            }
            Err(e) if e.is_panic() => {
                failures.push(format!("sqlx panicked: {e}"));
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let calls = (0..4).map(|_| {
            let store = naive.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..25 {
                    if let Err(e) = store.stats().await {
                        failed.push(e.to_string());
                    }
                }
                failed
            })
        });
        for call in calls.collect::<Vec<_>>() {
            match call.await {
                Ok(failed) => failures.extend(failed),
                // A name collision can run another client's statement under ours: sqlx
                // then panics decoding a row of the wrong shape.
                Err(e) if e.is_panic() => failures.push(format!("sqlx panicked: {e}")),
                Err(e) => panic!("{e}"),
            }
        }
        naive.pool().close().await;
    }
    common::drop_schema(&direct).await;
    drop(pooler);
    drop(database);
    assert!(
        !failures.is_empty(),
        "a store without transaction_pooler(true) worked behind PgBouncer in transaction mode"
    );
    assert!(
        failures
            .iter()
            .all(|f| f.contains("prepared statement") || f.starts_with("sqlx panicked")),
        "failed for another reason than its named statements: {failures:?}"
    );
}

/// Two workers drain 2,000 operations submitted by 4 submitters, all through the pooler;
/// every operation runs once. Then a worker waits for work with a poll interval of a
/// minute: only the `LISTEN` on the direct connection can wake it in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_submitters_work_through_the_pooler() {
    let Some((database, pooler)) = database_and_pooler(strict(8)).await else {
        return;
    };
    let schema = common::fresh_schema();
    let store = PostgresStore::connect_with(pooler::options(&pooler, &database.url, &schema))
        .await
        .unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let outcome = tokio::spawn({
        let shared = Arc::clone(&shared);
        let store = store.clone();
        async move {
            const N: usize = 2_000;
            let submits = (0..4).map(|k| {
                let queue = Queue::new(Arc::clone(&shared));
                tokio::spawn(async move {
                    for i in 0..N / 4 {
                        queue
                            .submit(NewOperation::new("pooled", json!({ "k": k, "i": i })))
                            .await
                            .unwrap();
                    }
                })
            });
            for submit in submits.collect::<Vec<_>>() {
                submit.await.unwrap();
            }
            let ran = Arc::new(AtomicUsize::new(0));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let workers = (0..2).map(|_| {
                let mut registry = Registry::new();
                let counter = Arc::clone(&ran);
                registry.register("pooled", move |_: Value, _| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, HandlerError>(Value::Null) }
                });
                let mut stop = stop_rx.clone();
                let worker = Worker::new(Arc::clone(&shared), registry)
                    .concurrency(16)
                    .poll_interval(Duration::from_millis(10));
                tokio::spawn(worker.run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                }))
            });
            let workers: Vec<_> = workers.collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let stats = shared.stats().await.unwrap();
                if stats
                    .kinds
                    .get("pooled")
                    .is_some_and(|k| k.completed as usize == N)
                {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "drain stalled: {stats:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = stop_tx.send(true);
            for worker in workers {
                worker.await.unwrap().unwrap();
            }
            assert_eq!(ran.load(Ordering::SeqCst), N, "an operation ran twice");

            // Woken by LISTEN on the direct connection, not by a poll a minute away.
            let waker = InProcessWaker::new();
            let listener = store.listen(waker.clone()).await.unwrap();
            let mut registry = Registry::new();
            let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
            registry.register("woken", move |_: Value, _| {
                let _ = seen_tx.send(());
                async { Ok::<_, HandlerError>(Value::Null) }
            });
            let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
            let worker = Worker::new(Arc::clone(&shared), registry)
                .poll_interval(Duration::from_secs(60))
                .wake_on(waker.subscribe());
            let worker = tokio::spawn(worker.run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }));
            // The first may be found by the worker's first look for work; the second is
            // submitted once the worker, having run the first, waits for its next poll
            // a minute away — only a wake-up can bring it sooner.
            for nth in ["first", "second"] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Queue::new(Arc::clone(&shared))
                    .submit(NewOperation::new("woken", json!({ "nth": nth })))
                    .await
                    .unwrap();
                tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("the {nth} operation did not wake the worker through LISTEN")
                    });
            }
            let _ = stop_tx.send(true);
            worker.await.unwrap().unwrap();
            drop(listener);
        }
    })
    .await;
    clean_up(&store, &database.url).await;
    drop(pooler);
    drop(database);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Behind a pooler with no direct URL, `listen` says what is missing instead of
/// listening on a connection the pooler takes back after each transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_behind_a_pooler_needs_a_direct_url() {
    let Some((database, pooler)) = database_and_pooler(strict(4)).await else {
        return;
    };
    let schema = common::fresh_schema();
    let store = PostgresStore::connect_with(
        PostgresOptions::new(&pooler.url)
            .schema(schema.clone())
            .transaction_pooler(true),
    )
    .await
    .unwrap();
    let result = store.listen(InProcessWaker::new()).await;
    clean_up(&store, &database.url).await;
    drop(pooler);
    match result {
        Err(e @ Error::Unsupported { .. }) => {
            assert!(e.to_string().contains("listen_url"), "{e}")
        }
        other => panic!("listen behind a pooler without a direct URL gave {other:?}"),
    }
}

/// A URL alone can say that the store is behind a transaction pooler and where `LISTEN`
/// connects, so `fascicle::connect` and the CLI's `--database-url` work there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_alone_can_put_the_store_behind_a_pooler() {
    let Some((database, pooler)) = database_and_pooler(strict(2)).await else {
        return;
    };
    let schema = common::fresh_schema();
    let listen: String = url::form_urlencoded::byte_serialize(database.url.as_bytes()).collect();
    let url = format!(
        "{}?fascicle_pooler=transaction&fascicle_listen_url={listen}",
        pooler.url
    );
    let store = PostgresStore::connect_with(PostgresOptions::new(&url).schema(schema.clone()))
        .await
        .unwrap();
    assert!(store.behind_transaction_pooler());
    let inner = store.clone();
    let outcome = tokio::spawn(async move {
        let store = inner;
        let listener = store.listen(InProcessWaker::new()).await;
        assert!(listener.is_ok(), "{listener:?}");
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        let receipts = Queue::new(Arc::clone(&shared))
            .submit_many((0..50).map(|i| NewOperation::new("by_url", json!({ "i": i }))))
            .await
            .unwrap();
        for receipt in &receipts {
            assert!(shared.get(receipt.id).await.unwrap().is_some());
        }
        assert_eq!(shared.stats().await.unwrap().work().ready, 50);
    })
    .await;
    clean_up(&store, &database.url).await;
    drop(pooler);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A store not told about the pooler is refused by it at once (PgBouncer refuses sqlx's
/// `extra_float_digits` startup parameter), and the error says what to add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_the_store_was_not_told_about_is_named_in_the_error() {
    let Some((_database, pooler)) = database_and_pooler(strict(2)).await else {
        return;
    };
    let result = PostgresStore::connect_with(
        PostgresOptions::new(&pooler.url).schema(common::fresh_schema()),
    )
    .await;
    match result {
        Err(e) => assert!(e.to_string().contains("fascicle_pooler=transaction"), "{e}"),
        Ok(_) => panic!("a store without transaction_pooler connected through a strict pooler"),
    }
}

/// Behind a pooler the statement timeout cannot be a connection parameter: it is set in
/// each transaction, the store's own and those of `begin_transaction`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_timeout_holds_behind_a_pooler() {
    let Some((database, pooler)) = database_and_pooler(strict(2)).await else {
        return;
    };
    let schema = common::fresh_schema();
    let store = PostgresStore::connect_with(
        pooler::options(&pooler, &database.url, &schema)
            .statement_timeout(Duration::from_millis(150)),
    )
    .await
    .unwrap();
    let mut tx = store.begin_transaction().await.unwrap();
    let shown: String = sqlx::query_scalar("SHOW statement_timeout")
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let slept = sqlx::query("SELECT pg_sleep(2)")
        .persistent(false)
        .execute(&mut *tx)
        .await;
    drop(tx);
    clean_up(&store, &database.url).await;
    drop(pooler);
    assert_eq!(shown, "150ms");
    let err = slept.expect_err("a 2 s statement outlived a 150 ms timeout");
    assert!(err.to_string().contains("statement timeout"), "{err}");
}
