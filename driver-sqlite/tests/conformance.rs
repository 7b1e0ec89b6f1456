//! The shared conformance suite on SQLite: a fresh database file per case.

use fascicle_api::OperationId;
use fascicle_sqlite::SqliteStore;

/// The suite's raw write past the API (see `Fixture::with_tamper`).
fn tamper(
    store: SqliteStore,
) -> impl Fn(OperationId, u64) -> fascicle_conformance::CaseFuture + Send + Sync + 'static {
    move |parent, total| {
        let store = store.clone();
        Box::pin(async move {
            store
                .transaction(move |tx| {
                    tx.execute(
                        "UPDATE fascicle_operations SET children_total = ?2 WHERE id = ?1",
                        fascicle_sqlite::rusqlite::params![parent.as_bytes(), total as i64],
                    )
                    .map_err(fascicle_sqlite::map_error)?;
                    Ok(())
                })
                .await
                .unwrap();
        })
    }
}

mod conformance {
    fascicle_conformance::suite!(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = fascicle_sqlite::SqliteStore::open(dir.path().join("conformance.db"))
            .await
            .expect("open a fresh SQLite file");
        let tamper = super::tamper(store.clone());
        fascicle_conformance::Fixture::new(store)
            .with_tamper(tamper)
            .with_cleanup(async move { drop(dir) })
    });
}

/// The same suite on `SqliteStore::open_temporary()`, what `sqlite::memory:` maps to.
mod conformance_temporary {
    fascicle_conformance::suite!(async {
        let store = fascicle_sqlite::SqliteStore::open_temporary()
            .await
            .expect("open a temporary SQLite store");
        let tamper = super::tamper(store.clone());
        fascicle_conformance::Fixture::new(store).with_tamper(tamper)
    });
}
