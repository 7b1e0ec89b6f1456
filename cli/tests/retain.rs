//! The main job end to end: `fascicle retain` on the shipped corpus, then the operator
//! commands on what it left, then a re-retain after one file changed.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::fascicle;
use serde_json::Value;

fn ok_json(output: Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints JSON")
}

fn corpus_copy() -> tempfile::TempDir {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/corpus");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn retain_status_stats_change_one_file_retain_again() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("bank.db");
    let corpus = corpus_copy();
    let corpus_arg = corpus.path().to_str().unwrap();

    let first = ok_json(fascicle(&db, &["--json", "retain", corpus_arg, "--wait"]));
    let batch = &first["batch"];
    assert_eq!(batch["status"], "completed");
    assert_eq!(batch["children"], 3, "12 documents, 4 per child");
    assert_eq!(batch["retained"]["documents_new"], 12);
    let units = batch["retained"]["units_added"].as_u64().unwrap();
    assert_eq!(units, 24, "the corpus has two paragraphs per document");
    let bank = &first["bank"];
    assert_eq!(bank["documents"], 12);
    assert_eq!(bank["memory_units"], 24);
    assert_eq!(bank["unconsolidated_units"], 0);
    let observations = bank["observations"].as_u64().unwrap();
    assert!(observations > 5, "{bank}");
    assert!(first["consolidation"]["cross_document_observations"].as_u64() > Some(5));

    // status: the batch and its three completed children.
    let id = batch["batch_id"].as_str().unwrap().to_string();
    let status = fascicle(&db, &["status", &id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("progress: 3/3 children finished (100%)"),
        "{text}"
    );
    assert!(text.matches("completed").count() >= 4, "{text}");

    // stats: the work, never the parent, by kind; the batch apart.
    let stats = ok_json(fascicle(&db, &["--json", "stats"]));
    assert_eq!(stats["kinds"]["retain"]["completed"], 3);
    assert_eq!(stats["kinds"]["consolidate"]["completed"], 1);
    assert!(stats["kinds"].get("batch_retain").is_none(), "{stats}");
    assert_eq!(stats["batches"]["completed"], 1);

    // Change one file: only the observations citing its old units are invalidated.
    std::fs::write(
        corpus.path().join("bakery.txt"),
        "Marta's bakery on Quay Street now opens at six.\n\nThe rye recipe came from Penhallow, and the Harbor Board buys bread for its meetings.\n",
    )
    .unwrap();
    let second = ok_json(fascicle(&db, &["--json", "retain", corpus_arg, "--wait"]));
    let retained = &second["batch"]["retained"];
    assert_eq!(retained["documents_new"], 0);
    assert_eq!(retained["documents_replaced"], 1);
    assert_eq!(retained["documents_unchanged"], 11);
    assert_eq!(retained["units_removed"], 2);
    assert_eq!(retained["units_added"], 2);
    // Old bakery units cite Marta (market), Quay (market, council), Street, Penhallow.
    assert_eq!(retained["observations_invalidated"], 4, "{retained}");
    assert_eq!(second["bank"]["documents"], 12);
    assert_eq!(second["bank"]["memory_units"], 24);
    assert_eq!(second["bank"]["unconsolidated_units"], 0);

    // The same folder again: nothing to do.
    let third = ok_json(fascicle(&db, &["--json", "retain", corpus_arg, "--wait"]));
    assert_eq!(third["batch"]["retained"]["documents_unchanged"], 12);
    assert_eq!(third["batch"]["retained"]["observations_invalidated"], 0);
    assert_eq!(third["bank"], second["bank"]);
}

#[test]
fn retain_without_wait_is_processed_by_work() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("bank.db");
    let corpus = corpus_copy();
    let submitted = ok_json(fascicle(
        &db,
        &["--json", "retain", corpus.path().to_str().unwrap()],
    ));
    assert_eq!(submitted["documents"], 12);
    let stats = ok_json(fascicle(&db, &["--json", "stats"]));
    assert_eq!(stats["kinds"]["retain"]["ready"], 3);
    assert_eq!(stats["batches"]["open"], 1);

    let report = ok_json(fascicle(&db, &["--json", "work", "--exit-when-idle"]));
    assert!(report["completed"].as_u64() >= Some(4), "{report}");
    let stats = ok_json(fascicle(&db, &["--json", "stats"]));
    assert_eq!(stats["kinds"]["retain"]["completed"], 3);
    assert_eq!(stats["batches"]["completed"], 1);
    let id = submitted["batch_id"].as_str().unwrap();
    let status = ok_json(fascicle(&db, &["--json", "status", id]));
    assert_eq!(status["operation"]["status"], "completed");
}

