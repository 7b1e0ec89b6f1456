// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Once};

use fascicle_api::{OperationId, Store};

pub mod broken;
pub mod cases;
pub mod faults;
pub mod hot_paths;
pub mod model;

/// A boxed, sendable future with no output, as every case returns.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One conformance case: takes the store under test, panics on a violation.
pub type CaseFn = fn(Arc<dyn Store>) -> CaseFuture;

type Cleanup = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A write past the `Store` API that sets a batch parent's `children_total`, given by a
/// driver's [`Fixture`]: the suite uses it to build the one state the API cannot produce
/// — a batch stranded by an older, non-atomic writer (counters promising more children
/// than its rows) — and checks that the reconciler still finalizes it.
pub type Tamper = Arc<dyn Fn(OperationId, u64) -> CaseFuture + Send + Sync>;

/// A second store instance on the same backend as a [`Fixture`]'s store, given by the
/// driver's fixture ([`Fixture::with_twin`]): another pool on the same schema, another
/// store on the same file, another handle on the same shared data. The suite's
/// two-instance cases run the work through both at once.
pub type Twin = Arc<dyn Fn() -> StoreFuture + Send + Sync>;

/// A boxed, sendable future yielding a store, as a [`Twin`] returns.
pub type StoreFuture = Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send + 'static>>;

tokio::task_local! {
    static TAMPER: Option<Tamper>;
    static TWIN: Option<Twin>;
}

/// Sets `parent`'s `children_total` through the fixture's [`Tamper`].
///
/// # Panics
///
/// When the driver's fixture gave none ([`Fixture::with_tamper`]).
pub async fn tamper_children_total(parent: OperationId, total: u64) {
    let tamper = TAMPER.try_with(Clone::clone).ok().flatten().expect(
        "this case builds a stranded batch past the Store API: give the fixture \
         Fixture::with_tamper(...) (see the crate's README)",
    );
    tamper(parent, total).await;
}

/// A new, independent instance of the store under test on the same backend, from the
/// fixture's [`Twin`]: every call opens another one (another pool, another connection
/// set), sharing the case's data with the store the case was given. Call it from the
/// case's own task (the fixture's hooks are task-local, like [`tamper_children_total`]'s).
///
/// # Panics
///
/// When the driver's fixture gave none ([`Fixture::with_twin`]).
pub async fn twin() -> Arc<dyn Store> {
    let twin = TWIN.try_with(Clone::clone).ok().flatten().expect(
        "this case runs two store instances on one backend at once: give the fixture \
         Fixture::with_twin(...), a second store on the same schema, file or shared data \
         (see the crate's README)",
    );
    twin().await
}

/// What a driver's factory hands the suite for one case: an isolated store (fresh
/// schema, file or instance), an optional clean-up run after the case whether it passed
/// or not, or a reason to skip.
pub struct Fixture {
    store: Option<Arc<dyn Store>>,
    cleanup: Option<Cleanup>,
    skip_reason: Option<String>,
    tamper: Option<Tamper>,
    twin: Option<Twin>,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("store", &self.store)
            .field("cleanup", &self.cleanup.is_some())
            .field("skip_reason", &self.skip_reason)
            .field("tamper", &self.tamper.is_some())
            .field("twin", &self.twin.is_some())
            .finish()
    }
}

impl Fixture {
    /// A fixture over `store`.
    pub fn new(store: impl Store + 'static) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A fixture over a shared store.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            store: Some(store),
            cleanup: None,
            skip_reason: None,
            tamper: None,
            twin: None,
        }
    }

    /// Gives the suite a raw write that sets a parent's `children_total` (see [`Tamper`]),
    /// e.g. an `UPDATE` on the driver's table.
    pub fn with_tamper<F, Fut>(mut self, tamper: F) -> Self
    where
        F: Fn(OperationId, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tamper = Some(Arc::new(move |parent, total| {
            Box::pin(tamper(parent, total))
        }));
        self
    }

    /// Gives the suite a second, independent instance of the store on the same backend
    /// (see [`Twin`]): `twin` opens one more each time it is called — for SQLite another
    /// `SqliteStore::open` of the same file, for PostgreSQL another pool on the same
    /// schema, for an in-process store another handle on the same data. It must not hand
    /// back the fixture's own store: the two-instance cases are about two of them.
    pub fn with_twin<F, Fut>(mut self, twin: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn Store>> + Send + 'static,
    {
        self.twin = Some(Arc::new(move || Box::pin(twin())));
        self
    }

    /// Runs `cleanup` after the case (dropping a schema, deleting a file).
    pub fn with_cleanup(mut self, cleanup: impl Future<Output = ()> + Send + 'static) -> Self {
        self.cleanup = Some(Box::pin(cleanup));
        self
    }

    /// The store (absent when skipped) and the clean-up.
    pub(crate) fn into_parts(self) -> (Option<Arc<dyn Store>>, Option<Cleanup>) {
        (self.store, self.cleanup)
    }

    /// No backend is available: every case prints one line (once per test binary) and
    /// passes without running. Use only where the environment allows skipping.
    pub fn skipped(reason: impl Into<String>) -> Self {
        Self {
            store: None,
            cleanup: None,
            skip_reason: Some(reason.into()),
            tamper: None,
            twin: None,
        }
    }
}

