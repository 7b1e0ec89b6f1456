//! Schema names, embedded versioned migrations, and the SQL text of every statement.

use std::sync::Arc;

use fascicle_api::{Error, Result};
use sqlx::{AssertSqlSafe, PgPool};

use crate::error;

/// Checks a schema name: `^[a-z_][a-z0-9_]{0,62}$`. It is the only identifier ever spliced
/// into SQL, so it is validated once, here.
pub(crate) fn validate_schema(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "schema name {name:?} is not allowed: use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
    }
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
];

/// The schema version this build writes.
pub(crate) const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings `schema` to [`CURRENT_VERSION`]. Several processes may call it at once: an
/// advisory lock keyed by the schema name serializes them.
pub(crate) async fn migrate(pool: &PgPool, schema: &str, location: &str) -> Result<()> {
    let mut tx = pool.begin().await.map_err(|e| connect_error(location, e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("fascicle-migrate:{schema}"))
        .execute(&mut *tx)
        .await
        .map_err(error::map)?;
    let ddl = |sql: &str| AssertSqlSafe(sql.replace("{schema}", schema));
    sqlx::query(ddl("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await
        .map_err(error::map)?;
    sqlx::query(ddl("CREATE TABLE IF NOT EXISTS {schema}.schema_version (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            version bigint NOT NULL)"))
    .execute(&mut *tx)
    .await
    .map_err(error::map)?;
    let version: Option<i64> =
        sqlx::query_scalar(ddl("SELECT version FROM {schema}.schema_version"))
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
    .bind(CURRENT_VERSION)
    .execute(&mut *tx)
    .await
    .map_err(error::map)?;
    tx.commit().await.map_err(error::map)
}

/// A failure to reach the server, worded for a person and without the password.
pub(crate) fn connect_error(location: &str, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(db) => Error::Storage {
            location: location.to_string(),
            reason: format!("the server refused the connection: {}", db.message()),
        },
        sqlx::Error::Configuration(msg) => {
            Error::InvalidInput(format!("{location} is not a usable PostgreSQL URL: {msg}"))
        }
        other => error::map(other),
    }
}

pub(crate) const COLUMNS: &str = "id, kind, status, payload, metadata, parent_id, priority, \
    serialization_key, attempts, max_attempts, run_at, worker_id, lease_expires_at, \
    children_total, children_completed, children_failed, children_cancelled, error, result, \
    created_at, updated_at, completed_at";

const INSERT_PARENT: &str = "INSERT INTO {schema}.operations
                (id, kind, status, payload, metadata, parent_id, priority, attempts, max_attempts,
                 run_at, children_total, children_completed, children_failed, children_cancelled,
                 created_at, updated_at)
                VALUES ($1, $2, 'pending', NULL, $3, NULL, 0, 0, 0, $4, $5, 0, 0, 0, $4, $4)";

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
}

impl Sql {
    pub(crate) fn new(schema: &str) -> Self {
        let s = |text: &str| -> Arc<str> { text.replace("{schema}", schema).into() };
        Self {
            schema: schema.to_string(),
            channel: format!("fascicle_{schema}"),
            insert_parent: s(INSERT_PARENT),
            insert_parent_if_absent: s(&format!(
                "{} ON CONFLICT (id) DO NOTHING",
                INSERT_PARENT
            )),
            // One statement per chunk of children, whatever its size; the NOTIFY rides in the
            // same statement and is delivered by PostgreSQL only when the transaction commits.
            insert_children: s("WITH inserted AS (
                INSERT INTO {schema}.operations
                    (id, kind, status, payload, parent_id, priority, serialization_key, attempts,
                     max_attempts, run_at, created_at, updated_at)
                SELECT t.id, t.kind, 'pending', t.payload::jsonb, t.parent_id, t.priority, t.skey, 0,
                       t.max_attempts, t.run_at, t.created_at, t.created_at
                -- unnest yields rows in array order and the identity is drawn row by row,
                -- so seq follows submission order without a sort (checked by the
                -- conformance suite's ordering assertions).
                FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int4[], $6::text[],
                            $7::int4[], $8::timestamptz[], $9::timestamptz[])
                     AS t(id, kind, payload, parent_id, priority, skey, max_attempts, run_at,
                          created_at)
                RETURNING 1)
                SELECT count(*), pg_notify($10, count(*)::text) FROM inserted"),
            copy_children: "COPY {schema}.operations (id, kind, payload, parent_id, priority,
                serialization_key, max_attempts, run_at, created_at, updated_at)
                FROM STDIN (FORMAT binary)"
                .replace("{schema}", schema),
            get: s(&format!("SELECT {COLUMNS} FROM {{schema}}.operations WHERE id = $1")),
            children_of: s(&format!(
                "SELECT {COLUMNS} FROM {{schema}}.operations WHERE parent_id = $1 ORDER BY seq"
            )),
            stats: s("SELECT kind, status, payload IS NULL, (status = 'pending' AND run_at > now()), count(*)
                FROM {schema}.operations GROUP BY 1, 2, 3, 4"),
            children_ids: s("SELECT id FROM {schema}.operations WHERE parent_id = $1 ORDER BY seq"),
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
    use super::validate_schema;

    #[test]
    fn only_plain_lowercase_identifiers_pass() {
        for ok in ["fascicle", "_x", "a1_b2", &"a".repeat(63)] {
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
}
