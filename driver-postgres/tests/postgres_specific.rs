//! Behaviour only PostgreSQL has: killed backends, caller transactions, several pools on
//! one schema, schema-name validation, concurrent migrations, URL redaction.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use fascicle_api::{Error, NewBatch, NewOperation, OperationId, Queue, Store};
use fascicle_postgres::sqlx::{self, AssertSqlSafe};
use fascicle_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use serde_json::json;

fn batch(n: usize) -> NewBatch {
    NewBatch::new("batch_retain")
        .children((0..n).map(|i| NewOperation::new("retain", json!({ "index": i }))))
}

/// Runs `body` with a fresh store, or prints one skip line; drops the schema afterwards.
macro_rules! with_store {
    (|$url:ident, $store:ident| $body:block) => {{
        let database = match common::database().await {
            Ok(database) => database,
            Err(reason) => {
                common::announce_skip(&reason);
                return;
            }
        };
        let $url = database.url.clone();
        let $store = common::fresh_store(&$url).await;
        let cleanup = $store.clone();
        let outcome = tokio::spawn(async move { $body }).await;
        common::drop_schema(&cleanup).await;
        drop(database);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }};
}

async fn count_rows(store: &PostgresStore) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.operations",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_before_commit_leaves_zero_rows() {
    with_store!(|url, store| {
        let app = format!("fascicle-kill-{}", uuid::Uuid::new_v4().simple());
        let victim = PostgresStore::connect_with(
            PostgresOptions::new(&url)
                .schema(store.schema().to_string())
                .application_name(&app)
                .max_connections(2),
        )
        .await
        .unwrap();
        let prepared = fascicle_api::Limits::default()
            .prepare_batch(batch(500))
            .unwrap();
        let mut tx = victim.begin().await.unwrap();
        tx.insert_parent(&prepared.0).await.unwrap();
        tx.insert_children(&prepared.1).await.unwrap();

        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'idle in transaction'",
        )
        .bind(&app)
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(
            killed,
            vec![true],
            "expected to kill exactly the batch's backend"
        );

        let err = tx.commit().await.unwrap_err();
        assert!(err.is_transient(), "a lost connection is transient: {err}");
        assert_eq!(
            count_rows(&store).await,
            0,
            "rows survived a killed backend"
        );
        assert!(store.get(prepared.0.id).await.unwrap().is_none());

        // The pool replaces the dead connection: the next submit works.
        let receipt = Queue::new(Arc::new(victim.clone()))
            .submit_batch(batch(3))
            .await
            .unwrap();
        assert_eq!(store.children_of(receipt.parent_id).await.unwrap().len(), 3);
        victim.pool().close().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_transaction_enqueue_follows_the_callers_commit_or_rollback() {
    with_store!(|_url, store| {
        // Rolled back by the caller: nothing remains.
        let mut tx = store.pool().begin().await.unwrap();
        let dropped = store.submit_batch_in(&mut tx, batch(4)).await.unwrap();
        assert!(
            store.get(dropped.parent_id).await.unwrap().is_none(),
            "visible before commit"
        );
        tx.rollback().await.unwrap();
        assert_eq!(count_rows(&store).await, 0);

        // Committed by the caller, together with the caller's own write.
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query("CREATE TEMP TABLE caller_write (n int) ON COMMIT DROP")
            .execute(&mut *tx)
            .await
            .unwrap();
        let id = OperationId::new();
        let kept = store
            .submit_batch_in(&mut tx, batch(4).with_id(id))
            .await
            .unwrap();
        assert!(kept.created);
        // Resubmitting in the same transaction returns the batch without aborting it.
        let again = store
            .submit_batch_in(&mut tx, batch(4).with_id(id))
            .await
            .unwrap();
        assert!(!again.created);
        assert_eq!(again.child_ids, kept.child_ids);
        tx.commit().await.unwrap();
        assert_eq!(store.children_of(id).await.unwrap().len(), 4);
        assert_eq!(count_rows(&store).await, 5);

        // Invalid input is refused before anything reaches the caller's transaction.
        let mut tx = store.pool().begin().await.unwrap();
        let err = store
            .submit_batch_in(&mut tx, NewBatch::new("empty"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_racing_on_one_schema_lose_and_duplicate_nothing() {
    with_store!(|url, store| {
        let other = PostgresStore::connect_with(
            PostgresOptions::new(&url)
                .schema(store.schema().to_string())
                .max_connections(4),
        )
        .await
        .unwrap();
        let shared_id = OperationId::new();
        let mut tasks = Vec::new();
        for pool in [store.clone(), other.clone()] {
            for _ in 0..4 {
                let queue = Queue::new(Arc::new(pool.clone()));
                tasks.push(tokio::spawn(async move {
                    let mut receipts = Vec::new();
                    for _ in 0..10 {
                        receipts.push(queue.submit_batch(batch(20)).await.unwrap());
                    }
                    // Everyone also races to create the same batch.
                    let shared = queue
                        .submit_batch(batch(5).with_id(shared_id))
                        .await
                        .unwrap();
                    (receipts, shared)
                }));
            }
        }
        let mut parents = HashSet::new();
        let mut children = HashSet::new();
        let mut created_shared = 0;
        for task in tasks {
            let (receipts, shared) = task.await.unwrap();
            created_shared += usize::from(shared.created);
            for receipt in receipts {
                assert!(parents.insert(receipt.parent_id));
                children.extend(receipt.child_ids);
            }
        }
        assert_eq!(created_shared, 1);
        assert_eq!(children.len(), 80 * 20);
        let stats = other.stats().await.unwrap();
        assert_eq!(stats.batches.open, 81);
        assert_eq!(stats.work().ready, 80 * 20 + 5);
        assert_eq!(count_rows(&store).await, 81 + 1605);
        other.pool().close().await;
    });
}

#[tokio::test]
async fn schema_name_injection_is_rejected_before_connecting() {
    // No server is needed: the name is checked before any connection is made.
    for bad in [
        "fascicle; DROP SCHEMA public CASCADE",
        "public\"",
        "Fascicle",
        "a-b",
        "",
        "9lives",
        "x.y",
        "user",
        "order",
        "pg_jobs",
        &"a".repeat(55),
    ] {
        let err = PostgresStore::connect_with(
            PostgresOptions::new("postgres://nobody@127.0.0.1:1/none").schema(bad),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains("schema name")),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_accepted_schema_submits_and_notifies() {
    use fascicle_api::InProcessWaker;
    use std::time::Duration;

    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return;
        }
    };
    // 54 bytes: the longest name validation accepts, making a 63-byte channel.
    let schema = format!("{:x<54}", common::fresh_schema());
    let store = PostgresStore::connect_with(
        PostgresOptions::new(&database.url)
            .schema(schema.clone())
            .max_connections(3),
    )
    .await
    .expect("the longest accepted schema name must connect and migrate");
    assert_eq!(store.notify_channel().len(), 63);

    let waker = InProcessWaker::new();
    let mut woken = waker.subscribe();
    let listener = store.listen(waker.clone()).await.unwrap();
    let submitter = store.clone();
    let outcome = async move {
        let store = submitter;
        let receipt = Queue::new(Arc::new(store.clone()))
            .submit_batch(batch(3))
            .await
            .expect("a submit on the longest accepted schema failed");
        assert_eq!(store.children_of(receipt.parent_id).await.unwrap().len(), 3);
        tokio::time::timeout(Duration::from_secs(5), woken.woken())
            .await
            .expect("no NOTIFY arrived on the 63-byte channel");

        // One byte more and the server itself refuses the channel, which is why the
        // name is capped at 54.
        let err = sqlx::query("SELECT pg_notify($1, '')")
            .bind(format!("{}x", store.notify_channel()))
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    };
    let outcome = tokio::spawn(outcome).await;
    drop(listener);
    common::drop_schema(&store).await;
    drop(database);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connections_migrate_once() {
    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return;
        }
    };
    let url = database.url.clone();
    let schema = common::fresh_schema();
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let options = PostgresOptions::new(&url)
                .schema(schema.clone())
                .max_connections(1);
            tokio::spawn(PostgresStore::connect_with(options))
        })
        .collect();
    let mut stores = Vec::new();
    for connect in connects {
        stores.push(connect.await.unwrap().expect("concurrent migration failed"));
    }
    let version: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM {schema}.schema_version"
    )))
    .fetch_one(stores[0].pool())
    .await
    .unwrap();
    assert_eq!(version, SCHEMA_VERSION);

    // A schema from a newer fascicle is refused with a clear error.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {schema}.schema_version SET version = version + 5"
    )))
    .execute(stores[0].pool())
    .await
    .unwrap();
    let err = PostgresStore::connect_with(PostgresOptions::new(&url).schema(schema.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Storage { reason, .. } if reason.contains("newer fascicle")),
        "{err}"
    );
    for store in &stores[1..] {
        store.pool().close().await;
    }
    common::drop_schema(&stores[0]).await;
}

