//! `PostgresStore`: a sqlx pool over one schema.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fascicle_api::InProcessWaker;
use fascicle_api::{
    Applied, BatchInfo, BatchPlan, BatchReceipt, CancelReport, Capabilities, ChildCounters,
    ClaimRequest, ClaimedOperation, Completion, Counted, Error, KindLimit, Lease, LeaseStatus,
    Limits, NewBatch, Operation, OperationId, PruneReport, ReconcileReport, RescueReport, Result,
    Stats, Store, Transaction,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::{self, DRIVER, redact_url};
use crate::lifecycle;
use crate::schema::{self, Sql, sql};
use crate::tx::{PostgresTransaction, insert_children, insert_parent};

/// How every transaction of the store begins, in the one round trip of its `BEGIN`: the
/// join and scan methods whose cost grows with the table, not with the rows a statement
/// touches, are off for the transaction. Every statement of the lifecycle joins a short
/// input (an `unnest` of the ids at hand, or a claim's few rows) with `operations` by its
/// primary key, walks an index in claim order with a limit, or follows a batch's rows by
/// parent; left to costs, a planner without statistics (or with stale ones) has chosen to
/// hash the processing rows of the whole table, or to bitmap-scan every pending row and
/// sort them, to update 128. With these off, a nested loop over the input with an index
/// lookup per row is the only cheap plan left (a disabled method stays possible, at a
/// penalty, where nothing else exists).
///
/// The same settings for every transaction of the store, not only the hot paths': a
/// prepared statement's generic plan is cached per connection and kept whatever the
/// settings of a later transaction, so a statement the hot paths share with others (the
/// tree lock, the terminal update) must be planned under the same settings everywhere.
///
/// READ COMMITTED whatever the server's default: the lifecycle is written for it (a
/// claim's `SKIP LOCKED` and its recount of a limited kind after locking it need a
/// snapshot per statement).
///
/// JIT compilation is off too: a statement the planner overestimates (an empty table never
/// analysed is estimated at hundreds of rows) was JIT-compiled on every claim, 5.6 ms
/// each, to read one row.
const STORE_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; \
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; \
    SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// How a read begins behind a transaction pooler (it needs a transaction, not the
/// lifecycle's planner settings: its statement is not cached, and `stats` counts the
/// whole table).
const READ_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// The planner settings `STORE_BEGIN` turns off (and `complete_in` for its call).
const PLANNER_SETTINGS: &[&str] = &[
    "enable_hashjoin",
    "enable_mergejoin",
    "enable_bitmapscan",
    "enable_seqscan",
    "jit",
];

/// Begins a store transaction (`STORE_BEGIN`) on a connection of `pool`, in a task of
/// its own, so that a caller who gives up while `BEGIN` is on the wire cannot leave the
/// connection inside a transaction. sqlx counts a transaction only once its `BEGIN` has
/// answered: cancelled before that, it rolls nothing back and the connection goes back
/// to the pool in a transaction that the next plain statement on it would join, holding
/// its locks with no one to commit. The task always finishes the `BEGIN`; if the caller
/// is gone, the transaction it yields is dropped there and rolled back by sqlx.
async fn begin(pool: &PgPool, text: &str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let pool = pool.clone();
    let text = text.to_string();
    tokio::spawn(async move { pool.begin_with(AssertSqlSafe(text)).await })
        .await
        .map_err(|e| {
            Error::backend(
                DRIVER,
                fascicle_api::BackendErrorKind::Connection,
                format!("beginning a transaction did not finish: {e}"),
            )
        })?
        .map_err(error::map)
}

/// Runs `$body` (which uses `$conn: &mut PgConnection`) in a transaction of `$store`'s
/// pool, committing when it returns `Ok`.
macro_rules! transact {
    ($store:ident, $conn:ident => $body:expr) => {{
        let mut tx = begin(&$store.pool, &$store.sql.begin).await?;
        let $conn: &mut PgConnection = &mut tx;
        match $body.await {
            Ok(out) => {
                tx.commit().await.map_err(error::map)?;
                Ok(out)
            }
            Err(e) => {
                // Rolled back now, not when the pooled connection is next used: an aborted
                // transaction keeps its row locks (a tree's root) until it ends.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }};
}

/// Runs `$body` — a statement's future that uses `$db` as its executor and yields a
/// `sqlx::Result` — on `$store`'s pool, mapped to this crate's errors. Behind a
/// transaction pooler it runs inside a store transaction of its own instead: the pooler
/// hands a server connection out per transaction, and a statement outside one could have
/// its parse and its execution sent to two different server connections.
macro_rules! on_pool {
    ($store:ident, $db:ident => $body:expr) => {{
        if $store.sql.pooled {
            let mut tx = begin(&$store.pool, &$store.sql.begin_read).await?;
            let $db: &mut PgConnection = &mut tx;
            let out = $body.await.map_err(error::map)?;
            tx.commit().await.map_err(error::map)?;
            Ok::<_, Error>(out)
        } else {
            let $db = &$store.pool;
            $body.await.map_err(error::map)
        }
    }};
}

/// Forwards `NOTIFY` wake-ups while it lives; see [`PostgresStore::listen`].
#[derive(Debug)]
pub struct NotificationListener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NotificationListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for [`PostgresStore::connect_with`].
#[derive(Clone)]
pub struct PostgresOptions {
    url: String,
    schema: String,
    max_connections: u32,
    statement_timeout: Option<Duration>,
    acquire_timeout: Duration,
    application_name: Option<String>,
    /// `None`: as the URL says (`fascicle_pooler`), else not behind one.
    transaction_pooler: Option<bool>,
    listen_url: Option<String>,
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("application_name", &self.application_name)
            .field("transaction_pooler", &self.transaction_pooler)
            .field("listen_url", &self.listen_url.as_deref().map(redact_url))
            .finish()
    }
}

impl PostgresOptions {
    /// Options for the database at `url` (`postgres://user:password@host:port/db`), in the
    /// default schema `fascicle`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "fascicle".into(),
            max_connections: 10,
            statement_timeout: None,
            acquire_timeout: Duration::from_secs(30),
            application_name: None,
            transaction_pooler: None,
            listen_url: None,
        }
    }

    /// The schema holding fascicle's tables (created if missing). Must match
    /// `^[a-z_][a-z0-9_]{0,62}$`; anything else is refused with `Error::InvalidInput`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Pool size; default 10.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// A server-side `statement_timeout` for every connection; default none (and
    /// `Duration::ZERO` is none too). Below a millisecond it is one millisecond.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// How long to wait for a pooled connection; default 30 s.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// `application_name` shown in `pg_stat_activity`; default sqlx's.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// The URL reaches PostgreSQL through a pooler in **transaction** mode (PgBouncer
    /// with `pool_mode = transaction`, PgCat, Supavisor…), which lends a server
    /// connection per transaction. Default: what the URL's `fascicle_pooler` parameter
    /// says (`transaction` or `none`), else `false`; a call here wins over the URL. The store then relies on no session
    /// state:
    /// - statements are not prepared once and cached under a name (a name prepared on one
    ///   server connection is unknown on the next): each is parsed again, unnamed;
    /// - every statement runs inside a transaction, reads included, so its parse and its
    ///   execution reach the same server connection;
    /// - the statement timeout ([`statement_timeout`](Self::statement_timeout)) is set in
    ///   each transaction (`SET LOCAL`) instead of as a connection parameter, which
    ///   poolers refuse or drop, and no `extra_float_digits` parameter is sent;
    /// - [`PostgresStore::listen`] needs a direct connection: give one with
    ///   [`listen_url`](Self::listen_url), or workers find new work by polling.
    ///
    /// Each read costs a `BEGIN` and a `COMMIT` more than on a direct connection, and each
    /// statement a parse. Migrations take a transaction-scoped advisory lock, which works
    /// behind such a pooler as directly (their wait is not bounded by the statement
    /// timeout there). Your own statements on [`PostgresStore::pool`] — a transaction for
    /// [`PostgresStore::submit_batch_in`] or [`PostgresStore::complete_in`] — follow the
    /// same rules: `.persistent(false)`, inside a transaction —
    /// [`PostgresStore::begin_transaction`] begins one with the statement timeout
    /// ([`PostgresStore::behind_transaction_pooler`] says which applies).
    pub fn transaction_pooler(mut self, behind: bool) -> Self {
        self.transaction_pooler = Some(behind);
        self
    }

    /// A direct connection (not through a transaction pooler) for `LISTEN`, used by
    /// [`PostgresStore::listen`] when the store is behind one; default the URL's
    /// `fascicle_listen_url` (percent-encoded), else none. Ignored, with a warning, when
    /// the store is not behind a transaction pooler.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }
}

/// The PostgreSQL store: many processes on many machines against one schema.
///
/// A batch reaches the server in a constant number of round trips whatever its size
/// (`INSERT … SELECT FROM unnest(…)`, one statement per 50,000 children), and the
/// `NOTIFY` that wakes listening workers is issued inside the same transaction, so
/// PostgreSQL delivers it only on commit.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    schema: Arc<str>,
    sql: Arc<Sql>,
    /// When a claim last found no kind limit stored: claims skip reading the limits for
    /// [`NO_LIMITS_RECHECK`] after that. Never needed for a limit to hold — a limited kind
    /// is claimed only after its limit is read — only for a new one to start being
    /// claimed.
    no_limits_since: Arc<std::sync::Mutex<LimitsCache>>,
    /// Behind a transaction pooler: the direct connection `listen` uses.
    listen_url: Option<String>,
}

/// What claims know of the stored limits: when one last found none, and how many times
/// this store set a limit (a claim that read the limits before a `set_limit` of this
/// store does not tell the ones after it that there are none).
#[derive(Debug, Default)]
struct LimitsCache {
    none_since: Option<std::time::Instant>,
    generation: u64,
}

/// How long a claim trusts that no kind limit is stored: a kind limited by another process
/// is not claimed at all until this store reads its limit, at most this long later.
const NO_LIMITS_RECHECK: Duration = Duration::from_secs(1);

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// After a prune that deleted at least a chunk of rows: `VACUUM` the operations
    /// table, so that the space of the deleted rows — and of the row versions claims and
    /// completions left — is reused by the next inserts instead of growing the table until
    /// autovacuum's next visit (a minute apart at its defaults: a table that work flows
    /// through held a minute of traffic, 21.6x its live rows, in `fascicle-bench --only
    /// growth`). `SKIP_LOCKED`: never waits for another vacuum or a migration. Without a
    /// statement timeout (a store's `statement_timeout` would cancel it on a large
    /// table). Skipped behind a transaction pooler (every statement of this store runs in
    /// a transaction there). A failure is logged and the deletions stand; PostgreSQL's
    /// own warnings (a role that does not own the table, a table skipped as locked) reach
    /// sqlx's `sqlx::postgres::notice` log only.
    async fn vacuum_operations(&self) {
        if self.sql.pooled {
            return;
        }
        let vacuum = async {
            let mut conn = self.pool.acquire().await?;
            sqlx::raw_sql(AssertSqlSafe("SET statement_timeout = 0"))
                .execute(&mut *conn)
                .await?;
            let result = sqlx::raw_sql(self.sql.text("VACUUM (SKIP_LOCKED) {s}.operations"))
                .execute(&mut *conn)
                .await;
            // Back to the connection's own setting (its startup value).
            sqlx::raw_sql(AssertSqlSafe("RESET statement_timeout"))
                .execute(&mut *conn)
                .await?;
            result.map(|_| ())
        };
        if let Err(error) = vacuum.await {
            tracing::warn!(%error, "vacuuming the operations table after a prune failed");
        }
    }

    /// Connects to `url` with default options and migrates the `fascicle` schema.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(PostgresOptions::new(url)).await
    }

    /// Connects with `options` and migrates the schema.
    pub async fn connect_with(options: PostgresOptions) -> Result<Self> {
        schema::validate_schema(&options.schema)?;
        let location = redact_url(&options.url);
        let (url, own) = take_own_parameters(&options.url)?;
        // What the options say wins over the URL's parameters.
        let transaction_pooler = options
            .transaction_pooler
            .or(own.transaction_pooler)
            .unwrap_or(false);
        let listen_url = options.listen_url.clone().or(own.listen_url);
        if listen_url.is_some() && !transaction_pooler {
            tracing::warn!(
                url = %location,
                "a listen URL is given but the store is not behind a transaction pooler: \
                 it is ignored (directly, LISTEN uses the store's own connections)"
            );
        }
        let mut connect = connect_options(&url)?;
        if let Some(name) = &options.application_name {
            connect = connect.application_name(name);
        }
        // Whole milliseconds, at least one (PostgreSQL reads 0 as no timeout); a zero
        // duration is no timeout, as it always was.
        let timeout_ms = options
            .statement_timeout
            .filter(|t| !t.is_zero())
            .map(|t| t.as_millis().max(1));
        let mut begin_texts = (STORE_BEGIN.to_string(), READ_BEGIN.to_string());
        if transaction_pooler {
            // No cached named statements; no startup parameter a pooler refuses.
            connect = connect.statement_cache_capacity(0).extra_float_digits(None);
            if let Some(ms) = timeout_ms {
                let set = format!("; SET LOCAL statement_timeout = {ms}");
                begin_texts.0.push_str(&set);
                begin_texts.1.push_str(&set);
            }
        } else if let Some(ms) = timeout_ms {
            connect = connect.options([("statement_timeout", ms.to_string())]);
        }
        // One direct connection first: an unreachable server or a refused login fails at
        // once with its own error, instead of the pool retrying until acquire_timeout.
        let probe = sqlx::ConnectOptions::connect(&connect)
            .await
            .map_err(|e| schema::connect_error(&location, e))?;
        let _ = sqlx::Connection::close(probe).await;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| schema::connect_error(&location, e))?;
        schema::migrate(&pool, &options.schema, &location, !transaction_pooler).await?;
        let mut store = Self::assemble(pool, &options.schema, transaction_pooler, begin_texts);
        if transaction_pooler {
            store.listen_url = listen_url;
        }
        Ok(store)
    }

    /// Uses an existing pool; migrates `schema` first. The pool's connection options are
    /// yours, and the store takes it for a direct connection (or a pooler in session
    /// mode): behind a pooler in transaction mode, use
    /// [`connect_with`](Self::connect_with) and
    /// [`PostgresOptions::transaction_pooler`].
    pub async fn from_pool(pool: PgPool, schema: &str) -> Result<Self> {
        schema::validate_schema(schema)?;
        schema::migrate(&pool, schema, "existing pool", true).await?;
        let begin_texts = (STORE_BEGIN.to_string(), READ_BEGIN.to_string());
        Ok(Self::assemble(pool, schema, false, begin_texts))
    }

    /// A transaction on the store's pool for your own statements, begun as the store
    /// begins its reads: `READ COMMITTED`, and behind a transaction pooler with the
    /// [statement timeout](PostgresOptions::statement_timeout) set for it (a pooler
    /// drops the connection parameter that sets it directly). Like the store's own
    /// `BEGIN`, it runs to the end even if the caller gives up meanwhile.
    pub async fn begin_transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        begin(&self.pool, &self.sql.begin_read).await
    }

    /// Whether the store was opened behind a transaction pooler
    /// ([`PostgresOptions::transaction_pooler`]): your own statements on
    /// [`pool`](Self::pool) must then be `.persistent(false)` and inside a transaction.
    pub fn behind_transaction_pooler(&self) -> bool {
        self.sql.pooled
    }

    fn assemble(pool: PgPool, schema: &str, pooled: bool, begin: (String, String)) -> Self {
        Self {
            pool,
            schema: schema.into(),
            sql: Arc::new(Sql::new(schema, pooled, begin)),
            no_limits_since: Arc::default(),
            listen_url: None,
        }
    }

    /// The pool underneath.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The channel this store `NOTIFY`s on commit of a submit (`fascicle_<schema>`).
    pub fn notify_channel(&self) -> &str {
        &self.sql.channel
    }

    /// Forwards this schema's `NOTIFY` wake-ups (sent when a submit commits, from any
    /// process) to `waker`, whose subscribers are typically [`Worker`](fascicle_api::Worker)s
    /// (`Worker::wake_on(waker.subscribe())`). Runs until the returned listener is dropped.
    /// A lost connection is re-established by the next receive; wake-ups sent meanwhile
    /// are missed, which the workers' poll interval covers. The listener holds one of the
    /// pool's connections: drop it before closing the pool.
    ///
    /// Behind a transaction pooler ([`PostgresOptions::transaction_pooler`]) it connects
    /// to [`PostgresOptions::listen_url`] instead, directly; without one it is
    /// `Unsupported` (a pooler lends its server connections per transaction, and a
    /// `LISTEN` ends with the transaction's): workers then find new work by polling.
    pub async fn listen(&self, waker: InProcessWaker) -> Result<NotificationListener> {
        let mut listener = if self.sql.pooled {
            let Some(url) = &self.listen_url else {
                // A pooler lends its server connections per transaction; a LISTEN
                // ends with the transaction's. Workers poll.
                return Err(Error::unsupported(
                    "LISTEN behind a transaction pooler without PostgresOptions::listen_url \
                     (a direct connection)",
                    DRIVER,
                ));
            };
            let options = connect_options(url)?;
            let location = redact_url(url);
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| schema::connect_error(&location, e))?;
            PgListener::connect_with(&pool).await.map_err(error::map)?
        } else {
            PgListener::connect_with(&self.pool)
                .await
                .map_err(error::map)?
        };
        listener
            .listen(&self.sql.channel)
            .await
            .map_err(error::map)?;
        let task = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => waker.wake(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection error; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Ok(NotificationListener { task })
    }

    /// Submits a batch inside a transaction the caller holds (like River's `InsertTx`):
    /// the rows exist only if the caller commits, and vanish with the caller's rollback.
    ///
    /// Validation is the same as `Queue::submit_batch` with default [`Limits`]. A parent
    /// id that already exists returns the existing batch without disturbing the caller's
    /// transaction. Workers are woken by the `NOTIFY` PostgreSQL delivers on commit.
    ///
    /// ```no_run
    /// # async fn example(store: fascicle::postgres::PostgresStore) -> fascicle::Result<()> {
    /// use fascicle::{NewBatch, NewOperation, json};
    /// let mut tx = store.pool().begin().await.unwrap();
    /// // ... the caller's own writes on `tx` ...
    /// let batch = NewBatch::new("batch_retain")
    ///     .child(NewOperation::new("retain", json!({"doc": 1})));
    /// store.submit_batch_in(&mut tx, batch).await?;
    /// tx.commit().await.unwrap();
    /// # Ok(()) }
    /// ```
    pub async fn submit_batch_in(
        &self,
        conn: &mut PgConnection,
        batch: NewBatch,
    ) -> Result<BatchReceipt> {
        self.submit_batch_in_with(conn, batch, &Limits::default())
            .await
    }

    /// [`submit_batch_in`](Self::submit_batch_in) with explicit limits.
    pub async fn submit_batch_in_with(
        &self,
        conn: &mut PgConnection,
        batch: NewBatch,
        limits: &Limits,
    ) -> Result<BatchReceipt> {
        let prepared = limits.prepare_batch(batch)?;
        let parent = prepared.root();
        let mut clock = insert_parent(&mut *conn, &self.sql, parent, true).await?;
        if clock.is_none() {
            let child_ids: Vec<Uuid> = sqlx::query_scalar(sql(&self.sql.children_ids))
                .persistent(self.sql.persistent())
                .bind(parent.id.as_uuid())
                .fetch_all(&mut *conn)
                .await
                .map_err(error::map)?;
            return Ok(BatchReceipt {
                parent_id: parent.id,
                child_ids: child_ids.into_iter().map(OperationId::from_uuid).collect(),
                created: false,
                notified: true,
            });
        }
        for (level, (parent, children)) in prepared.batches.iter().enumerate() {
            if level > 0 {
                // A nested batch's id taken: an error (the caller's transaction aborts).
                clock = insert_parent(&mut *conn, &self.sql, parent, false).await?;
            }
            insert_children(&mut *conn, &self.sql, children, &mut clock).await?;
        }
        Ok(BatchReceipt {
            parent_id: prepared.root().id,
            child_ids: prepared.child_ids(),
            created: true,
            notified: true,
        })
    }

    /// Records completions inside a transaction the caller holds, so a handler's own
    /// writes and its operation's completion commit together (see
    /// `Registry::register_recorded`). Same fencing and aggregation as
    /// [`Store::complete`]; `Applied::LeaseLost` means nothing was changed and the caller
    /// should roll back its writes.
    ///
    /// ```no_run
    /// # async fn example(store: fascicle::postgres::PostgresStore, ctx: fascicle::Context) -> fascicle::Result<()> {
    /// let mut tx = store.pool().begin().await.unwrap();
    /// // ... the handler's own writes on `tx` ...
    /// let applied = store.complete_in(&mut tx, &[ctx.completion(fascicle::json!({}))]).await?;
    /// if applied == [fascicle::Applied::Applied] {
    ///     tx.commit().await.unwrap();
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Its statements run under the store's planner settings (see `STORE_BEGIN` in the
    /// crate's README: hash and merge joins, bitmap and sequential scans off), set for
    /// the call only: your transaction's own settings are restored before it returns, so
    /// your statements plan as before and the store's prepared statements are never
    /// planned under other settings than its own. Its isolation is yours: under
    /// REPEATABLE READ or SERIALIZABLE a completion racing another change of the same row
    /// fails with a transient serialization error (retry the transaction).
    pub async fn complete_in(
        &self,
        conn: &mut PgConnection,
        completions: &[Completion],
    ) -> Result<Vec<Applied>> {
        let yours: Vec<String> = sqlx::query_scalar(
            "SELECT old FROM unnest($1::text[]) AS s(name),
                 LATERAL (SELECT current_setting(s.name) AS old,
                                 set_config(s.name, 'off', true)) AS c",
        )
        .persistent(self.sql.persistent())
        .bind(PLANNER_SETTINGS)
        .fetch_all(&mut *conn)
        .await
        .map_err(error::map)?;
        let applied = lifecycle::complete(conn, &self.sql, completions).await?;
        // (After an error the transaction is aborted: it rolls back, settings included.)
        sqlx::query("SELECT set_config(name, old, true) FROM unnest($1::text[], $2::text[]) AS s(name, old)")
            .persistent(self.sql.persistent())
            .bind(PLANNER_SETTINGS)
            .bind(&yours)
            .execute(&mut *conn)
            .await
            .map_err(error::map)?;
        Ok(applied)
    }
}

