//! Waking workers after a commit.

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::{Operation, OperationId};

/// What a committed submit announces to notifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The batch parent, `None` for a stand-alone operation.
    pub parent_id: Option<OperationId>,
    /// The operations that became claimable, in submission order.
    pub operation_ids: Vec<OperationId>,
}

/// Something that wakes workers once a submit has committed.
///
/// # Contract
///
/// [`Queue`](crate::Queue) calls `notify` only after the transaction committed, so a
/// notifier may read the rows it is told about. A notifier's failure never undoes the
/// submit: the rows stay stored and polling workers find them.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Notifier: Send + Sync + fmt::Debug {
    /// Announces committed operations.
    async fn notify(&self, submitted: &Submitted) -> Result<()>;
}

/// Wakes every in-process worker waiting on it. Cheap to clone; clones share the signal.
///
/// A waiter that subscribed before a notification never misses it, even if it was busy
/// when the notification arrived.
#[derive(Clone, Debug)]
pub struct InProcessWaker {
    sender: Arc<watch::Sender<u64>>,
}

impl InProcessWaker {
    /// A new waker with no waiters.
    pub fn new() -> Self {
        let (sender, _) = watch::channel(0);
        Self {
            sender: Arc::new(sender),
        }
    }

    /// A handle a worker awaits between polls.
    pub fn subscribe(&self) -> WakeSubscription {
        WakeSubscription {
            receiver: self.sender.subscribe(),
        }
    }

    /// How many notifications were sent so far.
    pub fn notifications(&self) -> u64 {
        *self.sender.borrow()
    }

    /// Wakes every subscriber now (what `notify` does; also used by bridges such as the
    /// Postgres `LISTEN` forwarder).
    pub fn wake(&self) {
        self.sender.send_modify(|n| *n += 1);
    }
}

impl Default for InProcessWaker {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Notifier for InProcessWaker {
    async fn notify(&self, _submitted: &Submitted) -> Result<()> {
        self.wake();
        Ok(())
    }
}

/// One waiter's view of an [`InProcessWaker`].
#[derive(Debug)]
pub struct WakeSubscription {
    receiver: watch::Receiver<u64>,
}

impl WakeSubscription {
    /// Resolves at the next notification not yet seen by this subscription.
    pub async fn woken(&mut self) {
        // An error means every waker is gone; nothing will wake us, so park forever and
        // let the caller's poll interval take over.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

type OnOperation = Box<dyn Fn(&Operation) + Send + Sync>;

/// A notifier that runs each notified operation at once, on the submitting task — for
/// tests that must see exactly what a worker woken by the notification would see.
///
/// It reads every notified operation back from the store; an operation that is not
/// visible yet is an error (it would mean the notification came before the commit).
/// Each operation read is recorded and passed to the optional callback.
pub struct InlineExecutor {
    store: Arc<dyn Store>,
    seen: Mutex<Vec<Operation>>,
    on_operation: Option<OnOperation>,
}

impl InlineExecutor {
    /// An executor that records the operations it is notified of.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            seen: Mutex::new(Vec::new()),
            on_operation: None,
        }
    }

    /// Also calls `f` with every notified operation.
    pub fn on_operation(mut self, f: impl Fn(&Operation) + Send + Sync + 'static) -> Self {
        self.on_operation = Some(Box::new(f));
        self
    }

    /// The operations run so far, in notification order.
    pub fn seen(&self) -> Vec<Operation> {
        self.seen.lock().expect("inline executor poisoned").clone()
    }
}

impl fmt::Debug for InlineExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineExecutor")
            .field("store", &self.store)
            .field("seen", &self.seen.lock().map(|s| s.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Notifier for InlineExecutor {
    async fn notify(&self, submitted: &Submitted) -> Result<()> {
        for id in &submitted.operation_ids {
            let operation = self.store.get(*id).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "notified operation {id} is not visible: the notification ran before the commit"
                ))
            })?;
            if let Some(f) = &self.on_operation {
                f(&operation);
            }
            self.seen
                .lock()
                .expect("inline executor poisoned")
                .push(operation);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_busy_at_notification_time_still_wakes() {
        let waker = InProcessWaker::new();
        let mut sub = waker.subscribe();
        let submitted = Submitted {
            parent_id: None,
            operation_ids: vec![],
        };
        waker.notify(&submitted).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), sub.woken())
            .await
            .expect("subscriber missed a notification sent while it was not waiting");
        assert_eq!(waker.notifications(), 1);
    }
}