#[tokio::test]
async fn passwords_never_appear_in_errors_or_debug() {
    let database = match common::database().await {
        Ok(database) => database,
        Err(reason) => {
            common::announce_skip(&reason);
            return;
        }
    };
    let url = database.url.clone();
    // Same server, a database that does not exist, a password that must stay secret.
    let host = url.split('@').nth(1).unwrap_or("127.0.0.1:5432/test");
    let host = host.split('/').next().unwrap();
    let secret_url = format!("postgres://root:hunter2secret@{host}/no_such_database_fascicle");
    let options = PostgresOptions::new(&secret_url);
    assert!(!format!("{options:?}").contains("hunter2secret"));
    let err = PostgresStore::connect_with(options).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2secret"), "password leaked: {shown}");
    assert!(shown.contains("no_such_database_fascicle"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_wakes_a_worker_in_another_process_without_polling() {
    with_store!(|url, store| {
        use fascicle_api::{HandlerError, InProcessWaker, Registry, Worker};
        use std::time::Duration;

        // The worker's side: its own pool, LISTEN forwarded to an in-process waker, and a
        // poll interval far longer than the test, so only the NOTIFY can wake it.
        let worker_store = PostgresStore::connect_with(
            PostgresOptions::new(&url).schema(store.schema().to_string()),
        )
        .await
        .unwrap();
        let waker = InProcessWaker::new();
        let listener = worker_store.listen(waker.clone()).await.unwrap();
        let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut registry = Registry::new();
        registry.register("ping", move |_: serde_json::Value, ctx| {
            let ran = ran_tx.clone();
            async move {
                let _ = ran.send(ctx.id);
                Ok::<_, HandlerError>(json!("pong"))
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let worker = Worker::new(Arc::new(worker_store.clone()), registry)
            .poll_interval(Duration::from_secs(3600))
            .wake_on(waker.subscribe());
        let handle = tokio::spawn(worker.run(async {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;

        // The producer's side: another pool, no in-process notifier at all.
        let receipt = Queue::new(Arc::new(store.clone()))
            .submit(NewOperation::new("ping", json!({})))
            .await
            .unwrap();
        let ran = tokio::time::timeout(Duration::from_secs(5), ran_rx.recv())
            .await
            .expect("the NOTIFY did not wake the worker")
            .unwrap();
        assert_eq!(ran, receipt.id);
        let _ = stop_tx.send(());
        handle.await.unwrap().unwrap();
        // The listener holds a pooled connection: let it go before closing the pool.
        drop(listener);
        worker_store.pool().close().await;
    });
}