/// The query parameters sqlx's PostgreSQL driver reads (sqlx-postgres 0.9,
/// `options/parse.rs`), besides `options[name]`. It ignores any other after logging it
/// at `warn` *with its value*.
const READ_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Refuses a URL with a query parameter the driver does not read. sqlx would log it with
/// its value — a secret, for `sslpassword` (encrypted client keys are not supported) or a
/// `Password` in another case — and go on without it: a misspelt `sslmod=require` would
/// connect without TLS. The message names the parameter, never its value, and not even
/// the name when the query holds an `@` (a password with a `?` puts the userinfo there).
fn refuse_unread_parameters(url: &str) -> Result<()> {
    // A URL that does not parse is refused by sqlx's own parser, with its message.
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let query = parsed.query().unwrap_or_default();
    for (key, _) in parsed.query_pairs() {
        let read =
            READ_PARAMETERS.contains(&&*key) || (key.starts_with("options[") && key.ends_with(']'));
        if !read {
            let named = if query.contains('@') {
                "a parameter".to_string()
            } else {
                format!("the parameter `{key}`")
            };
            return Err(Error::InvalidInput(format!(
                "{} has {named}, which the PostgreSQL driver does not read (it would be \
                 ignored); remove it. The parameters read are {}, options[name], and \
                 fascicle's own fascicle_pooler and fascicle_listen_url",
                redact_url(url),
                READ_PARAMETERS.join(", ")
            )));
        }
    }
    Ok(())
}

