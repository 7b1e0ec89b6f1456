//! Proof the conformance suite can fail: the whole suite runs against each deliberately
//! broken store of `fascicle_conformance::broken` (a real `MemoryStore` with one promise
//! of the `Store` contract broken), a fresh store per case, and every broken store must
//! fail at least one case — each of the cases written to catch it among them. The same
//! run on the real store passes every case.
//!
//! Each test prints one line naming the cases that caught its store (see it with
//! `cargo nextest run -p fascicle-memory --test suite_self_test --no-capture`).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use fascicle_api::Store;
use fascicle_conformance::broken::{BrokenPromise, BrokenStore};
use fascicle_conformance::faults::autocommit_parent_store;
use fascicle_conformance::{CaseFn, Fixture, cases};
use fascicle_memory::MemoryStore;

/// Cases run at once in this process, whichever test runs them (`cargo test` runs the
/// tests of this file side by side): most of a case's time is spent waiting (for a late
/// write to land, for a worker's poll), so more than the two cores, but few enough that
/// the cases with tight timings still pass on the real store.
const PARALLEL_CASES: usize = 8;

/// The process's slots for running cases, [`PARALLEL_CASES`] of them.
static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(PARALLEL_CASES), Condvar::new());

/// Holds one of the [`SLOTS`] until dropped.
struct Slot;

impl Slot {
    fn take() -> Self {
        let (free, freed) = &SLOTS;
        let mut free = freed
            .wait_while(free.lock().unwrap(), |free| *free == 0)
            .unwrap();
        *free -= 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (free, freed) = &SLOTS;
        *free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        freed.notify_one();
    }
}

/// A case that has not finished by then counts as failed (a broken store may make a
/// worker case wait for work that never comes).
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// How one case ended.
#[derive(Debug)]
enum Verdict {
    Passed,
    Failed(String),
}

/// While positive, panics on tokio's threads (named `tokio-…`) print nothing: the panics of a case
/// failing on a broken store are expected, and their messages are reported here.
static QUIET_CASES: AtomicUsize = AtomicUsize::new(0);

fn install_quiet_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let on_runtime = std::thread::current()
                .name()
                .is_some_and(|name| name.starts_with("tokio-"));
            if !(on_runtime && QUIET_CASES.load(Ordering::SeqCst) > 0) {
                default(info);
            }
        }));
    });
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// A fresh memory store, and the fixture the suite needs around it (the reconcile case
/// writes a stranded batch through the fixture's tamper).
/// `wrap` makes the store under test from the memory store; `wrap_twin` makes its twin
/// from a second handle on the same memory.
fn fixture(
    wrap: impl Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync + 'static,
    wrap_twin: impl Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync + 'static,
) -> Fixture {
    let memory = MemoryStore::new();
    let tamper = memory.clone();
    let twin = memory.clone();
    Fixture::from_arc(wrap(Arc::new(memory)))
        .with_tamper(move |parent, total| {
            tamper.overwrite_children_total_for_conformance(parent, total);
            async {}
        })
        .with_twin(move || {
            let twin = wrap_twin(Arc::new(twin.clone()));
            async move { twin }
        })
}

/// Runs one case the way `suite!` does (`run_case`: its own runtime, the fixture's
/// tamper in scope), with a time limit.
fn run_one(name: &'static str, case: CaseFn, fixture: Fixture) -> Verdict {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        fascicle_conformance::run_case(
            name,
            || async { fixture },
            |store| {
                Box::pin(async move {
                    if tokio::time::timeout(CASE_TIMEOUT, case(store))
                        .await
                        .is_err()
                    {
                        panic!("timed out after {CASE_TIMEOUT:?}");
                    }
                })
            },
        )
    }));
    match outcome {
        Ok(()) => Verdict::Passed,
        Err(panic) => Verdict::Failed(panic_message(&*panic)),
    }
}

/// Runs every case of the suite, each on a fresh store from `make`, as many at a time as
/// [`SLOTS`] allow; the verdicts in the suite's order.
fn run_suite(make: impl Fn() -> Fixture + Sync) -> Vec<(&'static str, Verdict)> {
    install_quiet_panic_hook();
    QUIET_CASES.fetch_add(1, Ordering::SeqCst);
    let next = AtomicUsize::new(0);
    let verdicts = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_CASES {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(name, case)) = cases::ALL.get(i) else {
                        break;
                    };
                    let slot = Slot::take();
                    let verdict = run_one(name, case, make());
                    drop(slot);
                    verdicts.lock().unwrap().push((i, name, verdict));
                }
            });
        }
    });
    QUIET_CASES.fetch_sub(1, Ordering::SeqCst);
    let mut verdicts = verdicts.into_inner().unwrap();
    verdicts.sort_by_key(|(i, _, _)| *i);
    verdicts.into_iter().map(|(_, n, v)| (n, v)).collect()
}

