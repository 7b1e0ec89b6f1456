//! Random histories on SQLite (a fresh file per history), invariants checked after every
//! step.

use fascicle_conformance::Fixture;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn random_histories_keep_invariants(steps in fascicle_conformance::model::history(40)) {
        fascicle_conformance::model::check(
            || async {
                Fixture::new(fascicle_sqlite::SqliteStore::open_temporary().await.unwrap())
            },
            steps,
        );
    }
}