/// fascicle's own URL parameters, read by [`take_own_parameters`].
#[derive(Debug, Default, PartialEq)]
struct OwnParameters {
    /// `fascicle_pooler=transaction` (`true`) or `none` (`false`).
    transaction_pooler: Option<bool>,
    /// `fascicle_listen_url=…`, the direct URL for `LISTEN` (percent-encoded).
    listen_url: Option<String>,
}

/// The URL without fascicle's own query parameters, and their values, so that a URL alone
/// (`fascicle::connect`, the CLI's `--database-url`) can say what
/// [`PostgresOptions::transaction_pooler`] and [`PostgresOptions::listen_url`] say:
/// `fascicle_pooler=transaction|none` and `fascicle_listen_url=<URL, percent-encoded>`.
/// A URL without them is returned as it is.
fn take_own_parameters(url: &str) -> Result<(String, OwnParameters)> {
    const POOLER: &str = "fascicle_pooler";
    const LISTEN: &str = "fascicle_listen_url";
    let Ok(mut parsed) = url::Url::parse(url) else {
        // sqlx's parser refuses it, with its message.
        return Ok((url.to_string(), OwnParameters::default()));
    };
    let ours = |key: &str| key == POOLER || key == LISTEN;
    if !parsed.query_pairs().any(|(key, _)| ours(&key)) {
        return Ok((url.to_string(), OwnParameters::default()));
    }
    // A URL inside a URL must be percent-encoded: unencoded, its `&` would cut it into
    // parameters of the outer URL (a password's tail among them) and its `+` would read
    // as a space. Refused without quoting any of it.
    let raw_query = parsed.query().unwrap_or_default();
    for segment in raw_query.split('&') {
        if let Some(value) = segment.strip_prefix("fascicle_listen_url=")
            && value.contains([':', '/', '@', '?', '+', '#'])
        {
            return Err(Error::InvalidInput(
                "fascicle_listen_url must be percent-encoded (`:` as %3A, `/` as %2F, `@` as \
                 %40, `+` as %2B …), or its password could be cut into other parameters; \
                 the URL is not shown"
                    .into(),
            ));
        }
    }
    let mut own = OwnParameters::default();
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match &*key {
            POOLER => {
                own.transaction_pooler = Some(match &*value {
                    "transaction" => true,
                    "none" => false,
                    other => {
                        return Err(Error::InvalidInput(format!(
                            "{}: {POOLER} must be `transaction` (behind a pooler in \
                             transaction mode) or `none`, got `{other}`",
                            redact_url(url)
                        )));
                    }
                })
            }
            LISTEN => own.listen_url = Some(value.into_owned()),
            _ => rest.push((key.into_owned(), value.into_owned())),
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok((parsed.to_string(), own))
}

/// The connection options `url` names, or `InvalidInput` naming the URL with its password
/// hidden — whatever the URL, and whatever the parser's message quotes of it.
fn connect_options(url: &str) -> Result<PgConnectOptions> {
    refuse_unread_parameters(url)?;
    PgConnectOptions::from_str(url).map_err(|e| {
        Error::InvalidInput(format!(
            "{} is not a usable PostgreSQL URL: {}",
            redact_url(url),
            redact_url(&e.to_string())
        ))
    })
}

pub(crate) fn operation_from_row(row: &PgRow) -> sqlx::Result<Operation> {
    let status: String = row.try_get(2)?;
    let total: Option<i64> = row.try_get(13)?;
    let count = |i: usize| -> sqlx::Result<u64> { Ok(row.try_get::<i64, _>(i)? as u64) };
    Ok(Operation {
        id: OperationId::from_uuid(row.try_get(0)?),
        kind: row.try_get(1)?,
        status: status
            .parse()
            .map_err(|e: Error| sqlx::Error::Decode(e.into()))?,
        payload: row.try_get(3)?,
        metadata: row.try_get(4)?,
        parent_id: row
            .try_get::<Option<Uuid>, _>(5)?
            .map(OperationId::from_uuid),
        priority: row.try_get(6)?,
        serialization_key: row.try_get(7)?,
        attempts: row.try_get::<i32, _>(8)? as u32,
        max_attempts: row.try_get::<i32, _>(9)? as u32,
        run_at: row.try_get(10)?,
        worker_id: row.try_get(11)?,
        lease_expires_at: row.try_get(12)?,
        children: match total {
            Some(total) => Some(ChildCounters {
                total: total as u64,
                completed: count(14)?,
                failed: count(15)?,
                cancelled: count(16)?,
            }),
            None => None,
        },
        error: row.try_get(17)?,
        result: row.try_get(18)?,
        created_at: row.try_get(19)?,
        updated_at: row.try_get(20)?,
        completed_at: row.try_get(21)?,
        timeout: row
            .try_get::<Option<i64>, _>(22)?
            .map(|ms| std::time::Duration::from_millis(ms as u64)),
        plan: match total {
            Some(_) => Some(
                BatchPlan::from_stored(
                    row.try_get::<Option<String>, _>(23)?.as_deref(),
                    row.try_get::<Option<serde_json::Value>, _>(24)?
                        .map(|v| v.to_string())
                        .as_deref(),
                )
                .map_err(|e| sqlx::Error::Decode(e.into()))?,
            ),
            None => None,
        },
        callback_for: row
            .try_get::<Option<serde_json::Value>, _>(25)?
            .map(|v| BatchInfo::from_json(&v.to_string()))
            .transpose()
            .map_err(|e| sqlx::Error::Decode(e.into()))?,
        waiting_on: row.try_get::<i32, _>(26)? as u32,
        after: fascicle_api::Dependency::list_from_json(
            row.try_get::<Option<serde_json::Value>, _>(27)?
                .map(|v| v.to_string())
                .as_deref(),
        )
        .map_err(|e| sqlx::Error::Decode(e.into()))?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            uses_observation_sources_table: false,
        }
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>> {
        let tx = begin(&self.pool, &self.sql.begin).await?;
        Ok(Box::new(PostgresTransaction::new(
            tx,
            Arc::clone(&self.sql),
        )))
    }

    async fn get(&self, id: OperationId) -> Result<Option<Operation>> {
        let row = on_pool!(self, db => sqlx::query(sql(&self.sql.get))
            .persistent(self.sql.persistent())
            .bind(id.as_uuid())
            .fetch_optional(db))?;
        row.as_ref()
            .map(operation_from_row)
            .transpose()
            .map_err(error::map)
    }

    async fn children_of(&self, parent_id: OperationId) -> Result<Vec<Operation>> {
        let rows = on_pool!(self, db => sqlx::query(sql(&self.sql.children_of))
            .persistent(self.sql.persistent())
            .bind(parent_id.as_uuid())
            .fetch_all(db))?;
        rows.iter()
            .map(operation_from_row)
            .collect::<sqlx::Result<_>>()
            .map_err(error::map)
    }

    async fn children_page(
        &self,
        parent_id: OperationId,
        after: Option<OperationId>,
        limit: usize,
    ) -> Result<Vec<Operation>> {
        // The cursor's place in the batch, then an index walk (`operations_by_parent`,
        // on parent and seq) from it: a page costs what it holds.
        let from: i64 = match after {
            None => 0,
            Some(cursor) => on_pool!(self, db => sqlx::query_scalar(self.sql.text(
                "SELECT seq FROM {s}.operations WHERE id = $1 AND parent_id = $2"
            ))
            .persistent(self.sql.persistent())
            .bind(cursor.as_uuid())
            .bind(parent_id.as_uuid())
            .fetch_optional(db))?
            .ok_or_else(|| {
                Error::InvalidInput(fascicle_api::messages::not_a_child(cursor, parent_id))
            })?,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = on_pool!(self, db => sqlx::query(self.sql.text(&format!(
            "SELECT {} FROM {{s}}.operations WHERE parent_id = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
            schema::COLUMNS
        )))
        .persistent(self.sql.persistent())
        .bind(parent_id.as_uuid())
        .bind(from)
        .bind(limit)
        .fetch_all(db))?;
        rows.iter()
            .map(operation_from_row)
            .collect::<sqlx::Result<_>>()
            .map_err(error::map)
    }

    async fn child_ids_of(&self, parent_id: OperationId) -> Result<Vec<OperationId>> {
        let ids: Vec<uuid::Uuid> = on_pool!(self, db => sqlx::query_scalar(
            self.sql
                .text("SELECT id FROM {s}.operations WHERE parent_id = $1 ORDER BY seq"),
        )
        .persistent(self.sql.persistent())
        .bind(parent_id.as_uuid())
        .fetch_all(db))?;
        Ok(ids.into_iter().map(OperationId::from_uuid).collect())
    }

    async fn stats(&self) -> Result<Stats> {
        let rows = on_pool!(self, db => sqlx::query(sql(&self.sql.stats))
            .persistent(self.sql.persistent())
            .fetch_all(db))?;
        let mut stats = Stats::default();
        for row in rows {
            let kind: String = row.try_get(0).map_err(error::map)?;
            if row.try_get::<bool, _>(6).map_err(error::map)? {
                stats.paused.insert(kind);
                continue;
            }
            let status: String = row.try_get(1).map_err(error::map)?;
            let is_parent: bool = row.try_get(2).map_err(error::map)?;
            let scheduled: bool = row.try_get(3).map_err(error::map)?;
            let waiting: bool = row.try_get(4).map_err(error::map)?;
            let count = row.try_get::<i64, _>(5).map_err(error::map)? as u64;
            let rows = Counted {
                kind: &kind,
                status: status.parse()?,
                is_parent,
                scheduled,
                waiting,
            };
            stats.count(rows, count);
        }
        Ok(stats)
    }

    async fn pause(&self, kind: &str) -> Result<bool> {
        fascicle_api::validate_kind(kind)?;
        let inserted = on_pool!(self, db => sqlx::query(self.sql.text(
                "INSERT INTO {s}.paused_kinds (kind) VALUES ($1) ON CONFLICT (kind) DO NOTHING",
            ))
            .persistent(self.sql.persistent())
            .bind(kind)
            .execute(db))?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn resume(&self, kind: &str) -> Result<bool> {
        fascicle_api::validate_kind(kind)?;
        let deleted = on_pool!(self, db => sqlx::query(
            self.sql
                .text("DELETE FROM {s}.paused_kinds WHERE kind = $1"),
        )
        .persistent(self.sql.persistent())
        .bind(kind)
        .execute(db))?;
        Ok(deleted.rows_affected() == 1)
    }

    async fn set_limit(&self, kind: &str, limit: KindLimit) -> Result<KindLimit> {
        fascicle_api::validate_limit(kind, &limit)?;
        let previous = transact!(self, conn => async {
                    let previous = sqlx::query(self.sql.text(
                        "SELECT max_running, rate_starts, rate_period_us FROM {s}.kind_limits
                         WHERE kind = $1 FOR UPDATE",
                    ))
        .persistent(self.sql.persistent())
                    .bind(kind)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(error::map)?;
                    let previous = match previous {
                        Some(row) => lifecycle::limit_from_columns(
                            row.try_get(0).map_err(error::map)?,
                            row.try_get(1).map_err(error::map)?,
                            row.try_get(2).map_err(error::map)?,
                        ),
                        None => KindLimit::default(),
                    };
                    if limit.is_none() {
                        sqlx::query(self.sql.text("DELETE FROM {s}.kind_limits WHERE kind = $1"))
        .persistent(self.sql.persistent())
                            .bind(kind)
                            .execute(&mut *conn)
                            .await
                            .map_err(error::map)?;
                    } else {
                        // The starts kept for the old rate (at most its `starts`, none without one)
                        // count against the new one.
                        sqlx::query(self.sql.text(
                            "INSERT INTO {s}.kind_limits (kind, max_running, rate_starts, rate_period_us)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (kind) DO UPDATE SET max_running = $2, rate_starts = $3,
                         rate_period_us = $4",
                        ))
        .persistent(self.sql.persistent())
                        .bind(kind)
                        .bind(limit.running.map(|n| n as i32))
                        .bind(limit.rate.map(|r| r.starts as i32))
                        .bind(limit.rate.map(|r| r.per.as_micros() as i64))
                        .execute(&mut *conn)
                        .await
                        .map_err(error::map)?;
                    }
                    Ok::<_, Error>(previous)
                })?;
        // This process claims the kind under its new limit from now on.
        {
            let mut cache = self.no_limits_since.lock().expect("limits cache");
            cache.none_since = None;
            cache.generation += 1;
        }
        // Claims in flight may have read the limits before this one was committed: every
        // claim statement holds the gate shared until it commits, so taking it exclusively
        // waits them out — twice, for a claim that read the limits just before the commit
        // and reached the gate just after the first wait began.
        for _ in 0..2 {
            transact!(self, conn => async {
                            sqlx::query(self.sql.text(&format!(
                                "SELECT pg_advisory_xact_lock({})",
                                lifecycle::LIMITS_GATE
                            )))
            .persistent(self.sql.persistent())
                            .execute(&mut *conn)
                            .await
                            .map_err(error::map)
                        })?;
        }
        Ok(previous)
    }

    async fn put_schedule(
        &self,
        schedule: &fascicle_api::Schedule,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let spec = serde_json::to_string(schedule).expect("a schedule serializes");
        // `xmax = 0`: the row was inserted, not updated.
        let created: bool = on_pool!(self, db => sqlx::query_scalar(self.sql.text(
            "INSERT INTO {s}.schedules (name, spec, paused, last_tick, next_tick, version)
             VALUES ($1, $2, false, $3, $3, 1)
             ON CONFLICT (name) DO UPDATE SET spec = $2, next_tick = $3,
                 version = {s}.schedules.version + 1
             RETURNING xmax = 0",
        ))
        .persistent(self.sql.persistent())
        .bind(&schedule.name)
        .bind(spec)
        .bind(now)
        .fetch_one(db))?;
        Ok(created)
    }

    async fn remove_schedule(&self, name: &str) -> Result<bool> {
        let deleted = on_pool!(self, db => sqlx::query(self.sql.text("DELETE FROM {s}.schedules WHERE name = $1"))
            .persistent(self.sql.persistent())
            .bind(name)
            .execute(db))?;
        Ok(deleted.rows_affected() == 1)
    }

    async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool> {
        // The old value, from the row as locked by the update.
        let was: Option<bool> = on_pool!(self, db => sqlx::query_scalar(self.sql.text(
            "UPDATE {s}.schedules AS n SET paused = $2, version = n.version + 1
             FROM (SELECT name, paused FROM {s}.schedules WHERE name = $1 FOR UPDATE) AS o
             WHERE n.name = o.name
             RETURNING o.paused",
        ))
        .persistent(self.sql.persistent())
        .bind(name)
        .bind(paused)
        .fetch_optional(db))?;
        match was {
            Some(was) => Ok(was != paused),
            None => Err(Error::NotFound(fascicle_api::messages::no_such_schedule(
                name,
            ))),
        }
    }

    async fn schedules(&self) -> Result<Vec<fascicle_api::StoredSchedule>> {
        let rows = on_pool!(self, db => sqlx::query(self.sql.text(
            "SELECT name, spec, paused, last_tick, next_tick, version FROM {s}.schedules
             ORDER BY name",
        ))
        .persistent(self.sql.persistent())
        .fetch_all(db))?;
        rows.iter().map(stored_schedule).collect()
    }

    async fn due_schedules(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<fascicle_api::StoredSchedule>> {
        let rows = on_pool!(self, db => sqlx::query(self.sql.text(
            "SELECT name, spec, paused, last_tick, next_tick, version FROM {s}.schedules
             WHERE NOT paused AND next_tick <= $1 ORDER BY name",
        ))
        .persistent(self.sql.persistent())
        .bind(now)
        .fetch_all(db))?;
        // One row whose definition cannot be read never stops the passes: skipped here,
        // an error naming it in `schedules`.
        Ok(rows
            .iter()
            .filter_map(|row| match stored_schedule(row) {
                Ok(schedule) => Some(schedule),
                Err(error) => {
                    tracing::warn!(%error, "a stored schedule is skipped");
                    None
                }
            })
            .collect())
    }

    async fn advance_schedule(
        &self,
        name: &str,
        version: i64,
        last_tick: chrono::DateTime<chrono::Utc>,
        next_tick: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let updated = on_pool!(self, db => sqlx::query(self.sql.text(
            "UPDATE {s}.schedules SET last_tick = $3, next_tick = $4, version = version + 1
             WHERE name = $1 AND version = $2",
        ))
        .persistent(self.sql.persistent())
        .bind(name)
        .bind(version)
        .bind(last_tick)
        .bind(next_tick)
        .execute(db))?;
        Ok(updated.rows_affected() == 1)
    }

    async fn limits(&self) -> Result<BTreeMap<String, KindLimit>> {
        let rows = on_pool!(self, db => sqlx::query(
            self.sql
                .text("SELECT kind, max_running, rate_starts, rate_period_us FROM {s}.kind_limits"),
        )
        .persistent(self.sql.persistent())
        .fetch_all(db))?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get(0).map_err(error::map)?,
                    lifecycle::limit_from_columns(
                        row.try_get(1).map_err(error::map)?,
                        row.try_get(2).map_err(error::map)?,
                        row.try_get(3).map_err(error::map)?,
                    ),
                ))
            })
            .collect()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
        fascicle_api::validate_lease(request.lease)?;
        // Two claimers can both see a serialization key as free; the unique index on
        // held keys refuses the second (`Busy`, see `error::map`), which then claims again
        // with a fresh snapshot.
        let mut attempt = 0;
        loop {
            match self.claim_once(request).await {
                Err(e) if attempt < 8 && (e.is_transient() || matches!(e, Error::Conflict(_))) => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn complete(&self, completions: &[Completion]) -> Result<Vec<Applied>> {
        transact!(self, conn => lifecycle::complete(conn, &self.sql, completions))
    }

    async fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<LeaseStatus>> {
        fascicle_api::validate_lease(lease)?;
        transact!(self, conn => lifecycle::heartbeat(conn, &self.sql, leases, lease))
    }

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        transact!(self, conn => lifecycle::release(conn, &self.sql, leases))
    }

    async fn rescue_expired_leases(&self) -> Result<RescueReport> {
        transact!(self, conn => lifecycle::rescue(conn, &self.sql))
    }

    async fn reconcile_orphan_parents(&self) -> Result<ReconcileReport> {
        transact!(self, conn => lifecycle::reconcile(conn, &self.sql))
    }

    async fn cancel(&self, id: OperationId) -> Result<CancelReport> {
        transact!(self, conn => lifecycle::cancel(conn, &self.sql, id))
    }

    async fn retry_batch(&self, parent_id: OperationId) -> Result<u64> {
        transact!(self, conn => lifecycle::retry_batch(conn, &self.sql, parent_id))
    }

    async fn elect(&self, role: &str, candidate: &str, term: Duration) -> Result<bool> {
        fascicle_api::validate_election(role, candidate, term)?;
        // On the server's clock, which every process on the database shares. A racing
        // insert of the same role waits for the first, then finds it held.
        let taken = on_pool!(self, db => sqlx::query(self.sql.text(
                "INSERT INTO {s}.roles AS r (role, holder, term_ends)
                 VALUES ($1, $2, clock_timestamp() + $3 * interval '1 microsecond')
                 ON CONFLICT (role) DO UPDATE
                     SET holder = EXCLUDED.holder, term_ends = EXCLUDED.term_ends
                     WHERE r.holder = EXCLUDED.holder OR r.term_ends <= clock_timestamp()",
            ))
            .persistent(self.sql.persistent())
            .bind(role)
            .bind(candidate)
            .bind(term.as_micros() as i64)
            .execute(db))?;
        Ok(taken.rows_affected() == 1)
    }

    async fn resign(&self, role: &str, candidate: &str) -> Result<bool> {
        fascicle_api::validate_election(role, candidate, Duration::from_millis(1))?;
        let held: Option<bool> = on_pool!(self, db => sqlx::query_scalar(self.sql.text(
                "DELETE FROM {s}.roles WHERE role = $1 AND holder = $2
                 RETURNING term_ends > clock_timestamp()",
            ))
            .persistent(self.sql.persistent())
            .bind(role)
            .bind(candidate)
            .fetch_optional(db))?;
        Ok(held == Some(true))
    }

    async fn leader(&self, role: &str) -> Result<Option<String>> {
        fascicle_api::validate_election(role, "-", Duration::from_millis(1))?;
        on_pool!(self, db => sqlx::query_scalar(self.sql.text(
                "SELECT holder FROM {s}.roles WHERE role = $1 AND term_ends > clock_timestamp()",
            ))
            .persistent(self.sql.persistent())
            .bind(role)
            .fetch_optional(db))
    }

    async fn prune(&self, completed_before: chrono::DateTime<chrono::Utc>) -> Result<PruneReport> {
        // One transaction per chunk: workers never wait on a long delete.
        let mut report = PruneReport::default();
        loop {
            let chunk: PruneReport = transact!(self, conn => lifecycle::prune(
                conn,
                &self.sql,
                completed_before,
                fascicle_api::PRUNE_CHUNK_ROWS,
            ))?;
            if chunk.is_empty() {
                // A few rows are autovacuum's; a chunk's worth or more, ours.
                if report.operations + report.batches >= fascicle_api::PRUNE_CHUNK_ROWS {
                    self.vacuum_operations().await;
                }
                return Ok(report);
            }
            report.add(chunk);
        }
    }
}

impl PostgresStore {
    async fn claim_once(&self, request: &ClaimRequest) -> Result<Vec<ClaimedOperation>> {
        let (check_limits, generation) = {
            let cache = self.no_limits_since.lock().expect("limits cache");
            let check = cache
                .none_since
                .is_none_or(|since| since.elapsed() >= NO_LIMITS_RECHECK);
            (check, cache.generation)
        };
        let (claimed, limits_stored) =
            transact!(self, conn => lifecycle::claim(conn, &self.sql, request, check_limits))?;
        if check_limits {
            let mut cache = self.no_limits_since.lock().expect("limits cache");
            if cache.generation == generation {
                cache.none_since = (!limits_stored).then(std::time::Instant::now);
            }
        }
        Ok(claimed)
    }
}

/// A schedule row (`name, spec, paused, last_tick, next_tick, version`).
fn stored_schedule(row: &PgRow) -> Result<fascicle_api::StoredSchedule> {
    let name: String = row.try_get(0).map_err(error::map)?;
    let spec: String = row.try_get(1).map_err(error::map)?;
    Ok(fascicle_api::StoredSchedule {
        schedule: fascicle_api::schedule::decode_stored(&name, &spec)?,
        paused: row.try_get(2).map_err(error::map)?,
        last_tick: row.try_get(3).map_err(error::map)?,
        next_tick: row.try_get(4).map_err(error::map)?,
        version: row.try_get(5).map_err(error::map)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// fascicle's own URL parameters say what `PostgresOptions` says, and are taken out
    /// before sqlx reads the URL; the others stay as they were. A bad value is refused
    /// without echoing a password, and the listen URL (which holds one) is hidden whole.
    #[test]
    fn own_url_parameters_are_read_and_removed() {
        let plain = "postgres://app:secret@db:6432/q?sslmode=disable";
        assert_eq!(
            take_own_parameters(plain).unwrap(),
            (plain.to_string(), OwnParameters::default())
        );
        let url = "postgres://app:secret@pgbouncer:6432/q?fascicle_pooler=transaction\
                   &sslmode=disable&fascicle_listen_url=postgres%3A%2F%2Fapp%3Asecret%40db%3A5432%2Fq";
        let (rest, own) = take_own_parameters(url).unwrap();
        assert_eq!(
            rest,
            "postgres://app:secret@pgbouncer:6432/q?sslmode=disable"
        );
        assert_eq!(
            own,
            OwnParameters {
                transaction_pooler: Some(true),
                listen_url: Some("postgres://app:secret@db:5432/q".into()),
            }
        );
        let (rest, own) = take_own_parameters("postgres://app@db/q?fascicle_pooler=none").unwrap();
        assert_eq!(rest, "postgres://app@db/q");
        assert_eq!(own.transaction_pooler, Some(false));
        match take_own_parameters("postgres://app:secret@db/q?fascicle_pooler=session") {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains("`session`"), "{message}");
                assert!(!message.contains("secret"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!redact_url(url).contains("secret"), "{}", redact_url(url));
        // Unencoded, the listen URL's `&` would make its password's tail a parameter.
        let raw = "postgres://app@pgbouncer/q?fascicle_pooler=transaction\
                   &fascicle_listen_url=postgres://app:pa&ss@db/q";
        match take_own_parameters(raw) {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains("percent-encoded"), "{message}");
                assert!(!message.contains("pa&ss"), "{message}");
                assert!(!message.contains("ss@db"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !redact_url(url).contains("db%3A5432"),
            "{}",
            redact_url(url)
        );
    }

    /// sqlx ignores a parameter it does not read after logging it with its value: a
    /// secret in `sslpassword` or `Password` would reach the logs, and a misspelt
    /// `sslmod=require` would connect without TLS. Both are refused, naming the
    /// parameter and never its value.
    #[test]
    fn parameters_the_driver_does_not_read_are_refused() {
        for (url, key) in [
            ("postgres://app@db/q?sslpassword=hunter22", "sslpassword"),
            (
                "postgres://app@db/q?sslmode=require&Password=hunter22",
                "Password",
            ),
            ("postgres://app@db/q?sslmod=require", "sslmod"),
            ("postgres://app@db/q?connect_timeout=10", "connect_timeout"),
        ] {
            match connect_options(url) {
                Err(Error::InvalidInput(message)) => {
                    assert!(message.contains(&format!("`{key}`")), "{message}");
                    assert!(!message.contains("hunter22"), "{message}");
                    assert!(message.contains("sslmode"), "lists what is read: {message}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        // What sqlx reads is accepted, `options[…]` included.
        for url in [
            "postgres://app:pw@db:5432/q?sslmode=disable&application_name=a&options=-c%20x%3D1",
            "postgres://db/q?user=app&password=pw&dbname=q&port=5433&host=db",
            "postgres://db/q?options[search_path]=s&statement-cache-capacity=10",
            "postgres:///q?host=/var/run/postgresql&ssl-mode=prefer",
            // Percent-encoded names are read decoded, as sqlx reads them.
            "postgres://app@db/q?pass%77ord=pw",
        ] {
            connect_options(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        // A key that may hold part of a password is not shown: a password's `?` makes
        // the rest of the userinfo a query.
        for url in [
            "postgres://app:ab?x&hunter22@db/q",
            "postgres://app:ab@db/q?x&hunter22@db",
        ] {
            match connect_options(url) {
                Err(Error::InvalidInput(message)) => {
                    assert!(!message.contains("hunter22"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
        match connect_options("postgres://db/q?sslmode=disable&x@y") {
            Err(Error::InvalidInput(message)) => {
                assert!(message.contains("has a parameter,"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any URL with a password — any characters in it, any text around it — is
        /// options or `InvalidInput`, and the password appears in neither the error nor
        /// the options' `Debug` (issue #19). Never a panic.
        #[test]
        fn no_url_echoes_its_password(
            scheme in prop_oneof![Just("postgres://"), Just("postgresql://"), Just("")],
            user in "[a-z%:]{0,6}",
            password in "[^\u{0}]{8,16}",
            host in "[a-z0-9.:\\[\\]%-]{0,12}",
            rest in "[^\u{0}]{0,16}",
        ) {
            let url = format!("{scheme}{user}:{password}@{host}{rest}");
            // The password must not stand elsewhere in the URL, or the check would be moot.
            prop_assume!(!format!("{scheme}{user}{host}{rest}").contains(password.as_str()));
            match connect_options(&url) {
                Ok(_) => {}
                Err(Error::InvalidInput(message)) => prop_assert!(
                    !message.contains(password.as_str()),
                    "{message}"
                ),
                Err(other) => prop_assert!(false, "{other:?}"),
            }
            let debug = format!("{:?}", PostgresOptions::new(url));
            prop_assert!(!debug.contains(password.as_str()), "{debug}");
        }
    }
}
