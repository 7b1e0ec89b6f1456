//! `SqliteTransaction`: a `BEGIN IMMEDIATE` transaction that owns its connection.

use std::collections::HashMap;
use std::sync::Arc;

use fascicle_api::{ChildRecord, Error, InsertHealth, ParentRecord, Result};
use rusqlite::{Connection, params};

use crate::error;
use crate::store::{Inner, micros};

const INSERT_PARENT: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, metadata, parent_id, priority, attempts, max_attempts, run_at,
     children_total, children_completed, children_failed, children_cancelled,
     created_at, updated_at, failure_policy, callbacks, dependents)
    VALUES (?1, ?2, 'pending', NULL, ?3, ?8, 0, 0, 0, ?4, ?5, 0, 0, 0, ?4, ?4, ?6, ?7, ?9)";

const INSERT_CHILD_COLUMNS: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, parent_id, priority, serialization_key, attempts, max_attempts,
     run_at, created_at, updated_at, timeout_ms, waiting_on, dependents) VALUES ";
const CHILD_VALUES: &str = "(?, ?, 'pending', ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)";
const PARAMS_PER_CHILD: usize = 13;
/// Rows per multi-row INSERT; fewer statements to step through for a large batch.
const ROWS_PER_STATEMENT: usize = 64;

fn insert_children_sql(rows: usize) -> String {
    let mut sql =
        String::with_capacity(INSERT_CHILD_COLUMNS.len() + rows * (CHILD_VALUES.len() + 1));
    sql.push_str(INSERT_CHILD_COLUMNS);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(CHILD_VALUES);
    }
    sql
}

/// A child ready to bind: its payload already serialized, so the blocking task owns
/// everything it needs without cloning JSON values.
struct ChildRow {
    id: [u8; 16],
    kind: String,
    payload: String,
    parent_id: Option<[u8; 16]>,
    priority: i32,
    serialization_key: Option<String>,
    max_attempts: u32,
    run_at: i64,
    created_at: i64,
    timeout_ms: Option<i64>,
    waiting_on: u32,
    depends_on: Option<String>,
    dependents: Option<String>,
}

impl From<&ChildRecord> for ChildRow {
    fn from(child: &ChildRecord) -> Self {
        Self {
            id: *child.id.as_bytes(),
            kind: child.kind.clone(),
            payload: child.payload_json.clone(),
            parent_id: child.parent_id.map(|p| *p.as_bytes()),
            priority: child.priority,
            serialization_key: child.serialization_key.clone(),
            max_attempts: child.max_attempts,
            run_at: micros(child.run_at),
            created_at: micros(child.created_at),
            timeout_ms: child.timeout.map(|t| t.as_millis() as i64),
            waiting_on: child.after.len() as u32,
            depends_on: fascicle_api::Dependency::list_json(&child.after),
            dependents: fascicle_api::Dependency::list_json(&child.dependents),
        }
    }
}

fn bind_child(
    stmt: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    row: &ChildRow,
) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(first, &row.id[..])?;
    stmt.raw_bind_parameter(first + 1, row.kind.as_str())?;
    stmt.raw_bind_parameter(first + 2, row.payload.as_str())?;
    stmt.raw_bind_parameter(first + 3, row.parent_id.as_ref().map(|p| &p[..]))?;
    stmt.raw_bind_parameter(first + 4, row.priority)?;
    stmt.raw_bind_parameter(first + 5, row.serialization_key.as_deref())?;
    stmt.raw_bind_parameter(first + 6, row.max_attempts)?;
    stmt.raw_bind_parameter(first + 7, row.run_at)?;
    stmt.raw_bind_parameter(first + 8, row.created_at)?;
    stmt.raw_bind_parameter(first + 9, row.created_at)?;
    stmt.raw_bind_parameter(first + 10, row.timeout_ms)?;
    stmt.raw_bind_parameter(first + 11, row.waiting_on)?;
    stmt.raw_bind_parameter(first + 12, row.dependents.as_deref())?;
    Ok(())
}