#[test]
fn cancelling_a_retain_batch_consolidates_what_its_completed_children_retained() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("bank.db");
    let corpus = corpus_copy();
    // One child of three completes (run here, as a worker would); then the batch is
    // cancelled, which finishes it with no handler running after.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let batch = runtime.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let bank = fascicle_retain::MemoryBank::open(&url).await.unwrap();
        let documents = fascicle_retain::read_documents(corpus.path()).unwrap();
        let receipt = bank
            .submit(documents, &fascicle_retain::RetainOptions::default())
            .await
            .unwrap();
        let claimed = bank
            .store()
            .claim(&fascicle::ClaimRequest {
                worker_id: "test".into(),
                limit: 1,
                lease: std::time::Duration::from_secs(30),
                kinds: None,
            })
            .await
            .unwrap();
        bank.run_claimed(&claimed[0]).await.unwrap();
        receipt.parent_id.to_string()
    });
    drop(runtime);

    let cancelled = ok_json(fascicle(&db, &["--json", "cancel", &batch]));
    assert_eq!(cancelled["cancelled"], 2, "{cancelled}");
    let stats = ok_json(fascicle(&db, &["--json", "stats"]));
    assert_eq!(stats["batches"]["cancelled"], 1, "{stats}");
    assert_eq!(stats["kinds"]["consolidate"]["ready"], 1, "{stats}");

    ok_json(fascicle(&db, &["--json", "work", "--exit-when-idle"]));
    let stats = ok_json(fascicle(&db, &["--json", "stats"]));
    assert_eq!(stats["kinds"]["consolidate"]["completed"], 1, "{stats}");
    let status = ok_json(fascicle(&db, &["--json", "status", &batch]));
    assert_eq!(status["operation"]["status"], "cancelled", "{status}");
}

#[test]
fn bad_input_is_one_clear_line_and_a_non_zero_exit() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("bank.db");

    let missing = fascicle(&db, &["retain", "/no/such/folder", "--wait"]);
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.starts_with("error: invalid input: cannot read /no/such/folder"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!db.exists(), "a bad input must not create the database");

    let file = work.path().join("notes.txt");
    std::fs::write(&file, "text").unwrap();
    let wrong = fascicle(&db, &["retain", file.to_str().unwrap()]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("neither a folder nor a .jsonl file"));

    let corpus = corpus_copy();
    let bad_url = Command::new(env!("CARGO_BIN_EXE_fascicle"))
        .args(["--database-url", "mysql://root@localhost/x", "retain"])
        .arg(corpus.path())
        .output()
        .unwrap();
    assert_eq!(bad_url.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad_url.stderr);
    assert!(
        err.contains("unknown database URL scheme `mysql://`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let unknown = fascicle(&db, &["status", "01939a8c-0000-7000-8000-000000000000"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no operation or batch has id"));

    let zero = fascicle(
        &db,
        &[
            "retain",
            corpus.path().to_str().unwrap(),
            "--documents-per-child",
            "0",
        ],
    );
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("documents per child must be at least 1")
    );
}

#[cfg(unix)]
#[test]
fn work_stops_gracefully_on_ctrl_c() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("bank.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fascicle"))
        .arg("--database-url")
        .arg(format!("sqlite://{}", db.display()))
        .args(["--json", "work"])
        .env_remove("FASCICLE_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it announces itself: its signal handlers are installed by then.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("working on"), "{line}");
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = child.wait_with_output().unwrap();
    let report = ok_json(output);
    assert_eq!(report["released"], 0, "{report}");
}
