//! `Layered`: a store seen through a `Layer` forwards every call, with the layer's hooks
//! around each — checked by the whole conformance suite through a layer, by one call of
//! every method, and by refusals that must leave nothing stored.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fascicle_api::chrono::Utc;
use fascicle_api::{
    Call, ClaimRequest, Completion, Error, KindLimit, Layer, Layered, Lease, NewBatch,
    NewOperation, Outcome, Queue, Result, Schedule, Store, async_trait,
};
use fascicle_memory::MemoryStore;
use serde_json::json;

/// Records each call's name before it runs and its outcome after; refuses the calls
/// named in `refuse`.
#[derive(Debug, Default)]
struct Recorder {
    before: Mutex<Vec<&'static str>>,
    after: Mutex<Vec<(&'static str, bool)>>,
    refuse: Vec<&'static str>,
}

#[async_trait]
impl Layer for Recorder {
    async fn before(&self, call: &Call<'_>) -> Result<()> {
        self.before.lock().unwrap().push(call.name());
        if self.refuse.contains(&call.name()) {
            return Err(Error::Conflict(format!(
                "{} refused by the layer",
                call.name()
            )));
        }
        Ok(())
    }

    fn after(&self, call: &Call<'_>, outcome: std::result::Result<(), &Error>, _: Duration) {
        self.after
            .lock()
            .unwrap()
            .push((call.name(), outcome.is_ok()));
    }
}

mod conformance {
    use super::*;

