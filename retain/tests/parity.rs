//! The retain / re-retain scenario through the queue and its workers, on memory, SQLite
//! and PostgreSQL: every backend must end with the counts an independent model of the
//! corpus predicts, and so with identical counts. Then when consolidation runs, on each
//! backend: once per round of a batch, whatever the outcome of the child that finishes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fascicle::postgres::sqlx::AssertSqlSafe;
use fascicle::postgres::{PostgresOptions, PostgresStore};
use fascicle::{
    Applied, ClaimRequest, Driver, NewBatch, NewOperation, OperationId, Queue, Status, Worker,
};
use fascicle_retain::{
    BATCH_KIND, BankCounts, BatchSummary, ConsolidateReport, MemoryBank, RETAIN_KIND,
    RetainOptions, RetainReport, read_documents, split_units, terms,
};

const CHANGED: &str = "ferry.txt";
const CHANGED_TEXT: &str = "The ferry timetable changes in November. Crossings to Penhallow now leave at eight.\n\nTickets are sold on board. Captain Varga asks passengers to arrive early.\n\nDogs travel free on the Saltmere crossing.\n";

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/corpus")
}

fn copy_corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The bank an independent reading of `docs` predicts: one observation per term that
/// two or more units mention, citing each of them.
struct Model {
    units: u64,
    observations: u64,
    sources: u64,
    /// Terms with an observation, with the documents whose units mention them.
    observed: BTreeMap<String, BTreeSet<String>>,
    units_of: BTreeMap<String, Vec<Vec<String>>>,
}

fn model(dir: &Path) -> Model {
    let mut mentions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut units_of = BTreeMap::new();
    let mut units = 0;
    for doc in read_documents(dir).unwrap() {
        let doc_units: Vec<Vec<String>> = split_units(&doc.text).iter().map(|u| terms(u)).collect();
        for unit_terms in &doc_units {
            units += 1;
            for term in unit_terms {
                mentions
                    .entry(term.clone())
                    .or_default()
                    .push(doc.document_id.clone());
            }
        }
        units_of.insert(doc.document_id.clone(), doc_units);
    }
    let observed: BTreeMap<String, BTreeSet<String>> = mentions
        .iter()
        .filter(|(_, docs)| docs.len() >= 2)
        .map(|(term, docs)| (term.clone(), docs.iter().cloned().collect()))
        .collect();
    Model {
        units,
        observations: observed.len() as u64,
        sources: mentions
            .values()
            .filter(|docs| docs.len() >= 2)
            .map(|docs| docs.len() as u64)
            .sum(),
        observed,
        units_of,
    }
}

