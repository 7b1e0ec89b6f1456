//! The operator CLI end to end, on a SQLite file prepared through the library.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::fascicle;

use fascicle::{ClaimRequest, Completion, NewBatch, NewOperation, Outcome, Queue};
use serde_json::{Value, json};

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A batch of three: one completed, one failed, one still pending.
async fn prepare(db: &Path) -> String {
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(
            NewBatch::new("batch_retain")
                .children((0..3).map(|i| NewOperation::new("retain", json!({ "i": i })))),
        )
        .await
        .unwrap();
    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 2,
            lease: std::time::Duration::from_secs(60),
            kinds: None,
        })
        .await
        .unwrap();
    let outcomes = [
        Outcome::Completed(json!("ok")),
        Outcome::Failed("disk full".into()),
    ];
    let completions: Vec<Completion> = claimed
        .iter()
        .zip(outcomes)
        .map(|(c, outcome)| Completion {
            id: c.operation.id,
            lease_token: c.lease_token,
            outcome,
        })
        .collect();
    store.complete(&completions).await.unwrap();
    receipt.parent_id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_inspect_cancel_retry_reap_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let parent = prepare(&db).await;

    let out = fascicle(&db, &["stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("retain"), "{text}");
    assert!(text.contains("batches: 1 open"), "{text}");

    let out = fascicle(&db, &["--json", "stats"]);
    let stats: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats["kinds"]["retain"]["ready"], 1);
    assert_eq!(stats["kinds"]["retain"]["completed"], 1);
    assert_eq!(stats["kinds"]["retain"]["failed"], 1);
    assert!(
        stats["kinds"].get("batch_retain").is_none(),
        "a parent counted as work"
    );

    let out = fascicle(&db, &["status", &parent]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("batch"), "{text}");
    assert!(text.contains("2/3 children finished (66%)"), "{text}");
    assert!(text.contains("disk full"), "{text}");

    let out = fascicle(&db, &["cancel", &parent]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cancelled 1"), "{}", stdout(&out));
    let out = fascicle(&db, &["--json", "status", &parent]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["operation"]["status"], "failed");
    assert_eq!(status["children"].as_array().unwrap().len(), 3);
    assert_eq!(status["more_children"], 0);

    // A batch shows its first children only, read by page, and says how many more.
    let out = fascicle(&db, &["status", &parent, "--children", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("… 2 more (--children N shows more)"),
        "{text}"
    );
    assert!(text.contains("children finished"), "{text}");
    let out = fascicle(&db, &["--json", "status", &parent, "--children", "2"]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["children"].as_array().unwrap().len(), 2);
    assert_eq!(status["more_children"], 1);

    let out = fascicle(&db, &["retry", &parent]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("re-queued 2"), "{}", stdout(&out));
    let out = fascicle(&db, &["retry", &parent]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "nothing left to retry is a conflict"
    );
    assert!(
        stderr(&out).contains("no failed or cancelled children"),
        "{}",
        stderr(&out)
    );

    let out = fascicle(&db, &["reap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fascicle(&db, &["prune", "--older-than", "1d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deleted 0 batches"),
        "{}",
        stdout(&out)
    );
    let out = fascicle(&db, &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_get_one_readable_line_and_a_meaningful_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let parent = prepare(&db).await;

    let out = fascicle(&db, &["status", "01234567-89ab-7def-8123-456789abcdef"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).starts_with("error: not found"),
        "{}",
        stderr(&out)
    );

    let out = fascicle(&db, &["status", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("`not-an-id` is not an operation id"),
        "{}",
        stderr(&out)
    );

    let out = fascicle(&db, &["prune", "--older-than", "7y"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a duration"), "{}", stderr(&out));

    let out = fascicle(&db, &["retry", &parent]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fascicle(&db, &["retry", &parent]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let out = Command::new(env!("CARGO_BIN_EXE_fascicle"))
        .args([
            "--database-url",
            "mysql://root:hunter2@127.0.0.1/db",
            "stats",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("unknown database URL scheme `mysql://`"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert_eq!(err.lines().count(), 1, "one line, no backtrace: {err}");

    let missing_dir = dir.path().join("no/such/dir/queue.db");
    let out = fascicle(&missing_dir, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot open the database file"),
        "{}",
        stderr(&out)
    );
}

/// `fascicle status` shows a batch's failure policy and callbacks, and for a callback the
/// batch that fired it; `--json` carries the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_failure_policies_and_callbacks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(
            NewBatch::new("nightly")
                .child(NewOperation::new("step", json!(1)))
                .with_failure_policy(fascicle::FailurePolicy::FailFast)
                .on_failure(NewOperation::new("page_someone", json!({ "team": "ops" }))),
        )
        .await
        .unwrap();
    let parent = receipt.parent_id.to_string();
    let out = fascicle(&db, &["status", &parent]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("failure policy: fail_fast"), "{text}");
    assert!(
        text.contains("callback on_failure: page_someone (inserted when the batch fails)"),
        "{text}"
    );

    let claimed = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 1,
            lease: std::time::Duration::from_secs(60),
            kinds: None,
        })
        .await
        .unwrap();
    store
        .complete(&[Completion {
            id: claimed[0].operation.id,
            lease_token: claimed[0].lease_token,
            outcome: Outcome::Failed("it broke".into()),
        }])
        .await
        .unwrap();
    let callback = store
        .claim(&ClaimRequest {
            worker_id: "test".into(),
            limit: 1,
            lease: std::time::Duration::from_secs(60),
            kinds: Some(vec!["page_someone".into()]),
        })
        .await
        .unwrap()
        .remove(0);
    let out = fascicle(&db, &["status", &callback.operation.id.to_string()]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "callback on_failure of batch {parent} (nightly), which ended failed: 0 completed, 1 failed, 0 cancelled"
        )),
        "{text}"
    );
    let out = fascicle(&db, &["--json", "status", &parent]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["operation"]["plan"]["failure_policy"], "fail_fast");
    assert_eq!(status["operation"]["plan"]["callbacks"][0]["on"], "failure");
    let out = fascicle(
        &db,
        &["--json", "status", &callback.operation.id.to_string()],
    );
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["operation"]["callback_for"]["id"], parent.as_str());
    assert_eq!(status["operation"]["callback_for"]["outcome"], "failed");
}

/// `fascicle status` draws a batch's children as a tree and names, for each waiting
/// operation, the dependencies that have not released it; `--json` carries them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_what_a_waiting_operation_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let (a, b, c) = (
        fascicle::OperationId::new(),
        fascicle::OperationId::new(),
        fascicle::OperationId::new(),
    );
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(
            NewBatch::new("dag").children([
                NewOperation::new("step", json!(1)).with_id(a),
                NewOperation::new("step", json!(2)).with_id(b),
                NewOperation::new("step", json!(3))
                    .with_id(c)
                    .after(&[a])
                    .after_any(&[b]),
            ]),
        )
        .await
        .unwrap();
    let out = fascicle(&db, &["status", &receipt.parent_id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("├─ {a}")), "{text}");
    assert!(text.contains(&format!("└─ {c}")), "{text}");
    assert!(
        text.contains(&format!("waiting for 2: {a}, {b} (to end)")),
        "{text}"
    );
    let out = fascicle(&db, &["status", &c.to_string()]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "waiting for 2 of its dependencies: {a}, {b} (to end)"
        )),
        "{text}"
    );
    let out = fascicle(&db, &["--json", "status", &receipt.parent_id.to_string()]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let waiting = &status["children"][2];
    assert_eq!(waiting["waiting_on"], 2);
    assert_eq!(waiting["after"][0]["id"], a.to_string().as_str());
    assert_eq!(waiting["after"][1]["any"], true);
}

/// `fascicle status` of a tree draws the nested batches' children under them, each
/// nested batch with its progress, and names a dependency on a nested batch; `--json`
/// gives each nested batch's tree under `nested`, in the same shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_draws_nested_batches_as_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let [inner, deepest, x, y, z] = [(); 5].map(|_| fascicle::OperationId::new());
    let receipt = Queue::new(Arc::clone(&store))
        .submit_batch(
            NewBatch::new("pipeline")
                .child(
                    NewOperation::new("report", json!(1))
                        .with_id(z)
                        .after(&[inner]),
                )
                .child_batch(
                    NewBatch::new("fan_out")
                        .with_id(inner)
                        .child(NewOperation::new("work", json!(2)).with_id(x))
                        .child_batch(
                            NewBatch::new("deeper")
                                .with_id(deepest)
                                .child(NewOperation::new("work", json!(3)).with_id(y)),
                        ),
                ),
        )
        .await
        .unwrap();
    let out = fascicle(&db, &["status", &receipt.parent_id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        format!("├─ {z}"),
        format!("└─ {inner} (batch fan_out)"),
        format!("   ├─ {x}"),
        format!("   └─ {deepest} (batch deeper)"),
        format!("      └─ {y}"),
        format!("waiting for 1: {inner}"),
    ] {
        assert!(text.contains(&line), "{line:?} missing from:\n{text}");
    }
    assert!(text.contains("0/2"), "the nested batch's progress: {text}");
    let out = fascicle(&db, &["status", &inner.to_string()]);
    assert!(
        stdout(&out).contains(&format!("nested in batch {}", receipt.parent_id)),
        "{}",
        stdout(&out)
    );
    let out = fascicle(&db, &["--json", "status", &receipt.parent_id.to_string()]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["children"].as_array().unwrap().len(), 2);
    let nested = &status["nested"][0];
    assert_eq!(nested["operation"]["id"], inner.to_string().as_str());
    assert_eq!(nested["children"][1]["id"], deepest.to_string().as_str());
    assert_eq!(
        nested["nested"][0]["children"][0]["id"],
        y.to_string().as_str()
    );
}

/// `fascicle pause <kind>` stops claims of that kind (a worker drains the rest), `stats`
/// shows it paused, `resume` lets it run; `--json` and the exit code of a bad kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_kind() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let queue = Queue::new(Arc::clone(&store));
    queue
        .submit(NewOperation::new("slow", json!(1)))
        .await
        .unwrap();
    let out = fascicle(&db, &["pause", "slow"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused slow"), "{}", stdout(&out));
    let out = fascicle(&db, &["--json", "pause", "slow"]);
    let said: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (said["paused"].as_bool(), said["changed"].as_bool()),
        (Some(true), Some(false))
    );
    let request = fascicle::ClaimRequest {
        worker_id: "cli-test".into(),
        limit: 10,
        lease: std::time::Duration::from_secs(30),
        kinds: None,
    };
    assert!(store.claim(&request).await.unwrap().is_empty());
    let out = fascicle(&db, &["stats"]);
    let text = stdout(&out);
    assert!(text.contains("paused kinds (not claimed): slow"), "{text}");
    let out = fascicle(&db, &["--json", "stats"]);
    let stats: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats["paused"][0], "slow");
    let out = fascicle(&db, &["resume", "slow"]);
    assert!(stdout(&out).contains("resumed slow"), "{}", stdout(&out));
    assert_eq!(store.claim(&request).await.unwrap().len(), 1);
    let out = fascicle(&db, &["pause", ""]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `fascicle limit set <kind> --running N --rate N/PERIOD` limits claims of that kind for
/// every worker sharing the store, `limit list` shows it (a table, or JSON by kind),
/// `limit clear` removes it; a limit that is not one is exit code 2 with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_set_list_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let queue = Queue::new(Arc::clone(&store));
    for i in 0..3 {
        queue
            .submit(NewOperation::new("render", json!(i)))
            .await
            .unwrap();
    }
    let out = fascicle(&db, &["limit", "set", "render", "--running", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("limited render: running ≤ 1"),
        "{}",
        stdout(&out)
    );
    let request = fascicle::ClaimRequest {
        worker_id: "cli-test".into(),
        limit: 10,
        lease: std::time::Duration::from_secs(30),
        kinds: None,
    };
    assert_eq!(store.claim(&request).await.unwrap().len(), 1);
    assert!(store.claim(&request).await.unwrap().is_empty());
    let out = fascicle(
        &db,
        &[
            "--json",
            "limit",
            "set",
            "render",
            "--running",
            "2",
            "--rate",
            "100/1m",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(said["previous"]["running"], 1);
    assert_eq!(said["limit"]["running"], 2);
    assert_eq!(said["limit"]["rate"]["starts"], 100);
    assert_eq!(said["limit"]["rate"]["per"], 60_000_000, "microseconds");
    let out = fascicle(&db, &["limit", "list"]);
    let text = stdout(&out);
    assert!(
        text.contains("render") && text.contains("100 starts per 60s"),
        "{text}"
    );
    let out = fascicle(&db, &["--json", "limit", "list"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["render"]["running"], 2);
    assert_eq!(store.claim(&request).await.unwrap().len(), 1);
    for bad in [
        &["limit", "set", "render", "--running", "0"][..],
        &["limit", "set", "render", "--rate", "5/1y"],
        &["limit", "set", "render"],
        &["limit", "set", "", "--running", "1"],
    ] {
        let out = fascicle(&db, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    assert_eq!(
        store.limits().await.unwrap()["render"],
        fascicle::KindLimit::running(2).with_rate(fascicle::RateLimit::new(
            100,
            std::time::Duration::from_secs(60)
        )),
        "a refused change changed the limit"
    );
    let out = fascicle(&db, &["limit", "clear", "render"]);
    assert!(
        stdout(&out).contains("cleared the limit of render"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stdout(&fascicle(&db, &["limit", "list"])).trim(),
        "no kind is limited"
    );
    assert_eq!(store.claim(&request).await.unwrap().len(), 1);
}

/// `fascicle schedule add|list|pause|resume|remove`: a schedule stored in the database
/// (seen by every worker), listed as a table or JSON; a bad expression or zone is exit
/// code 2 naming the field, an unknown name exit code 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_added_listed_paused_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let out = fascicle(
        &db,
        &[
            "schedule",
            "add",
            "nightly",
            "--cron",
            "0 2 * * *",
            "--zone",
            "Europe/Paris",
            "--kind",
            "report",
            "--payload",
            r#"{"full":true}"#,
            "--catch-up",
            "run-once",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("added schedule nightly"),
        "{}",
        stdout(&out)
    );
    let out = fascicle(
        &db,
        &[
            "--json", "schedule", "add", "pulse", "--every", "30s", "--kind", "ping",
        ],
    );
    let said: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(said["created"], true);
    let out = fascicle(&db, &["schedule", "list"]);
    let text = stdout(&out);
    assert!(
        text.contains("cron 0 2 * * * Europe/Paris") && text.contains("every 30s"),
        "{text}"
    );
    let out = fascicle(&db, &["--json", "schedule", "list"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["schedule"]["name"], "nightly");
    assert_eq!(listed[0]["schedule"]["operation"]["payload"]["full"], true);
    assert_eq!(listed[0]["schedule"]["catch_up"], "run_once");
    let out = fascicle(&db, &["schedule", "pause", "nightly"]);
    assert!(
        stdout(&out).contains("paused schedule nightly"),
        "{}",
        stdout(&out)
    );
    let out = fascicle(&db, &["--json", "schedule", "list"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed[0]["paused"], true);
    let out = fascicle(&db, &["--json", "schedule", "resume", "nightly"]);
    let said: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (said["paused"].as_bool(), said["changed"].as_bool()),
        (Some(false), Some(true))
    );
    for (bad, field) in [
        (
            &[
                "schedule",
                "add",
                "x",
                "--cron",
                "99 * * * *",
                "--kind",
                "k",
            ][..],
            "cron expression",
        ),
        (
            &[
                "schedule",
                "add",
                "x",
                "--cron",
                "* * * * *",
                "--zone",
                "Nowhere",
                "--kind",
                "k",
            ],
            "zone",
        ),
        (
            &["schedule", "add", "x", "--every", "0s", "--kind", "k"],
            "interval",
        ),
        (&["schedule", "add", "x", "--kind", "k"], "--cron"),
        (
            &[
                "schedule",
                "add",
                "x",
                "--every",
                "5m",
                "--kind",
                "k",
                "--catch-up",
                "all",
            ],
            "catch-up",
        ),
    ] {
        let out = fascicle(&db, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(field), "{bad:?}: {}", stderr(&out));
    }
    let out = fascicle(&db, &["schedule", "remove", "pulse"]);
    assert!(
        stdout(&out).contains("removed schedule pulse"),
        "{}",
        stdout(&out)
    );
    let out = fascicle(&db, &["schedule", "remove", "pulse"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = fascicle(&db, &["schedule", "pause", "pulse"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let names: Vec<String> = store
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.schedule.name)
        .collect();
    assert_eq!(names, ["nightly"]);
}

/// An age no calendar holds is one readable line and exit code 2 — not a panic — and,
/// checked before the database is opened, it creates no database file.
#[test]
fn prune_refuses_an_age_past_the_calendar() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    for age in ["99999999999d", "18446744073709551615s", "36501d"] {
        let out = fascicle(&db, &["prune", "--older-than", age]);
        assert_eq!(out.status.code(), Some(2), "{age}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("--older-than") && err.contains("36500d"),
            "{err}"
        );
    }
    assert!(!db.exists(), "a refused prune created the database");
}
