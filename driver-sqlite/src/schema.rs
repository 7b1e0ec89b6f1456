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
    // The status CHECK as `=` comparisons: SQLite builds a temporary B-tree for an `IN`
    // list on every execution of a statement that changes `status`, which made each
    // claim and completion about twice as slow. The table is rebuilt (SQLite cannot
    // change a CHECK in place), rows and rowids kept.
    r#"
    CREATE TABLE fascicle_operations_v3 (
        seq                 INTEGER PRIMARY KEY,
        id                  BLOB NOT NULL UNIQUE,
        kind                TEXT NOT NULL,
        status              TEXT NOT NULL CHECK (status = 'pending' OR status = 'processing'
                                OR status = 'completed' OR status = 'failed'
                                OR status = 'cancelled'),
        payload             TEXT,
        metadata            TEXT,
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
        completed_at        INTEGER,
        cancel_requested    INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO fascicle_operations_v3 (seq, id, kind, status, payload, metadata, parent_id,
        priority, serialization_key, attempts, max_attempts, run_at, worker_id, lease_token,
        lease_expires_at, children_total, children_completed, children_failed,
        children_cancelled, error, result, created_at, updated_at, completed_at,
        cancel_requested)
    SELECT seq, id, kind, status, payload, metadata, parent_id, priority, serialization_key,
        attempts, max_attempts, run_at, worker_id, lease_token, lease_expires_at,
        children_total, children_completed, children_failed, children_cancelled, error,
        result, created_at, updated_at, completed_at, cancel_requested
    FROM fascicle_operations;
    DROP TABLE fascicle_operations;
    ALTER TABLE fascicle_operations_v3 RENAME TO fascicle_operations;
    CREATE INDEX fascicle_operations_by_parent
        ON fascicle_operations (parent_id) WHERE parent_id IS NOT NULL;
    CREATE INDEX fascicle_operations_claimable
        ON fascicle_operations (priority DESC, run_at)
        WHERE status = 'pending' AND payload IS NOT NULL;
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
    // 4: a per-operation attempt timeout (`NewOperation::with_timeout`), in milliseconds;
    // NULL leaves it to the worker. Existing rows keep NULL.
    r#"
    ALTER TABLE fascicle_operations ADD COLUMN timeout_ms INTEGER;
    "#,
    // 5: workflows. A parent's failure policy (NULL: wait_all, as every existing batch)
    // and callbacks (a JSON array, NULL: none); a callback operation's batch (JSON, what
    // its handler reads). Existing rows keep NULL and behave as before.
    r#"
    ALTER TABLE fascicle_operations ADD COLUMN failure_policy TEXT;
    ALTER TABLE fascicle_operations ADD COLUMN callbacks TEXT;
    ALTER TABLE fascicle_operations ADD COLUMN callback_for TEXT;
    -- Dependencies inside a batch: how many have not released an operation yet (it is
    -- not claimable before 0) and what waits for it (a JSON array of {"id", "any"}, read
    -- once, when it ends). What it waits for lives in a table of its own: SQLite rewrites
    -- a whole row on every update, and the row of a 100,000-way fan-in's dependent, whose
    -- count each dependency updates, would otherwise carry the whole list each time.
    ALTER TABLE fascicle_operations ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE fascicle_operations ADD COLUMN dependents TEXT;
    CREATE TABLE fascicle_depends_on (
        operation   BLOB PRIMARY KEY,
        list        TEXT NOT NULL
    ) WITHOUT ROWID;
    DROP INDEX fascicle_operations_claimable;
    CREATE INDEX fascicle_operations_claimable
        ON fascicle_operations (priority DESC, run_at)
        WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0;
    "#,
    // 6: flow control per kind: the paused kinds (`Store::pause`), never claimed.
    r#"
    CREATE TABLE fascicle_paused_kinds (
        kind        TEXT PRIMARY KEY,
        paused_at   INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 7: flow control per kind: concurrency and rate limits (`Store::set_limit`). A NULL
    // limit is none; `recent_starts` is the JSON array of the last starts' instants (in
    // microseconds) that the rate limit counts, at most `rate_starts` of them.
    r#"
    CREATE TABLE fascicle_kind_limits (
        kind            TEXT PRIMARY KEY,
        max_running     INTEGER,
        rate_starts     INTEGER,
        rate_period_us  INTEGER,
        recent_starts   TEXT NOT NULL DEFAULT '[]'
    ) WITHOUT ROWID;
    -- Each kind's ready rows in claim order: a claim among whose kinds one is limited or
    -- paused walks the others here, never past the held-back kind's backlog.
    CREATE INDEX fascicle_operations_ready_by_kind
        ON fascicle_operations (kind, priority DESC, run_at)
        WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0;
    "#,
    // 8: unique operations (`NewOperation::unique`): each key's row names the operation
    // that last took it; a submit takes the key only while that one blocks nothing.
    r#"
    CREATE TABLE fascicle_unique_keys (
        key         TEXT PRIMARY KEY,
        operation   BLOB NOT NULL
    ) WITHOUT ROWID;
    -- Pruning an operation deletes its key's row.
    CREATE INDEX fascicle_unique_keys_by_operation ON fascicle_unique_keys (operation);
    "#,
    // 9: periodic operations (`Store::put_schedule`): each schedule's definition (JSON),
    // its last handled and next tick (microseconds) and a version a pass advances it at.
    // A pass reads only the due ones, through the index.
    r#"
    CREATE TABLE fascicle_schedules (
        name        TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,
        paused      INTEGER NOT NULL DEFAULT 0,
        last_tick   INTEGER NOT NULL,
        next_tick   INTEGER NOT NULL,
        version     INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX fascicle_schedules_due ON fascicle_schedules (next_tick) WHERE paused = 0;
    "#,
    // 10: each kind's running operations, for a claim that counts a limited kind's
    // (`fascicle_kind_limits`): through the lease index it read every running operation
    // of every kind (10,000 steps per claim beside 10,000 held; tests/plans.rs).
    r#"
    CREATE INDEX fascicle_operations_running_by_kind ON fascicle_operations (kind)
        WHERE status = 'processing';
    "#,
    // 11: roles one process holds at a time (`Store::elect`): the maintenance a worker
    // runs for all of them. A term ends at `term_ends` (microseconds).
    r#"
    CREATE TABLE fascicle_roles (
        role        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        term_ends   INTEGER NOT NULL
    ) WITHOUT ROWID;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the operations table, every column, in rowid order.
    fn dump(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
        let mut stmt = conn
            .prepare("SELECT * FROM fascicle_operations ORDER BY seq")
            .unwrap();
        let columns = stmt.column_count();
        stmt.query_map([], |row| {
            (0..columns)
                .map(|i| row.get(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    #[test]
    fn version_2_databases_are_rebuilt_with_their_rows_and_the_status_check_kept() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute_batch(
            "INSERT INTO fascicle_operations (seq, id, kind, status, metadata, max_attempts,
                 run_at, children_total, children_completed, children_failed,
                 children_cancelled, created_at, updated_at)
             VALUES (7, x'01', 'batch', 'pending', '{}', 0, 1, 2, 1, 0, 0, 1, 2);
             INSERT INTO fascicle_operations (seq, id, kind, status, payload, parent_id,
                 attempts, max_attempts, run_at, result, created_at, updated_at, completed_at)
             VALUES (8, x'02', 'op', 'completed', '{\"i\":0}', x'01', 1, 3, 1, 'null', 1, 3, 3);
             INSERT INTO fascicle_operations (seq, id, kind, status, payload, parent_id,
                 serialization_key, attempts, max_attempts, run_at, worker_id, lease_token,
                 lease_expires_at, cancel_requested, created_at, updated_at)
             VALUES (12, x'03', 'op', 'processing', '{\"i\":1}', x'01', 'k', 1, 3, 1, 'w',
                 x'aa', 99, 1, 1, 4);",
        )
        .unwrap();
        let before = dump(&conn);

        migrate(&mut conn, "test").unwrap();

        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, CURRENT_VERSION);
        // Every row and rowid kept, each with the columns later versions added (NULL).
        // timeout_ms (4); failure_policy, callbacks, callback_for, waiting_on (0),
        // dependents (5).
        let added = 6;
        let kept: Vec<Vec<rusqlite::types::Value>> = dump(&conn)
            .into_iter()
            .map(|mut row| {
                let new = row.split_off(row.len() - added);
                use rusqlite::types::Value::{Integer, Null};
                assert!(
                    new.iter().all(|v| *v == Null || *v == Integer(0)),
                    "{new:?}"
                );
                row
            })
            .collect();
        assert_eq!(kept, before, "rows, rowids and columns are kept");
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master
                 WHERE type = 'index' AND tbl_name = 'fascicle_operations'
                   AND name LIKE 'fascicle_operations_%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        // The six of version 3, the ready-by-kind index of version 7 and the running-by-kind
        // index of version 10.
        assert_eq!(indexes, 8, "every index is recreated");
        let refused = conn.execute(
            "UPDATE fascicle_operations SET status = 'lost' WHERE seq = 8",
            [],
        );
        assert!(refused.is_err(), "an unknown status is still refused");
        let next: i64 = conn
            .query_row(
                "INSERT INTO fascicle_operations (id, kind, status, payload, max_attempts,
                     run_at, created_at, updated_at)
                 VALUES (x'04', 'op', 'pending', '{}', 1, 1, 1, 1) RETURNING seq",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(next, 13, "new rows follow the highest kept rowid");
    }

    #[test]
    fn changing_a_status_builds_no_temporary_btree() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, "test").unwrap();
        let opcodes: Vec<String> = conn
            .prepare(
                "EXPLAIN UPDATE fascicle_operations SET status = 'processing'
                 WHERE seq = ?1 AND status = 'pending'",
            )
            .unwrap()
            .query_map([1], |r| r.get(1))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            !opcodes.iter().any(|op| op == "OpenEphemeral"),
            "the status check builds a temporary B-tree per statement: {opcodes:?}"
        );
    }
}
