//! `Queue::submit_batch_from` / `submit_batch_stream`: a batch whose children come from an
//! iterator or a stream, inserted a chunk at a time in the batch's one transaction — all
//! of it or none, invisible until the commit, whatever the chunk a failure comes in.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fascicle_api::{
    BackendErrorKind, Error, Limits, NewBatch, NewOperation, Notifier, OperationId, Queue,
    STREAM_CHUNK, Status, Store, Submitted, async_trait,
};
use serde_json::json;

use crate::faults::{FaultPlan, FaultyStore};

/// More than two chunks, the last one partial.
const STREAMED: usize = 2 * STREAM_CHUNK + 7;

fn child(i: usize, id: OperationId) -> NewOperation {
    NewOperation::new(
        format!("streamed_{}", i % 3),
        json!({ "index": i, "text": format!("child {i}") }),
    )
    .with_id(id)
    .with_priority((i % 5) as i32 - 2)
}

fn ids(n: usize) -> Vec<OperationId> {
    (0..n).map(|_| OperationId::new()).collect()
}

async fn work(store: &Arc<dyn Store>) -> u64 {
    store.stats().await.unwrap().work().total()
}

/// Records what it is told, after each commit.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Submitted>>);

#[async_trait]
impl Notifier for Recorder {
    async fn notify(&self, submitted: &Submitted) -> fascicle_api::Result<()> {
        self.0.lock().unwrap().push(submitted.clone());
        Ok(())
    }
}

/// A stream over `items` that, before item `pause_at`, waits until `resume` is notified
/// (after notifying `paused`); it counts the items it hands out.
struct TestStream {
    items: std::vec::IntoIter<Result<NewOperation, String>>,
    pause_at: Option<usize>,
    paused: Arc<tokio::sync::Notify>,
    resume: Arc<tokio::sync::Notify>,
    waiting: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    given: Arc<AtomicUsize>,
}

impl TestStream {
    fn new(items: Vec<Result<NewOperation, String>>) -> Self {
        Self {
            items: items.into_iter(),
            pause_at: None,
            paused: Arc::new(tokio::sync::Notify::new()),
            resume: Arc::new(tokio::sync::Notify::new()),
            waiting: None,
            given: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl fascicle_api::Stream for TestStream {
    type Item = Result<NewOperation, String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let given = self.given.load(Ordering::SeqCst);
        if self.pause_at == Some(given) {
            if self.waiting.is_none() {
                let resume = Arc::clone(&self.resume);
                self.paused.notify_one();
                self.waiting = Some(Box::pin(async move { resume.notified().await }));
            }
            match self.waiting.as_mut().unwrap().as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    self.waiting = None;
                    self.pause_at = None;
                }
            }
        }
        let next = self.items.next();
        if next.is_some() {
            self.given.fetch_add(1, Ordering::SeqCst);
        }
        Poll::Ready(next)
    }
}

