//! Batch membership: children join a batch only in the transaction that creates it,
//! and a parent's counters come from the rows inserted.

use std::sync::Arc;

use fascicle_api::chrono::Utc;
use fascicle_api::{Error, NewBatch, NewOperation, OperationId, Queue, Store};
use serde_json::{Value, json};

fn batch_of(kind: &str, n: usize) -> NewBatch {
    NewBatch::new(kind).children((0..n).map(|i| NewOperation::new("retain", json!({ "i": i }))))
}

/// A child joins a batch only in the transaction that inserts the batch's parent: a
/// child naming a committed batch, or no stored row at all, is refused as invalid
/// input (so a committed batch's counters always match its rows, and it can never
/// finalize — or be pruned — while a late child is live); and a parent's
/// `children_total` is the number of children inserted for it, whatever its record
/// claimed.
pub async fn children_join_only_the_batch_of_their_transaction(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let committed = queue
        .submit_batch(batch_of("batch_retain", 1))
        .await
        .unwrap();
    let now = Utc::now();
    let child_of = |parent: OperationId| fascicle_api::ChildRecord {
        id: OperationId::new(),
        parent_id: Some(parent),
        kind: "retain".into(),
        payload: json!({ "late": true }),
        payload_json: json!({ "late": true }).to_string(),
        priority: 0,
        run_at: now,
        serialization_key: None,
        max_attempts: 3,
        created_at: now,
        timeout: None,
        after: Vec::new(),
        dependents: Vec::new(),
    };
    for parent in [committed.parent_id, OperationId::new()] {
        let late = child_of(parent);
        let mut tx = store.begin().await.unwrap();
        let refused = tx.insert_child(&late).await;
        assert!(
            matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("not inserted in this transaction")),
            "a child joined parent {parent} outside its transaction: {refused:?}"
        );
        let refused = tx
            .insert_children(&[child_of(parent), child_of(parent)])
            .await;
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{refused:?}"
        );
        drop(tx);
        assert!(store.get(late.id).await.unwrap().is_none());
    }

    // A record claiming five children, with two inserted: the parent counts two.
    let parent = fascicle_api::ParentRecord {
        id: OperationId::new(),
        kind: "batch_retain".into(),
        metadata: Value::Null,
        children_total: 5,
        created_at: now,
        plan: Default::default(),
        parent_id: None,
        dependents: Vec::new(),
    };
    let mut tx = store.begin().await.unwrap();
    tx.insert_parent(&parent).await.unwrap();
    tx.insert_child(&child_of(parent.id)).await.unwrap();
    tx.insert_children(&[child_of(parent.id)]).await.unwrap();
    tx.commit().await.unwrap();
    let stored = store.get(parent.id).await.unwrap().unwrap();
    assert_eq!(
        stored.children.unwrap().total,
        2,
        "children_total must come from the rows"
    );

    // Looked at again a while later: the committed batch still has its one child.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let batch = store.get(committed.parent_id).await.unwrap().unwrap();
    assert_eq!(batch.children.unwrap().total, 1);
    assert_eq!(
        store.children_of(committed.parent_id).await.unwrap().len(),
        1
    );
}

/// `child_ids_of` lists exactly the ids `children_of` lists, in the same (insertion)
/// order, and nothing for an unknown batch; an idempotent resubmit's receipt carries them.
pub async fn child_ids_of_lists_the_children_in_order(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let id = OperationId::new();
    let first = queue
        .submit_batch(batch_of("batch_retain", 70).with_id(id))
        .await
        .unwrap();
    let ids = store.child_ids_of(first.parent_id).await.unwrap();
    let children: Vec<OperationId> = store
        .children_of(first.parent_id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, children);
    assert_eq!(ids, first.child_ids);
    assert!(
        store
            .child_ids_of(OperationId::new())
            .await
            .unwrap()
            .is_empty()
    );
    // A resubmit with the same batch id (and fresh child ids) returns the stored ones.
    let again = queue
        .submit_batch(batch_of("batch_retain", 3).with_id(id))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.child_ids, first.child_ids);
}

