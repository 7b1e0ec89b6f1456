//! Embedded, versioned schema, applied on open; the version lives in `PRAGMA user_version`.

use fascicle_api::{Error, Result};
use rusqlite::{Connection, TransactionBehavior};

use crate::error;

/// Migrations in order; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: operations and batch parents in one table.
    r#"
    CREATE TABLE fascicle_operations (
        seq                 INTEGER PRIMARY KEY,
        id                  BLOB NOT NULL UNIQUE,
        kind                TEXT NOT NULL,
        status              TEXT NOT NULL CHECK (status IN ('pending','processing','completed','failed','cancelled')),
        payload             TEXT,
        metadata            TEXT,
        -- No FOREIGN KEY: it costs a lookup per child row; the driver checks each
        -- distinct parent once per insert instead, and pruning removes whole batches.
        parent_id           BLOB,
        priority            INTEGER NOT NULL DEFAULT 0,
        serialization_key   TEXT,
        attempts            INTEGER NOT NULL DEFAULT 0,
        max_attempts        INTEGER NOT NULL,
        run_at              INTEGER NOT NULL,
        worker_id           TEXT,
        lease_token         BLOB,
        lease_expires_at    INTEGER,
        children_total      INTEGER,
        children_completed  INTEGER,
        children_failed     INTEGER,
        children_cancelled  INTEGER,
        error               TEXT,
        result              TEXT,
        created_at          INTEGER NOT NULL,
        updated_at          INTEGER NOT NULL,
        completed_at        INTEGER
    );
    -- Index entries end with the rowid, which is `seq`: both indexes are ordered by seq
    -- within their keys without storing it twice.
    CREATE INDEX fascicle_operations_by_parent
        ON fascicle_operations (parent_id) WHERE parent_id IS NOT NULL;
    CREATE INDEX fascicle_operations_claimable
        ON fascicle_operations (priority DESC, run_at)
        WHERE status = 'pending' AND payload IS NOT NULL;
    "#,
    // 2: the worker lifecycle: cancellation requests, one holder per serialization key,
    // and indexes for the rescuer, the reconciler and pruning.
    r#"
    ALTER TABLE fascicle_operations ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX fascicle_operations_key_held
        ON fascicle_operations (serialization_key)
        WHERE status = 'processing' AND serialization_key IS NOT NULL;
    CREATE INDEX fascicle_operations_leases
        ON fascicle_operations (lease_expires_at) WHERE status = 'processing';
    CREATE INDEX fascicle_operations_open_parents
        ON fascicle_operations (created_at) WHERE payload IS NULL AND status = 'pending';
    CREATE INDEX fascicle_operations_finished
        ON fascicle_operations (completed_at) WHERE completed_at IS NOT NULL;
    "#,
];

/// The schema version this build writes.
pub(crate) const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`CURRENT_VERSION`]; a no-op when it is there already.
pub(crate) fn migrate(conn: &mut Connection, location: &str) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| error::storage(location, e))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| error::storage(location, e))?;
    if version > CURRENT_VERSION {
        return Err(Error::Storage {
            location: location.to_string(),
            reason: format!(
                "the database has schema version {version}, written by a newer fascicle; this build knows versions up to {CURRENT_VERSION}. Upgrade fascicle or use another file"
            ),
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)
            .map_err(|e| error::storage(location, e))?;
        tx.pragma_update(None, "user_version", from as i64 + 1)
            .map_err(|e| error::storage(location, e))?;
    }
    tx.commit().map_err(|e| error::storage(location, e))
}
