//! Worker processes killed with SIGKILL (one each time another 5 % of the work is done)
//! and restarted, on one SQLite file and on one PostgreSQL schema: at the end every
//! operation is terminal and completed, every parent is terminal, nothing is lost or
//! stranded.
//!
//! CI runs 2,000 operations per driver; `FASCICLE_RELIABILITY_FULL=1` runs 10,000.

#![cfg(unix)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fascicle::{BatchReceipt, NewBatch, NewOperation, Queue, Status, Store};

const WORKERS: usize = 3;
const BATCH: usize = 50;

fn operations() -> usize {
    if std::env::var("FASCICLE_RELIABILITY_FULL").as_deref() == Ok("1") {
        10_000
    } else {
        2_000
    }
}

/// A small deterministic generator for kill timing and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Workers {
    url: String,
    schema: String,
    log: std::path::PathBuf,
    children: Vec<Child>,
}

impl Workers {
    fn spawn_one(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_chaos-worker"))
            .args([&self.url, &self.schema])
            .arg(&self.log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the chaos worker starts")
    }

    fn start(url: &str, schema: &str, log: &Path) -> Self {
        let mut workers = Self {
            url: url.to_string(),
            schema: schema.to_string(),
            log: log.to_path_buf(),
            children: Vec::new(),
        };
        for _ in 0..WORKERS {
            let child = workers.spawn_one();
            workers.children.push(child);
        }
        workers
    }

    /// SIGKILL one worker and start a new one in its place.
    fn kill_and_restart(&mut self, victim: usize) {
        let child = &mut self.children[victim];
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        self.children[victim] = self.spawn_one();
    }

    /// Graceful stop: closing stdin asks each worker to shut down.
    fn stop(mut self) {
        for mut child in self.children.drain(..) {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn submit(store: &Arc<dyn Store>, operations: usize) -> Vec<BatchReceipt> {
    let queue = Queue::new(Arc::clone(store));
    let mut receipts = Vec::new();
    for b in 0..operations / BATCH {
        let batch = NewBatch::new("chaos_batch").children((0..BATCH).map(|i| {
            NewOperation::new(
                fascicle_reliability::KIND,
                serde_json::json!({ "n": b * BATCH + i }),
            )
            .with_max_attempts(1_000)
        }));
        receipts.push(queue.submit_batch(batch).await.unwrap());
    }
    receipts
}

async fn run(driver: &str, store: Arc<dyn Store>, url: &str, schema: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("executions.log");
    let total = operations();
    let receipts = submit(&store, total).await;

    let started = Instant::now();
    let mut workers = Workers::start(url, schema, &log);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut kills = 0;
    let mut next_kill = total / 20;
    let deadline = started + Duration::from_secs(if total > 2_000 { 300 } else { 120 });
    loop {
        let stats = store.stats().await.unwrap();
        let outstanding = stats.work().outstanding();
        if outstanding == 0 && stats.batches.open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{driver}: not drained in time: {outstanding} outstanding after {kills} kills"
        );
        // Kill a worker for every twentieth of the work done, while at least a tenth is
        // left (so the end also runs without faults): the number of faults does not
        // depend on how fast the host is. A fast drain crosses several twentieths between
        // two looks; each one crossed costs a kill (a worker may be killed again just
        // after its restart: a crash at start-up is a crash too).
        let done = total - outstanding as usize;
        while outstanding as usize > total / 10 && done >= next_kill {
            workers.kill_and_restart((rng.next() % WORKERS as u64) as usize);
            kills += 1;
            next_kill += total / 20;
        }
        tokio::time::sleep(Duration::from_millis(10 + rng.next() % 10)).await;
    }
    workers.stop();
    let elapsed = started.elapsed();

    // Nothing lost, nothing stranded, every child completed (at least once).
    let mut lost = 0;
    let mut stranded = 0;
    let mut not_completed = 0;
    for receipt in &receipts {
        let parent = store.get(receipt.parent_id).await.unwrap();
        match parent {
            Some(parent) if parent.status == Status::Completed => {}
            Some(_) => stranded += 1,
            None => lost += 1,
        }
        let children: HashMap<_, _> = store
            .children_of(receipt.parent_id)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect();
        for id in &receipt.child_ids {
            match children.get(id) {
                Some(Status::Completed) => {}
                Some(_) => not_completed += 1,
                None => lost += 1,
            }
        }
    }
    let executions = std::fs::read_to_string(&log).unwrap();
    let lines = executions.lines().count();
    let distinct: BTreeSet<&str> = executions.lines().collect();
    let never_ran = receipts
        .iter()
        .flat_map(|r| &r.child_ids)
        .filter(|id| !distinct.contains(id.to_string().as_str()))
        .count();
    eprintln!(
        "RELIABILITY | process crashes (SIGKILL) | {driver} | {total} | {kills} kills of {WORKERS} workers | {lost} | {stranded} | {} re-executions | {:.1}s",
        lines - distinct.len(),
        elapsed.as_secs_f64()
    );
    assert!(kills >= 3, "{driver}: the test killed only {kills} workers");
    assert_eq!(lost, 0, "{driver}: operations lost");
    assert_eq!(stranded, 0, "{driver}: parents not completed");
    assert_eq!(not_completed, 0, "{driver}: children not completed");
    assert_eq!(never_ran, 0, "{driver}: completed children that never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_workers_killed_with_sigkill_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chaos.db").display());
    let store = fascicle::connect(&url).await.unwrap();
    run("sqlite", store, &url, "-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_workers_killed_with_sigkill_lose_nothing() {
    let Some(url) = fascicle_reliability::postgres_url("the PostgreSQL crash test") else {
        return;
    };
    let store = fascicle_reliability::fresh_postgres(&url, "fascicle_c", |o| o).await;
    let schema = store.schema().to_string();
    run("postgres", Arc::new(store.clone()), &url, &schema).await;
    fascicle_reliability::drop_schema(&store).await;
}
