//! Ready-made expectations for the mocks (feature `mock`).
//!
//! mockall mocks every method of a trait, the provided ones too: on a [`MockTransaction`],
//! `insert_children` is an expectation of its own and does **not** call `insert_child`
//! for each child as the trait's provided version does. [`Queue`](crate::Queue) inserts a
//! batch's children with one `insert_children` call per batch (the parent's, then each
//! nested batch's), so expect `insert_children` there; `insert_child` is what a
//! stand-alone [`Queue::submit`](crate::Queue::submit) calls.

use std::sync::{Arc, Mutex};

use mockall::Sequence;

use crate::OperationId;
use crate::store::{MockStore, MockTransaction};

impl MockTransaction {
    /// A transaction that expects one flat batch of `children` children, in this order:
    /// `insert_parent` once, with `children_total == children`; `insert_children` once,
    /// with `children` records that all name that parent; `commit` once. It never expects
    /// `rollback` or `insert_child`. Each insert and the commit succeed; any other call,
    /// or a count that differs, fails the test naming what was expected.
    pub fn expecting_one_batch(children: usize) -> Self {
        let mut tx = MockTransaction::new();
        let mut sequence = Sequence::new();
        let parent: Arc<Mutex<Option<OperationId>>> = Arc::default();
        let seen = Arc::clone(&parent);
        tx.expect_insert_parent()
            .times(1)
            .in_sequence(&mut sequence)
            .returning(move |record| {
                assert_eq!(
                    record.children_total, children as u64,
                    "expected a batch of {children} children, the parent counts {}",
                    record.children_total
                );
                *seen.lock().unwrap() = Some(record.id);
                Ok(())
            });
        tx.expect_insert_children()
            .times(1)
            .in_sequence(&mut sequence)
            .returning(move |records| {
                assert_eq!(
                    records.len(),
                    children,
                    "expected {children} children in one insert_children call, got {}",
                    records.len()
                );
                let parent = *parent.lock().unwrap();
                for record in records {
                    assert_eq!(
                        record.parent_id, parent,
                        "child {} does not name the batch's parent",
                        record.id
                    );
                }
                Ok(())
            });
        tx.expect_commit()
            .times(1)
            .in_sequence(&mut sequence)
            .returning(|| Ok(()));
        tx.expect_insert_child().never();
        tx.expect_rollback().never();
        tx
    }
}

impl MockStore {
    /// Expects [`Queue::submit_batch`](crate::Queue::submit_batch) of one flat batch of
    /// `children` children and takes it as a store would: `get` of a caller-supplied
    /// batch id (at most once) finds nothing, `begin` (once) opens
    /// [`MockTransaction::expecting_one_batch`]. Returns `self` for more expectations.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use fascicle::{MockStore, NewBatch, NewOperation, Queue, json};
    ///
    /// let mut store = MockStore::new();
    /// store.expect_one_batch(2);
    /// let receipt = Queue::new(Arc::new(store))
    ///     .submit_batch(
    ///         NewBatch::new("batch_retain")
    ///             .child(NewOperation::new("retain", json!({ "document": "a.txt" })))
    ///             .child(NewOperation::new("retain", json!({ "document": "b.txt" }))),
    ///     )
    ///     .await
    ///     .unwrap();
    /// assert_eq!(receipt.child_ids.len(), 2);
    /// # }
    /// ```
    pub fn expect_one_batch(&mut self, children: usize) -> &mut Self {
        self.expect_get().times(0..=1).returning(|_| Ok(None));
        self.expect_begin()
            .times(1)
            .returning(move || Ok(Box::new(MockTransaction::expecting_one_batch(children))));
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use crate::{MockStore, NewBatch, NewOperation, OperationId, Queue};

    fn batch(n: usize) -> NewBatch {
        NewBatch::new("b").children((0..n).map(|i| NewOperation::new("c", json!(i))))
    }

    #[tokio::test]
    async fn one_batch_of_the_expected_size_passes() {
        let mut store = MockStore::new();
        store.expect_one_batch(3);
        let receipt = Queue::new(Arc::new(store))
            .submit_batch(batch(3).with_id(OperationId::new()))
            .await
            .unwrap();
        assert_eq!(receipt.child_ids.len(), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "expected a batch of 3 children, the parent counts 2")]
    async fn a_batch_of_another_size_fails_the_test() {
        let mut store = MockStore::new();
        store.expect_one_batch(3);
        let _ = Queue::new(Arc::new(store)).submit_batch(batch(2)).await;
    }

    #[tokio::test]
    #[should_panic(expected = "MockStore::begin")]
    async fn a_second_batch_fails_the_test() {
        let mut store = MockStore::new();
        store.expect_one_batch(1);
        let queue = Queue::new(Arc::new(store));
        queue.submit_batch(batch(1)).await.unwrap();
        let _ = queue.submit_batch(batch(1)).await;
    }
}
