//! Four worker processes on one database (one SQLite file, one PostgreSQL schema) drain
//! a shared backlog: every operation runs exactly once (a log of executions, one line
//! per handler start, written by every process), and the maintenance runs in one
//! elected process at a time — the holder of `MAINTENANCE_ROLE` is one of them throughout
//! the drain, and when it is killed (SIGKILL: no resignation) another takes over once
//! its term runs out.

#![cfg(unix)]

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle::{MAINTENANCE_ROLE, NewOperation, Queue, Status, Store};

const PROCESSES: usize = 4;
const OPERATIONS: usize = 4_000;
/// The chaos worker's maintenance interval.
const INTERVAL: Duration = Duration::from_millis(500);

fn spawn(
    url: &str,
    schema: &str,
    log: &std::path::Path,
    rounds: &std::path::Path,
    id: &str,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chaos-worker"))
        .args([url, schema])
        .arg(log)
        .env("CHAOS_WORKER_ID", id)
        .env("CHAOS_ROUNDS_LOG", rounds)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the chaos worker starts")
}

async fn run(driver: &str, store: Arc<dyn Store>, url: &str, schema: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("executions.log");
    let rounds = dir.path().join("rounds.log");
    let receipts =
        Queue::new(Arc::clone(&store))
            .submit_many((0..OPERATIONS).map(|n| {
                NewOperation::new(fascicle_reliability::KIND, serde_json::json!({ "n": n }))
            }))
            .await
            .unwrap();
    let ids: Vec<String> = (0..PROCESSES).map(|i| format!("process-{i}")).collect();
    let mut children: HashMap<String, Child> = ids
        .iter()
        .map(|id| (id.clone(), spawn(url, schema, &log, &rounds, id)))
        .collect();

    // The drain, watching who maintains.
    let started = Instant::now();
    let mut holders: BTreeSet<String> = BTreeSet::new();
    // Once a first holder was seen (the processes start and stand meanwhile): the longest
    // time nobody held the role. A holder whose renewal waits too long (SQLite's one
    // writer, shared by four busy processes) loses it and another takes it — a handover,
    // not a failure — but the role is never left unheld for an interval.
    let mut unheld_since: Option<Instant> = None;
    let mut longest_unheld = Duration::ZERO;
    loop {
        let outstanding = store.stats().await.unwrap().work().outstanding();
        if outstanding == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{driver}: {outstanding} operations still outstanding after 120 s"
        );
        match store.leader(MAINTENANCE_ROLE).await.unwrap() {
            Some(holder) => {
                holders.insert(holder);
                if let Some(since) = unheld_since.take() {
                    longest_unheld = longest_unheld.max(since.elapsed());
                }
            }
            None if holders.is_empty() => {}
            None => {
                let since = *unheld_since.get_or_insert_with(Instant::now);
                longest_unheld = longest_unheld.max(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    let leader = store.leader(MAINTENANCE_ROLE).await.unwrap();

    // Exactly once: one execution per operation, every operation completed.
    let executions = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = executions.lines().collect();
    let distinct: BTreeSet<&str> = lines.iter().copied().collect();
    let mut not_completed = 0;
    for receipt in &receipts {
        let op = store.get(receipt.id).await.unwrap().expect("stored");
        if op.status != Status::Completed {
            not_completed += 1;
        }
        assert!(
            distinct.contains(receipt.id.to_string().as_str()),
            "{driver}: operation {} completed without running",
            receipt.id
        );
    }

    // The maintainer killed: another process takes the role over.
    let leader = leader.expect("a process holds the maintenance");
    let mut victim = children
        .remove(&leader)
        .expect("the holder is one of the processes");
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    victim.kill().expect("SIGKILL");
    victim.wait().expect("reaped");
    let killed = Instant::now();
    let successor = loop {
        match store.leader(MAINTENANCE_ROLE).await.unwrap() {
            Some(holder) if holder != leader => break holder,
            _ => {}
        }
        assert!(
            killed.elapsed() < INTERVAL * 2,
            "{driver}: no process took the maintenance over within {:?} of its holder's kill",
            INTERVAL * 2
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let takeover = killed.elapsed();
    // Another round by the successor, then everyone stops.
    tokio::time::sleep(INTERVAL * 2).await;
    for (_, mut child) in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }

    // Rounds of two processes never overlap in time.
    let mut spans: Vec<(u128, u128, String)> = std::fs::read_to_string(&rounds)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut parts = line.split(' ');
            let id = parts.next().unwrap().to_string();
            let start: u128 = parts.next().unwrap().parse().unwrap();
            let end: u128 = parts.next().unwrap().parse().unwrap();
            (start, end, id)
        })
        .collect();
    spans.sort();
    let mut overlaps = Vec::new();
    let mut latest: Option<(u128, String)> = None;
    for (start, end, id) in &spans {
        if let Some((until, holder)) = &latest
            && holder != id
            && start < until
        {
            overlaps.push(format!("{holder} until {until} and {id} from {start}"));
        }
        if latest.as_ref().is_none_or(|(until, _)| end > until) {
            latest = Some((*end, id.clone()));
        }
    }
    let maintainers: BTreeSet<&str> = spans.iter().map(|(_, _, id)| id.as_str()).collect();
    // Before the kill, rounds ran only in processes seen holding the role.
    let before_kill: BTreeSet<&str> = spans
        .iter()
        .filter(|(_, end, _)| *end < killed_at)
        .map(|(_, _, id)| id.as_str())
        .collect();
    eprintln!(
        "RELIABILITY | {PROCESSES} processes, one backlog | {driver} | {OPERATIONS} | {} executions of {} operations | role held by {holders:?} during the drain, unheld at most {} ms | {} rounds by {maintainers:?}, {} overlapping | {:.0} ops/s | maintenance taken over by {successor} {} ms after {leader} was killed (interval {} ms)",
        lines.len(),
        distinct.len(),
        longest_unheld.as_millis(),
        spans.len(),
        overlaps.len(),
        OPERATIONS as f64 / drained.as_secs_f64(),
        takeover.as_millis(),
        INTERVAL.as_millis()
    );
    assert_eq!(
        lines.len(),
        OPERATIONS,
        "{driver}: {} executions of {OPERATIONS} operations ({} distinct)",
        lines.len(),
        distinct.len()
    );
    assert_eq!(not_completed, 0, "{driver}: operations not completed");
    assert!(
        longest_unheld < INTERVAL,
        "{driver}: nobody held the maintenance for {longest_unheld:?} during the drain"
    );
    assert!(ids.contains(&successor));
    assert!(
        before_kill.iter().all(|id| holders.contains(*id)),
        "{driver}: rounds ran in {before_kill:?}, but only {holders:?} held the role"
    );
    assert!(
        overlaps.is_empty(),
        "{driver}: maintenance rounds of two processes overlapped: {overlaps:?}"
    );
    assert!(
        maintainers.contains(successor.as_str()),
        "{driver}: the successor {successor} ran no round: {maintainers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_processes_drain_once_with_one_maintainer() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("processes.db").display());
    let store = fascicle::connect(&url).await.unwrap();
    run("sqlite", store, &url, "-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_processes_drain_once_with_one_maintainer() {
    let Some(url) = fascicle_reliability::postgres_url("the PostgreSQL processes test") else {
        return;
    };
    let store = fascicle_reliability::fresh_postgres(&url, "fascicle_p", |o| o).await;
    let schema = store.schema().to_string();
    run("postgres", Arc::new(store.clone()), &url, &schema).await;
    fascicle_reliability::drop_schema(&store).await;
}
