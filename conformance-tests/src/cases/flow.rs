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

fn kinds_of(claimed: &[fascicle_api::ClaimedOperation], kind: &str) -> usize {
    claimed.iter().filter(|c| c.operation.kind == kind).count()
}

async fn claim_kind(
    store: &Arc<dyn Store>,
    kind: &str,
    limit: usize,
) -> Vec<fascicle_api::ClaimedOperation> {
    let mut request = super::lifecycle::request(limit);
    request.kinds = Some(vec![kind.to_owned()]);
    store.claim(&request).await.unwrap()
}

/// A running limit (`Store::set_limit`, issue #15): a claim hands out at most the limit's
/// room of the kind — the limit less the kind's `processing` operations — whatever room
/// it has, and other kinds fill the rest. An attempt that ends (completed, or retried back
/// to `pending`) frees its place. `limits` lists the limit, `set_limit` answers the one it
/// replaced, and the default clears it.
pub async fn a_running_limit_caps_claims_of_its_kind(store: Arc<dyn Store>) {
    use fascicle_api::KindLimit;
    let queue = Queue::new(Arc::clone(&store));
    submit(&queue, "capped", 5).await;
    submit(&queue, "free", 3).await;
    assert_eq!(
        store
            .set_limit("capped", KindLimit::running(2))
            .await
            .unwrap(),
        KindLimit::default(),
        "there was no limit before"
    );
    assert_eq!(
        store.limits().await.unwrap(),
        [("capped".to_string(), KindLimit::running(2))].into()
    );
    let first = claim(&store, 10).await;
    assert_eq!(kinds_of(&first, "capped"), 2, "the limit is 2: {first:?}");
    assert_eq!(kinds_of(&first, "free"), 3, "other kinds fill the room");
    assert!(
        claim(&store, 10).await.is_empty(),
        "two are processing: a third was claimed"
    );
    let capped: Vec<_> = first
        .iter()
        .filter(|c| c.operation.kind == "capped")
        .collect();
    assert_eq!(
        finish(&store, capped[0], Outcome::Completed(json!(1))).await,
        Applied::Applied
    );
    let second = claim(&store, 10).await;
    assert_eq!(kinds_of(&second, "capped"), 1, "one place was freed");
    let retry = Outcome::Retry {
        error: "later".into(),
        run_at: fascicle_api::chrono::Utc::now(),
    };
    assert_eq!(finish(&store, capped[1], retry).await, Applied::Applied);
    let third = claim(&store, 10).await;
    assert_eq!(
        kinds_of(&third, "capped"),
        1,
        "a retried attempt frees its place"
    );
    // Raising the limit gives room at once; the old limit is answered.
    assert_eq!(
        store
            .set_limit("capped", KindLimit::running(3))
            .await
            .unwrap(),
        KindLimit::running(2)
    );
    assert_eq!(kinds_of(&claim(&store, 10).await, "capped"), 1);
    assert!(claim(&store, 10).await.is_empty());
    assert_eq!(
        store
            .set_limit("capped", KindLimit::default())
            .await
            .unwrap(),
        KindLimit::running(3)
    );
    assert!(store.limits().await.unwrap().is_empty());
    assert_eq!(
        kinds_of(&claim(&store, 10).await, "capped"),
        1,
        "the last one, once the limit is cleared"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.kinds["capped"].processing, 4);
}

