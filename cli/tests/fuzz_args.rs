//! The CLI's argument values fuzzed (issue #19): ids, durations, kinds, numbers, rates,
//! cron expressions, zones, payloads and catch-up values of any text, each through the real
//! binary against a SQLite store holding a batch. Every run exits 0 or with a documented
//! code for a refusal (2 invalid input, 3 not found, 4 conflict; never 1, a failure of
//! the store) and an `error:` line — never a panic (101) — and a run that did not succeed
//! changed nothing in the store. A refused `retain` input creates no database at all.

mod common;

use std::path::Path;
use std::sync::Arc;

use fascicle::{NewBatch, NewOperation, Queue, Store};
use proptest::prelude::*;
use serde_json::json;

/// The commands, each with one value the generator fills (`{}`).
const TEMPLATES: &[&[&str]] = &[
    &["status", "{}"],
    &["cancel", "{}"],
    &["retry", "{}"],
    &["prune", "--older-than", "{}"],
    &["pause", "{}"],
    &["resume", "{}"],
    &["limit", "set", "{}", "--running", "3"],
    &["limit", "set", "work", "--running", "{}"],
    &["limit", "set", "work", "--rate", "{}"],
    &["limit", "clear", "{}"],
    &["schedule", "add", "{}", "--every", "1m", "--kind", "work"],
    &["schedule", "add", "s", "--every", "{}", "--kind", "work"],
    &["schedule", "add", "s", "--cron", "{}", "--kind", "work"],
    &[
        "schedule",
        "add",
        "s",
        "--cron",
        "*/5 * * * *",
        "--zone",
        "{}",
        "--kind",
        "work",
    ],
    &["schedule", "add", "s", "--every", "1m", "--kind", "{}"],
    &[
        "schedule",
        "add",
        "s",
        "--every",
        "1m",
        "--kind",
        "work",
        "--payload",
        "{}",
    ],
    &[
        "schedule",
        "add",
        "s",
        "--every",
        "1m",
        "--kind",
        "work",
        "--priority",
        "{}",
    ],
    &[
        "schedule",
        "add",
        "s",
        "--every",
        "1m",
        "--kind",
        "work",
        "--catch-up",
        "{}",
    ],
    &[
        "schedule", "add", "s", "--every", "1m", "--kind", "work", "--grace", "{}",
    ],
    &["schedule", "remove", "{}"],
    &["schedule", "pause", "{}"],
];

/// Values of any text (no NUL: an argument cannot hold one), numbers at their limits, and
/// the shapes each argument expects, slightly wrong.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[^\u{0}]{0,24}",
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => ("[0-9]{1,22}", "(ms|s|m|h|d|w|y|)").prop_map(|(n, u)| format!("{n}{u}")),
        1 => ("[0-9]{1,12}", "[0-9]{0,12}", "(ms|s|m|h|d|)").prop_map(|(a, b, u)| format!("{a}/{b}{u}")),
        1 => "[0-9*/,-]{1,4}( [0-9*/,-]{1,4}){3,7}",
        1 => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        1 => "(run-all=|run-once|skip|)[0-9-]{0,12}",
        1 => prop_oneof![
            Just(String::new()),
            Just(" ".to_string()),
            Just("99999999999d".to_string()),
            Just("-1".to_string()),
            Just("{\"a\": [1, 2".to_string()),
            Just("Mars/Phobos".to_string()),
            Just("[".repeat(5000)),
            Just("x".repeat(5000)),
        ],
    ]
}

/// What a refused run must leave as it was: operations by state, batches, limits,
/// schedules, paused kinds.
async fn snapshot(store: &Arc<dyn Store>) -> String {
    let stats = store.stats().await.unwrap();
    let limits = store.limits().await.unwrap();
    let schedules = store.schedules().await.unwrap();
    format!("{stats:?} {limits:?} {schedules:?}")
}

async fn prepare(db: &Path) -> Arc<dyn Store> {
    let store = fascicle::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    Queue::new(Arc::clone(&store))
        .submit_batch(
            NewBatch::new("fuzz")
                .children((0..3).map(|i| NewOperation::new("work", json!({ "i": i })))),
        )
        .await
        .unwrap();
    store
}

/// The cases: `PROPTEST_CASES` when set (the longer run of docs/RELIABILITY.md), else
/// `default` (what CI runs).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(160), ..ProptestConfig::default() })]

    #[test]
    fn any_argument_value_exits_with_a_documented_code_and_refusals_write_nothing(
        template in 0..TEMPLATES.len(),
        value in value(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("fuzz.db");
        let store = runtime.block_on(prepare(&db));
        let before = runtime.block_on(snapshot(&store));
        let args: Vec<&str> = TEMPLATES[template]
            .iter()
            .map(|a| if *a == "{}" { value.as_str() } else { a })
            .collect();
        let output = common::fascicle(&db, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        // 1 is a failure of the store, never an answer to a bad argument.
        prop_assert!(
            matches!(code, Some(0 | 2..=4)),
            "{:?} exited {:?}: {}", args, code, stderr
        );
        prop_assert!(!stderr.contains("panicked"), "{:?}: {}", args, stderr);
        if code != Some(0) {
            prop_assert!(
                stderr.trim_start().starts_with("error"),
                "{:?}: the refusal is not an error line: {}", args, stderr
            );
            let after = runtime.block_on(snapshot(&store));
            prop_assert_eq!(before, after, "{:?} was refused but changed the store", args);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// `fascicle retain <file>` of arbitrary bytes (as `.jsonl`) or of broken lines: a
    /// refusal exits 2 naming the file, before any database is opened (none is created).
    #[test]
    fn refused_retain_inputs_create_no_database(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            Just(b"{\"document_id\": \"a\", \"text\": \"x\"}\n{\"document_id\": \"a\", \"text\": \"y\"}\n".to_vec()),
            Just(b"{\"document_id\": \"a\", \"text\": \"nul \\u0000\"}\n".to_vec()),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("never.db");
        let input = dir.path().join("input.jsonl");
        std::fs::write(&input, &bytes).unwrap();
        let output = common::fascicle(&db, &["retain", input.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        match output.status.code() {
            Some(0) => {}
            Some(2) => {
                prop_assert!(stderr.contains("input.jsonl"), "{}", stderr);
                prop_assert!(!db.exists(), "a refused input created the database");
            }
            other => prop_assert!(false, "exit {:?}: {}", other, stderr),
        }
    }
}