/// A batch with two children of its own and `2 × STREAM_CHUNK + 7` from an iterator: one
/// batch with every child, its own first, in order and as given; its total counted; workers
/// notified once of every child, after the commit. Submitted again under its id, the
/// existing batch is the answer and the iterator is never read. The same through a stream.
pub async fn streamed_batch_commits_every_child_in_order(store: Arc<dyn Store>) {
    let recorder = Arc::new(Recorder::default());
    let queue = Queue::new(Arc::clone(&store)).with_notifier(recorder.clone());
    let parent = OperationId::new();
    let streamed = ids(STREAMED);
    let own = ids(2);
    let batch = NewBatch::new("streamed_batch")
        .with_id(parent)
        .with_metadata(json!({ "streamed": true }))
        .children([
            NewOperation::new("own", json!({ "own": 0 })).with_id(own[0]),
            NewOperation::new("own", json!({ "own": 1 })).with_id(own[1]),
        ]);
    let receipt = queue
        .submit_batch_from(
            batch.clone(),
            streamed
                .clone()
                .into_iter()
                .enumerate()
                .map(|(i, id)| child(i, id)),
        )
        .await
        .unwrap();
    assert!(receipt.created && receipt.notified);
    assert_eq!(receipt.parent_id, parent);
    let expected: Vec<OperationId> = own.iter().chain(&streamed).copied().collect();
    assert_eq!(
        receipt.child_ids, expected,
        "the receipt's children, in order"
    );

    let stored = store
        .get(parent)
        .await
        .unwrap()
        .expect("the parent is stored");
    assert!(stored.is_parent());
    assert_eq!(stored.metadata, Some(json!({ "streamed": true })));
    let counters = stored.children.expect("a parent has counters");
    assert_eq!(counters.total as usize, STREAMED + 2);
    assert_eq!(store.child_ids_of(parent).await.unwrap(), expected);
    assert_eq!(work(&store).await as usize, STREAMED + 2);
    for i in [0, STREAM_CHUNK - 1, STREAM_CHUNK, STREAMED - 1] {
        let op = store
            .get(streamed[i])
            .await
            .unwrap()
            .expect("a streamed child is stored");
        assert_eq!(op.parent_id, Some(parent));
        assert_eq!(op.kind, format!("streamed_{}", i % 3));
        assert_eq!(
            op.payload,
            Some(json!({ "index": i, "text": format!("child {i}") }))
        );
        assert_eq!(op.priority, (i % 5) as i32 - 2);
        assert_eq!(op.status, Status::Pending);
    }
    {
        let told = recorder.0.lock().unwrap();
        assert_eq!(told.len(), 1, "one notification, after the commit");
        assert_eq!(told[0].parent_id, Some(parent));
        let mut notified = told[0].operation_ids.clone();
        notified.sort();
        let mut all = expected.clone();
        all.sort();
        assert_eq!(notified, all, "every child is notified");
    }

    // Again under the same id: the stored batch, the iterator never read.
    let read = AtomicUsize::new(0);
    let again = queue
        .submit_batch_from(
            batch,
            (0..10).map(|i| {
                read.fetch_add(1, Ordering::SeqCst);
                NewOperation::new("never", json!(i))
            }),
        )
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.child_ids, expected);
    assert_eq!(read.load(Ordering::SeqCst), 0, "the iterator was read");
    assert_eq!(work(&store).await as usize, STREAMED + 2);

    // Through a stream, with no children of its own, in a spawned task (the future is Send).
    let streamed = ids(STREAM_CHUNK + 1);
    let stream = TestStream::new(
        streamed
            .iter()
            .enumerate()
            .map(|(i, id)| Ok(child(i, *id)))
            .collect(),
    );
    let spawned = queue.clone();
    let receipt = tokio::spawn(async move {
        spawned
            .submit_batch_stream(NewBatch::new("streamed_from_a_stream"), stream)
            .await
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(receipt.child_ids, streamed);
    assert_eq!(
        store.child_ids_of(receipt.parent_id).await.unwrap(),
        streamed
    );
    assert_eq!(work(&store).await as usize, STREAMED + 2 + STREAM_CHUNK + 1);

    // With a nested batch: the root's own child, the streamed ones, then the nested batch
    // — in the receipt, in the store and to the notifiers. The limit counts every row of
    // the tree with the streamed ones: exactly `max_children` go in, one more does not.
    let before = work(&store).await as usize;
    let tree = |own: OperationId, nested: OperationId, inner: [OperationId; 2]| {
        NewBatch::new("streamed_tree")
            .child(NewOperation::new("own", json!("own")).with_id(own))
            .child_batch(NewBatch::new("nested").with_id(nested).children([
                NewOperation::new("inner", json!(0)).with_id(inner[0]),
                NewOperation::new("inner", json!(1)).with_id(inner[1]),
            ]))
    };
    let recorder = Arc::new(Recorder::default());
    // 4 rows in the tree below the root (own, nested, its 2) and 20 streamed.
    let limited = Queue::new(Arc::clone(&store))
        .with_notifier(recorder.clone())
        .with_limits(Limits {
            max_children: 24,
            ..Limits::default()
        });
    let (own, nested, inner, streamed) = (OperationId::new(), OperationId::new(), ids(2), ids(20));
    let receipt = limited
        .submit_batch_from(
            tree(own, nested, [inner[0], inner[1]]),
            streamed
                .clone()
                .into_iter()
                .enumerate()
                .map(|(i, id)| child(i, id)),
        )
        .await
        .unwrap();
    let expected: Vec<OperationId> = std::iter::once(own)
        .chain(streamed.iter().copied())
        .chain(std::iter::once(nested))
        .collect();
    assert_eq!(receipt.child_ids, expected);
    assert_eq!(
        store.child_ids_of(receipt.parent_id).await.unwrap(),
        expected
    );
    let root = store.get(receipt.parent_id).await.unwrap().unwrap();
    assert_eq!(root.children.map(|c| c.total), Some(22));
    let inner_batch = store.get(nested).await.unwrap().unwrap();
    assert_eq!(inner_batch.children.map(|c| c.total), Some(2));
    let told: Vec<OperationId> = recorder.0.lock().unwrap()[0].operation_ids.clone();
    let in_order: Vec<OperationId> = std::iter::once(own)
        .chain(streamed.iter().copied())
        .chain(inner.iter().copied())
        .collect();
    assert_eq!(told, in_order, "notified in insertion order");
    assert_eq!(work(&store).await as usize, before + 23);

    let (own, nested, inner, streamed) = (OperationId::new(), OperationId::new(), ids(2), ids(21));
    let result = limited
        .submit_batch_from(
            tree(own, nested, [inner[0], inner[1]]),
            streamed.into_iter().enumerate().map(|(i, id)| child(i, id)),
        )
        .await;
    match result {
        Err(Error::InvalidInput(reason)) if reason.contains("more than 24 children") => {}
        other => panic!("one row over the limit: expected InvalidInput, got {other:?}"),
    }
    // A streamed id repeating a nested batch's child.
    let (own, nested, inner) = (OperationId::new(), OperationId::new(), ids(2));
    let repeat = inner[1];
    let result = limited
        .submit_batch_from(
            tree(own, nested, [inner[0], inner[1]]),
            [child(0, OperationId::new()), child(1, repeat)],
        )
        .await;
    match result {
        Err(Error::InvalidInput(reason)) if reason.contains(&format!("repeats id {repeat}")) => {}
        other => panic!("a streamed id repeating a nested child's: got {other:?}"),
    }
    assert!(store.get(own).await.unwrap().is_none());
    assert_eq!(work(&store).await as usize, before + 23);

    // A root of nested batches only, with an empty stream: a batch like any other.
    let nested = OperationId::new();
    let receipt = queue
        .submit_batch_from(
            NewBatch::new("streamed_nested_only").child_batch(
                NewBatch::new("nested")
                    .with_id(nested)
                    .child(NewOperation::new("inner", json!(0))),
            ),
            std::iter::empty(),
        )
        .await
        .unwrap();
    assert_eq!(receipt.child_ids, vec![nested]);
    assert_eq!(work(&store).await as usize, before + 24);
}

/// Every way a streamed batch can fail after chunks of it reached the store — a refused
/// child, a stream error, a repeated id, too many children, a dependency, a failed
/// insert, a failed commit — leaves no row and notifies nothing; an empty stream is a
/// batch without children, refused.
pub async fn streamed_batch_is_all_or_nothing(store: Arc<dyn Store>) {
    let recorder = Arc::new(Recorder::default());
    let queue = Queue::new(Arc::clone(&store)).with_notifier(recorder.clone());
    let n = STREAM_CHUNK + STREAM_CHUNK / 2;
    let late = STREAM_CHUNK + 17;

    let check = |what: &'static str,
                 result: fascicle_api::Result<fascicle_api::BatchReceipt>,
                 parent: OperationId,
                 children: Vec<OperationId>,
                 expect: &'static str| {
        let store = Arc::clone(&store);
        let recorder = Arc::clone(&recorder);
        async move {
            match result {
                Err(e) if e.to_string().contains(expect) => {}
                other => panic!("{what}: expected an error saying {expect:?}, got {other:?}"),
            }
            assert!(
                store.get(parent).await.unwrap().is_none(),
                "{what}: the parent was stored"
            );
            for id in [
                children[0],
                children[STREAM_CHUNK - 1],
                children[STREAM_CHUNK],
            ] {
                assert!(
                    store.get(id).await.unwrap().is_none(),
                    "{what}: child {id} was stored"
                );
            }
            assert_eq!(work(&store).await, 0, "{what}: rows were left behind");
            assert!(
                recorder.0.lock().unwrap().is_empty(),
                "{what}: workers were notified"
            );
        }
    };
    let batch = |parent| NewBatch::new("streamed_failing").with_id(parent);

    // A refused child in the second chunk.
    let (parent, children) = (OperationId::new(), ids(n));
    let input = children
        .clone()
        .into_iter()
        .enumerate()
        .map(move |(i, id)| {
            if i == late {
                NewOperation::new("", json!(i)).with_id(id)
            } else {
                child(i, id)
            }
        });
    let result = queue.submit_batch_from(batch(parent), input).await;
    let expect = "child #10017 kind is empty";
    assert_eq!(late, 10_017, "the message above names the late index");
    check("a refused child", result, parent, children, expect).await;

    // The stream fails in the second chunk.
    let (parent, children) = (OperationId::new(), ids(n));
    let items = children
        .iter()
        .enumerate()
        .map(|(i, id)| {
            if i == late {
                Err("the source file ends in the middle of a line".to_string())
            } else {
                Ok(child(i, *id))
            }
        })
        .collect();
    let result = queue
        .submit_batch_stream(batch(parent), TestStream::new(items))
        .await;
    let expect = "child #10017 of batch `streamed_failing` could not be read from its stream, so \
                  nothing was submitted: the source file ends in the middle of a line";
    check("a stream error", result, parent, children, expect).await;

    // An id repeated across chunks.
    let (parent, children) = (OperationId::new(), ids(n));
    let third = children[3];
    let input = children
        .clone()
        .into_iter()
        .enumerate()
        .map(move |(i, id)| child(i, if i == late { third } else { id }));
    let result = queue.submit_batch_from(batch(parent), input).await;
    check("a repeated id", result, parent, children, "repeats id").await;

    // One child more than the limit.
    let limited = Queue::new(Arc::clone(&store))
        .with_notifier(recorder.clone())
        .with_limits(Limits {
            max_children: STREAM_CHUNK + 1,
            ..Limits::default()
        });
    let (parent, children) = (OperationId::new(), ids(STREAM_CHUNK + 2));
    let input = children
        .clone()
        .into_iter()
        .enumerate()
        .map(|(i, id)| child(i, id));
    let result = limited.submit_batch_from(batch(parent), input).await;
    check(
        "too many children",
        result,
        parent,
        children,
        "has more than 10001",
    )
    .await;

    // A streamed child that waits for another.
    let (parent, children) = (OperationId::new(), ids(n));
    let first = children[0];
    let input = children
        .clone()
        .into_iter()
        .enumerate()
        .map(move |(i, id)| {
            if i == late {
                child(i, id).after(&[first])
            } else {
                child(i, id)
            }
        });
    let result = queue.submit_batch_from(batch(parent), input).await;
    check(
        "a dependency",
        result,
        parent,
        children,
        "a streamed child cannot have dependencies",
    )
    .await;

    // The store fails an insert in the second chunk, then a commit.
    for (what, plan) in [
        (
            "a failed insert",
            FaultPlan {
                fail_child: Some(late + 1),
                ..FaultPlan::default()
            },
        ),
        (
            "a failed commit",
            FaultPlan {
                fail_commit: true,
                ..FaultPlan::default()
            },
        ),
    ] {
        let broken: Arc<dyn Store> = Arc::new(FaultyStore::new(Arc::clone(&store), plan));
        let broken = Queue::new(broken).with_notifier(recorder.clone());
        let (parent, children) = (OperationId::new(), ids(n));
        let input = children
            .clone()
            .into_iter()
            .enumerate()
            .map(|(i, id)| child(i, id));
        let result = broken.submit_batch_from(batch(parent), input).await;
        match &result {
            Err(Error::Backend {
                kind: BackendErrorKind::Injected,
                ..
            }) => {}
            other => panic!("{what}: expected the injected failure, got {other:?}"),
        }
        check(what, result, parent, children, "injected").await;
    }

    // No children at all.
    let parent = OperationId::new();
    let result = queue
        .submit_batch_from(batch(parent), std::iter::empty())
        .await;
    match result {
        Err(Error::InvalidInput(reason)) if reason.contains("has no children") => {}
        other => panic!("an empty stream: expected InvalidInput, got {other:?}"),
    }
    assert!(store.get(parent).await.unwrap().is_none());
    assert_eq!(work(&store).await, 0);
    // Looked at again after a while: nothing failed above was committed late either.
    super::submit::assert_still_nothing_stored_after_a_while(&store, None, &[], (0, 0)).await;
}