    // The whole suite through a layer: any call it did not forward, or forwarded wrong,
    // fails a case.
    fascicle_conformance::suite!(async {
        let store = MemoryStore::new();
        let tamper = store.clone();
        let twin = store.clone();
        fascicle_conformance::Fixture::new(Layered::new(Arc::new(store), Recorder::default()))
            .with_tamper(move |parent, total| {
                tamper.overwrite_children_total_for_conformance(parent, total);
                async {}
            })
            .with_twin(move || {
                let twin: Arc<dyn Store> =
                    Arc::new(Layered::new(Arc::new(twin.clone()), Recorder::default()));
                async move { twin }
            })
    });
}

#[tokio::test]
async fn every_call_passes_through_the_layers_hooks() {
    let layered = Layered::new(Arc::new(MemoryStore::new()), Recorder::default());
    let store: &dyn Store = &layered;
    assert_eq!(store.driver(), "memory");
    let queue = Queue::new(Arc::new(Layered::new(
        Arc::clone(layered.inner()),
        Recorder::default(),
    )));
    let receipt = queue
        .submit_batch(NewBatch::new("b").child(NewOperation::new("k", json!(1))))
        .await
        .unwrap();
    let now = Utc::now();

    let mut tx = store.begin().await.unwrap();
    let prepared = fascicle_api::Limits::default()
        .prepare_batch(NewBatch::new("b").child(NewOperation::new("k", json!(2))))
        .unwrap();
    let (parent, children) = &prepared.batches[0];
    tx.insert_parent(parent).await.unwrap();
    tx.insert_children(children).await.unwrap();
    tx.commit().await.unwrap();
    let tx = store.begin().await.unwrap();
    tx.rollback().await.unwrap();

    store.get(receipt.parent_id).await.unwrap();
    store.children_of(receipt.parent_id).await.unwrap();
    store.child_ids_of(receipt.parent_id).await.unwrap();
    store
        .children_page(receipt.parent_id, None, 10)
        .await
        .unwrap();
    store.stats().await.unwrap();
    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "w".into(),
            limit: 1,
            lease: Duration::from_secs(30),
            kinds: None,
        })
        .await
        .unwrap();
    let lease = Lease {
        id: claimed[0].operation.id,
        token: claimed[0].lease_token,
    };
    store
        .heartbeat(&[lease], Duration::from_secs(30))
        .await
        .unwrap();
    store
        .complete(&[Completion {
            id: lease.id,
            lease_token: lease.token,
            outcome: Outcome::Completed(json!("done")),
        }])
        .await
        .unwrap();
    store.release(&[lease]).await.unwrap();
    store.rescue_expired_leases().await.unwrap();
    store.reconcile_orphan_parents().await.unwrap();
    store.cancel(prepared.root().id).await.unwrap();
    let _ = store.retry_batch(receipt.parent_id).await;
    store.pause("k").await.unwrap();
    store.resume("k").await.unwrap();
    store.set_limit("k", KindLimit::running(2)).await.unwrap();
    store.limits().await.unwrap();
    let schedule = Schedule::every(
        "s",
        Duration::from_secs(60),
        NewOperation::new("k", json!(0)),
    );
    store.put_schedule(&schedule, now).await.unwrap();
    store.pause_schedule("s", true).await.unwrap();
    store.schedules().await.unwrap();
    store.due_schedules(now).await.unwrap();
    store.advance_schedule("s", 0, now, now).await.unwrap();
    store.remove_schedule("s").await.unwrap();
    store.prune(now).await.unwrap();
    assert!(
        store
            .elect("maintenance", "w", Duration::from_secs(1))
            .await
            .unwrap()
    );
    store.leader("maintenance").await.unwrap();
    store.resign("maintenance", "w").await.unwrap();
    // An error of the inner store reaches `after` as a failure.
    assert!(matches!(
        store.cancel(fascicle_api::OperationId::new()).await,
        Err(Error::NotFound(_))
    ));

    let names: Vec<&str> = vec![
        "begin",
        "transaction.insert_parent",
        "transaction.insert_children",
        "transaction.commit",
        "begin",
        "transaction.rollback",
        "get",
        "children_of",
        "child_ids_of",
        "children_page",
        "stats",
        "claim",
        "heartbeat",
        "complete",
        "release",
        "rescue_expired_leases",
        "reconcile_orphan_parents",
        "cancel",
        "retry_batch",
        "pause",
        "resume",
        "set_limit",
        "limits",
        "put_schedule",
        "pause_schedule",
        "schedules",
        "due_schedules",
        "advance_schedule",
        "remove_schedule",
        "prune",
        "elect",
        "leader",
        "resign",
        "cancel",
    ];
    let recorder = layered.layer();
    assert_eq!(*recorder.before.lock().unwrap(), names);
    let after = recorder.after.lock().unwrap();
    assert_eq!(
        after.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        names
    );
    let failed: Vec<&str> = after
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| *name)
        .collect();
    // `retry_batch` of a completed batch has nothing to retry; the unknown id is not found.
    assert_eq!(failed, ["retry_batch", "cancel"]);
}

#[tokio::test]
async fn a_refused_insert_or_commit_leaves_nothing_stored() {
    for refused in ["transaction.insert_children", "transaction.commit"] {
        let inner = Arc::new(MemoryStore::new());
        let layered = Arc::new(Layered::new(
            Arc::clone(&inner) as Arc<dyn Store>,
            Recorder {
                refuse: vec![refused],
                ..Recorder::default()
            },
        ));
        let batch = NewBatch::new("b")
            .with_id(fascicle_api::OperationId::new())
            .children((0..3).map(|i| NewOperation::new("k", json!(i))));
        let root = batch.id.unwrap();
        let error = Queue::new(layered.clone() as Arc<dyn Store>)
            .submit_batch(batch)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains(&format!("{refused} refused")),
            "{error}"
        );
        assert!(inner.get(root).await.unwrap().is_none(), "{refused}");
        let stats = inner.stats().await.unwrap();
        assert_eq!(
            (stats.work().total(), stats.batches.total()),
            (0, 0),
            "{refused}"
        );
        // A refused call never reached the inner store, so `after` did not see it.
        let after = layered.layer().after.lock().unwrap();
        assert!(after.iter().all(|(name, _)| *name != refused), "{after:?}");
    }
}
