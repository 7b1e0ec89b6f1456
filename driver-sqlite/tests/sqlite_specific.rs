//! Behaviour only SQLite has: files, reopening, several stores on one file, busy waits.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fascicle_api::{Error, NewBatch, NewOperation, OperationId, Queue, Status, Store};
use fascicle_conformance::faults::{FaultPlan, FaultyStore};
use fascicle_sqlite::{SCHEMA_VERSION, SqliteOptions, SqliteStore};
use serde_json::json;

fn batch(n: usize) -> NewBatch {
    NewBatch::new("batch_retain")
        .children((0..n).map(|i| NewOperation::new("retain", json!({ "index": i }))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_survive_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durable.db");
    let receipt = {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
        Queue::new(store).submit_batch(batch(25)).await.unwrap()
    };
    let reopened = SqliteStore::open(&path).await.unwrap();
    let parent = reopened.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(parent.status, Status::Pending);
    assert_eq!(parent.children.unwrap().total, 25);
    let children = reopened.children_of(receipt.parent_id).await.unwrap();
    let ids: Vec<_> = children.iter().map(|c| c.id).collect();
    assert_eq!(ids, receipt.child_ids);
    assert!(children.iter().all(|c| c.status == Status::Pending));
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        version, SCHEMA_VERSION,
        "reopening must not re-run migrations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let mut tasks = Vec::new();
    for store in [&a, &b] {
        for _ in 0..4 {
            let queue = Queue::new(Arc::clone(store));
            let reader = Arc::clone(store);
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                for _ in 0..10 {
                    let receipt = queue.submit_batch(batch(20)).await.unwrap();
                    // Read while the other store writes: a reader never sees a partial batch.
                    let seen = reader.children_of(receipt.parent_id).await.unwrap();
                    assert_eq!(seen.len(), 20);
                    receipts.push(receipt);
                }
                receipts
            }));
        }
    }
    let mut parents = HashSet::new();
    let mut children = HashSet::new();
    for task in tasks {
        for receipt in task.await.unwrap() {
            assert!(parents.insert(receipt.parent_id));
            for id in receipt.child_ids {
                assert!(children.insert(id));
            }
        }
    }
    for store in [&a, &b] {
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.batches.open, 80);
        assert_eq!(stats.work().ready, 1600);
    }
    for parent in parents.iter().take(10) {
        assert_eq!(a.children_of(*parent).await.unwrap().len(), 20);
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are my notes, not a database ".repeat(200)).unwrap();
    let err = SqliteStore::open(&path).await.unwrap_err();
    match &err {
        Error::Storage { location, reason } => {
            assert!(location.contains("notes.txt"), "{err}");
            assert!(reason.contains("not a SQLite database"), "{err}");
        }
        other => panic!("expected Error::Storage, got {other:?}"),
    }
    // Nothing was overwritten.
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("these are my notes")
    );
}

#[tokio::test]
async fn an_unwritable_location_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    // A directory that cannot exist: its parent is a regular file (works even as root).
    let path = file.join("queue.db");
    let err = SqliteStore::open(&path).await.unwrap_err();
    match &err {
        Error::Storage { location, reason } => {
            assert!(location.contains("plain-file"), "{err}");
            assert!(reason.contains("cannot open"), "{err}");
        }
        other => panic!("expected Error::Storage, got {other:?}"),
    }
}

#[tokio::test]
async fn a_database_from_a_newer_fascicle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 7)
            .unwrap();
    }
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(&err, Error::Storage { reason, .. } if reason.contains("newer fascicle")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_waits_too_long_gets_a_transient_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let holder = SqliteStore::open(&path).await.unwrap();
    let impatient: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with(SqliteOptions::new(&path).busy_timeout(Duration::from_millis(100)))
            .await
            .unwrap(),
    );
    let lock = holder.begin().await.unwrap();
    let id = OperationId::new();
    let err = Queue::new(Arc::clone(&impatient))
        .submit_batch(batch(3).with_id(id))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "busy must be transient: {err}");
    lock.rollback().await.unwrap();
    assert!(impatient.get(id).await.unwrap().is_none());
    Queue::new(impatient)
        .submit_batch(batch(3).with_id(id))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100k_children_commits_atomically() {
    const N: usize = 100_000;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_temporary().await.unwrap());
    let parent = OperationId::new();
    let full = batch(N).with_id(parent);
    let broken = Queue::new(Arc::new(FaultyStore::new(
        Arc::clone(&store),
        FaultPlan {
            fail_child: Some(N),
            ..FaultPlan::default()
        },
    )));
    assert!(broken.submit_batch(full.clone()).await.is_err());
    assert!(store.get(parent).await.unwrap().is_none());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total() + stats.batches.total(), 0);

    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(full)
        .await
        .unwrap();
    assert_eq!(receipt.child_ids.len(), N);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().ready, N as u64);
    assert_eq!(stats.batches.open, 1);
}

/// What an operation waits for is kept beside its row (so a fan-in's counter updates do
/// not rewrite the list); pruning the batch removes those rows too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_a_batch_removes_what_its_operations_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deps.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let (a, b) = (OperationId::new(), OperationId::new());
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(NewBatch::new("dag").children([
            NewOperation::new("step", json!(1)).with_id(a),
            NewOperation::new("step", json!(2)).with_id(b).after(&[a]),
        ]))
        .await
        .unwrap();
    let lists = || -> i64 {
        rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM fascicle_depends_on", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(lists(), 1);
    store.cancel(receipt.parent_id).await.unwrap();
    let report = store
        .prune(fascicle_api::chrono::Utc::now() + fascicle_api::chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!((report.batches, report.operations), (1, 2));
    assert_eq!(
        lists(),
        0,
        "a pruned batch left its dependency lists behind"
    );
}