/// Submits `dir`, runs workers until the batch and the consolidation it triggers are
/// finished, and returns the batch's summary.
async fn retain(bank: &MemoryBank, dir: &Path) -> BatchSummary {
    let documents = read_documents(dir).unwrap();
    let receipt = bank
        .submit(
            documents,
            &RetainOptions {
                documents_per_child: 3,
                ..RetainOptions::default()
            },
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(bank.store(), bank.registry())
        .concurrency(4)
        .poll_interval(Duration::from_millis(50))
        .wake_on(bank.waker().subscribe());
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (summary, consolidation) = loop {
        let summary = bank.batch_summary(receipt.parent_id).await.unwrap();
        // The child that finishes the batch submits its consolidation.
        let consolidation = bank.consolidation_of(receipt.parent_id).await.unwrap();
        if let Some(consolidation) = consolidation
            && summary.status.is_terminal()
            && bank
                .store()
                .get(consolidation)
                .await
                .unwrap()
                .is_some_and(|op| op.status.is_terminal())
        {
            break (summary, consolidation);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch did not finish: {summary:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = stop.send(());
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.lease_lost, 0, "{report:?}");
    let op = bank.store().get(consolidation).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Completed, "{op:?}");
    summary
}

#[derive(Debug, PartialEq)]
struct Outcome {
    first: (RetainReport, BankCounts),
    second: (RetainReport, BankCounts),
    third: (RetainReport, BankCounts),
}

async fn scenario(bank: MemoryBank) -> Outcome {
    let dir = copy_corpus();
    let before = model(dir.path());

    let first = retain(&bank, dir.path()).await;
    assert_eq!(first.status, Status::Completed);
    assert_eq!(first.children, 4);
    let counts = bank.counts().await.unwrap();
    assert_eq!(
        counts,
        BankCounts {
            documents: 12,
            memory_units: before.units,
            unconsolidated_units: 0,
            observations: before.observations,
            observation_sources: before.sources,
        }
    );
    assert!(
        before
            .observed
            .values()
            .filter(|docs| docs.len() > 1)
            .count()
            >= 5,
        "the corpus should produce observations spanning several documents"
    );
    assert_eq!(first.retained.documents_new, 12);
    assert_eq!(first.retained.units_added, before.units);
    let first = (first.retained, counts);

    // Change one file: exactly the observations citing its old units are invalidated.
    std::fs::write(dir.path().join(CHANGED), CHANGED_TEXT).unwrap();
    let after = model(dir.path());
    let old_terms: BTreeSet<&String> = before.units_of[CHANGED].iter().flatten().collect();
    let invalidated = before
        .observed
        .keys()
        .filter(|t| old_terms.contains(t))
        .count() as u64;
    assert!(invalidated >= 2, "the change should touch observations");
    let second = retain(&bank, dir.path()).await;
    assert_eq!(second.status, Status::Completed);
    assert_eq!(
        second.retained,
        RetainReport {
            documents_new: 0,
            documents_replaced: 1,
            documents_unchanged: 11,
            units_added: after.units_of[CHANGED].len() as u64,
            units_removed: before.units_of[CHANGED].len() as u64,
            observations_invalidated: invalidated,
            sources_reset: second.retained.sources_reset,
        }
    );
    assert!(second.retained.sources_reset > 0);
    let counts = bank.counts().await.unwrap();
    assert_eq!(
        counts,
        BankCounts {
            documents: 12,
            memory_units: after.units,
            unconsolidated_units: 0,
            observations: after.observations,
            observation_sources: after.sources,
        }
    );
    let second = (second.retained, counts);

    // Nothing changed: nothing is rewritten.
    let third = retain(&bank, dir.path()).await;
    assert_eq!(third.retained.documents_unchanged, 12);
    assert_eq!(third.retained.units_added + third.retained.units_removed, 0);
    let counts = bank.counts().await.unwrap();
    assert_eq!(counts, second.1);
    let third = (third.retained, counts);
    Outcome {
        first,
        second,
        third,
    }
}

async fn memory_outcome() -> Outcome {
    let bank = MemoryBank::open("memory://").await.unwrap();
    assert!(!bank.capabilities().uses_observation_sources_table);
    scenario(bank).await
}

async fn sqlite_outcome() -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bank.db").display());
    let bank = MemoryBank::open(&url).await.unwrap();
    assert!(bank.capabilities().uses_observation_sources_table);
    scenario(bank).await
}

/// A store on a fresh schema of `DATABASE_URL`, or `None` (skipped) when it is unset and
/// `REQUIRE_POSTGRES` is not `1`.
async fn postgres_store() -> Option<PostgresStore> {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        assert!(
            std::env::var("REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "REQUIRE_POSTGRES=1 but DATABASE_URL is not set"
        );
        eprintln!("SKIPPED: DATABASE_URL is not set; the PostgreSQL retain scenario did not run");
        return None;
    };
    let schema = format!("fascicle_r_{}", uuid::Uuid::new_v4().simple());
    Some(
        PostgresStore::connect_with(PostgresOptions::new(url).schema(schema).max_connections(6))
            .await
            .expect("cannot connect to DATABASE_URL"),
    )
}

async fn drop_schema(store: &PostgresStore) {
    let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", store.schema());
    let _ = fascicle::postgres::sqlx::query(AssertSqlSafe(statement))
        .execute(store.pool())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_sqlite_and_postgres_end_with_identical_counts() {
    let memory = memory_outcome().await;
    let sqlite = sqlite_outcome().await;
    assert_eq!(memory, sqlite);
    if let Some(store) = postgres_store().await {
        let bank = MemoryBank::new(Driver::Postgres(store.clone()))
            .await
            .unwrap();
        assert!(!bank.capabilities().uses_observation_sources_table);
        let postgres = scenario(bank).await;
        drop_schema(&store).await;
        assert_eq!(memory, postgres);
    }
}

#[tokio::test]
async fn a_lost_lease_writes_nothing_to_the_bank() {
    // A child is claimed and its lease rescued away before its handler runs: the
    // handler's writes must roll back with the refused completion.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bank.db").display());
    for url in ["memory://", url.as_str()] {
        let bank = MemoryBank::open(url).await.unwrap();
        let documents = read_documents(&corpus()).unwrap();
        bank.submit(documents, &RetainOptions::default())
            .await
            .unwrap();
        let store = bank.store();
        let claim = |lease: Duration| {
            let store = store.clone();
            async move {
                let mut claimed = store
                    .claim(&ClaimRequest {
                        worker_id: "test".into(),
                        limit: 1,
                        lease,
                        kinds: None,
                    })
                    .await
                    .unwrap();
                assert_eq!(claimed.len(), 1);
                claimed.pop().unwrap()
            }
        };
        let stale = claim(Duration::from_millis(1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.rescue_expired_leases().await.unwrap().requeued, 1);
        assert_eq!(
            bank.run_claimed(&stale).await.unwrap(),
            Applied::LeaseLost,
            "{url}"
        );
        assert_eq!(bank.counts().await.unwrap(), BankCounts::default(), "{url}");

        // A child under a live claim is written and completed together.
        let live = claim(Duration::from_secs(30)).await;
        assert_eq!(bank.run_claimed(&live).await.unwrap(), Applied::Applied);
        let counts = bank.counts().await.unwrap();
        assert_eq!(counts.documents, 4, "{url}");
        let child = store.get(live.operation.id).await.unwrap().unwrap();
        assert_eq!(child.status, Status::Completed);
        let report: RetainReport = serde_json::from_value(child.result.unwrap()).unwrap();
        assert_eq!(report.documents_new, 4);
    }
}

#[tokio::test]
async fn consolidation_ids_are_stable_and_distinct() {
    let (a, b) = (OperationId::new(), OperationId::new());
    let first = fascicle::chrono::Utc::now();
    let id = MemoryBank::consolidation_id;
    assert_eq!(id(a, first), id(a, first));
    // Per batch, and per round of a batch: a retried batch finishes at a later instant.
    assert_ne!(id(a, first), id(b, first));
    assert_ne!(id(a, first), id(a, first + chrono_micros(1)));
    let rounds: BTreeSet<OperationId> = (0..10_000)
        .map(|n| id(a, first + chrono_micros(n)))
        .collect();
    assert_eq!(rounds.len(), 10_000);
    assert!(!rounds.contains(&a));
    assert_ne!(id(a, first), a);
}

fn chrono_micros(n: i64) -> fascicle::chrono::Duration {
    fascicle::chrono::Duration::microseconds(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_a_child_budget_goes_alone_and_is_retained() {
    let db = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", db.path().join("bank.db").display());
    for url in ["memory://", sqlite.as_str()] {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c", "d", "e"] {
            std::fs::write(
                dir.path().join(format!("{name}.txt")),
                format!("A note about Saltmere from {name}.\n"),
            )
            .unwrap();
        }
        // 3,000 paragraphs of about 1 KiB: 3 MiB, over the 1 MiB payload default.
        let paragraph = "the tide came in over the stones ".repeat(31);
        let big: String = (0..3_000)
            .map(|i| format!("Saltmere paragraph {i}: {paragraph}\n\n"))
            .collect();
        assert!(big.len() > 3 * 1024 * 1024);
        std::fs::write(dir.path().join("m-big.txt"), big).unwrap();

        let bank = MemoryBank::open(url).await.unwrap();
        let summary = retain(&bank, dir.path()).await;
        assert_eq!(summary.status, Status::Completed, "{url}");
        // [a b c] [d e] [m-big]: three per child, and the large document alone.
        assert_eq!(summary.children, 3, "{url}");
        assert_eq!(summary.retained.units_added, 3_005, "{url}");
        let counts = bank.counts().await.unwrap();
        assert_eq!((counts.documents, counts.memory_units), (6, 3_005), "{url}");
        // Every unit mentions Saltmere: one observation citing all of them.
        assert_eq!(
            (counts.observations, counts.observation_sources),
            (1, 3_005),
            "{url}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// When consolidation runs: whatever the outcome of the child that finishes the batch, and
// once per round of the batch (a `retry_batch` starts a new one).

/// Runs `scenario` on a fresh bank of `backend`: `memory`, `sqlite`, or `postgres` when
/// `DATABASE_URL` is set.
async fn on_backend<F, Fut>(backend: &'static str, scenario: F)
where
    F: FnOnce(MemoryBank, &'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match backend {
        "memory" => scenario(MemoryBank::open("memory://").await.unwrap(), backend).await,
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("bank.db").display());
            scenario(MemoryBank::open(&url).await.unwrap(), backend).await;
        }
        "postgres" => {
            if let Some(store) = postgres_store().await {
                let bank = MemoryBank::new(Driver::Postgres(store.clone()))
                    .await
                    .unwrap();
                scenario(bank, backend).await;
                drop_schema(&store).await;
            }
        }
        other => unreachable!("no backend {other}"),
    }
}

/// One test per backend for each scenario: `<test>::memory`, `<test>::sqlite`,
/// `<test>::postgres`.
macro_rules! on_every_backend {
    ($($test:ident => $scenario:ident;)*) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::on_backend("memory", super::$scenario).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::on_backend("sqlite", super::$scenario).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::on_backend("postgres", super::$scenario).await;
            }
        }
    )*};
}

on_every_backend! {
    a_batch_whose_last_child_fails_still_consolidates => last_child_fails;
    a_retried_batch_consolidates_its_retried_children => retried_child_succeeds;
    racing_last_children_submit_one_consolidation => last_children_race;
    a_cancelled_batch_is_consolidated_once_on_request => cancelled_batch;
}

/// A worker on `bank`, running until [`Running::stop`].
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<fascicle::Result<fascicle::WorkerReport>>,
}

