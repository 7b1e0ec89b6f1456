//! Which cases check which row of the lifecycle table
//! ([`fascicle_api::table::TRANSITIONS`]). A row without a case, a case named here that
//! does not exist, or a case function missing from the suite fails this crate's tests.

/// Every transition of the lifecycle table with the cases that check it on every driver.
pub const TRANSITION_CASES: &[(&str, &[&str])] = &[
    (
        "claim",
        &[
            "a_paused_kind_is_not_claimed_until_resumed",
            "a_pause_holds_against_racing_claims",
            "a_running_limit_caps_claims_of_its_kind",
            "a_limited_kind_does_not_hold_back_other_kinds",
            "a_running_limit_holds_against_racing_claimers",
            "a_rate_limit_spaces_the_starts_of_its_kind",
            "a_rate_limit_holds_against_racing_claimers",
            "claim_never_returns_parents",
            "claim_respects_priority_and_run_at",
            "claim_skips_key_duplicates_before_the_limit",
            "concurrent_workers_no_double_processing",
            "serialization_key_exclusive",
            "two_instances_drain_one_queue_exactly_once",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "heartbeat",
        &[
            "cancel_batch_cascades",
            "retry_batch_clears_the_cancel_request",
        ],
    ),
    (
        "complete",
        &[
            "dependencies_run_in_order",
            "a_fan_in_releases_its_dependent_after_the_last_dependency",
            "a_dependency_finishing_races_its_dependent_being_cancelled",
            "parent_completes_when_all_children_complete",
            "last_two_children_race",
            "two_instances_drain_one_queue_exactly_once",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "fail",
        &[
            "permanent_error_fails_immediately",
            "parent_fails_with_most_common_child_error",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "stop_cancelled",
        &[
            "every_cancelled_ending_releases_the_dependents",
            "cancel_batch_cascades",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "retry",
        &[
            "retry_backoff_then_success",
            "retry_batch_clears_the_cancel_request",
        ],
    ),
    (
        "retry_after_cancel",
        &[
            "every_cancelled_ending_releases_the_dependents",
            "cancel_request_survives_a_retryable_outcome",
            "cancel_races_a_retryable_outcome",
        ],
    ),
    ("release", &["graceful_shutdown_releases_in_flight"]),
    (
        "release_after_cancel",
        &[
            "every_cancelled_ending_releases_the_dependents",
            "cancel_request_survives_release",
        ],
    ),
    (
        "rescue",
        &[
            "expired_lease_is_rescued",
            "rescued_worker_cannot_complete",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "rescue_exhausted",
        &[
            "expired_lease_is_rescued",
            "rescue_races_a_completion",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "rescue_after_cancel",
        &[
            "every_cancelled_ending_releases_the_dependents",
            "cancel_request_survives_rescue",
        ],
    ),
    (
        "cancel_pending",
        &[
            "cancel_batch_cascades",
            "cancel_races_a_retryable_outcome",
            "two_instances_race_every_transition",
            "cancel_acts_on_the_tree",
            "cancelling_a_fail_fast_tree_is_one_step",
        ],
    ),
    (
        "request_cancel",
        &[
            "cancel_batch_cascades",
            "cancel_races_a_completion",
            "cancel_acts_on_the_tree",
        ],
    ),
    (
        "fail_fast_cancel_pending",
        &[
            "fail_fast_cancels_pending_siblings_and_stops_running_ones",
            "fail_fast_races_a_completing_sibling",
            "fail_fast_on_an_expired_last_attempt",
            "one_complete_call_is_one_fail_fast_step",
            "one_rescue_is_one_fail_fast_step",
            "fail_fast_reaches_into_nested_batches",
        ],
    ),
    (
        "dependency_failed",
        &[
            "a_failed_dependency_cancels_its_dependents_and_after_any_still_runs",
            "cancelling_a_dependency_cascades_to_its_dependents",
            "retry_batch_requeues_a_dependency_chain",
            "the_longest_chain_allowed_cancels_in_one_step",
        ],
    ),
    (
        "fail_fast_request_cancel",
        &[
            "fail_fast_cancels_pending_siblings_and_stops_running_ones",
            "fail_fast_reaches_into_nested_batches",
        ],
    ),
    (
        "finalize_parent",
        &[
            "parent_completes_when_all_children_complete",
            "parent_fails_with_most_common_child_error",
            "last_two_children_race",
            "two_instances_drain_one_queue_exactly_once",
            "two_instances_race_every_transition",
            "callbacks_fire_once_for_the_outcome",
            "a_failed_batch_fires_its_failure_callbacks",
            "a_cancelled_batch_fires_only_on_complete",
            "the_last_two_children_race_fires_each_callback_once",
            "retry_batch_fires_the_callbacks_of_the_new_outcome",
            "fail_fast_races_a_completing_sibling",
            "ignore_failures_completes_a_batch_with_failed_children",
            "a_callback_handler_sees_its_batch",
            "a_callback_runs_without_waiting_for_the_poll_interval",
            "a_nested_tree_finalizes_level_by_level",
            "a_failed_nested_batch_fails_fast_its_outer_batch",
            "dependencies_cross_the_tree",
            "last_children_of_two_nested_batches_race",
            "the_deepest_tree_allowed_ends_in_one_step",
        ],
    ),
    (
        "reconcile_empty",
        &[
            "reconcile_zero_child_parent",
            "two_instances_race_every_transition",
            "the_reconciler_fires_the_callbacks_of_the_batches_it_finalizes",
            "the_reconciler_counts_a_nested_batch_into_its_parent",
        ],
    ),
    (
        "reconcile_finalize",
        &[
            "reconcile_parent_with_all_children_terminal",
            "two_instances_race_every_transition",
            "the_reconciler_fires_the_callbacks_of_the_batches_it_finalizes",
        ],
    ),
    (
        "retry_batch_child",
        &[
            "retry_batch_requeues_failed_children",
            "retry_batch_clears_the_cancel_request",
            "two_instances_race_every_transition",
            "retry_batch_reopens_the_tree",
        ],
    ),
    (
        "retry_batch_parent",
        &[
            "retry_batch_reopens_the_tree",
            "retry_batch_never_strands_a_dependent",
            "retry_batch_requeues_failed_children",
            "retry_batch_races_an_in_flight_completion",
            "two_instances_race_every_transition",
        ],
    ),
    (
        "prune",
        &[
            "prune_removes_only_whole_terminal_batches",
            "prune_races_a_live_batch",
            "prune_deletes_a_long_history_in_chunks",
            "prune_removes_whole_trees",
            "two_instances_race_every_transition",
        ],
    ),
];

#[cfg(test)]
mod tests {
    use super::TRANSITION_CASES;
    use crate::cases::ALL;
    use fascicle_api::table::TRANSITIONS;

    fn is_case(name: &str) -> bool {
        ALL.iter().any(|(case, _)| *case == name)
    }

    #[test]
    fn every_transition_has_a_case_and_every_named_case_exists() {
        for t in TRANSITIONS {
            let cases = TRANSITION_CASES
                .iter()
                .find(|(name, _)| *name == t.name)
                .map(|(_, cases)| *cases)
                .unwrap_or_default();
            assert!(!cases.is_empty(), "transition `{}` has no case", t.name);
            for case in cases {
                assert!(is_case(case), "`{case}` (for `{}`) is not a case", t.name);
            }
        }
        for (name, _) in TRANSITION_CASES {
            assert!(
                TRANSITIONS.iter().any(|t| t.name == *name),
                "`{name}` is not a transition of the table"
            );
        }
    }

    #[test]
    fn every_case_function_is_in_the_suite() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cases");
        let mut found = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in source.lines() {
                let Some(rest) = line.strip_prefix("pub async fn ") else {
                    continue;
                };
                let name = rest.split('(').next().unwrap();
                found += 1;
                assert!(is_case(name), "case `{name}` is not in the suite's list");
            }
        }
        assert_eq!(
            found,
            ALL.len(),
            "the suite lists a case twice or one that is gone"
        );
    }
}
