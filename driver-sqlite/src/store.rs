//! `SqliteStore`: a small connection pool over one database file, every call on the
//! blocking thread pool.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fascicle_api::{
    Applied, BatchInfo, BatchPlan, CancelReport, Capabilities, ChildCounters, ClaimRequest,
    ClaimedOperation, Completion, Counted, Dependency, KindLimit, Lease, LeaseStatus, Operation,
    OperationId, PruneReport, ReconcileReport, RescueReport, Result, Stats, Store, Transaction,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use crate::error::{self, DRIVER};
use crate::lifecycle;
use crate::schema;
use crate::tx::SqliteTransaction;

/// How hard SQLite syncs the file on commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// `synchronous=FULL` (default): a committed batch survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster commits in WAL mode; a power loss (not a process
    /// crash) may roll back the most recent commits. The database stays consistent and
    /// batches stay atomic either way.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Options for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    path: PathBuf,
    synchronous: Synchronous,
    busy_timeout: Duration,
    max_idle_connections: usize,
    cache_size_kib: u32,
    on_statement: Option<fn(rusqlite::trace::TraceEvent<'_>)>,
}

impl SqliteOptions {
    /// Options for the database file at `path` (created if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            max_idle_connections: 8,
            cache_size_kib: 32 * 1024,
            on_statement: None,
        }
    }

    /// For the plan tests: `f` is called as each statement of this store's connections
    /// starts and ends (SQLite's `SQLITE_TRACE_STMT` and `SQLITE_TRACE_PROFILE`), with
    /// the statement and its counters.
    #[doc(hidden)]
    pub fn on_statement(mut self, f: fn(rusqlite::trace::TraceEvent<'_>)) -> Self {
        self.on_statement = Some(f);
        self
    }

    /// Sync mode; default [`Synchronous::Full`].
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long a writer waits for another writer (in this or another process) before
    /// giving up with a transient `Busy` error. Default 5 s.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// SQLite's page cache per connection, in KiB (`PRAGMA cache_size`). Default 32 MiB,
    /// sixteen times SQLite's own default, so a busy queue's indexes stay in memory.
    pub fn cache_size_kib(mut self, kib: u32) -> Self {
        self.cache_size_kib = kib.max(64);
        self
    }

    /// Connections kept open between calls. Default 8.
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle_connections = n.max(1);
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(crate) struct Inner {
    options: SqliteOptions,
    location: String,
    idle: Mutex<Vec<Connection>>,
    /// Serializes this store's writers before they reach SQLite: a writer that finds the
    /// file locked sleeps in SQLite's busy handler for milliseconds, so writers of one
    /// process queue here instead; other processes still meet the busy handler.
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Keeps the directory of a `open_temporary` store alive; deleted on drop.
    _temporary: Option<tempfile::TempDir>,
}

impl Inner {
    fn open_connection(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.options.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| error::storage(&self.location, e))?;
        conn.busy_timeout(self.options.busy_timeout)
            .map_err(|e| error::storage(&self.location, e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| error::storage(&self.location, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fascicle_api::Error::Storage {
                location: self.location.clone(),
                reason: format!("cannot switch the database to WAL mode (it stays in `{mode}`)"),
            });
        }
        conn.execute_batch(&format!(
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = {}; PRAGMA cache_size = -{};",
            self.options.synchronous.pragma(),
            self.options.cache_size_kib
        ))
        .map_err(|e| error::storage(&self.location, e))?;
        conn.set_prepared_statement_cache_capacity(32);
        if let Some(f) = self.options.on_statement {
            conn.trace_v2(
                rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT
                    | rusqlite::trace::TraceEventCodes::SQLITE_TRACE_PROFILE,
                Some(f),
            );
        }
        Ok(conn)
    }

    /// Takes this store's writer slot, waiting at most the busy timeout.
    pub(crate) async fn lock_writer(&self) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        tokio::time::timeout(
            self.options.busy_timeout,
            Arc::clone(&self.write_lock).lock_owned(),
        )
        .await
        .map_err(|_| {
            fascicle_api::Error::backend(
                DRIVER,
                fascicle_api::BackendErrorKind::Busy,
                format!(
                    "another transaction of this store held the write lock for longer than the busy timeout ({:?})",
                    self.options.busy_timeout
                ),
            )
        })
    }

    pub(crate) fn acquire(&self) -> Result<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.open_connection(),
        }
    }

    /// Returns a connection to the pool. Only connections outside any transaction come
    /// back here.
    pub(crate) fn release(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.options.max_idle_connections {
            idle.push(conn);
        }
    }
}