impl Running {
    /// A worker running (and claiming) `concurrency` operations at a time; with 1,
    /// children run in claim order (priority, then submission order), each finished
    /// before the next is claimed.
    fn start(bank: &MemoryBank, concurrency: usize) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = Worker::new(bank.store(), bank.registry())
            .concurrency(concurrency)
            .claim_batch(concurrency)
            .poll_interval(Duration::from_millis(20))
            .wake_on(bank.waker().subscribe());
        let worker = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Self { stop, worker }
    }

    async fn stop(self) -> fascicle::WorkerReport {
        let _ = self.stop.send(());
        self.worker.await.unwrap().unwrap()
    }
}

/// How many `consolidate` operations the store holds, in any state.
async fn consolidations(bank: &MemoryBank) -> u64 {
    let stats = bank.store().stats().await.unwrap();
    stats.kinds.get("consolidate").map_or(0, |k| k.total())
}

/// Waits until `batch` is finished, no work is outstanding and nothing in the bank is
/// left unconsolidated; panics with the state after 15 s.
async fn settle(bank: &MemoryBank, batch: OperationId, name: &str) -> BatchSummary {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let summary = bank.batch_summary(batch).await.unwrap();
        let stats = bank.store().stats().await.unwrap();
        let counts = bank.counts().await.unwrap();
        if summary.status.is_terminal()
            && stats.work().outstanding() == 0
            && counts.unconsolidated_units == 0
        {
            return summary;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: the batch's documents were never consolidated: {summary:?}, {counts:?}, {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The counts the model of the whole corpus predicts.
fn corpus_counts() -> BankCounts {
    let expected = model(&corpus());
    BankCounts {
        documents: 12,
        memory_units: expected.units,
        unconsolidated_units: 0,
        observations: expected.observations,
        observation_sources: expected.sources,
    }
}

/// A batch whose last child to finish fails for good: what the other children retained
/// is consolidated all the same, once.
async fn last_child_fails(bank: MemoryBank, name: &'static str) {
    // Three children retain the corpus; a fourth, claimed last (lowest priority),
    // carries no list of documents: its handler fails permanently, so its failure —
    // the batch's last transition — is recorded by the worker, not by a handler.
    let documents = read_documents(&corpus()).unwrap();
    let mut children: Vec<NewOperation> = documents
        .chunks(4)
        .map(|chunk| {
            NewOperation::new(RETAIN_KIND, serde_json::json!({ "documents": chunk }))
                .with_priority(1)
                .with_max_attempts(1)
        })
        .collect();
    children.push(
        NewOperation::new(RETAIN_KIND, serde_json::json!({ "documents": "none" }))
            .with_max_attempts(1),
    );
    let batch = Queue::new(bank.store())
        .submit_batch(NewBatch::new(BATCH_KIND).children(children))
        .await
        .unwrap()
        .parent_id;
    let worker = Running::start(&bank, 1);
    let summary = settle(&bank, batch, name).await;
    let report = worker.stop().await;
    assert_eq!(report.failed, 1, "{name}: {report:?}");
    assert_eq!(summary.status, Status::Failed, "{name}");
    assert_eq!(
        (summary.completed, summary.failed),
        (3, 1),
        "{name}: {summary:?}"
    );
    assert_eq!(bank.counts().await.unwrap(), corpus_counts(), "{name}");
    assert_eq!(consolidations(&bank).await, 1, "{name}");
    let consolidation = bank.consolidation_of(batch).await.unwrap().unwrap();
    let report = consolidated(&bank, consolidation).await;
    assert_eq!(report.units_consolidated, 24, "{name}: {report:?}");
}

/// The report of the completed consolidation `id`.
async fn consolidated(bank: &MemoryBank, id: OperationId) -> ConsolidateReport {
    let op = bank.store().get(id).await.unwrap().unwrap();
    assert_eq!(op.status, Status::Completed, "{op:?}");
    serde_json::from_value(op.result.unwrap()).unwrap()
}

/// A batch with a failed child, retried, whose retried child then succeeds: the retried
/// documents are consolidated by the second round's own consolidation.
async fn retried_child_succeeds(bank: MemoryBank, name: &'static str) {
    let documents = read_documents(&corpus()).unwrap();
    let retried: Vec<String> = documents[..6]
        .iter()
        .map(|d| d.document_id.clone())
        .collect();
    let receipt = bank
        .submit(
            documents,
            &RetainOptions {
                documents_per_child: 6,
                max_attempts: 1,
            },
        )
        .await
        .unwrap();
    let batch = receipt.parent_id;
    assert_eq!(receipt.child_ids.len(), 2);

    // The first child's only attempt loses its lease: rescued, it fails for good.
    let store = bank.store();
    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 1,
            lease: Duration::from_millis(1),
            kinds: None,
        })
        .await
        .unwrap();
    assert_eq!(claimed[0].operation.id, receipt.child_ids[0], "{name}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.rescue_expired_leases().await.unwrap().failed, 1);

    // Round one: the second child finishes the batch, which failed; what it
    // retained is consolidated.
    let worker = Running::start(&bank, 2);
    let first = settle(&bank, batch, name).await;
    assert_eq!(first.status, Status::Failed, "{name}");
    assert_eq!((first.completed, first.failed), (1, 1), "{name}: {first:?}");
    let counts = bank.counts().await.unwrap();
    assert_eq!((counts.documents, counts.unconsolidated_units), (6, 0));
    assert_eq!(consolidations(&bank).await, 1, "{name}");
    let first_round = bank.consolidation_of(batch).await.unwrap().unwrap();
    let units = counts.memory_units;
    assert_eq!(
        consolidated(&bank, first_round).await.units_consolidated,
        units
    );

    // Round two: the failed child is retried and succeeds; its documents' units are
    // consolidated too, by a consolidation of their own.
    assert_eq!(store.retry_batch(batch).await.unwrap(), 1, "{name}");
    let second = settle(&bank, batch, name).await;
    worker.stop().await;
    assert_eq!(second.status, Status::Completed, "{name}");
    assert_eq!((second.completed, second.failed), (2, 0), "{name}");
    assert_eq!(bank.counts().await.unwrap(), corpus_counts(), "{name}");
    // The retried documents mention observed terms (so the counts above cover them).
    let full = model(&corpus());
    let observed_in_retried = full
        .observed
        .values()
        .filter(|docs| docs.iter().any(|d| retried.contains(d)))
        .count();
    assert!(observed_in_retried >= 5, "{observed_in_retried}");
    assert_eq!(consolidations(&bank).await, 2, "{name}");
    let second_round = bank.consolidation_of(batch).await.unwrap().unwrap();
    assert_ne!(second_round, first_round, "{name}");
    let report = consolidated(&bank, second_round).await;
    assert_eq!(
        report.units_consolidated,
        corpus_counts().memory_units - units
    );
}

/// The last two children of a batch finish at once (each checking the batch after its
/// own completion): one consolidation for the round, whichever of them saw it finish.
async fn last_children_race(bank: MemoryBank, name: &'static str) {
    let documents = read_documents(&corpus()).unwrap();
    let options = RetainOptions {
        documents_per_child: 6,
        ..RetainOptions::default()
    };
    let batch = bank.submit(documents, &options).await.unwrap().parent_id;
    let store = bank.store();
    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 2,
            lease: Duration::from_secs(30),
            kinds: None,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2, "{name}");
    let (one, two) = tokio::join!(bank.run_claimed(&claimed[0]), bank.run_claimed(&claimed[1]));
    assert_eq!(
        (one.unwrap(), two.unwrap()),
        (Applied::Applied, Applied::Applied)
    );
    assert_eq!(consolidations(&bank).await, 1, "{name}");
    // Asked again (as `retain --wait` does), it is the same operation.
    let again = bank.submit_consolidation(Some(batch)).await.unwrap();
    assert!(!again.created, "{name}");
    assert_eq!(Some(again.id), bank.consolidation_of(batch).await.unwrap());
    let worker = Running::start(&bank, 2);
    settle(&bank, batch, name).await;
    worker.stop().await;
    assert_eq!(bank.counts().await.unwrap(), corpus_counts(), "{name}");
    assert_eq!(consolidations(&bank).await, 1, "{name}");
}

