//! One random history on memory, SQLite and PostgreSQL at once: the same steps with the
//! same ids on every store, each store's invariants checked after every step, and the
//! state of every operation required to be the same on all of them.

use std::future::Future;
use std::pin::Pin;

use fascicle::memory::MemoryStore;
use fascicle::sqlite::SqliteStore;
use fascicle_conformance::Fixture;
use fascicle_reliability::{drop_schema, fresh_postgres, postgres_url};
use proptest::prelude::*;

type Factory = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Fixture>>>>;

fn factories() -> Vec<Factory> {
    let mut factories: Vec<Factory> = vec![
        Box::new(|| Box::pin(async { Fixture::new(MemoryStore::new()) })),
        Box::new(|| {
            Box::pin(async {
                Fixture::new(
                    SqliteStore::open_temporary()
                        .await
                        .expect("temporary SQLite"),
                )
            })
        }),
    ];
    if let Some(url) = postgres_url("the PostgreSQL leg of the lockstep model") {
        factories.push(Box::new(move || {
            Box::pin(async move {
                let store = fresh_postgres(&url, "model_parity", |o| o.max_connections(4)).await;
                let cleanup = store.clone();
                Fixture::new(store).with_cleanup(async move { drop_schema(&cleanup).await })
            })
        }));
    }
    factories
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn one_history_gives_the_same_state_on_every_driver(
        steps in fascicle_conformance::model::history(40)
    ) {
        fascicle_conformance::model::check_lockstep(factories(), steps);
    }
}
