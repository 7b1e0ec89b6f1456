//! Random histories on the memory store, invariants checked after every step.

use fascicle_conformance::Fixture;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_histories_keep_invariants(steps in fascicle_conformance::model::history(40)) {
        fascicle_conformance::model::check(
            || async { Fixture::new(fascicle_memory::MemoryStore::new()) },
            steps,
        );
    }
}
