//! `Queue::submit_many`: independent operations in one transaction — all or nothing,
//! in order, idempotent per caller id, racing submitters storing each id once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fascicle_api::{
    BackendErrorKind, Error, InlineExecutor, Limits, NewBatch, NewOperation, OperationId, Queue,
    Receipt, Status, Store,
};
use serde_json::json;

use super::lifecycle::request;
use crate::faults::{FaultPlan, FaultyStore};

/// `n` operations with chosen ids, kinds, payloads, priorities and keys that differ.
fn operations(n: usize, tag: &str) -> (Vec<NewOperation>, Vec<OperationId>) {
    let ids: Vec<OperationId> = (0..n).map(|_| OperationId::new()).collect();
    let ops = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let op = NewOperation::new(
                format!("many_{}", i % 3),
                json!({ "tag": tag, "index": i, "text": format!("operation {i}") }),
            )
            .with_id(*id)
            .with_priority((i % 5) as i32 - 2);
            if i % 4 == 0 {
                op.with_serialization_key(format!("key:{}", i % 7))
            } else {
                op
            }
        })
        .collect();
    (ops, ids)
}

async fn work(store: &Arc<dyn Store>) -> u64 {
    store.stats().await.unwrap().work().total()
}

async fn assert_none_stored(store: &Arc<dyn Store>, ids: &[OperationId], what: &str) {
    for id in ids {
        assert!(
            store.get(*id).await.unwrap().is_none(),
            "{what}: operation {id} was stored"
        );
    }
    assert_eq!(work(store).await, 0, "{what}: rows were left behind");
}

fn assert_injected(result: fascicle_api::Result<Vec<Receipt>>) {
    match result {
        Err(Error::Backend {
            kind: BackendErrorKind::Injected,
            ..
        }) => {}
        other => panic!("expected the injected failure to surface, got {other:?}"),
    }
}

/// A thousand operations in one call: every one stored as given, stand-alone and ready,
/// the receipts in the order of the input, and workers notified once, after the commit
/// (the inline executor reads every notified id back). An empty call writes nothing.
pub async fn submit_many_stores_every_operation_in_order(store: Arc<dyn Store>) {
    let executor = Arc::new(InlineExecutor::new(Arc::clone(&store)));
    let queue = Queue::new(Arc::clone(&store)).with_notifier(executor.clone());
    assert!(queue.submit_many(Vec::new()).await.unwrap().is_empty());
    assert_eq!(work(&store).await, 0);

    let (ops, ids) = operations(1_000, "order");
    let mut without_id = NewOperation::new("many_plain", json!({ "no": "id" }));
    without_id.id = None;
    let mut input = ops.clone();
    input.push(without_id);
    let receipts = queue.submit_many(input).await.unwrap();
    assert_eq!(receipts.len(), 1_001);
    assert_eq!(
        receipts[..1_000].iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "receipts out of order"
    );
    assert!(!ids.contains(&receipts[1_000].id));
    assert!(receipts.iter().all(|r| r.created && r.notified));
    assert_eq!(work(&store).await, 1_001);
    assert_eq!(store.stats().await.unwrap().work().ready, 1_001);
    for (op, id) in ops.iter().zip(&ids) {
        let stored = store
            .get(*id)
            .await
            .unwrap()
            .expect("a submitted operation");
        assert_eq!(stored.kind, op.kind);
        assert_eq!(stored.payload.as_ref(), Some(&op.payload));
        assert_eq!(stored.priority, op.priority);
        assert_eq!(stored.serialization_key, op.serialization_key);
        assert_eq!(stored.parent_id, None);
        assert_eq!(stored.status, Status::Pending);
    }
    let seen: Vec<OperationId> = executor.seen().iter().map(|op| op.id).collect();
    assert_eq!(
        seen,
        receipts.iter().map(|r| r.id).collect::<Vec<_>>(),
        "workers were not told of exactly the operations submitted"
    );
}

