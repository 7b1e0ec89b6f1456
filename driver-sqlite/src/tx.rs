//! `SqliteTransaction`: a `BEGIN IMMEDIATE` transaction that owns its connection.

use std::sync::Arc;

use async_trait::async_trait;
use fascicle_api::{ChildRecord, Error, ParentRecord, Result, Transaction};
use rusqlite::{Connection, params};

use crate::error;
use crate::store::{Inner, micros};

const INSERT_PARENT: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, metadata, parent_id, priority, attempts, max_attempts, run_at,
     children_total, children_completed, children_failed, children_cancelled,
     created_at, updated_at)
    VALUES (?1, ?2, 'pending', NULL, ?3, NULL, 0, 0, 0, ?4, ?5, 0, 0, 0, ?4, ?4)";

const INSERT_CHILD: &str = "INSERT INTO fascicle_operations
    (id, kind, status, payload, parent_id, priority, serialization_key, attempts, max_attempts,
     run_at, created_at, updated_at)
    VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?9)";

/// A write transaction. It takes SQLite's write lock at `begin` (`BEGIN IMMEDIATE`), so a
/// concurrent writer waits on the busy handler instead of failing half-way; if the wait
/// runs out the caller gets a transient `Busy` error and nothing was written.
pub(crate) struct SqliteTransaction {
    inner: Arc<Inner>,
    conn: Option<Connection>,
}

impl SqliteTransaction {
    pub(crate) async fn begin(inner: Arc<Inner>) -> Result<Self> {
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
        let inner = Arc::clone(&self.inner);
        if let Some(conn) = conn {
            tokio::task::spawn_blocking(move || {
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

fn insert_child(conn: &Connection, child: &ChildRecord) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(INSERT_CHILD)?;
    let payload = child.payload.to_string();
    stmt.execute(params![
        child.id.as_bytes(),
        child.kind,
        payload,
        child.parent_id.as_ref().map(|p| p.as_bytes()),
        child.priority,
        child.serialization_key,
        child.max_attempts,
        micros(child.run_at),
        micros(child.created_at),
    ])?;
    Ok(())
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        let parent = parent.clone();
        self.run(move |conn| {
            conn.prepare_cached(INSERT_PARENT)?.execute(params![
                parent.id.as_bytes(),
                parent.kind,
                parent.metadata.to_string(),
                micros(parent.created_at),
                parent.children_total as i64,
            ])?;
            Ok(())
        })
        .await
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        let child = child.clone();
        self.run(move |conn| insert_child(conn, &child)).await
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        let children = children.to_vec();
        self.run(move |conn| {
            for child in &children {
                insert_child(conn, child)?;
            }
            Ok(())
        })
        .await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.finish("COMMIT").await
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        self.finish("ROLLBACK").await
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let roll_back = move || {
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