/// Ready work of other kinds is not held back by a limited kind, even when the limited
/// kind's backlog comes first in claim order (higher priority).
pub async fn a_limited_kind_does_not_hold_back_other_kinds(store: Arc<dyn Store>) {
    use fascicle_api::KindLimit;
    let queue = Queue::new(Arc::clone(&store));
    for i in 0..40 {
        queue
            .submit(NewOperation::new("urgent", json!({ "i": i })).with_priority(10))
            .await
            .unwrap();
    }
    submit(&queue, "routine", 5).await;
    store
        .set_limit("urgent", KindLimit::running(1))
        .await
        .unwrap();
    let claimed = claim(&store, 6).await;
    assert_eq!(kinds_of(&claimed, "urgent"), 1);
    assert_eq!(
        kinds_of(&claimed, "routine"),
        5,
        "the limited kind's backlog held back other kinds"
    );
    // A claim of the other kind alone is not held back either.
    submit(&queue, "routine", 2).await;
    assert_eq!(claim_kind(&store, "routine", 5).await.len(), 2);
    assert!(claim_kind(&store, "urgent", 5).await.is_empty());
    // A claim of named kinds, one of them limited, keeps claim order across the others.
    for (kind, priority) in [("routine", 5), ("other", 4), ("routine", 3)] {
        queue
            .submit(NewOperation::new(kind, json!(priority)).with_priority(priority))
            .await
            .unwrap();
    }
    let mut request = super::lifecycle::request(10);
    request.kinds = Some(vec!["routine".into(), "other".into(), "urgent".into()]);
    let claimed = store.claim(&request).await.unwrap();
    let priorities: Vec<i32> = claimed.iter().map(|c| c.operation.priority).collect();
    assert_eq!(priorities, [5, 4, 3], "claim order across kinds");
    // A limited kind with room is claimed in claim order too — not before better work of
    // another kind — and shares the one-per-key rule with it.
    store
        .set_limit("roomy", KindLimit::running(10))
        .await
        .unwrap();
    let low = queue
        .submit(NewOperation::new("roomy", json!(0)).with_serialization_key("k"))
        .await
        .unwrap()
        .id;
    let high = queue
        .submit(
            NewOperation::new("plain", json!(9))
                .with_priority(9)
                .with_serialization_key("k"),
        )
        .await
        .unwrap()
        .id;
    for kinds in [None, Some(vec!["roomy".to_string(), "plain".to_string()])] {
        let mut request = super::lifecycle::request(1);
        request.kinds = kinds.clone();
        let claimed = store.claim(&request).await.unwrap();
        let ids: Vec<_> = claimed.iter().map(|c| c.operation.id).collect();
        assert_eq!(ids, [high], "{kinds:?}: the higher priority first");
        let retry = Outcome::Retry {
            error: "again".into(),
            run_at: fascicle_api::chrono::Utc::now(),
        };
        finish(&store, &claimed[0], retry).await;
    }
    let claimed = claim(&store, 10).await;
    let ids: Vec<_> = claimed.iter().map(|c| c.operation.id).collect();
    assert_eq!(ids, [high], "one per serialization key across kinds");
    assert_eq!(status(&store, low).await, Status::Pending);
}

