//! Random histories on PostgreSQL (a fresh schema per history), invariants checked after
//! every step.

mod common;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_histories_keep_invariants(steps in fascicle_conformance::model::history(40)) {
        fascicle_conformance::model::check(common::fixture, steps);
    }
}
