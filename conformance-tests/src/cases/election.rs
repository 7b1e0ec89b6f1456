//! `Store::elect` / `resign` / `leader`: a role one candidate holds at a time, across
//! every process on the database — what elects the one worker that runs maintenance.

use std::sync::Arc;
use std::time::Duration;

use fascicle_api::{Error, MAX_LEASE, Store};

const TERM: Duration = Duration::from_secs(30);

/// A role is held by one candidate: taken when free, kept (renewed) by its holder,
/// refused to another, given up by `resign` (only by its holder) and taken at once by the
/// next. Roles are independent. Bad names and terms are `InvalidInput`, changing nothing.
pub async fn one_candidate_holds_a_role_at_a_time(store: Arc<dyn Store>) {
    let role = "maintenance";
    assert_eq!(store.leader(role).await.unwrap(), None);
    assert!(store.elect(role, "worker-a", TERM).await.unwrap());
    assert_eq!(
        store.leader(role).await.unwrap().as_deref(),
        Some("worker-a")
    );
    assert!(
        !store.elect(role, "worker-b", TERM).await.unwrap(),
        "a second candidate took a held role"
    );
    assert!(
        store.elect(role, "worker-a", TERM).await.unwrap(),
        "the holder could not renew"
    );
    assert!(
        store.elect("another-role", "worker-b", TERM).await.unwrap(),
        "roles are independent"
    );
    assert_eq!(
        store.leader("another-role").await.unwrap().as_deref(),
        Some("worker-b")
    );

    assert!(
        !store.resign(role, "worker-b").await.unwrap(),
        "a candidate that does not hold the role resigned it"
    );
    assert_eq!(
        store.leader(role).await.unwrap().as_deref(),
        Some("worker-a")
    );
    assert!(store.resign(role, "worker-a").await.unwrap());
    assert_eq!(store.leader(role).await.unwrap(), None);
    assert!(!store.resign(role, "worker-a").await.unwrap());
    assert!(
        store.elect(role, "worker-b", TERM).await.unwrap(),
        "a resigned role was not free"
    );
    assert!(!store.elect(role, "worker-a", TERM).await.unwrap());

    let too_long = MAX_LEASE + Duration::from_secs(1);
    for (what, result) in [
        ("an empty role", store.elect("", "worker-a", TERM).await),
        ("a blank candidate", store.elect(role, "  ", TERM).await),
        (
            "a NUL in the role",
            store.elect("main\0", "worker-a", TERM).await,
        ),
        (
            "a 256-byte candidate",
            store.elect(role, &"c".repeat(256), TERM).await,
        ),
        (
            "a zero term",
            store.elect(role, "worker-a", Duration::ZERO).await,
        ),
        (
            "a term over MAX_LEASE",
            store.elect(role, "worker-a", too_long).await,
        ),
        (
            "resign of an empty role",
            store.resign("", "worker-b").await,
        ),
    ] {
        match result {
            Err(Error::InvalidInput(_)) => {}
            other => panic!("{what}: expected InvalidInput, got {other:?}"),
        }
    }
    assert!(matches!(
        store.leader("").await,
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(
        store.leader(role).await.unwrap().as_deref(),
        Some("worker-b"),
        "a refused call changed the holder"
    );
}

/// A holder that stops renewing loses the role when its term ends, and another takes it;
/// one that renews keeps it past the end of its first term.
pub async fn a_role_passes_on_when_its_term_ends(store: Arc<dyn Store>) {
    let role = "maintenance";
    let term = Duration::from_millis(1_000);
    let start = tokio::time::Instant::now();
    assert!(store.elect(role, "worker-a", term).await.unwrap());
    tokio::time::sleep_until(start + Duration::from_millis(400)).await;
    assert!(
        store.elect(role, "worker-a", term).await.unwrap(),
        "renewal"
    );
    // Past the end of the first term, within the renewed one (which ends at 1.4 s at the
    // earliest).
    tokio::time::sleep_until(start + Duration::from_millis(1_150)).await;
    assert!(
        !store.elect(role, "worker-b", term).await.unwrap(),
        "the renewal did not extend the term"
    );
    assert_eq!(
        store.leader(role).await.unwrap().as_deref(),
        Some("worker-a")
    );
    // The renewed term (at most 400 ms + the call + 1 s) is over.
    tokio::time::sleep_until(start + Duration::from_millis(2_000)).await;
    assert_eq!(
        store.leader(role).await.unwrap(),
        None,
        "a role is still held after its holder's term ended"
    );
    assert!(
        store.elect(role, "worker-b", TERM).await.unwrap(),
        "an ended term was not taken over"
    );
    assert!(!store.elect(role, "worker-a", term).await.unwrap());
    assert_eq!(
        store.leader(role).await.unwrap().as_deref(),
        Some("worker-b")
    );
}

/// Candidates racing for a free role — through two instances of the store, as processes
/// do — elect exactly one, the one `leader` names; and so do candidates racing to take
/// over a role whose term has just ended.
pub async fn racing_candidates_elect_one(store: Arc<dyn Store>) {
    let twin = crate::twin().await;
    for round in 0..12 {
        let role = format!("race-{round}");
        let expired = round % 2 == 1;
        if expired {
            assert!(
                store
                    .elect(&role, "gone", Duration::from_millis(20))
                    .await
                    .unwrap()
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let mut racers = Vec::new();
        for i in 0..8 {
            let instance = Arc::clone(if i % 2 == 0 { &store } else { &twin });
            let role = role.clone();
            racers.push(tokio::spawn(async move {
                let candidate = format!("candidate-{i}");
                let won = instance.elect(&role, &candidate, TERM).await.unwrap();
                won.then_some(candidate)
            }));
        }
        let mut winners = Vec::new();
        for racer in racers {
            if let Some(winner) = racer.await.unwrap() {
                winners.push(winner);
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round} (free: {}): racing candidates elected {winners:?}",
            !expired
        );
        assert_eq!(store.leader(&role).await.unwrap().as_ref(), winners.first());
        assert_eq!(twin.leader(&role).await.unwrap().as_ref(), winners.first());
    }
}

/// Counts one worker's maintenance rounds (its rescue calls) and their instants.
#[derive(Debug, Default, Clone)]
struct Rounds(Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>);

#[fascicle_api::async_trait]
impl fascicle_api::Layer for Rounds {
    async fn before(&self, call: &fascicle_api::Call<'_>) -> fascicle_api::Result<()> {
        if matches!(call, fascicle_api::Call::RescueExpiredLeases) {
            self.0.lock().unwrap().push(tokio::time::Instant::now());
        }
        Ok(())
    }
}

/// Three workers share the store: the maintenance (rescue, reconcile) runs in exactly
/// one of them — the one `leader(MAINTENANCE_ROLE)` names. Stopped, it resigns and
/// another takes over within one maintenance interval; killed (its task dropped: no
/// resignation), its term runs out and another takes over within one interval too.
pub async fn maintenance_runs_in_one_elected_worker(store: Arc<dyn Store>) {
    use fascicle_api::{Layered, MAINTENANCE_ROLE, Registry, Worker};
    const EVERY: Duration = Duration::from_millis(1_000);
    // Seven tenths of an interval at most (a term of half of it, a try every fifth), and
    // slack for a loaded machine.
    const TAKEOVER: Duration = Duration::from_millis(700 + 500);

    let mut workers = Vec::new();
    for i in 0..3 {
        let rounds = Rounds::default();
        let layered: Arc<dyn Store> = Arc::new(Layered::new(Arc::clone(&store), rounds.clone()));
        let id = format!("maintainer-{i}");
        let worker = Worker::new(layered, Registry::new())
            .id(id.clone())
            .poll_interval(Duration::from_millis(50))
            .maintenance_interval(EVERY)
            .without_scheduler()
            .shutdown_timeout(Duration::from_secs(2));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        workers.push((id, rounds, Some(stop), handle));
    }
    let rounds_of = |workers: &Vec<(String, Rounds, _, _)>, since: tokio::time::Instant| {
        workers
            .iter()
            .map(|(id, rounds, _, _)| {
                let n = rounds
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|t| **t >= since)
                    .count();
                (id.clone(), n)
            })
            .collect::<Vec<(String, usize)>>()
    };
    let start = tokio::time::Instant::now();
    tokio::time::sleep(EVERY * 3).await;
    let counts = rounds_of(&workers, start);
    let maintaining: Vec<&(String, usize)> = counts.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        maintaining.len(),
        1,
        "the maintenance ran in {} workers, not one: {counts:?}",
        maintaining.len()
    );
    assert!(maintaining[0].1 >= 2, "too few rounds: {counts:?}");
    let first = maintaining[0].0.clone();
    assert_eq!(
        store.leader(MAINTENANCE_ROLE).await.unwrap(),
        Some(first.clone())
    );

    // Stopped: it resigns, and another takes over.
    let index = workers.iter().position(|(id, ..)| *id == first).unwrap();
    let (_, _, stop, handle) = &mut workers[index];
    let _ = stop.take().unwrap().send(());
    let report = handle.await.unwrap().unwrap();
    assert!(report.maintained >= 2, "{report:?}");
    let stopped_at = tokio::time::Instant::now();
    let second = loop {
        if let Some(holder) = store.leader(MAINTENANCE_ROLE).await.unwrap() {
            assert_ne!(
                holder, first,
                "a stopped worker still holds the maintenance"
            );
            break holder;
        }
        assert!(
            stopped_at.elapsed() < TAKEOVER,
            "no worker took the maintenance over within {TAKEOVER:?} of the maintainer's stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // It runs a round at once (one was due).
    tokio::time::sleep(EVERY / 2).await;
    let counts = rounds_of(&workers, stopped_at);
    for (id, n) in &counts {
        if *id == second {
            assert!(*n >= 1, "the new maintainer ran no round: {counts:?}");
        } else {
            assert_eq!(
                *n, 0,
                "{id} ran the maintenance beside {second}: {counts:?}"
            );
        }
    }

    // Killed: dropped without resigning; its term runs out and the last one takes over.
    let index = workers.iter().position(|(id, ..)| *id == second).unwrap();
    workers[index].3.abort();
    let killed_at = tokio::time::Instant::now();
    let third = loop {
        match store.leader(MAINTENANCE_ROLE).await.unwrap() {
            Some(holder) if holder != second => break holder,
            _ => {}
        }
        assert!(
            killed_at.elapsed() < TAKEOVER,
            "no worker took the maintenance over within {TAKEOVER:?} of the maintainer's death"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_ne!(third, first);
    tokio::time::sleep(EVERY / 2).await;
    let counts = rounds_of(&workers, killed_at + Duration::from_millis(1));
    let ran: Vec<&(String, usize)> = counts.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        ran.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        vec![third.as_str()],
        "after the kill: {counts:?}"
    );
    for (_, _, stop, handle) in workers {
        if let Some(stop) = stop {
            let _ = stop.send(());
            let _ = handle.await;
        }
    }
}