/// The embedded SQLite store: one database file in WAL mode, shared safely by several
/// stores and processes (writers take the lock with `BEGIN IMMEDIATE` and wait on the
/// busy handler; readers never block writers).
///
/// Every SQLite call runs on tokio's blocking pool, never on the async runtime.
/// Clones share the same connection pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.options.path)
            .field("synchronous", &self.inner.options.synchronous)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default options, and
    /// applies pending schema migrations.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(SqliteOptions::new(path)).await
    }

    /// Opens the database described by `options`.
    pub async fn open_with(options: SqliteOptions) -> Result<Self> {
        Self::open_inner(options, None).await
    }

    /// A private database in a new temporary directory, deleted when the last clone of
    /// the store is dropped — what `sqlite::memory:` means for fascicle. (SQLite's own
    /// `:memory:` databases cannot be shared by the several connections a store uses
    /// for concurrent readers and a writer.)
    pub async fn open_temporary() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fascicle-sqlite-")
            .tempdir()
            .map_err(|e| fascicle_api::Error::Storage {
                location: std::env::temp_dir().display().to_string(),
                reason: format!("cannot create a temporary directory: {e}"),
            })?;
        let options = SqliteOptions::new(dir.path().join("fascicle.db"));
        Self::open_inner(options, Some(dir)).await
    }

    async fn open_inner(
        options: SqliteOptions,
        temporary: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        let location = options.path.display().to_string();
        let inner = Arc::new(Inner {
            options,
            location,
            idle: Mutex::new(Vec::new()),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
            _temporary: temporary,
        });
        let opened = Arc::clone(&inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = opened.open_connection()?;
            schema::migrate(&mut conn, &opened.location)?;
            opened.release(conn);
            Ok::<_, fascicle_api::Error>(())
        })
        .await
        .map_err(error::task)??;
        Ok(Self { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.options.path
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    pub(crate) async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.acquire()?;
            let result = f(&mut conn);
            if conn.is_autocommit() {
                inner.release(conn);
            }
            result
        })
        .await
        .map_err(error::task)?
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction on the blocking pool; commits if it
    /// returns `Ok`, rolls back otherwise.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let writer = self.inner.lock_writer().await?;
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(error::map)?;
            let out = f(&tx)?;
            tx.commit().map_err(error::map)?;
            drop(writer);
            Ok(out)
        })
        .await
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` write transaction on the blocking pool, queued
    /// behind this store's other writers; commits if `f` returns `Ok`, rolls back
    /// otherwise. With [`complete_in`](crate::complete_in) a handler's own writes and its
    /// operation's completion commit together (see `Registry::register_recorded`).
    /// `f` must not open another write on this store (it would wait for itself).
    pub async fn transaction<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.write(f).await
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

pub(crate) const COLUMNS: &str = "id, kind, status, payload, metadata, parent_id, priority, \
    serialization_key, attempts, max_attempts, run_at, worker_id, lease_expires_at, \
    children_total, children_completed, children_failed, children_cancelled, error, result, \
    created_at, updated_at, completed_at, timeout_ms, failure_policy, callbacks, callback_for, \
    waiting_on, (SELECT list FROM fascicle_depends_on WHERE operation = id)";

/// The number of columns in [`COLUMNS`]: a statement that selects more reads them after.
pub(crate) const COLUMN_COUNT: usize = 28;

pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub(crate) fn instant(micros: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            format!("timestamp {micros} out of range").into(),
        )
    })
}

/// The schedules, by name: all of them, or (`due` = now, in microseconds) the unpaused
/// ones whose next tick has come — those whose definition cannot be read skipped with a
/// warning (one bad row never stops the passes), listed as an error naming it.
fn read_schedules(
    conn: &Connection,
    due: Option<i64>,
) -> Result<Vec<fascicle_api::StoredSchedule>> {
    let sql = match due {
        None => {
            "SELECT name, spec, paused, last_tick, next_tick, version FROM fascicle_schedules
             WHERE ?1 IS NULL ORDER BY name"
        }
        Some(_) => {
            "SELECT name, spec, paused, last_tick, next_tick, version FROM fascicle_schedules
             INDEXED BY fascicle_schedules_due
             WHERE paused = 0 AND next_tick <= ?1 ORDER BY name"
        }
    };
    let mut stmt = conn.prepare_cached(sql).map_err(error::map)?;
    let rows = stmt
        .query_map(params![due], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, bool>(2)?,
                instant(row.get(3)?)?,
                instant(row.get(4)?)?,
                row.get::<_, i64>(5)?,
            ))
        })
        .map_err(error::map)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, spec, paused, last_tick, next_tick, version) = row.map_err(error::map)?;
        let schedule = match fascicle_api::schedule::decode_stored(&name, &spec) {
            Ok(schedule) => schedule,
            Err(error) if due.is_some() => {
                tracing::warn!(%error, "a stored schedule is skipped");
                continue;
            }
            Err(error) => return Err(error),
        };
        out.push(fascicle_api::StoredSchedule {
            schedule,
            paused,
            last_tick,
            next_tick,
            version,
        });
    }
    Ok(out)
}

pub(crate) fn id_from(bytes: Vec<u8>) -> rusqlite::Result<OperationId> {
    uuid::Uuid::from_slice(&bytes)
        .map(OperationId::from_uuid)
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
        })
}

fn json(text: Option<String>) -> rusqlite::Result<Option<serde_json::Value>> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

pub(crate) fn operation_from_row(row: &Row<'_>) -> rusqlite::Result<Operation> {
    let status: String = row.get(2)?;
    let total: Option<i64> = row.get(13)?;
    Ok(Operation {
        id: id_from(row.get(0)?)?,
        kind: row.get(1)?,
        status: status.parse().map_err(|e: fascicle_api::Error| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?,
        payload: json(row.get(3)?)?,
        metadata: json(row.get(4)?)?,
        parent_id: row.get::<_, Option<Vec<u8>>>(5)?.map(id_from).transpose()?,
        priority: row.get(6)?,
        serialization_key: row.get(7)?,
        attempts: row.get(8)?,
        max_attempts: row.get(9)?,
        run_at: instant(row.get(10)?)?,
        worker_id: row.get(11)?,
        lease_expires_at: row.get::<_, Option<i64>>(12)?.map(instant).transpose()?,
        children: match total {
            Some(total) => Some(ChildCounters {
                total: total as u64,
                completed: row.get::<_, i64>(14)? as u64,
                failed: row.get::<_, i64>(15)? as u64,
                cancelled: row.get::<_, i64>(16)? as u64,
            }),
            None => None,
        },
        error: row.get(17)?,
        result: json(row.get(18)?)?,
        created_at: instant(row.get(19)?)?,
        updated_at: instant(row.get(20)?)?,
        completed_at: row.get::<_, Option<i64>>(21)?.map(instant).transpose()?,
        timeout: row
            .get::<_, Option<i64>>(22)?
            .map(|ms| std::time::Duration::from_millis(ms as u64)),
        plan: match total {
            Some(_) => Some(
                BatchPlan::from_stored(
                    row.get::<_, Option<String>>(23)?.as_deref(),
                    row.get::<_, Option<String>>(24)?.as_deref(),
                )
                .map_err(|e| conversion(23, e))?,
            ),
            None => None,
        },
        callback_for: row
            .get::<_, Option<String>>(25)?
            .map(|text| BatchInfo::from_json(&text).map_err(|e| conversion(25, e)))
            .transpose()?,
        waiting_on: row.get(26)?,
        after: Dependency::list_from_json(row.get::<_, Option<String>>(27)?.as_deref())
            .map_err(|e| conversion(27, e))?,
    })
}

fn conversion(column: usize, e: fascicle_api::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e.into())
}

#[async_trait]
impl Store for SqliteStore {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            uses_observation_sources_table: true,
        }
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        Ok(Box::new(
            SqliteTransaction::begin(Arc::clone(self.inner())).await?,
        ))
    }

    async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
        self.with_conn(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM fascicle_operations WHERE id = ?1"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![id.as_bytes()], operation_from_row)
                    .optional()
            })
            .map_err(error::map)
        })
        .await
    }

    async fn children_page(
        &self,
        parent_id: OperationId,
        after: Option<OperationId>,
        limit: usize,
    ) -> Result<Vec<Operation>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            // The cursor's place in the batch, then a walk of the parent index from it.
            let from: i64 = match after {
                None => 0,
                Some(cursor) => conn
                    .prepare_cached(
                        "SELECT seq FROM fascicle_operations WHERE id = ?1 AND parent_id = ?2",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_row(params![cursor.as_bytes(), parent_id.as_bytes()], |r| {
                            r.get(0)
                        })
                        .optional()
                    })
                    .map_err(error::map)?
                    .ok_or_else(|| {
                        fascicle_api::Error::InvalidInput(fascicle_api::messages::not_a_child(
                            cursor, parent_id,
                        ))
                    })?,
            };
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM fascicle_operations
                     WHERE parent_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))
                .map_err(error::map)?;
            stmt.query_map(
                params![parent_id.as_bytes(), from, limit],
                operation_from_row,
            )
            .and_then(|rows| rows.collect())
            .map_err(error::map)
        })
        .await
    }

    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM fascicle_operations WHERE parent_id = ?1 ORDER BY seq"
                ))
                .map_err(error::map)?;
            stmt.query_map(params![parent_id.as_bytes()], operation_from_row)
                .and_then(|rows| rows.collect())
                .map_err(error::map)
        })
        .await
    }

    async fn child_ids_of(&self, parent_id: OperationId) -> Result<Vec<OperationId>> {
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM fascicle_operations WHERE parent_id = ?1 ORDER BY seq",
                )
                .map_err(error::map)?;
            let ids: Vec<Vec<u8>> = stmt
                .query_map(params![parent_id.as_bytes()], |row| row.get(0))
                .and_then(|rows| rows.collect())
                .map_err(error::map)?;
            ids.into_iter()
                .map(|id| {
                    uuid::Uuid::from_slice(&id)
                        .map(OperationId::from_uuid)
                        .map_err(|e| {
                            fascicle_api::Error::backend(
                                DRIVER,
                                fascicle_api::BackendErrorKind::Other,
                                e,
                            )
                        })
                })
                .collect()
        })
        .await
    }

    async fn stats(&self) -> Result<Stats> {
        let now = micros(Utc::now());
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kind, status, payload IS NULL, status = 'pending' AND run_at > ?1,
                            status = 'pending' AND waiting_on > 0, count(*)
                     FROM fascicle_operations GROUP BY 1, 2, 3, 4, 5",
                )
                .map_err(error::map)?;
            let mut rows = stmt.query(params![now]).map_err(error::map)?;
            let mut stats = Stats::default();
            while let Some(row) = rows.next().map_err(error::map)? {
                let kind: String = row.get(0).map_err(error::map)?;
                let status: String = row.get(1).map_err(error::map)?;
                let is_parent: bool = row.get(2).map_err(error::map)?;
                let scheduled: bool = row.get(3).map_err(error::map)?;
                let waiting: bool = row.get(4).map_err(error::map)?;
                let count = row.get::<_, i64>(5).map_err(error::map)? as u64;
                let rows = Counted {
                    kind: &kind,
                    status: status.parse()?,
                    is_parent,
                    scheduled,
                    waiting,
                };
                stats.count(rows, count);
            }
            let mut stmt = conn
                .prepare_cached("SELECT kind FROM fascicle_paused_kinds")
                .map_err(error::map)?;
            stats.paused = stmt
                .query_map([], |row| row.get(0))
                .map_err(error::map)?
                .collect::<rusqlite::Result<_>>()
                .map_err(error::map)?;
            Ok(stats)
        })
        .await
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
        fascicle_api::validate_lease(request.lease)?;
        let request = request.clone();
        self.write(move |tx| lifecycle::claim(tx, &request, Utc::now()))
            .await
    }

    async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>> {
        let completions = completions.to_vec();
        self.write(move |tx| lifecycle::complete(tx, &completions, Utc::now()))
            .await
    }

    async fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<LeaseStatus>> {
        fascicle_api::validate_lease(lease)?;
        let leases = leases.to_vec();
        self.write(move |tx| {
            let now = Utc::now();
            let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
            lifecycle::heartbeat(tx, &leases, until, now)
        })
        .await
    }

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        let leases = leases.to_vec();
        self.write(move |tx| lifecycle::release(tx, &leases, Utc::now()))
            .await
    }

    async fn rescue_expired_leases(&self) -> Result<RescueReport> {
        self.write(|tx| lifecycle::rescue(tx, Utc::now())).await
    }

    async fn reconcile_orphan_parents(&self) -> Result<ReconcileReport> {
        self.write(|tx| lifecycle::reconcile(tx, Utc::now())).await
    }

    async fn cancel(&self, id: OperationId) -> Result<CancelReport> {
        self.write(move |tx| lifecycle::cancel(tx, id, Utc::now()))
            .await
    }

    async fn retry_batch(&self, parent_id: OperationId) -> Result<u64> {
        self.write(move |tx| lifecycle::retry_batch(tx, parent_id, Utc::now()))
            .await
    }

    async fn pause(&self, kind: &str) -> Result<bool> {
        fascicle_api::validate_kind(kind)?;
        let kind = kind.to_owned();
        self.write(move |tx| {
            Ok(tx
                .prepare_cached(
                    "INSERT INTO fascicle_paused_kinds (kind, paused_at) VALUES (?1, ?2)
                     ON CONFLICT (kind) DO NOTHING",
                )
                .map_err(error::map)?
                .execute(params![kind, micros(Utc::now())])
                .map_err(error::map)?
                == 1)
        })
        .await
    }

    async fn resume(&self, kind: &str) -> Result<bool> {
        fascicle_api::validate_kind(kind)?;
        let kind = kind.to_owned();
        self.write(move |tx| {
            Ok(tx
                .prepare_cached("DELETE FROM fascicle_paused_kinds WHERE kind = ?1")
                .map_err(error::map)?
                .execute(params![kind])
                .map_err(error::map)?
                == 1)
        })
        .await
    }

    async fn set_limit(&self, kind: &str, limit: KindLimit) -> Result<KindLimit> {
        fascicle_api::validate_limit(kind, &limit)?;
        let kind = kind.to_owned();
        self.write(move |tx| {
            let previous = tx
                .prepare_cached(
                    "SELECT max_running, rate_starts, rate_period_us FROM fascicle_kind_limits
                     WHERE kind = ?1",
                )
                .map_err(error::map)?
                .query_row(params![kind], |row| {
                    Ok(KindLimit::from_stored(row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()
                .map_err(error::map)?
                .unwrap_or_default();
            if limit.is_none() {
                tx.prepare_cached("DELETE FROM fascicle_kind_limits WHERE kind = ?1")
                    .map_err(error::map)?
                    .execute(params![kind])
                    .map_err(error::map)?;
            } else {
                // The starts kept for the old rate (at most its `starts`, none without one)
                // count against the new one.
                tx.prepare_cached(
                    "INSERT INTO fascicle_kind_limits (kind, max_running, rate_starts, rate_period_us)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind) DO UPDATE SET max_running = ?2, rate_starts = ?3,
                         rate_period_us = ?4",
                )
                .map_err(error::map)?
                .execute(params![
                    kind,
                    limit.running,
                    limit.rate.map(|r| r.starts),
                    limit.rate.map(|r| r.per.as_micros() as i64)
                ])
                .map_err(error::map)?;
            }
            Ok(previous)
        })
        .await
    }

    async fn put_schedule(
        &self,
        schedule: &fascicle_api::Schedule,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let name = schedule.name.clone();
        let spec = serde_json::to_string(schedule).expect("a schedule serializes");
        self.write(move |tx| {
            let existed = tx
                .prepare_cached("SELECT 1 FROM fascicle_schedules WHERE name = ?1")
                .map_err(error::map)?
                .exists(params![name])
                .map_err(error::map)?;
            tx.prepare_cached(
                "INSERT INTO fascicle_schedules (name, spec, paused, last_tick, next_tick, version)
                 VALUES (?1, ?2, 0, ?3, ?3, 1)
                 ON CONFLICT (name) DO UPDATE SET spec = ?2, next_tick = ?3,
                     version = version + 1",
            )
            .map_err(error::map)?
            .execute(params![name, spec, micros(now)])
            .map_err(error::map)?;
            Ok(!existed)
        })
        .await
    }

    async fn remove_schedule(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx| {
            Ok(tx
                .prepare_cached("DELETE FROM fascicle_schedules WHERE name = ?1")
                .map_err(error::map)?
                .execute(params![name])
                .map_err(error::map)?
                == 1)
        })
        .await
    }

    async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx| {
            let was: Option<bool> = tx
                .prepare_cached("SELECT paused FROM fascicle_schedules WHERE name = ?1")
                .map_err(error::map)?
                .query_row(params![name], |row| row.get(0))
                .optional()
                .map_err(error::map)?;
            let Some(was) = was else {
                return Err(fascicle_api::Error::NotFound(
                    fascicle_api::messages::no_such_schedule(&name),
                ));
            };
            tx.prepare_cached(
                "UPDATE fascicle_schedules SET paused = ?2, version = version + 1 WHERE name = ?1",
            )
            .map_err(error::map)?
            .execute(params![name, paused])
            .map_err(error::map)?;
            Ok(was != paused)
        })
        .await
    }

    async fn schedules(&self) -> Result<Vec<fascicle_api::StoredSchedule>> {
        self.with_conn(|conn| read_schedules(conn, None)).await
    }

    async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<fascicle_api::StoredSchedule>> {
        let now = micros(now);
        self.with_conn(move |conn| read_schedules(conn, Some(now)))
            .await
    }

    async fn advance_schedule(
        &self,
        name: &str,
        version: i64,
        last_tick: DateTime<Utc>,
        next_tick: DateTime<Utc>,
    ) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE fascicle_schedules SET last_tick = ?3, next_tick = ?4,
                         version = version + 1
                     WHERE name = ?1 AND version = ?2",
                )
                .map_err(error::map)?
                .execute(params![name, version, micros(last_tick), micros(next_tick)])
                .map_err(error::map)?
                == 1)
        })
        .await
    }

    async fn limits(&self) -> Result<BTreeMap<String, KindLimit>> {
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kind, max_running, rate_starts, rate_period_us FROM fascicle_kind_limits",
                )
                .map_err(error::map)?;
            stmt.query_map([], |row| {
                Ok((
                    row.get(0)?,
                    KindLimit::from_stored(row.get(1)?, row.get(2)?, row.get(3)?),
                ))
            })
            .map_err(error::map)?
            .collect::<rusqlite::Result<_>>()
            .map_err(error::map)
        })
        .await
    }

    async fn elect(&self, role: &str, candidate: &str, term: Duration) -> Result<bool> {
        fascicle_api::validate_election(role, candidate, term)?;
        let (role, candidate) = (role.to_owned(), candidate.to_owned());
        self.write(move |tx| {
            // In the write transaction: one writer at a time decides.
            let now = micros(Utc::now());
            Ok(tx
                .prepare_cached(
                    "INSERT INTO fascicle_roles (role, holder, term_ends) VALUES (?1, ?2, ?3)
                     ON CONFLICT (role) DO UPDATE
                         SET holder = excluded.holder, term_ends = excluded.term_ends
                         WHERE fascicle_roles.holder = excluded.holder
                            OR fascicle_roles.term_ends <= ?4",
                )
                .map_err(error::map)?
                .execute(params![role, candidate, now + term.as_micros() as i64, now])
                .map_err(error::map)?
                == 1)
        })
        .await
    }

    async fn resign(&self, role: &str, candidate: &str) -> Result<bool> {
        fascicle_api::validate_election(role, candidate, Duration::from_millis(1))?;
        let (role, candidate) = (role.to_owned(), candidate.to_owned());
        self.write(move |tx| {
            let ends: Option<i64> = tx
                .prepare_cached(
                    "DELETE FROM fascicle_roles WHERE role = ?1 AND holder = ?2
                     RETURNING term_ends",
                )
                .map_err(error::map)?
                .query_row(params![role, candidate], |r| r.get(0))
                .optional()
                .map_err(error::map)?;
            Ok(ends.is_some_and(|ends| ends > micros(Utc::now())))
        })
        .await
    }

    async fn leader(&self, role: &str) -> Result<Option<String>> {
        fascicle_api::validate_election(role, "-", Duration::from_millis(1))?;
        let role = role.to_owned();
        self.with_conn(move |conn| {
            conn.prepare_cached(
                "SELECT holder FROM fascicle_roles WHERE role = ?1 AND term_ends > ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![role, micros(Utc::now())], |r| r.get(0))
                    .optional()
            })
            .map_err(error::map)
        })
        .await
    }

    async fn prune(&self, completed_before: DateTime<Utc>) -> Result<PruneReport> {
        // One write transaction per chunk: other writers get the lock in between.
        let mut report = PruneReport::default();
        loop {
            let chunk = self
                .write(move |tx| {
                    lifecycle::prune(tx, completed_before, fascicle_api::PRUNE_CHUNK_ROWS)
                })
                .await?;
            if chunk.is_empty() {
                return Ok(report);
            }
            report.add(chunk);
        }
    }
}