/// One bad operation, a failing insert, a failing commit, an id given twice or too
/// many operations: the call fails and not one operation is stored (looked at again a
/// while later) nor notified; the same operations then go in whole.
pub async fn submit_many_is_all_or_nothing(store: Arc<dyn Store>) {
    let (ops, ids) = operations(1_000, "atomic");

    let mut bad = ops[..10].to_vec();
    bad[7] = NewOperation::new("", json!({})).with_id(ids[7]);
    match Queue::new(Arc::clone(&store)).submit_many(bad).await {
        Err(Error::InvalidInput(message)) => {
            assert!(message.contains("index 7"), "{message}")
        }
        other => panic!("an operation with an empty kind gave {other:?}"),
    }
    assert_none_stored(&store, &ids, "a refused operation").await;

    let mut twice = ops[..10].to_vec();
    twice[9] = twice[3].clone();
    match Queue::new(Arc::clone(&store)).submit_many(twice).await {
        Err(Error::InvalidInput(message)) => {
            assert!(message.contains("index 3 and 9"), "{message}")
        }
        other => panic!("an id given twice gave {other:?}"),
    }
    assert_none_stored(&store, &ids, "an id given twice").await;

    let small = Limits {
        max_children: 5,
        ..Limits::default()
    };
    let result = Queue::new(Arc::clone(&store))
        .with_limits(small)
        .submit_many(ops[..6].to_vec())
        .await;
    assert!(matches!(result, Err(Error::InvalidInput(_))), "{result:?}");
    assert_none_stored(&store, &ids, "too many operations").await;

    for plan in [
        FaultPlan {
            fail_child: Some(1),
            ..FaultPlan::default()
        },
        FaultPlan {
            fail_child: Some(600),
            ..FaultPlan::default()
        },
        FaultPlan {
            fail_commit: true,
            ..FaultPlan::default()
        },
    ] {
        let executor = Arc::new(InlineExecutor::new(Arc::clone(&store)));
        let broken: Arc<dyn Store> = Arc::new(FaultyStore::new(Arc::clone(&store), plan));
        let queue = Queue::new(broken).with_notifier(executor.clone());
        assert_injected(queue.submit_many(ops.clone()).await);
        assert!(
            executor.seen().is_empty(),
            "{plan:?}: a failed call notified"
        );
        assert_none_stored(&store, &ids, &format!("{plan:?}")).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_none_stored(&store, &ids, "looking again 300 ms later").await;

    let receipts = Queue::new(Arc::clone(&store))
        .submit_many(ops)
        .await
        .unwrap();
    assert!(
        receipts.iter().all(|r| r.created),
        "the failed ids were taken"
    );
    assert_eq!(work(&store).await, 1_000);
}

/// An operation whose caller id is stored is answered, not inserted again (its stored
/// payload is kept); the others of the call are inserted. An id that names a batch
/// parent is a conflict, and then nothing of the call is stored.
pub async fn submit_many_is_idempotent_per_caller_id(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let (ops, ids) = operations(6, "idempotent");
    for op in &ops[..3] {
        assert!(queue.submit(op.clone()).await.unwrap().created);
    }
    let mut input = ops.clone();
    for op in &mut input[..3] {
        op.payload = json!({ "changed": true });
    }
    let receipts = queue.submit_many(input.clone()).await.unwrap();
    let created: Vec<bool> = receipts.iter().map(|r| r.created).collect();
    assert_eq!(created, [false, false, false, true, true, true]);
    assert_eq!(receipts.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    assert_eq!(work(&store).await, 6);
    for (op, id) in ops.iter().zip(&ids) {
        let stored = store.get(*id).await.unwrap().unwrap();
        assert_eq!(
            stored.payload.as_ref(),
            Some(&op.payload),
            "payload replaced"
        );
    }
    let again = queue.submit_many(input).await.unwrap();
    assert!(again.iter().all(|r| !r.created), "{again:?}");
    assert_eq!(work(&store).await, 6);

    let batch = queue
        .submit_batch(NewBatch::new("many_batch").child(NewOperation::new("c", json!({}))))
        .await
        .unwrap();
    let fresh = OperationId::new();
    let result = queue
        .submit_many([
            NewOperation::new("many_0", json!({})).with_id(fresh),
            NewOperation::new("many_0", json!({})).with_id(batch.parent_id),
        ])
        .await;
    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
    assert!(store.get(fresh).await.unwrap().is_none());
    assert_eq!(work(&store).await, 7, "the conflicting call stored rows");
}

/// Four submitters race, round after round, over overlapping ids (each call shares
/// half its ids with the next): every id is stored once, and for each id exactly one
/// racer answers `created == true`.
pub async fn racing_submit_many_store_each_id_once(store: Arc<dyn Store>) {
    const ROUNDS: usize = 5;
    const PER_CALL: usize = 100;
    for round in 0..ROUNDS {
        let ids: Vec<OperationId> = (0..PER_CALL * 5 / 2).map(|_| OperationId::new()).collect();
        let calls = (0..4).map(|k| {
            let queue = Queue::new(Arc::clone(&store));
            let mine: Vec<NewOperation> = ids[k * PER_CALL / 2..k * PER_CALL / 2 + PER_CALL]
                .iter()
                .map(|id| {
                    NewOperation::new("many_race", json!({ "round": round, "by": k })).with_id(*id)
                })
                .collect();
            tokio::spawn(async move { queue.submit_many(mine).await })
        });
        let mut created: HashMap<OperationId, usize> = HashMap::new();
        for call in calls.collect::<Vec<_>>() {
            for receipt in call.await.unwrap().unwrap() {
                *created.entry(receipt.id).or_default() += usize::from(receipt.created);
            }
        }
        assert_eq!(created.len(), ids.len());
        for id in &ids {
            assert_eq!(
                created[id], 1,
                "round {round}: {id} created {} times",
                created[id]
            );
            assert!(store.get(*id).await.unwrap().is_some());
        }
        assert_eq!(work(&store).await, ((round + 1) * ids.len()) as u64);
    }
}

/// An operation with a unique key goes in with the rest: a key held before the call is
/// answered with its holder; two operations of one call with one key are one operation;
/// the plain operations beside them are stored.
pub async fn submit_many_answers_unique_key_holders(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let holder = queue
        .submit(NewOperation::new("report", json!({ "n": 0 })).unique("report:held"))
        .await
        .unwrap();
    let receipts = queue
        .submit_many([
            NewOperation::new("report", json!({ "n": 1 })).unique("report:held"),
            NewOperation::new("report", json!({ "n": 2 })).unique("report:new"),
            NewOperation::new("plain", json!({ "n": 3 })),
            NewOperation::new("report", json!({ "n": 4 })).unique("report:new"),
        ])
        .await
        .unwrap();
    assert_eq!((receipts[0].id, receipts[0].created), (holder.id, false));
    assert!(receipts[1].created && receipts[2].created);
    assert_eq!(
        (receipts[3].id, receipts[3].created),
        (receipts[1].id, false),
        "one key twice in a call made two operations"
    );
    let distinct: HashSet<OperationId> = receipts.iter().map(|r| r.id).collect();
    assert_eq!(distinct.len(), 3);
    assert_eq!(work(&store).await, 3);
    let stored = store.get(receipts[1].id).await.unwrap().unwrap();
    assert_eq!(stored.payload, Some(json!({ "n": 2 })));

    // An operation with a caller id and a key is answered by its id when stored, as
    // `submit` answers it — not by the key's later holder.
    let own = OperationId::new();
    let keyed = NewOperation::new("report", json!({ "n": 5 }))
        .with_id(own)
        .unique("report:moving");
    assert!(queue.submit(keyed.clone()).await.unwrap().created);
    store.cancel(own).await.unwrap();
    let next = queue
        .submit(NewOperation::new("report", json!({ "n": 6 })).unique("report:moving"))
        .await
        .unwrap();
    assert!(next.created && next.id != own);
    let again = queue.submit_many([keyed]).await.unwrap();
    assert_eq!(
        (again[0].id, again[0].created),
        (own, false),
        "answered by the key's new holder, not by the caller's id"
    );
}

/// Plain and unique-key operations mixed in one call are stored in the order given:
/// claimed one at a time (same priority, same instant), they come back in input order.
pub async fn submit_many_keeps_the_input_order(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let input: Vec<NewOperation> = (0..7)
        .map(|i| {
            let op = NewOperation::new("ordered", json!({ "i": i }));
            if i % 3 == 0 {
                op.unique(format!("ordered:{i}"))
            } else {
                op
            }
        })
        .collect();
    let receipts = queue.submit_many(input).await.unwrap();
    assert!(receipts.iter().all(|r| r.created));
    let mut claimed = Vec::new();
    for _ in 0..receipts.len() {
        let one = store.claim(&request(1)).await.unwrap();
        assert_eq!(one.len(), 1);
        claimed.push(one[0].operation.id);
    }
    assert_eq!(
        claimed,
        receipts.iter().map(|r| r.id).collect::<Vec<_>>(),
        "not claimed in the order submitted"
    );
}
