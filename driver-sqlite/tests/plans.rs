//! Issue #20 for SQLite: the claim and completion paths (every hot call of
//! `fascicle_conformance::hot_paths`) never scan the operations table and never sort into
//! a temporary B-tree, and the work each call does is bounded by the rows it handles, not
//! the backlog. Every statement the store runs is seen as it ends (SQLite's profile hook,
//! with its real parameters): its plan (`EXPLAIN QUERY PLAN` of the statement with its
//! parameters expanded) and SQLite's own counters of the run (virtual machine steps, full
//! scan steps, sorts, automatic indexes). No timing.
//!
//! With 100,000 pending operations and 10,000 more held by a worker, in three states:
//! never analysed, analysed (`ANALYZE`), and with 1,000,000 more operations completed.

use std::sync::{Arc, Mutex};

use fascicle_api::Store;
use fascicle_conformance::hot_paths;
use fascicle_sqlite::rusqlite::{self, StatementStatus, trace::TraceEvent};
use fascicle_sqlite::{SqliteOptions, SqliteStore};

/// SQLite virtual machine steps one call may take per row it handles, plus a constant: a
/// scan of the backlog takes millions.
const STEPS_PER_ROW: u64 = 400;
const STEPS_FIXED: u64 = 10_000;
/// Steps of full scans (SQLite's `SQLITE_STMTSTATUS_FULLSCAN_STEP`) one call may take per
/// row it handles, plus a constant.
const FULLSCAN_STEPS_PER_ROW: u64 = 4;
const FULLSCAN_STEPS_FIXED: u64 = 64;

/// One statement as it ran.
#[derive(Debug)]
struct Run {
    expanded: String,
    vm_steps: u64,
    /// Steps of full scans (of small tables, or an ordered index walk that stops at a
    /// limit).
    fullscan_steps: u64,
    sorts: u64,
    automatic_indexes: u64,
}

static RUNS: Mutex<Vec<Run>> = Mutex::new(Vec::new());

/// A statement's counters (virtual machine steps, full scan steps, sorts, automatic
/// indexes): SQLite adds up every run of one prepared statement.
type Counters = [u64; 4];

/// The statements started and not ended yet, with their counters at the start.
static STARTED: Mutex<Vec<(String, Counters)>> = Mutex::new(Vec::new());

fn counters(statement: &rusqlite::trace::StmtRef<'_>) -> Counters {
    let counter = |status| statement.get_status(status).max(0) as u64;
    [
        counter(StatementStatus::VmStep),
        counter(StatementStatus::FullscanStep),
        counter(StatementStatus::Sort),
        counter(StatementStatus::AutoIndex),
    ]
}

fn on_statement(event: TraceEvent<'_>) {
    match event {
        TraceEvent::Stmt(statement, _) => {
            // A trigger subprogram starts with the same statement: one start per run.
            let sql = statement.sql().into_owned();
            let mut started = STARTED.lock().unwrap();
            if !started.iter().any(|(s, _)| *s == sql) {
                started.push((sql, counters(&statement)));
            }
        }
        TraceEvent::Profile(statement, _) => {
            let sql = statement.sql().into_owned();
            let before = {
                let mut started = STARTED.lock().unwrap();
                match started.iter().rposition(|(s, _)| *s == sql) {
                    Some(i) => started.remove(i).1,
                    None => [0; 4],
                }
            };
            let after = counters(&statement);
            let run = |i: usize| after[i].saturating_sub(before[i]);
            RUNS.lock().unwrap().push(Run {
                expanded: statement.expanded_sql().unwrap_or(sql),
                vm_steps: run(0),
                fullscan_steps: run(1),
                sorts: run(2),
                automatic_indexes: run(3),
            });
        }
        _ => {}
    }
}

fn take_runs() -> Vec<Run> {
    std::mem::take(&mut *RUNS.lock().unwrap())
}

/// The names the statement gives the operations table: itself and its aliases
/// (`EXPLAIN QUERY PLAN` names a scanned table by its alias).
fn operations_names(sql: &str) -> Vec<String> {
    let words: Vec<&str> = sql
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let mut names = vec!["fascicle_operations".to_string()];
    for (i, word) in words.iter().enumerate() {
        if *word != "fascicle_operations" {
            continue;
        }
        let alias = match words.get(i + 1) {
            Some(w) if w.eq_ignore_ascii_case("AS") => words.get(i + 2),
            other => other,
        };
        if let Some(alias) = alias {
            let keyword = [
                "WHERE",
                "SET",
                "INDEXED",
                "ON",
                "JOIN",
                "LEFT",
                "ORDER",
                "GROUP",
                "LIMIT",
                "VALUES",
                "SELECT",
                "DEFAULT",
                "RETURNING",
                "UNION",
            ]
            .iter()
            .any(|k| alias.eq_ignore_ascii_case(k));
            if !keyword {
                names.push(alias.to_string());
            }
        }
    }
    names
}