/// The whole suite on a memory store broken by `promise`: at least one case fails, and
/// every case written to catch it does.
fn suite_catches(promise: BrokenPromise) {
    let started = Instant::now();
    let verdicts = run_suite(|| {
        // The twin is the same broken store over a second handle: one memory, as two
        // processes of one broken driver share a database.
        let broken = Arc::new(std::sync::Mutex::new(None::<Arc<BrokenStore>>));
        let made = Arc::clone(&broken);
        fixture(
            move |memory| {
                let store = Arc::new(BrokenStore::new(memory, promise));
                *made.lock().unwrap() = Some(Arc::clone(&store));
                store as Arc<dyn Store>
            },
            move |memory| {
                let first = broken.lock().unwrap().clone().expect("made first");
                Arc::new(first.sharing(memory)) as Arc<dyn Store>
            },
        )
    });
    let caught: Vec<&str> = verdicts
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Failed(_)))
        .map(|(name, _)| *name)
        .collect();
    let timed_out: Vec<&str> = verdicts
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Failed(m) if m.starts_with("timed out")))
        .map(|(name, _)| *name)
        .collect();
    eprintln!(
        "{promise}: caught by {} of {} cases in {:.1?}{}: {}",
        caught.len(),
        verdicts.len(),
        started.elapsed(),
        if timed_out.is_empty() {
            String::new()
        } else {
            format!(" ({} timed out: {})", timed_out.len(), timed_out.join(", "))
        },
        caught.join(", ")
    );
    assert!(
        !caught.is_empty(),
        "no case of the suite caught the broken store `{promise}` ({})",
        promise.promise()
    );
    for expected in promise.caught_by() {
        assert!(
            cases::ALL.iter().any(|(name, _)| name == expected),
            "`{expected}`, named by BrokenPromise::{promise:?}::caught_by, is not a case"
        );
        assert!(
            caught.contains(expected),
            "`{expected}` passed on the broken store `{promise}` ({}); caught by: {caught:?}",
            promise.promise()
        );
    }
}

macro_rules! suite_catches {
    ($($test:ident => $promise:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                suite_catches(BrokenPromise::$promise);
            }
        )+

        /// The broken stores a test above runs the suite against.
        const TESTED: &[BrokenPromise] = &[$(BrokenPromise::$promise),+];
    };
}

suite_catches! {
    suite_catches_late_commit_of_a_dropped_transaction => LateCommitOfADroppedTransaction,
    suite_catches_autocommit_parent => AutocommitParent,
    suite_catches_autocommit_standalone => AutocommitStandalone,
    suite_catches_lost_cancel_request => LostCancelRequest,
    suite_catches_unfenced_completion => UnfencedCompletion,
    suite_catches_off_by_one_finalization => OffByOneFinalization,
    suite_catches_double_claim => DoubleClaim,
    suite_catches_claim_returns_parents => ClaimReturnsParents,
    suite_catches_parents_counted_as_work => ParentsCountedAsWork,
    suite_catches_prune_tears_open_batches => PruneTearsOpenBatches,
    suite_catches_pause_ignored => PauseIgnored,
    suite_catches_running_limit_checked_before_the_claim => RunningLimitCheckedBeforeTheClaim,
    suite_catches_rate_limit_ignored => RateLimitIgnored,
    suite_catches_unique_checked_before_insert => UniqueCheckedBeforeInsert,
    suite_catches_schedule_advanced_at_any_version => ScheduleAdvancedAtAnyVersion,
    suite_catches_election_checked_before_taking => ElectionCheckedBeforeTaking,
}

#[test]
fn every_broken_store_is_tested() {
    assert_eq!(TESTED, BrokenPromise::ALL);
}

#[test]
fn the_same_cases_pass_on_the_real_store() {
    let started = Instant::now();
    let verdicts = run_suite(|| fixture(|memory| memory, |memory| memory));
    let failed: Vec<String> = verdicts
        .iter()
        .filter_map(|(name, v)| match v {
            Verdict::Failed(message) => Some(format!("{name}: {message}")),
            Verdict::Passed => None,
        })
        .collect();
    eprintln!(
        "real memory store: {} of {} cases passed in {:.1?}",
        verdicts.len() - failed.len(),
        verdicts.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "the real store failed, so a broken store's failures prove nothing:\n{}",
        failed.join("\n")
    );
}

#[test]
fn suite_catches_a_parent_committed_outside_the_batch() {
    let store =
        || -> Arc<dyn Store> { Arc::new(autocommit_parent_store(Arc::new(MemoryStore::new()))) };
    install_quiet_panic_hook();
    QUIET_CASES.fetch_add(1, Ordering::SeqCst);
    let verdict = run_one(
        "rollback_on_child_failure",
        |s| Box::pin(cases::rollback_on_child_failure(s)),
        Fixture::from_arc(store()),
    );
    QUIET_CASES.fetch_sub(1, Ordering::SeqCst);
    let Verdict::Failed(message) = verdict else {
        panic!("rollback_on_child_failure passed on a store that leaks parents");
    };
    assert!(message.contains("survived a failed batch"), "{message}");
}