/// Runs one case on a fresh multi-threaded runtime. Used by [`suite!`]; call it directly
/// to run a single case by hand.
pub fn run_case<Fac, FacFut, Case>(name: &str, factory: Fac, case: Case)
where
    Fac: FnOnce() -> FacFut,
    FacFut: Future<Output = Fixture>,
    Case: FnOnce(Arc<dyn Store>) -> CaseFuture,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime for the conformance case");
    runtime.block_on(async move {
        let fixture = factory().await;
        let Some(store) = fixture.store else {
            static SKIP_LINE: Once = Once::new();
            let reason = fixture.skip_reason.unwrap_or_default();
            SKIP_LINE.call_once(|| {
                // Written to the process's stderr directly: the test harness captures
                // `eprintln!`, and a skip must be seen.
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "SKIPPED conformance suite: {reason}");
            });
            let _ = name;
            return;
        };
        let hooked = TAMPER.scope(fixture.tamper, TWIN.scope(fixture.twin, case(store)));
        let outcome = tokio::spawn(hooked).await;
        if let Some(cleanup) = fixture.cleanup {
            cleanup.await;
        }
        if let Err(join_error) = outcome {
            match join_error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("conformance case {name} did not finish: {e}"),
            }
        }
    });
}

/// Expands into one `#[test]` per conformance case, each running on a fresh store from
/// `$factory` — an expression evaluating to a future whose output is a [`Fixture`].
///
/// ```ignore
/// mod conformance {
///     fascicle_conformance::suite!(async { fascicle_conformance::Fixture::new(MyStore::new()) });
/// }
/// ```
#[macro_export]
macro_rules! suite {
    ($factory:expr) => {
        $crate::__for_each_case!(__suite_cases; $factory);
    };
}