/// Inserts rows with multi-row statements after checking, once per distinct parent,
/// that the parent exists (in this transaction or before it).
fn insert_rows(conn: &Connection, rows: &[ChildRow]) -> rusqlite::Result<()> {
    let full = insert_children_sql(ROWS_PER_STATEMENT);
    let mut chunks = rows.chunks_exact(ROWS_PER_STATEMENT);
    for chunk in &mut chunks {
        let mut stmt = conn.prepare_cached(&full)?;
        for (i, row) in chunk.iter().enumerate() {
            bind_child(&mut stmt, 1 + i * PARAMS_PER_CHILD, row)?;
        }
        stmt.raw_execute()?;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut stmt = conn.prepare_cached(&insert_children_sql(1))?;
        for row in rest {
            bind_child(&mut stmt, 1, row)?;
            stmt.raw_execute()?;
        }
    }
    // What each waits for, beside its row (see the schema's version 5).
    for row in rows {
        if let Some(list) = &row.depends_on {
            conn.prepare_cached(
                "INSERT INTO fascicle_depends_on (operation, list) VALUES (?1, ?2)",
            )?
            .execute(rusqlite::params![&row.id[..], list])?;
        }
    }
    Ok(())
}

/// A write transaction. It takes SQLite's write lock at `begin` (`BEGIN IMMEDIATE`), so a
/// concurrent writer waits on the busy handler instead of failing half-way; if the wait
/// runs out the caller gets a transient `Busy` error and nothing was written.
pub(crate) struct SqliteTransaction {
    inner: Arc<Inner>,
    conn: Option<Connection>,
    writer: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Children inserted per parent of this transaction: the parents' `children_total`,
    /// written just before the commit.
    children_per_parent: HashMap<[u8; 16], i64>,
    health: InsertHealth,
}

impl SqliteTransaction {
    pub(crate) async fn begin(inner: Arc<Inner>) -> Result<Self> {
        let writer = inner.lock_writer().await?;
        let pool = Arc::clone(&inner);
        let conn = tokio::task::spawn_blocking(move || {
            let conn = pool.acquire()?;
            match conn.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => Ok(conn),
                Err(e) => {
                    pool.release(conn);
                    Err(error::map(e))
                }
            }
        })
        .await
        .map_err(error::task)??;
        Ok(Self {
            inner,
            conn: Some(conn),
            writer: Some(writer),
            children_per_parent: HashMap::new(),
            health: InsertHealth::default(),
        })
    }

    /// Runs `f` on the transaction's connection, on the blocking pool.
    async fn run<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let mut conn = self.conn.take().ok_or_else(|| {
            Error::backend(
                error::DRIVER,
                fascicle_api::BackendErrorKind::Connection,
                "the transaction lost its connection in an earlier failed call",
            )
        })?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut conn);
            (conn, result)
        })
        .await
        .map_err(error::task)?;
        self.conn = Some(conn);
        result.map_err(error::map)
    }

    async fn finish(mut self, sql: &'static str) -> Result<()> {
        let result = self.run(move |conn| conn.execute_batch(sql)).await;
        let conn = self.conn.take();
        let writer = self.writer.take();
        let inner = Arc::clone(&self.inner);
        if let Some(conn) = conn {
            tokio::task::spawn_blocking(move || {
                let _writer = writer;
                if !conn.is_autocommit() {
                    // A failed COMMIT can leave the transaction open; never pool it so.
                    let _ = conn.execute_batch("ROLLBACK");
                }
                if conn.is_autocommit() {
                    inner.release(conn);
                }
            })
            .await
            .map_err(error::task)?;
        }
        result
    }
}

impl SqliteTransaction {
    async fn insert_parent_unchecked(&mut self, parent: &ParentRecord) -> Result<()> {
        fascicle_api::check_parent_membership(parent, |p| {
            self.children_per_parent.contains_key(p.as_bytes())
        })?;
        let parent = parent.clone();
        let id = *parent.id.as_bytes();
        let outer = parent.parent_id;
        self.run(move |conn| {
            conn.prepare_cached(INSERT_PARENT)?.execute(params![
                parent.id.as_bytes(),
                parent.kind,
                fascicle_api::to_stored_text(&parent.metadata),
                micros(parent.created_at),
                0i64,
                parent.plan.policy_stored(),
                parent.plan.callbacks_json(),
                parent.parent_id.map(|p| p.as_bytes().to_vec()),
                fascicle_api::Dependency::list_json(&parent.dependents),
            ])?;
            Ok(())
        })
        .await?;
        if let Some(outer) = outer {
            *self
                .children_per_parent
                .entry(*outer.as_bytes())
                .or_default() += 1;
        }
        self.children_per_parent.insert(id, 0);
        Ok(())
    }