/// Eight claimers on two store instances (two pools, two connections to one file, two
/// handles) race for a kind limited to 2 running: no moment sees a third `processing` —
/// checked continuously, by every claimer holding what it claimed for a while and by a
/// monitor reading the store's counts, not only at the end — and every operation is
/// claimed exactly once.
pub async fn a_running_limit_holds_against_racing_claimers(store: Arc<dyn Store>) {
    use fascicle_api::KindLimit;
    use std::sync::atomic::AtomicUsize;
    let twin = crate::twin().await;
    let queue = Queue::new(Arc::clone(&store));
    let ids = submit(&queue, "narrow", 48).await;
    store
        .set_limit("narrow", KindLimit::running(2))
        .await
        .unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                let stats = store.stats().await.unwrap();
                let running = stats.kinds.get("narrow").map_or(0, |k| k.processing);
                most = most.max(running);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            most
        })
    };
    let mut claimers = Vec::new();
    for i in 0..8 {
        let instance = if i % 2 == 0 { &store } else { &twin };
        let (store, held, peak) = (Arc::clone(instance), Arc::clone(&held), Arc::clone(&peak));
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut idle = 0;
            while idle < 40 {
                let claimed = claim_kind(&store, "narrow", 2).await;
                if claimed.is_empty() {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                idle = 0;
                let now = held.fetch_add(claimed.len(), Ordering::SeqCst) + claimed.len();
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                held.fetch_sub(claimed.len(), Ordering::SeqCst);
                for c in &claimed {
                    assert_eq!(
                        finish(&store, c, Outcome::Completed(json!(null))).await,
                        Applied::Applied
                    );
                    mine.push(c.operation.id);
                }
            }
            mine
        }));
    }
    let mut seen = Vec::new();
    for claimer in claimers {
        seen.extend(claimer.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let monitored = monitor.await.unwrap();
    assert!(
        monitored <= 2,
        "the store counted {monitored} processing under a limit of 2"
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 2, "claimers held {peak} at once under a limit of 2");
    assert_eq!(
        peak, 2,
        "the race never reached the limit: it checked nothing"
    );
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(seen.len(), unique.len(), "an operation was claimed twice");
    assert_eq!(unique.len(), ids.len(), "an operation was never claimed");
}

/// A rate limit: at most `starts` attempts of the kind begin in any window of `per`;
/// the rest stay `pending` (counted as ready) and are claimed once the window has room
/// again — ending an attempt gives no room, time does.
pub async fn a_rate_limit_spaces_the_starts_of_its_kind(store: Arc<dyn Store>) {
    use fascicle_api::{KindLimit, RateLimit};
    use std::time::{Duration, Instant};
    let queue = Queue::new(Arc::clone(&store));
    submit(&queue, "metered", 8).await;
    submit(&queue, "free", 2).await;
    let per = Duration::from_millis(800);
    store
        .set_limit("metered", KindLimit::rate(RateLimit::new(3, per)))
        .await
        .unwrap();
    let started = Instant::now();
    let first = claim(&store, 10).await;
    // The window began during the first claim: at the latest when it answered.
    let window_began = Instant::now();
    assert_eq!(kinds_of(&first, "metered"), 3, "{first:?}");
    assert_eq!(kinds_of(&first, "free"), 2);
    for c in &first {
        finish(&store, c, Outcome::Completed(json!(null))).await;
    }
    let again = claim(&store, 10).await;
    if started.elapsed() < per {
        assert!(
            again.is_empty(),
            "ended attempts gave room inside the window"
        );
        assert_eq!(store.stats().await.unwrap().kinds["metered"].ready, 5);
    }
    tokio::time::sleep(per.saturating_sub(window_began.elapsed()) + Duration::from_millis(50))
        .await;
    let mut second = again;
    second.extend(claim(&store, 10).await);
    assert_eq!(
        kinds_of(&second, "metered"),
        3,
        "the next window allows 3 more: {second:?}"
    );
    // The limit also reads as stored.
    assert_eq!(
        store.limits().await.unwrap()["metered"],
        KindLimit::rate(RateLimit::new(3, per))
    );
}

/// Claimers on two store instances racing a rate limit never start more than `starts` in
/// a window: every set of
/// `starts + 1` claims whose calls all fall inside one window's length is a breach (each
/// start happened between its call and its answer).
pub async fn a_rate_limit_holds_against_racing_claimers(store: Arc<dyn Store>) {
    use fascicle_api::{KindLimit, RateLimit};
    use std::time::{Duration, Instant};
    let twin = crate::twin().await;
    let queue = Queue::new(Arc::clone(&store));
    submit(&queue, "metered", 40).await;
    let (starts, per) = (4usize, Duration::from_millis(400));
    store
        .set_limit(
            "metered",
            KindLimit::rate(RateLimit::new(starts as u32, per)),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(1300);
    let mut claimers = Vec::new();
    for i in 0..6 {
        let store = Arc::clone(if i % 2 == 0 { &store } else { &twin });
        claimers.push(tokio::spawn(async move {
            let mut spans = Vec::new();
            while Instant::now() < deadline {
                let asked = Instant::now();
                let claimed = claim_kind(&store, "metered", 2).await;
                let answered = Instant::now();
                for c in &claimed {
                    spans.push((asked, answered));
                    finish(&store, c, Outcome::Completed(json!(null))).await;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            spans
        }));
    }
    let mut spans = Vec::new();
    for claimer in claimers {
        spans.extend(claimer.await.unwrap());
    }
    spans.sort();
    assert!(
        spans.len() >= 2 * starts,
        "only {} starts in three windows: the rate let too few through",
        spans.len()
    );
    for group in spans.windows(starts + 1) {
        let earliest = group.iter().map(|s| s.0).min().unwrap();
        let latest = group.iter().map(|s| s.1).max().unwrap();
        // 5 ms for the store's clock and this process's to drift apart meanwhile.
        assert!(
            latest - earliest + Duration::from_millis(5) >= per,
            "{} starts within {:?} under a limit of {starts} per {per:?}",
            starts + 1,
            latest - earliest
        );
    }
}

/// A limit that is not one is refused with `InvalidInput` naming the field, and nothing
/// is stored: a running limit of 0 (a kind never claimed is a paused one), a rate of no
/// starts or of an empty window, a kind that is not a name.
pub async fn limits_refuse_what_is_not_a_limit(store: Arc<dyn Store>) {
    use fascicle_api::{KindLimit, RateLimit};
    use std::time::Duration;
    let cases = [
        ("job", KindLimit::running(0), "running"),
        (
            "job",
            KindLimit::rate(RateLimit::new(0, Duration::from_secs(1))),
            "starts",
        ),
        (
            "job",
            KindLimit::rate(RateLimit::new(5, Duration::ZERO)),
            "period",
        ),
        ("", KindLimit::running(1), "kind"),
        ("nul\0byte", KindLimit::running(1), "kind"),
    ];
    for (kind, limit, field) in cases {
        match store.set_limit(kind, limit).await {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains(field), "{message:?} should name {field}")
            }
            other => panic!("{kind:?} {limit:?}: expected InvalidInput, got {other:?}"),
        }
    }
    assert!(
        store.limits().await.unwrap().is_empty(),
        "a refused limit was stored"
    );
}
