//! Schema names, embedded versioned migrations, and the SQL text of every statement.

use std::sync::Arc;

use fascicle_api::{Error, Result};
use sqlx::{AssertSqlSafe, PgPool};

use crate::error;

/// The NOTIFY channel of a schema is this prefix followed by the schema name.
const CHANNEL_PREFIX: &str = "fascicle_";

/// PostgreSQL's longest identifier, in bytes (`NAMEDATALEN - 1`). Channel names are held
/// to it too: `pg_notify` refuses a longer one ("channel name too long") and `LISTEN`
/// truncates it.
const PG_MAX_IDENTIFIER_BYTES: usize = 63;

/// The longest schema name: every identifier derived from it must fit in 63 bytes. The
/// schema itself is one; the only other is the channel `fascicle_<schema>`, 9 bytes longer.
/// (Table, index and constraint names are fixed and only qualified by the schema; the
/// migration lock key is a hashed string, not an identifier.) So 63 - 9 = 54.
pub(crate) const MAX_SCHEMA_LEN: usize = PG_MAX_IDENTIFIER_BYTES - CHANNEL_PREFIX.len();

/// The key words PostgreSQL reserves (categories "reserved" and "reserved (can be function
/// or type)" of the SQL Key Words appendix; PostgreSQL 15's `pg_get_keywords()` plus 16's
/// `system_user`): unquoted, none can name a schema in `{schema}.operations`. Sorted, for
/// the binary search.
const RESERVED_KEY_WORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Checks a schema name: `^[a-z_][a-z0-9_]{0,53}$`, not starting with `pg_` (reserved by
/// PostgreSQL for system schemas) and not a reserved key word. It is the only identifier
/// ever spliced into SQL, so it is validated once, here, before any connection is made.
pub(crate) fn validate_schema(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    let problem = if !well_formed {
        "it must match ^[a-z_][a-z0-9_]*$ (a-z, 0-9 and _, not starting with a digit)".to_string()
    } else if name.len() > MAX_SCHEMA_LEN {
        format!(
            "it is {} characters long and the limit is {MAX_SCHEMA_LEN}, so that the NOTIFY channel {CHANNEL_PREFIX}<schema> fits in PostgreSQL's {PG_MAX_IDENTIFIER_BYTES}-byte identifier limit",
            name.len()
        )
    } else if name.starts_with("pg_") {
        "the prefix pg_ is reserved by PostgreSQL for system schemas".to_string()
    } else if RESERVED_KEY_WORDS.binary_search(&name).is_ok() {
        "it is a reserved SQL key word in PostgreSQL".to_string()
    } else {
        return Ok(());
    };
    Err(Error::InvalidInput(format!(
        "schema name {name:?} is not allowed: {problem}. A schema name is 1 to {MAX_SCHEMA_LEN} characters of a-z, 0-9 and _ (^[a-z_][a-z0-9_]{{0,{}}}$), not starting with pg_, and not a reserved key word such as user, order or table",
        MAX_SCHEMA_LEN - 1
    )))
}

/// Migrations in order; `{schema}` is replaced by the validated schema name.
const MIGRATIONS: &[&str] = &[
    // 1: operations and batch parents in one table.
    r#"
    CREATE TABLE {schema}.operations (
        seq                 bigint GENERATED ALWAYS AS IDENTITY,
        id                  uuid PRIMARY KEY,
        kind                text NOT NULL,
        status              text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','processing','completed','failed','cancelled')),
        payload             jsonb,
        metadata            jsonb,
        parent_id           uuid,
        priority            integer NOT NULL DEFAULT 0,
        serialization_key   text,
        attempts            integer NOT NULL DEFAULT 0,
        max_attempts        integer NOT NULL,
        run_at              timestamptz NOT NULL,
        worker_id           text,
        lease_token         uuid,
        lease_expires_at    timestamptz,
        children_total      bigint,
        children_completed  bigint,
        children_failed     bigint,
        children_cancelled  bigint,
        error               text,
        result              jsonb,
        created_at          timestamptz NOT NULL,
        updated_at          timestamptz NOT NULL,
        completed_at        timestamptz
    );
    CREATE INDEX operations_by_parent ON {schema}.operations (parent_id, seq)
        WHERE parent_id IS NOT NULL;
    CREATE INDEX operations_claimable ON {schema}.operations (priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL;
    "#,
    // 2: the worker lifecycle: cancellation requests, one holder per serialization key,
    // and indexes for the rescuer, the reconciler and pruning.
    r#"
    ALTER TABLE {schema}.operations ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
    CREATE UNIQUE INDEX operations_key_held ON {schema}.operations (serialization_key)
        WHERE status = 'processing' AND serialization_key IS NOT NULL;
    CREATE INDEX operations_leases ON {schema}.operations (lease_expires_at)
        WHERE status = 'processing';
    CREATE INDEX operations_open_parents ON {schema}.operations (created_at)
        WHERE payload IS NULL AND status = 'pending';
    CREATE INDEX operations_finished ON {schema}.operations (completed_at)
        WHERE completed_at IS NOT NULL;
    "#,
    // 3: a per-operation attempt timeout (`NewOperation::with_timeout`), in milliseconds;
    // NULL leaves it to the worker. Existing rows keep NULL.
    r#"
    ALTER TABLE {schema}.operations ADD COLUMN timeout_ms bigint;
    "#,
    // 4: the ready operations that have a serialization key, in claim order within each
    // key: the claim's one-per-key step reads the first of each key here. Without it
    // every claim scanned every pending row (5 ms per claim at 100,000 pending, drain
    // 0.3x the raw bound); with no keyed work it is empty and costs nothing.
    r#"
    CREATE INDEX operations_keyed_ready
        ON {schema}.operations (serialization_key, priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL AND serialization_key IS NOT NULL;
    "#,
    // 5: workflows. A parent's failure policy (NULL: wait_all, as every existing batch)
    // and callbacks (a JSON array, NULL: none); a callback operation's batch (what its
    // handler reads). Existing rows keep NULL and behave as before.
    r#"
    ALTER TABLE {schema}.operations ADD COLUMN failure_policy text,
        ADD COLUMN callbacks jsonb, ADD COLUMN callback_for jsonb;
    -- Dependencies inside a batch: how many have not released an operation yet (it is
    -- not claimable before 0), what it waits for and what waits for it (arrays of
    -- {"id", "any"}). The claim indexes leave waiting operations out.
    ALTER TABLE {schema}.operations ADD COLUMN waiting_on integer NOT NULL DEFAULT 0,
        ADD COLUMN depends_on jsonb, ADD COLUMN dependents jsonb;
    DROP INDEX {schema}.operations_claimable;
    CREATE INDEX operations_claimable ON {schema}.operations (priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0;
    DROP INDEX {schema}.operations_keyed_ready;
    CREATE INDEX operations_keyed_ready
        ON {schema}.operations (serialization_key, priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL AND serialization_key IS NOT NULL
          AND waiting_on = 0;
    "#,
    // 6: nested batches (a batch row with a parent). Walking a tree down reads the nested
    // batches of each batch here, not every child; it holds only nested batch rows.
    r#"
    CREATE INDEX operations_nested ON {schema}.operations (parent_id)
        WHERE payload IS NULL AND parent_id IS NOT NULL;
    "#,
    // 7: flow control per kind: the paused kinds (`Store::pause`), never claimed.
    r#"
    CREATE TABLE {schema}.paused_kinds (
        kind        text PRIMARY KEY,
        paused_at   timestamptz NOT NULL DEFAULT now()
    );
    "#,
    // 8: flow control per kind: concurrency and rate limits (`Store::set_limit`). A NULL
    // limit is none; `recent_starts` holds the last starts the rate limit counts, at most
    // `rate_starts` of them. A claim of a limited kind locks its row.
    r#"
    CREATE TABLE {schema}.kind_limits (
        kind            text PRIMARY KEY,
        max_running     integer,
        rate_starts     integer,
        rate_period_us  bigint,
        recent_starts   timestamptz[] NOT NULL DEFAULT '{}'
    );
    -- Each kind's ready rows in claim order: a claim of named kinds walks each one here,
    -- never past a paused or limited kind's backlog.
    CREATE INDEX operations_ready_by_kind ON {schema}.operations (kind, priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0;
    -- The shared index only for the claim of any kind, which names its extra predicate:
    -- a lane (one kind) cannot use it, so it never walks every kind's rows for one kind's
    -- (an analysed table planned an empty kind's lane that way).
    DROP INDEX {schema}.operations_claimable;
    CREATE INDEX operations_claimable ON {schema}.operations (priority DESC, run_at, seq)
        WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0
          AND run_at > '-infinity';
    "#,
    // 9: unique operations (`NewOperation::unique`): each key's row names the operation
    // that last took it; a submit takes the key only while that one blocks nothing.
    r#"
    CREATE TABLE {schema}.unique_keys (
        key         text PRIMARY KEY,
        operation   uuid NOT NULL
    );
    -- Pruning an operation deletes its key's row.
    CREATE INDEX unique_keys_by_operation ON {schema}.unique_keys (operation);
    "#,
    // 10: periodic operations (`Store::put_schedule`): each schedule's definition (JSON
    // text), its last handled and next tick and a version a pass advances it at. A pass
    // reads only the due ones, through the index.
    r#"
    CREATE TABLE {schema}.schedules (
        name        text PRIMARY KEY,
        spec        text NOT NULL,
        paused      boolean NOT NULL DEFAULT false,
        last_tick   timestamptz NOT NULL,
        next_tick   timestamptz NOT NULL,
        version     bigint NOT NULL
    );
    CREATE INDEX schedules_due ON {schema}.schedules (next_tick) WHERE NOT paused;
    "#,
    // 11: the rescuer's index of leases, partial on a predicate only the rescuer states
    // (a lease is set exactly while an operation is processing). Partial on
    // `status = 'processing'`, it was a path for every statement that updates held rows
    // by id (heartbeat, complete, release — they state that status too): a planner that
    // underestimated the processing rows read them all to update 128, where the primary
    // key finds each one.
    r#"
    DROP INDEX {schema}.operations_leases;
    CREATE INDEX operations_leases ON {schema}.operations (lease_expires_at)
        WHERE lease_expires_at IS NOT NULL;
    -- Each kind's running rows, for a claim that counts a limited kind's (`kind_limits`).
    -- Partial on another column set exactly while processing (the worker's id), which
    -- only that count states: neither the rescuer's range nor the updates by id can take
    -- it, and the count cannot take the lease index (it read every running row of every
    -- kind through it once analysed).
    CREATE INDEX operations_running_by_kind ON {schema}.operations (kind)
        WHERE worker_id IS NOT NULL;
    -- A claim's index scan passes the dead entries of the operations claimed before (in
    -- claim order they lie ahead of the backlog) until a vacuum removes them: vacuum this
    -- table at 1% dead rows, not autovacuum's default 20% (where autovacuum runs).
    ALTER TABLE {schema}.operations SET (autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.02);
    "#,
    // 12: roles one process holds at a time (`Store::elect`): the maintenance a worker
    // runs for all of them. A term ends on the server's clock.
    r#"
    CREATE TABLE {schema}.roles (
        role        text PRIMARY KEY,
        holder      text NOT NULL,
        term_ends   timestamptz NOT NULL
    );
    "#,
    // 13: the finished outermost batches in prune order. A prune chunk looks for them
    // first: through the index of every finished row it read each finished stand-alone
    // operation to find none (a chunk cost ~130 ms beside 2,000,000 of them, whatever its
    // size: `fascicle-bench --only growth`).
    r#"
    CREATE INDEX operations_finished_batches ON {schema}.operations (completed_at, id)
        WHERE payload IS NULL AND parent_id IS NULL AND completed_at IS NOT NULL;
    "#,
];

/// The schema version this build writes.
pub(crate) const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings `schema` to [`CURRENT_VERSION`]. Several processes may call it at once: an
/// advisory lock keyed by the schema name serializes them.
pub(crate) async fn migrate(
    pool: &PgPool,
    schema: &str,
    location: &str,
    persistent: bool,
) -> Result<()> {
    let mut tx = pool.begin().await.map_err(|e| connect_error(location, e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .persistent(persistent)
        .bind(format!("fascicle-migrate:{schema}"))
        .execute(&mut *tx)
        .await
        .map_err(error::map)?;
    let ddl = |sql: &str| AssertSqlSafe(sql.replace("{schema}", schema));
    sqlx::query(ddl("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .persistent(persistent)
        .execute(&mut *tx)
        .await
        .map_err(error::map)?;
    sqlx::query(ddl("CREATE TABLE IF NOT EXISTS {schema}.schema_version (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            version bigint NOT NULL)"))
    .persistent(persistent)
    .execute(&mut *tx)
    .await
    .map_err(error::map)?;
    let version: Option<i64> =
        sqlx::query_scalar(ddl("SELECT version FROM {schema}.schema_version"))
            .persistent(persistent)
            .fetch_optional(&mut *tx)
            .await
            .map_err(error::map)?;
    let version = version.unwrap_or(0);
    if version > CURRENT_VERSION {
        return Err(Error::Storage {
            location: format!("{location} schema {schema}"),
            reason: format!(
                "the schema has version {version}, written by a newer fascicle; this build knows versions up to {CURRENT_VERSION}. Upgrade fascicle or use another schema"
            ),
        });
    }
    for sql in MIGRATIONS.iter().skip(version as usize) {
        sqlx::raw_sql(ddl(sql))
            .execute(&mut *tx)
            .await
            .map_err(error::map)?;
    }
    sqlx::query(ddl(
        "INSERT INTO {schema}.schema_version (version) VALUES ($1)
         ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version",
    ))
    .persistent(persistent)
    .bind(CURRENT_VERSION)
    .execute(&mut *tx)
    .await
    .map_err(error::map)?;
    tx.commit().await.map_err(error::map)
}

/// A failure to reach the server, worded for a person and without the password.
pub(crate) fn connect_error(location: &str, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => {
            // PgBouncer refusing sqlx's default startup parameters: a pooler the store
            // was not told about.
            let hint = if db.message().contains("unsupported startup parameter") {
                " (a connection pooler? behind one in transaction mode, add \
                 fascicle_pooler=transaction to the URL or use \
                 PostgresOptions::transaction_pooler)"
            } else {
                ""
            };
            Error::Storage {
                location: location.to_string(),
                reason: format!("the server refused the connection: {}{hint}", db.message()),
            }
        }
        sqlx::Error::Configuration(msg) => {
            Error::InvalidInput(format!("{location} is not a usable PostgreSQL URL: {msg}"))
        }
        other => error::map(other),
    }
}

pub(crate) const COLUMNS: &str = "id, kind, status, payload, metadata, parent_id, priority, \
    serialization_key, attempts, max_attempts, run_at, worker_id, lease_expires_at, \
    children_total, children_completed, children_failed, children_cancelled, error, result, \
    created_at, updated_at, completed_at, timeout_ms, failure_policy, callbacks, callback_for, \
    waiting_on, depends_on";

/// The number of columns in [`COLUMNS`]: a statement that returns more has them after.
pub(crate) const COLUMN_COUNT: usize = 28;

/// How far a client's clock may read *behind* the server's before it counts as wrong.
///
/// PostgreSQL's clock is the only one the store compares with (claims, leases, rescue), so
/// every timestamp a client sends is placed on it. A record's `created_at` is the client's
/// "now" when it prepared the record, and its `run_at` that instant plus the delay the
/// caller asked for (a past `run_at` is a negative delay). When the server receives the
/// insert, its clock (`statement_timestamp()`) must read at or after the record's
/// `created_at`: the record was prepared before it was sent. A `created_at` within this
/// tolerance before the server's time is what a right clock and the time between preparing
/// and sending look like, so the record is stored as prepared (an instant the caller chose
/// is kept to the microsecond). Anything else is a wrong client clock (a `created_at` in
/// the server's future, or more than this far in its past), and the record is re-based:
/// `created_at` becomes the server's time and `run_at` that time plus the same delay.
///
/// Hence a client clock that runs fast never delays work, and one that runs slow by more
/// than this never makes scheduled work run early (by at most this much otherwise).
pub(crate) const CLOCK_TOLERANCE_MICROS: i64 = 1_000_000;

/// SQL for the instant of the server's clock that stores the client's reading `client`
/// (a `timestamptz` expression): see [`CLOCK_TOLERANCE_MICROS`].
fn on_server_clock(client: &str) -> String {
    format!(
        "CASE WHEN {client} BETWEEN statement_timestamp() - interval '{CLOCK_TOLERANCE_MICROS} microseconds' \
                             AND statement_timestamp() \
         THEN {client} ELSE statement_timestamp() END"
    )
}

/// Inserts a parent (`ON CONFLICT` goes where `{conflict}` is) and returns the server's
/// clock as it read for this statement, for a `COPY` of children that follows.
fn insert_parent(conflict: &str) -> String {
    format!(
        "WITH clock AS (SELECT {} AS at)
         INSERT INTO {{schema}}.operations
                (id, kind, status, payload, metadata, parent_id, priority, attempts, max_attempts,
                 run_at, children_total, children_completed, children_failed, children_cancelled,
                 created_at, updated_at, failure_policy, callbacks, dependents)
         SELECT $1, $2, 'pending', NULL, $3::jsonb, $8, 0, 0, 0, at, $5, 0, 0, 0, at, at, $6, $7::jsonb,
                $9::jsonb
         FROM clock
         {conflict}
         RETURNING statement_timestamp()",
        on_server_clock("$4::timestamptz")
    )
}

/// Every statement's text, built once with the schema name.
#[derive(Debug)]
pub(crate) struct Sql {
    schema: String,
    pub(crate) channel: String,
    pub(crate) insert_parent: Arc<str>,
    pub(crate) insert_parent_if_absent: Arc<str>,
    pub(crate) insert_children: Arc<str>,
    pub(crate) copy_children: String,
    pub(crate) get: Arc<str>,
    pub(crate) children_of: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) children_ids: Arc<str>,
    /// The text that begins every store transaction (`STORE_BEGIN`, and behind a
    /// transaction pooler the statement timeout set for the transaction).
    pub(crate) begin: String,
    /// The text that begins a read's transaction behind a transaction pooler.
    pub(crate) begin_read: String,
    /// Behind a transaction pooler: every statement runs inside a transaction, so the
    /// pooler keeps one server connection from its parse to its result.
    pub(crate) pooled: bool,
}

impl Sql {
    /// Whether statements are prepared once per connection and cached (named), or
    /// prepared anew each time (unnamed): behind a transaction pooler a named statement
    /// prepared on one server connection is unknown on the next.
    pub(crate) fn persistent(&self) -> bool {
        !self.pooled
    }

    /// The statements of `schema`; `pooled` behind a transaction pooler; `begin` the text
    /// that begins each store transaction.
    pub(crate) fn new(schema: &str, pooled: bool, (begin, begin_read): (String, String)) -> Self {
        let s = |text: &str| -> Arc<str> { text.replace("{schema}", schema).into() };
        Self {
            schema: schema.to_string(),
            channel: format!("{CHANNEL_PREFIX}{schema}"),
            insert_parent: s(&insert_parent("")),
            insert_parent_if_absent: s(&insert_parent("ON CONFLICT (id) DO NOTHING")),
            // One statement per chunk of children, whatever its size; the NOTIFY rides in the
            // same statement and is delivered by PostgreSQL only when the transaction commits.
            // Each row is placed on the server's clock (`CLOCK_TOLERANCE_MICROS`): `at` is its
            // stored `created_at`, and its `run_at` is `at` plus the delay the client asked
            // for, sent as an interval of microseconds only (adding days would follow the
            // session's time zone across a daylight-saving change).
            insert_children: s(&format!("WITH inserted AS (
                INSERT INTO {{schema}}.operations
                    (id, kind, status, payload, parent_id, priority, serialization_key, attempts,
                     max_attempts, run_at, created_at, updated_at, timeout_ms, waiting_on,
                     depends_on, dependents)
                SELECT t.id, t.kind, 'pending', t.payload::jsonb, t.parent_id, t.priority, t.skey, 0,
                       t.max_attempts, t.at + t.delay, t.at, t.at, t.timeout_ms, t.waiting_on,
                       t.depends_on::jsonb, t.dependents::jsonb
                -- unnest yields rows in array order and the identity is drawn row by row,
                -- so seq follows submission order without a sort (checked by the
                -- conformance suite's ordering assertions).
                FROM (SELECT u.*, {} AS at
                      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int4[],
                                  $6::text[], $7::int4[], $8::timestamptz[], $9::interval[],
                                  $11::int8[], $12::int4[], $13::text[], $14::text[])
                           AS u(id, kind, payload, parent_id, priority, skey, max_attempts,
                                created_at, delay, timeout_ms, waiting_on, depends_on,
                                dependents)) AS t
                RETURNING 1)
                SELECT count(*), statement_timestamp(), pg_notify($10, count(*)::text)
                FROM inserted", on_server_clock("u.created_at"))),
            copy_children: "COPY {schema}.operations (id, kind, payload, parent_id, priority,
                serialization_key, max_attempts, run_at, created_at, updated_at, timeout_ms,
                waiting_on, depends_on, dependents)
                FROM STDIN (FORMAT binary)"
                .replace("{schema}", schema),
            get: s(&format!("SELECT {COLUMNS} FROM {{schema}}.operations WHERE id = $1")),
            children_of: s(&format!(
                "SELECT {COLUMNS} FROM {{schema}}.operations WHERE parent_id = $1 ORDER BY seq"
            )),
            // The paused kinds ride in the same statement (one round trip): rows with
            // `paused` true and a count of zero.
            stats: s("SELECT kind, status, payload IS NULL, (status = 'pending' AND run_at > now()),
                    (status = 'pending' AND waiting_on > 0), count(*), false
                FROM {schema}.operations GROUP BY 1, 2, 3, 4, 5
                UNION ALL
                SELECT kind, 'pending', false, false, false, 0, true FROM {schema}.paused_kinds"),
            children_ids: s("SELECT id FROM {schema}.operations WHERE parent_id = $1 ORDER BY seq"),
            begin,
            begin_read,
            pooled,
        }
    }
}

impl Sql {
    /// A statement whose only spliced identifier is the validated schema, written `{s}`.
    pub(crate) fn text(&self, template: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(template.replace("{s}", &self.schema))
    }
}

pub(crate) fn sql(text: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(text))
}

#[cfg(test)]
mod tests {
    use super::{Sql, validate_schema};
    use fascicle_api::Error;

    /// PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names fail or truncate.
    const PG_IDENTIFIER_BYTES: usize = 63;
    /// `fascicle_` + schema, the NOTIFY channel, must fit in 63 bytes: 63 - 9.
    const LONGEST: usize = 54;

    fn refusal(name: &str) -> String {
        match validate_schema(name) {
            Err(Error::InvalidInput(message)) => message,
            other => panic!("{name:?} should be refused with InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn only_plain_lowercase_identifiers_pass() {
        for ok in ["fascicle", "tenant_42", "_x", "a1_b2", &"a".repeat(LONGEST)] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Fascicle",
            "a-b",
            "a b",
            "x; DROP TABLE y",
            "x\"",
            "pg_catalog.x",
            &"a".repeat(64),
            "é",
        ] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_longest_accepted_schema_keeps_every_derived_identifier_within_63_bytes() {
        let longest = "s".repeat(LONGEST);
        assert!(validate_schema(&longest).is_ok());
        let sql = Sql::new(&longest, false, (String::new(), String::new()));
        assert!(
            sql.channel.len() <= PG_IDENTIFIER_BYTES,
            "channel {} is {} bytes",
            sql.channel,
            sql.channel.len()
        );
        assert!(longest.len() <= PG_IDENTIFIER_BYTES);
    }

    #[test]
    fn one_byte_past_the_limit_is_refused_naming_the_limit() {
        let message = refusal(&"s".repeat(LONGEST + 1));
        assert!(message.contains(&LONGEST.to_string()), "{message}");
        assert!(message.contains("fascicle_"), "{message}");
        assert!(message.contains("63"), "{message}");
        // The 59 characters that used to pass and then broke every submit.
        refusal(&"s".repeat(59));
    }

    #[test]
    fn reserved_key_words_are_refused() {
        for word in [
            "user",
            "order",
            "select",
            "table",
            "all",
            "group",
            "limit",
            "system_user",
            "join",
            "left",
            "authorization",
            "current_schema",
            "verbose",
            "tablesample",
        ] {
            let message = refusal(word);
            assert!(message.contains("reserved"), "{word}: {message}");
        }
        // Non-reserved key words are ordinary identifiers and stay allowed.
        for word in ["action", "data", "name", "value", "int", "public"] {
            assert!(validate_schema(word).is_ok(), "{word}");
        }
    }

    #[test]
    fn the_key_word_list_is_sorted_for_binary_search() {
        assert!(super::RESERVED_KEY_WORDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(super::MAX_SCHEMA_LEN, LONGEST);
    }

    #[test]
    fn the_pg_prefix_reserved_for_system_schemas_is_refused() {
        let message = refusal("pg_queue");
        assert!(message.contains("pg_"), "{message}");
    }
}