/// What in a plan line means the statement reads more than the rows it handles: a scan of
/// the operations table (by its name or an alias), a sort into a temporary B-tree, an
/// automatic index.
fn refused(line: &str, operations: &[String]) -> Option<&'static str> {
    let scans_the_table = line.strip_prefix("SCAN ").is_some_and(|rest| {
        !rest.contains(" USING ")
            && rest
                .split_whitespace()
                .next()
                .is_some_and(|name| operations.iter().any(|o| o == name))
    });
    if scans_the_table {
        Some("a scan of the operations table")
    } else if line.contains("TEMP B-TREE") {
        Some("a sort into a temporary B-tree")
    } else if line.contains("AUTOMATIC") {
        Some("an automatic index")
    } else {
        None
    }
}

/// The plan of `sql`, one line per step.
fn plan_of(explainer: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut statement = match explainer.prepare(&format!("EXPLAIN QUERY PLAN {sql}")) {
        Ok(statement) => statement,
        // Statements without a plan (BEGIN, COMMIT, PRAGMA ...).
        Err(_) => return Vec::new(),
    };
    statement
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .map(|line| line.unwrap())
        .collect()
}

fn check(explainer: &rusqlite::Connection, state: &str, call: &str, rows: u64) {
    let runs = take_runs();
    if rows == 0 {
        return;
    }
    assert!(!runs.is_empty(), "{state}, {call}: no statement was seen");
    let steps: u64 = runs.iter().map(|r| r.vm_steps).sum();
    let bound = STEPS_PER_ROW * rows + STEPS_FIXED;
    eprintln!(
        "{state}, {call}: {} statements, {steps} VM steps for {rows} rows (bound {bound})",
        runs.len()
    );
    for run in &runs {
        let plan = plan_of(explainer, &run.expanded);
        if std::env::var("PLANS_DUMP").is_ok() {
            eprintln!("    {run:?}\n      {plan:?}");
        }
        let operations = operations_names(&run.expanded);
        for line in &plan {
            if let Some(what) = refused(line, &operations) {
                panic!(
                    "{state}, {call}: {what} ({line}) in: {}\nplan: {plan:#?}",
                    run.expanded
                );
            }
        }
        assert_eq!(
            (run.sorts, run.automatic_indexes),
            (0, 0),
            "{state}, {call}: sorted or built an index in: {}",
            run.expanded
        );
    }
    // Steps of full scans: of a small table (the paused kinds, the limits), or an ordered
    // index walk that stops at its limit — a few per row handled, never the backlog.
    let fullscan: u64 = runs.iter().map(|r| r.fullscan_steps).sum();
    let fullscan_bound = FULLSCAN_STEPS_PER_ROW * rows + FULLSCAN_STEPS_FIXED;
    assert!(
        fullscan <= fullscan_bound,
        "{state}, {call}: {fullscan} full scan steps for {rows} rows (bound \
         {fullscan_bound}); runs: {runs:#?}"
    );
    assert!(
        steps <= bound,
        "{state}, {call}: {steps} VM steps for {rows} rows (bound {bound}); runs: {runs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_and_completion_paths_never_scan_the_backlog() {
    // The plan check itself: a scan of the table under its alias, or its name, is refused;
    // an ordered walk of an index is not.
    let aliased = operations_names("SELECT 1 FROM fascicle_operations AS o WHERE o.kind = 'a'");
    assert!(refused("SCAN o", &aliased).is_some());
    assert!(refused("SCAN fascicle_operations", &aliased).is_some());
    assert!(refused("SCAN o USING INDEX fascicle_operations_claimable", &aliased).is_none());
    assert!(refused("SCAN fascicle_paused_kinds", &aliased).is_none());
    assert!(refused("USE TEMP B-TREE FOR ORDER BY", &aliased).is_some());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    let store = SqliteStore::open_with(SqliteOptions::new(&path).on_statement(on_statement))
        .await
        .unwrap();
    let explainer = rusqlite::Connection::open(&path).unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    hot_paths::fill(&shared, 50_000, 50_000).await;
    take_runs();
    let measure = |state: &'static str| {
        let explainer = &explainer;
        move |call: &str, rows: u64| check(explainer, state, call, rows)
    };
    hot_paths::every_hot_path(&shared, measure("never analysed")).await;
    analyse(&explainer, &shared).await;
    hot_paths::every_hot_path(&shared, measure("analysed")).await;
    // 1,000,000 completed operations that ran before the backlog.
    explainer
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
             INSERT INTO fascicle_operations (id, kind, status, payload, max_attempts,
                 attempts, run_at, created_at, updated_at, completed_at, result)
             SELECT randomblob(16), CASE WHEN i % 2 = 0 THEN 'solo' ELSE 'work' END,
                 'completed', '{}', 3, 1, 0, 0, 0, 0, 'null'
             FROM n",
        )
        .unwrap();
    hot_paths::every_hot_path(&shared, measure("after 1,000,000 completed")).await;
    analyse(&explainer, &shared).await;
    hot_paths::every_hot_path(&shared, measure("after 1,000,000 completed, analysed")).await;
}

/// `ANALYZE`, then one pass of the workload unmeasured: the schema changed, so each of the
/// store's cached statements is prepared again at its first run (SQLite counts the
/// reload of the schema and its statistics in that run's steps), once per connection.
async fn analyse(explainer: &rusqlite::Connection, store: &Arc<dyn Store>) {
    explainer.execute_batch("ANALYZE").unwrap();
    hot_paths::every_hot_path(store, |_: &str, _: u64| {
        take_runs();
    })
    .await;
}