/// A batch cancelled after one child completed: no handler sees it finish, so the
/// operator's side asks for its consolidation (`fascicle cancel` does) — once per round.
async fn cancelled_batch(bank: MemoryBank, name: &'static str) {
    let documents = read_documents(&corpus()).unwrap();
    let receipt = bank
        .submit(documents, &RetainOptions::default())
        .await
        .unwrap();
    let batch = receipt.parent_id;
    // While the batch is open there is nothing to consolidate after.
    assert_eq!(bank.consolidation_of(batch).await.unwrap(), None);
    assert!(bank.consolidate_if_finished(batch).await.unwrap().is_none());
    let open = bank.submit_consolidation(Some(batch)).await.unwrap_err();
    assert!(
        matches!(open, fascicle::Error::Conflict(_)),
        "{name}: {open}"
    );

    let store = bank.store();
    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 1,
            lease: Duration::from_secs(30),
            kinds: None,
        })
        .await
        .unwrap();
    assert_eq!(
        bank.run_claimed(&claimed[0]).await.unwrap(),
        Applied::Applied
    );
    assert_eq!(store.cancel(batch).await.unwrap().cancelled, 2, "{name}");
    let summary = bank.batch_summary(batch).await.unwrap();
    assert_eq!(summary.status, Status::Cancelled, "{name}");
    assert_eq!(consolidations(&bank).await, 0, "{name}");

    let submitted = bank.consolidate_if_finished(batch).await.unwrap().unwrap();
    assert!(submitted.created, "{name}");
    let again = bank.consolidate_if_finished(batch).await.unwrap().unwrap();
    assert_eq!((again.id, again.created), (submitted.id, false), "{name}");
    let worker = Running::start(&bank, 1);
    settle(&bank, batch, name).await;
    worker.stop().await;
    let counts = bank.counts().await.unwrap();
    assert_eq!((counts.documents, counts.unconsolidated_units), (4, 0));
    assert_eq!(
        consolidated(&bank, submitted.id).await.units_consolidated,
        8
    );

    // A batch none of whose children completed retained nothing: no consolidation.
    let documents = read_documents(&corpus()).unwrap();
    let nothing = bank
        .submit(documents, &RetainOptions::default())
        .await
        .unwrap()
        .parent_id;
    store.cancel(nothing).await.unwrap();
    assert!(
        bank.consolidate_if_finished(nothing)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(consolidations(&bank).await, 1, "{name}");
}