    async fn insert_child_unchecked(&mut self, child: &ChildRecord) -> Result<()> {
        self.insert_children_unchecked(std::slice::from_ref(child))
            .await
    }

    async fn insert_children_unchecked(&mut self, children: &[ChildRecord]) -> Result<()> {
        fascicle_api::check_batch_membership(children, |p| {
            self.children_per_parent.contains_key(p.as_bytes())
        })?;
        let rows: Vec<ChildRow> = children.iter().map(ChildRow::from).collect();
        self.run(move |conn| insert_rows(conn, &rows)).await?;
        for parent in children.iter().filter_map(|c| c.parent_id) {
            *self
                .children_per_parent
                .entry(*parent.as_bytes())
                .or_default() += 1;
        }
        Ok(())
    }

    async fn insert_unique_unchecked(
        &mut self,
        child: &ChildRecord,
        unique: &fascicle_api::Unique,
    ) -> Result<Option<fascicle_api::OperationId>> {
        fascicle_api::check_standalone(child)?;
        let row = ChildRow::from(child);
        let unique = unique.clone();
        self.run(move |conn| {
            // The key's row is the unique index: taken here, or found with its holder
            // (this transaction is the one writer until it ends).
            let taken = conn
                .prepare_cached(
                    "INSERT INTO fascicle_unique_keys (key, operation) VALUES (?1, ?2)
                         ON CONFLICT (key) DO NOTHING",
                )?
                .execute(params![unique.key, &row.id[..]])?;
            if taken == 0 {
                let (holder, status, completed_at): (Vec<u8>, Option<String>, Option<i64>) = conn
                    .prepare_cached(
                        "SELECT k.operation, o.status, o.completed_at
                             FROM fascicle_unique_keys AS k
                             LEFT JOIN fascicle_operations AS o ON o.id = k.operation
                             WHERE k.key = ?1",
                    )?
                    .query_row(params![unique.key], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
                let status = status
                    .map(|s| s.parse::<fascicle_api::Status>())
                    .transpose()
                    .map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Text,
                            e.to_string().into(),
                        )
                    })?;
                let completed_at = completed_at.map(crate::store::instant).transpose()?;
                let blocks = status.is_some_and(|status| {
                    unique
                        .scope
                        .blocks(status, completed_at, chrono::Utc::now())
                });
                if blocks {
                    return crate::store::id_from(holder).map(Some);
                }
                conn.prepare_cached(
                    "UPDATE fascicle_unique_keys SET operation = ?2 WHERE key = ?1",
                )?
                .execute(params![unique.key, &row.id[..]])?;
            }
            insert_rows(conn, std::slice::from_ref(&row))?;
            Ok(None)
        })
        .await
    }

    async fn commit_unchecked(mut self: Box<Self>) -> Result<()> {
        // A parent's `children_total` is the number of rows inserted for it here, never a
        // number the caller claims.
        let totals: Vec<([u8; 16], i64)> = self.children_per_parent.drain().collect();
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE fascicle_operations SET children_total = ?2 WHERE id = ?1",
            )?;
            for (parent, total) in &totals {
                stmt.execute(params![&parent[..], total])?;
            }
            Ok(())
        })
        .await?;
        self.finish("COMMIT").await
    }

    async fn rollback_unchecked(self: Box<Self>) -> Result<()> {
        self.finish("ROLLBACK").await
    }
}

fascicle_api::checked_transaction!(SqliteTransaction);

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let writer = self.writer.take();
        let roll_back = move || {
            let _writer = writer;
            // Ignore the result: if ROLLBACK fails the connection is closed instead,
            // which rolls the transaction back as well.
            let _ = conn.execute_batch("ROLLBACK");
            if conn.is_autocommit() {
                inner.release(conn);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(roll_back);
            }
            Err(_) => roll_back(),
        }
    }
}