/// An insert of a transaction fails (a taken id, a child naming a parent of another
/// transaction) and the caller commits anyway: the commit rolls back and says so, and
/// nothing the transaction inserted exists — now or a while later.
pub async fn a_transaction_whose_insert_failed_cannot_commit(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let taken = queue
        .submit(NewOperation::new("retain", json!({ "taken": true })))
        .await
        .unwrap()
        .id;
    let now = Utc::now();
    let record = |id: OperationId, parent: Option<OperationId>| fascicle_api::ChildRecord {
        id,
        parent_id: parent,
        kind: "retain".into(),
        payload: json!({}),
        payload_json: "{}".into(),
        priority: 0,
        run_at: now,
        serialization_key: None,
        max_attempts: 3,
        created_at: now,
        timeout: None,
        after: Vec::new(),
        dependents: Vec::new(),
    };
    for failing in ["taken id", "foreign parent"] {
        let parent = fascicle_api::ParentRecord {
            id: OperationId::new(),
            kind: "batch_retain".into(),
            metadata: Value::Null,
            children_total: 3,
            created_at: now,
            plan: Default::default(),
            parent_id: None,
            dependents: Vec::new(),
        };
        let fine: Vec<OperationId> = (0..2).map(|_| OperationId::new()).collect();
        let mut tx = store.begin().await.unwrap();
        tx.insert_parent(&parent).await.unwrap();
        tx.insert_children(&[
            record(fine[0], Some(parent.id)),
            record(fine[1], Some(parent.id)),
        ])
        .await
        .unwrap();
        let bad = match failing {
            "taken id" => record(taken, Some(parent.id)),
            _ => record(OperationId::new(), Some(OperationId::new())),
        };
        assert!(
            tx.insert_child(&bad).await.is_err(),
            "{failing}: the insert must fail"
        );
        let committed = tx.commit().await;
        assert!(
            matches!(&committed, Err(Error::InvalidInput(m)) if m.contains("rolled back")),
            "{failing}: a commit after a failed insert must roll back: {committed:?}"
        );
        for _ in 0..2 {
            assert!(
                store.get(parent.id).await.unwrap().is_none(),
                "{failing}: parent kept"
            );
            for id in &fine {
                assert!(
                    store.get(*id).await.unwrap().is_none(),
                    "{failing}: child kept"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
    }
    // Only the operation submitted first is stored.
    assert_eq!(store.stats().await.unwrap().work().total(), 1);
    assert_eq!(store.stats().await.unwrap().batches.total(), 0);
}

/// A batch read page by page (`children_page`, keyset by the last child of the previous
/// page) gives its children once each, in insertion order — what `children_of` gives —
/// and then an empty page; a page after something that is not a child of the batch (the
/// parent, another batch's child, an unknown id) is `InvalidInput`.
pub async fn children_page_walks_a_batch_in_order(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let batch = queue
        .submit_batch(batch_of("batch_retain", 250))
        .await
        .unwrap();
    let other = queue
        .submit_batch(batch_of("batch_retain", 2))
        .await
        .unwrap();
    let mut walked = Vec::new();
    let mut after = None;
    let mut sizes = Vec::new();
    loop {
        let page = store
            .children_page(batch.parent_id, after, 100)
            .await
            .unwrap();
        sizes.push(page.len());
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for child in &page {
            assert_eq!(child.parent_id, Some(batch.parent_id));
        }
        walked.extend(page.iter().map(|c| c.id));
    }
    assert_eq!(sizes, [100, 100, 50, 0]);
    assert_eq!(
        walked, batch.child_ids,
        "pages out of order, or a child twice"
    );
    let first = store.children_page(batch.parent_id, None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0],
        store.get(batch.child_ids[0]).await.unwrap().unwrap()
    );
    assert!(
        store
            .children_page(batch.parent_id, None, 0)
            .await
            .unwrap()
            .is_empty()
    );
    for cursor in [batch.parent_id, other.child_ids[0], OperationId::new()] {
        let refused = store.children_page(batch.parent_id, Some(cursor), 10).await;
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "a page after {cursor}, no child of the batch, gave {refused:?}"
        );
    }
}
