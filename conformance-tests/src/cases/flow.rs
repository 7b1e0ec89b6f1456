//! Flow control per kind (issue #15): pausing and resuming a kind.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fascicle_api::{Applied, Error, NewOperation, Outcome, Queue, Status, Store};
use serde_json::json;

use super::lifecycle::{claim, finish, status};

async fn submit(queue: &Queue, kind: &str, n: usize) -> Vec<fascicle_api::OperationId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            queue
                .submit(NewOperation::new(kind, json!({ "i": i })))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// A paused kind is not claimed — its operations stay pending and counted as ready,
/// `stats` lists the kind as paused — while other kinds are; resumed, it is claimed
/// again. Pausing twice, or resuming a kind that is not paused, says so and changes
/// nothing.
pub async fn a_paused_kind_is_not_claimed_until_resumed(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    let held = submit(&queue, "held", 3).await;
    let free = submit(&queue, "free", 2).await;
    assert!(
        store.pause("held").await.unwrap(),
        "the kind was not paused yet"
    );
    assert!(
        !store.pause("held").await.unwrap(),
        "pausing twice is a no-op"
    );
    let claimed = claim(&store, 10).await;
    let kinds: HashSet<&str> = claimed.iter().map(|c| c.operation.kind.as_str()).collect();
    assert_eq!(kinds, HashSet::from(["free"]), "a paused kind was claimed");
    assert_eq!(claimed.len(), free.len());
    for id in &held {
        assert_eq!(status(&store, *id).await, Status::Pending);
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.paused, ["held".to_string()].into_iter().collect());
    assert_eq!(
        stats.kinds["held"].ready, 3,
        "a paused kind's work is still counted"
    );
    assert!(
        claim(&store, 10).await.is_empty(),
        "a paused kind was claimed"
    );
    assert!(store.resume("held").await.unwrap());
    assert!(
        !store.resume("held").await.unwrap(),
        "resuming twice is a no-op"
    );
    assert!(store.stats().await.unwrap().paused.is_empty());
    let claimed = claim(&store, 10).await;
    let ids: HashSet<_> = claimed.iter().map(|c| c.operation.id).collect();
    assert_eq!(ids, held.into_iter().collect());
    // A kind with no operation at all can be paused too (work may come later).
    assert!(store.pause("not_yet_submitted").await.unwrap());
    submit(&queue, "not_yet_submitted", 1).await;
    assert!(claim(&store, 10).await.is_empty());
}

