//! The shared conformance suite on SQLite: a fresh database file per case.

use std::path::PathBuf;
use std::sync::Arc;

use fascicle_api::{OperationId, Store};
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

/// The suite's second instance on the same backend (see `Fixture::with_twin`): another
/// `SqliteStore::open` of the file at `path`, with its own connections and its own writer
/// lock, so the two meet only in SQLite's file locks, as two processes do. `first` keeps
/// the fixture's store, and with it a temporary store's directory, alive while a twin can
/// still be opened.
fn twin(
    path: PathBuf,
    first: SqliteStore,
) -> impl Fn() -> fascicle_conformance::StoreFuture + Send + Sync + 'static {
    move || {
        let (path, first) = (path.clone(), first.clone());
        Box::pin(async move {
            let twin = SqliteStore::open(&path)
                .await
                .unwrap_or_else(|e| panic!("open a second store on {}: {e}", path.display()));
            drop(first);
            Arc::new(twin) as Arc<dyn Store>
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
        let twin = super::twin(store.path().to_path_buf(), store.clone());
        fascicle_conformance::Fixture::new(store)
            .with_tamper(tamper)
            .with_twin(twin)
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
        // A temporary database is a file of its own directory, so a second store can open
        // it too, for as long as the first one keeps the directory.
        let twin = super::twin(store.path().to_path_buf(), store.clone());
        fascicle_conformance::Fixture::new(store)
            .with_tamper(tamper)
            .with_twin(twin)
    });
}
