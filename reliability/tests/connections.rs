//! PostgreSQL connections terminated under the queue (`pg_terminate_backend`): a drain
//! whose backends are killed over and over still finishes with nothing lost, and a
//! submit whose connection dies leaves either the whole batch or no row at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle::postgres::PostgresStore;
use fascicle::postgres::sqlx::{self, PgPool};
use fascicle::{HandlerError, NewBatch, NewOperation, Queue, Registry, Status, Store, Worker};

struct Database {
    store: PostgresStore,
    admin: PgPool,
    application: String,
}

impl Database {
    async fn open() -> Option<Self> {
        let url = fascicle_reliability::postgres_url("the connection tests")?;
        let application = format!(
            "fascicle-chaos-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let store = fascicle_reliability::fresh_postgres(&url, "fascicle_k", |o| {
            o.application_name(&application).max_connections(6)
        })
        .await;
        let admin = PgPool::connect(&url).await.unwrap();
        Some(Self {
            store,
            admin,
            application,
        })
    }

    /// Terminates the store's backends — all of them, or only those inside a statement
    /// or a transaction; returns how many.
    async fn terminate(&self, busy_only: bool) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()
               AND (NOT $2 OR state <> 'idle')",
        )
        .bind(&self.application)
        .bind(busy_only)
        .fetch_one(&self.admin)
        .await
        .unwrap()
    }

    async fn close(self) {
        fascicle_reliability::drop_schema(&self.store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_its_connections_being_terminated() {
    let Some(db) = Database::open().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let queue = Queue::new(Arc::clone(&store));
    let total = 2_000;
    let mut receipts = Vec::new();
    for b in 0..total / 50 {
        let batch = NewBatch::new("chaos_batch").children((0..50).map(|i| {
            NewOperation::new("chaos", serde_json::json!({ "n": b * 50 + i }))
                .with_max_attempts(1_000)
        }));
        receipts.push(queue.submit_batch(batch).await.unwrap());
    }
    let mut registry = Registry::new();
    registry.register("chaos", |input: serde_json::Value, _| async move {
        tokio::time::sleep(Duration::from_millis(input["n"].as_u64().unwrap_or(0) % 3)).await;
        Ok::<_, HandlerError>(input)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(Arc::clone(&store), registry)
        .concurrency(16)
        .claim_batch(16)
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(50))
        .maintenance_interval(Duration::from_millis(200));
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let started = Instant::now();
    let mut terminated = 0;
    let mut rounds = 0;
    let mut next_round = 0;
    let mut done_at_round = 0;
    let mut last_round = Instant::now();
    loop {
        // The stats read itself may meet a terminated connection: retry, after a pause
        // (a tight loop of reconnects would take the pool from the worker).
        let Ok(stats) = store.stats().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if stats.work().outstanding() == 0 && stats.batches.open == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not drained: {stats:?}"
        );
        // A round of terminations every 100 ms, and at least one per tenth of the work
        // done (so a fast host sees as many faults), while a tenth is left. The 100 ms
        // rounds wait for some work done since the last round: on a host whose commits
        // take longer than that (fsync under load), killing every connection every
        // 100 ms would leave no transaction the time to commit at all.
        let outstanding = stats.work().outstanding() as usize;
        let done = total - outstanding;
        if outstanding > total / 10
            && (done >= next_round
                || (last_round.elapsed() >= Duration::from_millis(100) && done > done_at_round))
        {
            terminated += db.terminate(false).await;
            rounds += 1;
            next_round = done + total / 10;
            done_at_round = done;
            last_round = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    let mut lost = 0;
    let mut stranded = 0;
    for receipt in &receipts {
        let parent = store.get(receipt.parent_id).await.unwrap();
        match parent.map(|p| p.status) {
            Some(Status::Completed) => {}
            Some(_) => stranded += 1,
            None => lost += 1,
        }
        let children = store.children_of(receipt.parent_id).await.unwrap();
        lost += receipt.child_ids.len() - children.len();
        stranded += children
            .iter()
            .filter(|c| c.status != Status::Completed)
            .count();
    }
    eprintln!(
        "RELIABILITY | backends terminated during a drain | postgres | {total} | {terminated} backends killed in {rounds} rounds | {lost} | {stranded} | - | {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        rounds >= 2 && terminated >= 2,
        "too few faults: {terminated}"
    );
    assert_eq!((lost, stranded), (0, 0));
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_whose_connection_dies_leaves_all_or_nothing() {
    let Some(db) = Database::open().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let queue = Queue::new(Arc::clone(&store));
    let children = 20_000;
    let (mut failed, mut committed) = (0, 0);
    for attempt in 0..8u64 {
        let parent = fascicle::OperationId::new();
        let batch = NewBatch::new("chaos_batch").with_id(parent).children(
            (0..children).map(|i| NewOperation::new("chaos", serde_json::json!({ "n": i }))),
        );
        let submit = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.submit_batch(batch).await })
        };
        // Kill the connection once it is inside the submit's transaction (a little
        // later on each attempt), unless the submit is already over.
        tokio::time::sleep(Duration::from_millis(attempt * 4)).await;
        while !submit.is_finished() && db.terminate(true).await == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let outcome = submit.await.unwrap();
        // Whatever the submit answered, the rows are all there or none is.
        let stored = loop {
            match store.children_of(parent).await {
                Ok(rows) => break rows.len(),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let parent_row = store.get(parent).await.unwrap();
        match outcome {
            Ok(receipt) => {
                committed += 1;
                assert_eq!(receipt.child_ids.len(), children);
                assert_eq!(stored, children);
                assert!(parent_row.is_some());
            }
            Err(error) => {
                failed += 1;
                assert!(
                    error.is_transient() || matches!(error, fascicle::Error::Backend { .. }),
                    "{error}"
                );
                // A commit whose answer was lost may have landed: then it is whole.
                assert!(
                    stored == 0 && parent_row.is_none() || stored == children,
                    "partial batch: {stored} of {children} children, parent {parent_row:?}"
                );
            }
        }
    }
    eprintln!(
        "RELIABILITY | backend terminated during a 20,000-child submit | postgres | {} | 8 terminations | 0 | 0 | - ({failed} submits failed, {committed} committed whole)",
        8 * children
    );
    assert!(
        failed > 0,
        "no submit was interrupted; the test injected nothing"
    );
    // The store is still usable.
    queue
        .submit_batch(
            NewBatch::new("after").child(NewOperation::new("chaos", serde_json::json!({}))),
        )
        .await
        .unwrap();
    db.close().await;
}