/// The one list of cases: [`suite!`] and [`cases::ALL`] are both expanded from it, and a
/// test fails when a `pub async fn` in `src/cases/` is missing here.
#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_case {
    ($callback:ident; $($args:tt)*) => {
        $crate::$callback!(
            $($args)*;
            batch_commit_makes_parent_and_children_visible,
            rollback_on_child_failure,
            rollback_on_first_child_failure,
            rollback_on_commit_failure,
            dropped_transaction_rolls_back,
            explicit_rollback,
            uncommitted_rows_are_invisible_to_other_callers,
            notify_runs_after_commit,
            notify_not_called_when_submit_fails,
            notify_failure_keeps_the_batch,
            parent_has_no_payload,
            stats_do_not_count_parents_as_work,
            scheduled_operations_are_not_ready,
            empty_batch_rejected_nothing_written,
            oversized_payload_rejected,
            duplicate_child_ids_rejected,
            invalid_names_and_values_rejected,
            deeply_nested_payload_limit,
            unusual_text_round_trips,
            idempotent_submit_returns_existing_batch,
            concurrent_identical_submits_create_one_batch,
            child_id_taken_by_another_batch_rolls_back,
            standalone_submit_is_visible_and_idempotent,
            submit_many_stores_every_operation_in_order,
            submit_many_is_all_or_nothing,
            submit_many_is_idempotent_per_caller_id,
            racing_submit_many_store_each_id_once,
            submit_many_answers_unique_key_holders,
            submit_many_keeps_the_input_order,
            streamed_batch_commits_every_child_in_order,
            streamed_batch_is_all_or_nothing,
            streamed_batch_is_invisible_until_its_commit,
            one_candidate_holds_a_role_at_a_time,
            a_role_passes_on_when_its_term_ends,
            racing_candidates_elect_one,
            maintenance_runs_in_one_elected_worker,
            children_join_only_the_batch_of_their_transaction,
            child_ids_of_lists_the_children_in_order,
            children_page_walks_a_batch_in_order,
            a_transaction_whose_insert_failed_cannot_commit,
            large_batch_10k_children_commits_atomically,
            standalone_rollback_on_commit_failure,
            standalone_dropped_transaction_rolls_back,
            standalone_explicit_rollback,
            standalone_uncommitted_is_invisible_to_get_stats_and_claim,
            claim_never_returns_parents,
            claim_respects_priority_and_run_at,
            claim_skips_key_duplicates_before_the_limit,
            retry_backoff_then_success,
            permanent_error_fails_immediately,
            max_attempts_exhausted_fails_and_fails_parent,
            parent_completes_when_all_children_complete,
            parent_fails_with_most_common_child_error,
            last_two_children_race,
            concurrent_workers_no_double_processing,
            expired_lease_is_rescued,
            rescued_worker_cannot_complete,
            reconcile_zero_child_parent,
            reconcile_parent_with_all_children_terminal,
            cancel_batch_cascades,
            cancel_request_survives_a_retryable_outcome,
            cancel_request_survives_release,
            cancel_request_survives_rescue,
            retry_batch_clears_the_cancel_request,
            cancel_races_a_retryable_outcome,
            cancel_races_a_completion,
            rescue_races_a_completion,
            retry_batch_races_an_in_flight_completion,
            reconcile_races_the_last_completion,
            prune_races_a_live_batch,
            prune_deletes_a_long_history_in_chunks,
            two_instances_drain_one_queue_exactly_once,
            two_instances_race_every_transition,
            retry_batch_requeues_failed_children,
            serialization_key_exclusive,
            graceful_shutdown_releases_in_flight,
            stats_breakdown,
            prune_removes_only_whole_terminal_batches,
            unstorable_outcomes_fail_alone,
            a_refused_completion_never_holds_back_the_others,
            the_shutdown_deadline_holds_while_completions_cannot_be_recorded,
            attempt_timeout_stops_a_hung_handler,
            lease_loss_reaches_the_handler,
            a_stale_heartbeat_reply_does_not_cancel_a_new_attempt,
            a_recorded_handler_completes_once,
            handler_panics_are_retried_then_fail,
            per_operation_timeout_overrides_the_worker,
            a_store_in_trouble_never_turns_success_into_failure,
            the_shutdown_deadline_holds_while_the_store_hangs,
            callbacks_fire_once_for_the_outcome,
            a_failed_batch_fires_its_failure_callbacks,
            a_cancelled_batch_fires_only_on_complete,
            the_last_two_children_race_fires_each_callback_once,
            the_reconciler_fires_the_callbacks_of_the_batches_it_finalizes,
            retry_batch_fires_the_callbacks_of_the_new_outcome,
            fail_fast_cancels_pending_siblings_and_stops_running_ones,
            fail_fast_races_a_completing_sibling,
            fail_fast_on_an_expired_last_attempt,
            ignore_failures_completes_a_batch_with_failed_children,
            invalid_callbacks_are_refused_and_nothing_is_written,
            a_callback_handler_sees_its_batch,
            a_callback_runs_without_waiting_for_the_poll_interval,
            dependencies_run_in_order,
            a_failed_dependency_cancels_its_dependents_and_after_any_still_runs,
            cancelling_a_dependency_cascades_to_its_dependents,
            a_fan_in_releases_its_dependent_after_the_last_dependency,
            a_dependency_finishing_races_its_dependent_being_cancelled,
            retry_batch_requeues_a_dependency_chain,
            invalid_dependencies_are_refused_naming_the_ids,
            the_longest_chain_allowed_cancels_in_one_step,
            one_complete_call_is_one_fail_fast_step,
            one_rescue_is_one_fail_fast_step,
            a_nested_tree_finalizes_level_by_level,
            a_failed_nested_batch_fails_fast_its_outer_batch,
            fail_fast_reaches_into_nested_batches,
            cancel_acts_on_the_tree,
            retry_batch_reopens_the_tree,
            dependencies_cross_the_tree,
            invalid_trees_are_refused,
            the_reconciler_counts_a_nested_batch_into_its_parent,
            a_nested_batch_joins_only_a_batch_of_its_transaction,
            prune_removes_whole_trees,
            last_children_of_two_nested_batches_race,
            the_deepest_tree_allowed_ends_in_one_step,
            retry_batch_never_strands_a_dependent,
            a_nested_batch_id_is_not_a_batch_to_resubmit,
            cancelling_a_fail_fast_tree_is_one_step,
            every_cancelled_ending_releases_the_dependents,
            a_paused_kind_is_not_claimed_until_resumed,
            pausing_lets_running_attempts_finish,
            pause_refuses_kinds_that_are_not_names,
            a_pause_holds_against_racing_claims,
            a_running_limit_caps_claims_of_its_kind,
            a_limited_kind_does_not_hold_back_other_kinds,
            a_running_limit_holds_against_racing_claimers,
            a_rate_limit_spaces_the_starts_of_its_kind,
            a_rate_limit_holds_against_racing_claimers,
            limits_refuse_what_is_not_a_limit,
            a_unique_submit_answers_the_open_operation,
            unique_within_blocks_a_recently_completed_operation,
            racing_unique_submits_insert_one,
            a_unique_submit_with_its_own_id,
            unique_keys_that_cannot_be_are_refused,
            a_schedule_submits_one_operation_per_tick,
            a_pass_that_read_before_a_change_does_not_undo_it,
            missed_ticks_follow_the_catch_up,
            a_cron_schedule_ticks_in_its_zone,
            paused_and_removed_schedules_submit_nothing,
            racing_scheduler_passes_submit_each_tick_once,
            invalid_schedules_are_refused,
            a_schedule_that_cannot_submit_does_not_stop_the_others,
            extreme_leases_instants_and_priorities,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_cases {
    ($factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_case(
                    ::core::stringify!($case),
                    || $factory,
                    |store| ::std::boxed::Box::pin($crate::cases::$case(store)),
                );
            }
        )+
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_table {
    (; $($case:ident),+ $(,)?) => {
        /// Every case by name, in the order [`suite!`](crate::suite) runs them.
        pub const ALL: &[(&str, $crate::CaseFn)] = &[
            $((::core::stringify!($case), |store| ::std::boxed::Box::pin($case(store)))),+
        ];
    };
}