/// Pausing a kind lets its running attempts finish: their leases stay held, their
/// outcomes are recorded.
pub async fn pausing_lets_running_attempts_finish(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    submit(&queue, "job", 2).await;
    let running = claim(&store, 2).await;
    assert_eq!(running.len(), 2);
    store.pause("job").await.unwrap();
    let lease = fascicle_api::Lease {
        id: running[0].operation.id,
        token: running[0].lease_token,
    };
    let held = store
        .heartbeat(&[lease], std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert!(held[0].held && !held[0].cancel_requested);
    assert_eq!(
        finish(&store, &running[0], Outcome::Completed(json!(1))).await,
        Applied::Applied
    );
    let retry = Outcome::Retry {
        error: "later".into(),
        run_at: fascicle_api::chrono::Utc::now(),
    };
    assert_eq!(finish(&store, &running[1], retry).await, Applied::Applied);
    assert_eq!(
        status(&store, running[1].operation.id).await,
        Status::Pending
    );
    assert!(
        claim(&store, 10).await.is_empty(),
        "a retried operation of a paused kind was claimed"
    );
}

/// A kind that is not a valid name is refused with `InvalidInput`, and nothing is paused.
pub async fn pause_refuses_kinds_that_are_not_names(store: Arc<dyn Store>) {
    for bad in ["", "   ", "nul\0byte", &"k".repeat(256)] {
        for result in [store.pause(bad).await, store.resume(bad).await] {
            match result {
                Err(Error::InvalidInput(message)) => assert!(message.contains("kind")),
                other => panic!("{bad:?}: expected InvalidInput, got {other:?}"),
            }
        }
    }
    assert!(store.stats().await.unwrap().paused.is_empty());
}

/// Claims racing a pause: once `pause` has returned, no claim that starts after it hands
/// out the kind — checked on every claim of the race, not only at the end.
pub async fn a_pause_holds_against_racing_claims(store: Arc<dyn Store>) {
    let queue = Queue::new(Arc::clone(&store));
    submit(&queue, "raced", 300).await;
    let paused = Arc::new(AtomicBool::new(false));
    let mut claimers = Vec::new();
    for _ in 0..3 {
        let (store, paused) = (Arc::clone(&store), Arc::clone(&paused));
        claimers.push(tokio::spawn(async move {
            let mut after_pause = 0;
            for _ in 0..40 {
                // Read before the claim starts: a claim that began earlier may still
                // hand the kind out.
                let was_paused = paused.load(Ordering::SeqCst);
                let claimed = claim(&store, 2).await;
                if was_paused {
                    after_pause += claimed.len();
                }
                tokio::task::yield_now().await;
            }
            after_pause
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.pause("raced").await.unwrap();
    paused.store(true, Ordering::SeqCst);
    for claimer in claimers {
        assert_eq!(
            claimer.await.unwrap(),
            0,
            "a claim that started after the pause returned handed the kind out"
        );
    }
}

/// The limits of what a claim, a heartbeat and a submit accept, on every driver: a lease
/// longer than [`MAX_LEASE`](fascicle_api::MAX_LEASE) and a `run_at` outside the years
/// 1–9999 are `InvalidInput` and change nothing (never an overflow, nor a lease wrapped
/// into the past); the extremes inside round-trip — a `run_at` in 9999 waits, one in the
/// year 1 is ready, priorities at the integer limits claim in order.
pub async fn extreme_leases_instants_and_priorities(store: Arc<dyn Store>) {
    use fascicle_api::chrono::{DateTime, Utc};
    use fascicle_api::{ClaimRequest, MAX_LEASE, latest_run_at};
    let queue = Queue::new(Arc::clone(&store));
    let request = |lease| ClaimRequest {
        worker_id: "conformance".into(),
        limit: 10,
        lease,
        kinds: None,
    };
    let ids = submit(&queue, "edge", 1).await;
    for lease in [
        MAX_LEASE + std::time::Duration::from_secs(1),
        std::time::Duration::MAX,
    ] {
        assert!(
            matches!(
                store.claim(&request(lease)).await,
                Err(Error::InvalidInput(_))
            ),
            "{lease:?}"
        );
    }
    assert_eq!(
        status(&store, ids[0]).await,
        Status::Pending,
        "a refused claim claimed"
    );
    let held = store.claim(&request(MAX_LEASE)).await.unwrap();
    assert_eq!(held.len(), 1);
    let expires = held[0].operation.lease_expires_at.expect("a lease");
    assert!(expires > Utc::now() + fascicle_api::chrono::Duration::days(6));
    let lease = fascicle_api::Lease {
        id: ids[0],
        token: held[0].lease_token,
    };
    assert!(matches!(
        store.heartbeat(&[lease], std::time::Duration::MAX).await,
        Err(Error::InvalidInput(_))
    ));
    let after = store.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(
        after.lease_expires_at,
        Some(expires),
        "a refused heartbeat moved the lease"
    );
    finish(&store, &held[0], Outcome::Completed(json!(1))).await;

    for run_at in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
        let op = NewOperation::new("edge", json!(null)).with_run_at(run_at);
        assert!(
            matches!(queue.submit(op).await, Err(Error::InvalidInput(_))),
            "{run_at}"
        );
    }
    let far = latest_run_at();
    let later = queue
        .submit(NewOperation::new("far", json!(null)).with_run_at(far))
        .await
        .unwrap()
        .id;
    assert_eq!(store.get(later).await.unwrap().unwrap().run_at, far);
    let early = fascicle_api::earliest_run_at();
    let past = queue
        .submit(NewOperation::new("past", json!(null)).with_run_at(early))
        .await
        .unwrap()
        .id;
    assert_eq!(store.get(past).await.unwrap().unwrap().run_at, early);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.kinds["far"].scheduled, 1);
    assert_eq!(
        stats.kinds["edge"].total(),
        1,
        "a refused submit wrote something"
    );
    let low = queue
        .submit(NewOperation::new("rank", json!(0)).with_priority(i32::MIN))
        .await
        .unwrap()
        .id;
    let high = queue
        .submit(NewOperation::new("rank", json!(1)).with_priority(i32::MAX))
        .await
        .unwrap()
        .id;
    let order: Vec<_> = claim(&store, 10)
        .await
        .iter()
        .map(|c| c.operation.id)
        .collect();
    assert_eq!(
        order,
        [high, past, low],
        "claim order at the integer limits"
    );
}
