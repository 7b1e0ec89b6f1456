//! Behaviour only PostgreSQL has: killed backends, caller transactions, several pools on
//! one schema, schema-name validation, concurrent migrations, URL redaction, and one
//! clock (the server's) for every timestamp written.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use fascicle_api::chrono::{DateTime, Duration as TimeDelta, Utc};
use fascicle_api::{
    ChildRecord, ClaimRequest, Error, NewBatch, NewOperation, OperationId, ParentRecord, Queue,
    Store,
};
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

/// A second store on `store`'s schema with its own application name (returned, so a
/// test can find its backends in `pg_stat_activity`) and two connections.
async fn victim(url: &str, store: &PostgresStore, tag: &str) -> (String, PostgresStore) {
    let app = format!("fascicle-{tag}-{}", uuid::Uuid::new_v4().simple());
    let victim = PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(store.schema().to_string())
            .application_name(&app)
            .max_connections(2),
    )
    .await
    .unwrap();
    (app, victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_before_commit_leaves_zero_rows() {
    with_store!(|url, store| {
        let (app, victim) = victim(&url, &store, "kill").await;
        let prepared = fascicle_api::Limits::default()
            .prepare_batch(batch(500))
            .unwrap();
        let mut tx = victim.begin().await.unwrap();
        tx.insert_parent(&prepared.batches[0].0).await.unwrap();
        tx.insert_children(&prepared.batches[0].1).await.unwrap();

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
        assert!(store.get(prepared.root().id).await.unwrap().is_none());

        // The pool replaces the dead connection: the next submit works.
        let receipt = Queue::new(Arc::new(victim.clone()))
            .submit_batch(batch(3))
            .await
            .unwrap();
        assert_eq!(store.children_of(receipt.parent_id).await.unwrap().len(), 3);
        victim.pool().close().await;
    });
}

/// Yields until `wait` has passed: a cancellation point finer than the timer's 1 ms.
async fn spin(wait: std::time::Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < wait {
        tokio::task::yield_now().await;
    }
}

/// A caller that gives up while `BEGIN` is on the wire (a timeout, a dropped request)
/// must not leave the pooled connection inside a transaction: sqlx counts the
/// transaction only once `BEGIN` has answered, so its guard rolled back nothing and the
/// next plain statement on that connection would run in a transaction no one commits,
/// holding its locks. Cancelled at every instant through `begin`, the store's own
/// transactions (`rescue`) and a commit, no connection is ever left in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_begin_leaves_no_connection_in_a_transaction() {
    with_store!(|url, store| {
        let (app, victim) = victim(&url, &store, "cancel").await;
        let mut stuck = Vec::new();
        for step in 0..600u64 {
            let wait = std::time::Duration::from_micros(step * 3);
            let work = async {
                match step % 3 {
                    0 => drop(victim.begin().await),
                    1 => drop(victim.rescue_expired_leases().await),
                    _ => {
                        if let Ok(tx) = victim.begin().await {
                            let _ = tx.commit().await;
                        }
                    }
                }
            };
            tokio::select! {
                biased;
                () = work => {}
                () = spin(wait) => {}
            }
            // Every connection back in the pool (returning runs in a task).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while victim.pool().num_idle() < victim.pool().size() as usize {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a connection never came back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let in_transaction: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
            )
            .bind(&app)
            .fetch_one(store.pool())
            .await
            .unwrap();
            if in_transaction > 0 {
                stuck.push(step);
                // Out of the way, so each later step is judged alone.
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
                )
                .bind(&app)
                .execute(store.pool())
                .await
                .unwrap();
            }
        }
        assert!(
            stuck.is_empty(),
            "left in a transaction after steps {stuck:?}"
        );
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

// ---- One clock: the server's (issue #13 item 10) ----
//
// A client whose clock is off is simulated by building the records by hand, as
// `Limits::prepare_batch` would on that client: `created_at` is the client's "now" and
// `run_at` that now plus the requested delay.

/// Records as a client whose clock reads `skew` away from the real time prepares them,
/// for work `delay` after submission: a parent with `children` children, or (with
/// `parent: false`) that many stand-alone operations.
fn records_on_a_skewed_clock(
    skew: TimeDelta,
    delay: TimeDelta,
    children: usize,
    parent: bool,
) -> (Option<ParentRecord>, Vec<ChildRecord>) {
    let client_now = Utc::now() + skew;
    let parent = parent.then(|| ParentRecord {
        id: OperationId::new(),
        kind: "batch_retain".into(),
        metadata: json!({ "skew_ms": skew.num_milliseconds() }),
        children_total: children as u64,
        created_at: client_now,
        plan: Default::default(),
        parent_id: None,
        dependents: Vec::new(),
    });
    let children = (0..children)
        .map(|i| ChildRecord {
            id: OperationId::new(),
            parent_id: parent.as_ref().map(|p| p.id),
            kind: "retain".into(),
            payload: json!({ "index": i }),
            payload_json: json!({ "index": i }).to_string(),
            priority: 0,
            run_at: client_now + delay,
            serialization_key: None,
            max_attempts: 3,
            created_at: client_now,
            timeout: None,
            after: Vec::new(),
            dependents: Vec::new(),
        })
        .collect();
    (parent, children)
}

/// Inserts through `Store::begin` the way `Queue` does; each slice of children is one
/// `insert_children` call (so its size picks `unnest` below 64 and `COPY` from 64), a
/// slice of one goes through `insert_child`.
async fn insert_in_one_transaction(
    store: &PostgresStore,
    parent: Option<&ParentRecord>,
    calls: &[&[ChildRecord]],
) {
    let mut tx = store.begin().await.unwrap();
    if let Some(parent) = parent {
        tx.insert_parent(parent).await.unwrap();
    }
    for children in calls {
        match children {
            [one] => tx.insert_child(one).await.unwrap(),
            many => tx.insert_children(many).await.unwrap(),
        }
    }
    tx.commit().await.unwrap();
}

async fn server_now(store: &PostgresStore) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn claim_up_to(store: &PostgresStore, limit: usize) -> Vec<OperationId> {
    store
        .claim(&ClaimRequest {
            worker_id: "clock-test".into(),
            limit,
            lease: std::time::Duration::from_secs(30),
            kinds: None,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.operation.id)
        .collect()
}

/// Every id's stored `created_at` (and `updated_at`) is an instant of the server's clock
/// between `from` and `to`, and its `run_at` is `delay` after it.
async fn assert_on_the_servers_clock(
    store: &PostgresStore,
    ids: Vec<OperationId>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    delay: TimeDelta,
) {
    for id in ids {
        let op = store.get(id).await.unwrap().unwrap();
        assert!(
            from <= op.created_at && op.created_at <= to,
            "{id}: created_at {} is not the server's time of the insert (between {from} and {to})",
            op.created_at
        );
        assert_eq!(op.updated_at, op.created_at, "{id}: updated_at");
        let expected_run_at = if op.is_parent() {
            op.created_at
        } else {
            op.created_at + delay
        };
        assert_eq!(op.run_at, expected_run_at, "{id}: run_at");
    }
}

/// A client clock a minute fast, no delay requested: claimable at once, stored at the
/// server's time. `sizes` are the `insert_children` calls of one transaction.
async fn a_fast_clock_delays_nothing(store: &PostgresStore, parent: bool, sizes: &[usize]) {
    let total: usize = sizes.iter().sum();
    let (parent, children) =
        records_on_a_skewed_clock(TimeDelta::seconds(60), TimeDelta::zero(), total, parent);
    let mut calls = Vec::new();
    let mut rest = &children[..];
    for &size in sizes {
        let (call, tail) = rest.split_at(size);
        calls.push(call);
        rest = tail;
    }
    let from = server_now(store).await;
    insert_in_one_transaction(store, parent.as_ref(), &calls).await;
    let to = server_now(store).await;

    // Checked before the claim, which writes updated_at.
    let ids = parent
        .iter()
        .map(|p| p.id)
        .chain(children.iter().map(|c| c.id))
        .collect();
    assert_on_the_servers_clock(store, ids, from, to, TimeDelta::zero()).await;
    let claimed: HashSet<OperationId> = claim_up_to(store, total + 10).await.into_iter().collect();
    let submitted: HashSet<OperationId> = children.iter().map(|c| c.id).collect();
    assert_eq!(
        claimed.len(),
        total,
        "work from a client whose clock runs a minute fast must be claimable at once"
    );
    assert_eq!(claimed, submitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_client_clock_does_not_delay_a_small_batch() {
    with_store!(|_url, store| {
        // Three children: one INSERT … SELECT FROM unnest(…).
        a_fast_clock_delays_nothing(&store, true, &[3]).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_client_clock_does_not_delay_a_copied_batch() {
    with_store!(|_url, store| {
        // 100 children: binary COPY, which cannot call now() itself.
        a_fast_clock_delays_nothing(&store, true, &[100]).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_client_clock_does_not_delay_stand_alone_operations() {
    with_store!(|_url, store| {
        // One through insert_child, then 70 through COPY with no parent insert before it
        // in the transaction, then two more through unnest.
        a_fast_clock_delays_nothing(&store, false, &[1, 70, 2]).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_from_a_fast_client_clock_counts_from_the_servers_clock() {
    with_store!(|_url, store| {
        let delay = TimeDelta::seconds(2);
        let (parent, children) = records_on_a_skewed_clock(TimeDelta::seconds(60), delay, 66, true);
        let (small, large) = children.split_at(2);
        let from = server_now(&store).await;
        insert_in_one_transaction(&store, parent.as_ref(), &[small, large]).await;
        let to = server_now(&store).await;
        let submitted = std::time::Instant::now();
        assert_eq!(
            claim_up_to(&store, 100).await.len(),
            0,
            "claimable before its delay"
        );
        let ids = parent
            .iter()
            .map(|p| p.id)
            .chain(children.iter().map(|c| c.id))
            .collect();
        assert_on_the_servers_clock(&store, ids, from, to, delay).await;

        // Claimable once the two seconds have passed on the server, not a minute later.
        // The two statements placed their rows a moment apart (each on the server's clock
        // when it ran), so a claim may land between the two groups' instants: claim until
        // all are in.
        let mut claimed = Vec::new();
        let mut first = None;
        while claimed.len() < 66 && submitted.elapsed() < std::time::Duration::from_secs(10) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = claim_up_to(&store, 100).await;
            if !now.is_empty() && first.is_none() {
                first = Some(submitted.elapsed());
            }
            claimed.extend(now);
        }
        let waited = submitted.elapsed();
        assert_eq!(claimed.len(), 66, "not claimable after {waited:?}");
        let first = first.expect("claimed");
        assert!(
            first >= std::time::Duration::from_millis(1500),
            "claimed after {first:?}, before the 2 s delay"
        );
        assert!(
            waited < std::time::Duration::from_secs(5),
            "the last ones were claimable only after {waited:?}"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_from_a_slow_client_clock_is_not_cut_short() {
    with_store!(|_url, store| {
        // A client a minute slow asking for 30 s: by the server's clock its run_at would
        // be half a minute in the past.
        let delay = TimeDelta::seconds(30);
        let skew = TimeDelta::seconds(-60);
        let (parent, children) = records_on_a_skewed_clock(skew, delay, 67, true);
        let (small, large) = children.split_at(3);
        let (_, alone) = records_on_a_skewed_clock(skew, delay, 1, false);
        let from = server_now(&store).await;
        insert_in_one_transaction(&store, parent.as_ref(), &[small, large]).await;
        insert_in_one_transaction(&store, None, &[&alone]).await;
        let to = server_now(&store).await;
        assert_eq!(
            claim_up_to(&store, 100).await.len(),
            0,
            "delayed work from a slow client clock ran early"
        );
        let ids = parent
            .iter()
            .map(|p| p.id)
            .chain(children.iter().chain(&alone).map(|c| c.id))
            .collect();
        assert_on_the_servers_clock(&store, ids, from, to, delay).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_right_client_clock_keeps_an_absolute_run_at_to_the_microsecond() {
    with_store!(|_url, store| {
        // The clocks agree (same host): an instant the caller chose is stored as chosen,
        // on both insert paths and in a caller's transaction.
        let at = Utc::now() + TimeDelta::hours(1);
        let scheduled = |n: usize| {
            batch(0)
                .children((0..n).map(|_| NewOperation::new("retain", json!({})).with_run_at(at)))
        };
        let queue = Queue::new(Arc::new(store.clone()));
        let mut ids = Vec::new();
        for n in [3, 100] {
            ids.extend(queue.submit_batch(scheduled(n)).await.unwrap().child_ids);
            let mut tx = store.pool().begin().await.unwrap();
            ids.extend(
                store
                    .submit_batch_in(&mut tx, scheduled(n))
                    .await
                    .unwrap()
                    .child_ids,
            );
            tx.commit().await.unwrap();
        }
        assert_eq!(ids.len(), 206);
        for id in ids {
            let stored = store.get(id).await.unwrap().unwrap().run_at;
            let drift = (stored - at).num_microseconds().unwrap().abs();
            assert!(drift <= 1, "{id}: run_at {stored}, asked for {at}");
        }
    });
}
