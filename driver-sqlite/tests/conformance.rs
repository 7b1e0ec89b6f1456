//! The shared conformance suite on SQLite: a fresh database file per case.

mod conformance {
    fascicle_conformance::suite!(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = fascicle_sqlite::SqliteStore::open(dir.path().join("conformance.db"))
            .await
            .expect("open a fresh SQLite file");
        fascicle_conformance::Fixture::new(store).with_cleanup(async move { drop(dir) })
    });
}

/// The same suite on `SqliteStore::open_temporary()`, what `sqlite::memory:` maps to.
mod conformance_temporary {
    fascicle_conformance::suite!(async {
        fascicle_conformance::Fixture::new(
            fascicle_sqlite::SqliteStore::open_temporary()
                .await
                .expect("open a temporary SQLite store"),
        )
    });
}