/// While a streamed batch waits for its stream after a first chunk reached the store,
/// another caller sees neither the parent nor any child, in reads and in statistics; the
/// whole batch appears at the commit.
pub async fn streamed_batch_is_invisible_until_its_commit(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let parent = OperationId::new();
    let children = ids(STREAM_CHUNK + 10);
    let mut stream = TestStream::new(
        children
            .iter()
            .enumerate()
            .map(|(i, id)| Ok(child(i, *id)))
            .collect(),
    );
    // The first chunk is inserted once the stream has given STREAM_CHUNK items.
    stream.pause_at = Some(STREAM_CHUNK + 5);
    let paused = Arc::clone(&stream.paused);
    let resume = Arc::clone(&stream.resume);
    let given = Arc::clone(&stream.given);
    let submit = tokio::spawn(async move {
        queue
            .submit_batch_stream(NewBatch::new("streamed_invisible").with_id(parent), stream)
            .await
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), paused.notified())
        .await
        .expect("the stream was never read to its pause");
    assert_eq!(given.load(Ordering::SeqCst), STREAM_CHUNK + 5);
    assert!(
        store.get(parent).await.unwrap().is_none(),
        "the parent is visible"
    );
    for id in [children[0], children[STREAM_CHUNK - 1]] {
        assert!(
            store.get(id).await.unwrap().is_none(),
            "a child of the first chunk is visible before the commit"
        );
    }
    assert!(store.children_of(parent).await.unwrap().is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work().total(), 0, "statistics count uncommitted rows");
    resume.notify_one();
    let receipt = tokio::time::timeout(std::time::Duration::from_secs(60), submit)
        .await
        .expect("the submit never ended")
        .unwrap()
        .unwrap();
    assert_eq!(receipt.child_ids, children);
    assert_eq!(work(&store).await as usize, STREAM_CHUNK + 10);
    assert_eq!(
        store
            .get(parent)
            .await
            .unwrap()
            .and_then(|p| p.children)
            .map(|c| c.total),
        Some((STREAM_CHUNK + 10) as u64)
    );
}
