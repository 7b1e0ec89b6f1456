//! The retain / re-retain scenario through the queue and its workers, on memory, SQLite
//! and PostgreSQL: every backend must end with the counts an independent model of the
//! corpus predicts, and so with identical counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fascicle::postgres::sqlx::AssertSqlSafe;
use fascicle::postgres::{PostgresOptions, PostgresStore};
use fascicle::{Applied, ClaimRequest, Driver, OperationId, Status, Worker};
use fascicle_retain::{
    BankCounts, BatchSummary, MemoryBank, RetainOptions, RetainReport, read_documents, split_units,
    terms,
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
    let consolidation = MemoryBank::consolidation_id(receipt.parent_id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let summary = loop {
        let summary = bank.batch_summary(receipt.parent_id).await.unwrap();
        // The child that finishes the batch submits its consolidation.
        let consolidated = bank
            .store()
            .get(consolidation)
            .await
            .unwrap()
            .is_some_and(|op| op.status.is_terminal());
        if summary.status.is_terminal() && consolidated {
            break summary;
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
    let a = OperationId::new();
    let b = OperationId::new();
    assert_eq!(
        MemoryBank::consolidation_id(a),
        MemoryBank::consolidation_id(a)
    );
    assert_ne!(
        MemoryBank::consolidation_id(a),
        MemoryBank::consolidation_id(b)
    );
    assert_ne!(MemoryBank::consolidation_id(a), a);
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
