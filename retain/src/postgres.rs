//! The memory bank in the Postgres store's schema: observation sources in a native
//! `uuid[]` column with a GIN index.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use fascicle::postgres::sqlx::{self, AssertSqlSafe, PgConnection};
use fascicle::postgres::{PostgresStore, map_error};
use fascicle::{Applied, Context, Error, Result, Store};
use uuid::Uuid;

use crate::backend::{Backend, Done};
use crate::bank::{
    BankCounts, BankTx, Cited, DocumentRow, Observation, Unit, UnitTerms, Work, execute,
};

const DRIVER: &str = "postgres";

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {s}.bank_documents (
        id text PRIMARY KEY,
        content_hash text NOT NULL,
        tags text[] NOT NULL,
        unit_count integer NOT NULL,
        retained_at timestamptz NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {s}.bank_memory_units (
        id uuid PRIMARY KEY,
        document_id text NOT NULL,
        position integer NOT NULL,
        text text NOT NULL,
        terms text[] NOT NULL,
        consolidated boolean NOT NULL DEFAULT false)",
    "CREATE INDEX IF NOT EXISTS bank_memory_units_document ON {s}.bank_memory_units (document_id)",
    "CREATE TABLE IF NOT EXISTS {s}.bank_observations (
        id uuid PRIMARY KEY,
        term text NOT NULL,
        text text NOT NULL,
        source_ids uuid[] NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS bank_observations_sources ON {s}.bank_observations USING gin (source_ids)",
    "CREATE INDEX IF NOT EXISTS bank_observations_term ON {s}.bank_observations (term)",
];

/// The statements, with the schema filled in once.
#[derive(Debug)]
struct Sql {
    schema: String,
    document_hash: String,
    unit_ids_of: String,
    citing: String,
    set_consolidated: String,
    delete_observations: String,
    delete_units: String,
    upsert_document: String,
    insert_units: String,
    unit_terms: String,
    observations_for_terms: String,
    insert_observations: String,
    counts: String,
    /// `false` behind a transaction pooler: statements are parsed unnamed, each time
    /// (see `PostgresOptions::transaction_pooler`).
    persistent: bool,
}

impl Sql {
    fn new(schema: &str, persistent: bool) -> Self {
        let s = |template: &str| template.replace("{s}", schema);
        Self {
            persistent,
            schema: schema.to_string(),
            document_hash: s("SELECT content_hash FROM {s}.bank_documents WHERE id = $1"),
            unit_ids_of: s(
                "SELECT id FROM {s}.bank_memory_units WHERE document_id = $1 ORDER BY position",
            ),
            citing: s("SELECT id, source_ids FROM {s}.bank_observations
                       WHERE source_ids && $1::uuid[] ORDER BY id"),
            set_consolidated: s("UPDATE {s}.bank_memory_units SET consolidated = $2
                                 WHERE id = ANY($1::uuid[])"),
            delete_observations: s("DELETE FROM {s}.bank_observations WHERE id = ANY($1::uuid[])"),
            delete_units: s("DELETE FROM {s}.bank_memory_units WHERE id = ANY($1::uuid[])"),
            upsert_document: s(
                "INSERT INTO {s}.bank_documents (id, content_hash, tags, unit_count, retained_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET content_hash = excluded.content_hash,
                     tags = excluded.tags, unit_count = excluded.unit_count,
                     retained_at = excluded.retained_at",
            ),
            insert_units: s(
                "INSERT INTO {s}.bank_memory_units (id, document_id, position, text, terms, consolidated)
                 SELECT u.id, u.document_id, u.position, u.text,
                        ARRAY(SELECT jsonb_array_elements_text(u.terms::jsonb)), false
                 FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[])
                      AS u (id, document_id, position, text, terms)",
            ),
            unit_terms: s(
                "SELECT id, document_id, terms, consolidated FROM {s}.bank_memory_units ORDER BY id",
            ),
            observations_for_terms: s(
                "SELECT id FROM {s}.bank_observations WHERE term = ANY($1::text[]) ORDER BY id",
            ),
            insert_observations: s(
                "INSERT INTO {s}.bank_observations (id, term, text, source_ids)
                 SELECT o.id, o.term, o.text,
                        ARRAY(SELECT jsonb_array_elements_text(o.sources::jsonb)::uuid)
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                      AS o (id, term, text, sources)",
            ),
            counts: s("SELECT
                 (SELECT count(*) FROM {s}.bank_documents),
                 (SELECT count(*) FROM {s}.bank_memory_units),
                 (SELECT count(*) FROM {s}.bank_memory_units WHERE NOT consolidated),
                 (SELECT count(*) FROM {s}.bank_observations),
                 (SELECT coalesce(sum(cardinality(source_ids)), 0)::bigint FROM {s}.bank_observations)"),
        }
    }
}

fn q(text: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(text.to_string())
}

#[derive(Debug)]
pub(crate) struct PostgresBackend {
    store: PostgresStore,
    sql: Arc<Sql>,
}

impl PostgresBackend {
    pub(crate) fn new(store: PostgresStore) -> Self {
        let sql = Arc::new(Sql::new(store.schema(), !store.behind_transaction_pooler()));
        Self { store, sql }
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.store.begin_transaction().await?;
        // Concurrent migrations of one schema would race in the catalog.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))")
            .persistent(self.sql.persistent)
            .bind(format!("{}.bank", self.sql.schema))
            .execute(&mut *tx)
            .await
            .map_err(map_error)?;
        for ddl in SCHEMA {
            sqlx::query(AssertSqlSafe(ddl.replace("{s}", &self.sql.schema)))
                .persistent(self.sql.persistent)
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
        }
        tx.commit().await.map_err(map_error)
    }

    async fn run(&self, work: Work, ctx: Option<Context>) -> Result<Done> {
        let capabilities = self.store.capabilities();
        let mut tx = self.store.begin_transaction().await?;
        // Retains share the bank and lock their own documents; a consolidation has the
        // bank to itself, so it never cites a unit a retain is deleting.
        match &work {
            Work::Retain(documents) => {
                sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 2))")
                    .persistent(self.sql.persistent)
                    .bind(format!("{}.bank", self.sql.schema))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_error)?;
                let ids: Vec<String> = documents
                    .iter()
                    .map(|d| format!("{}.doc.{}", self.sql.schema, d.document_id))
                    .collect();
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(k) FROM (
                         SELECT DISTINCT hashtextextended(d, 3) AS k FROM unnest($1::text[]) AS d
                         ORDER BY 1) AS keys",
                )
                .persistent(self.sql.persistent)
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
            }
            Work::Consolidate => {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 2))")
                    .persistent(self.sql.persistent)
                    .bind(format!("{}.bank", self.sql.schema))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_error)?;
            }
        }
        let report = execute(
            &mut PgTx {
                conn: &mut tx,
                sql: &self.sql,
            },
            capabilities,
            &work,
            Utc::now(),
        )
        .await?;
        if let Some(ctx) = ctx {
            let result = serde_json::to_value(report).map_err(|e| {
                Error::InvalidInput(format!("the report cannot be serialized: {e}"))
            })?;
            let applied = self
                .store
                .complete_in(&mut tx, &[ctx.completion(result)])
                .await?[0];
            if applied == Applied::LeaseLost {
                tx.rollback().await.map_err(map_error)?;
                return Ok(Done::LeaseLost);
            }
            tx.commit().await.map_err(map_error)?;
            return Ok(Done::Completed);
        }
        tx.commit().await.map_err(map_error)?;
        Ok(Done::Written(report))
    }

    async fn counts(&self) -> Result<BankCounts> {
        // In a transaction: behind a transaction pooler a statement's parse and execution
        // must reach one server connection.
        let mut tx = self.store.begin_transaction().await?;
        let (documents, memory_units, unconsolidated_units, observations, observation_sources): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(q(&self.sql.counts))
            .persistent(self.sql.persistent)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_error)?;
        tx.commit().await.map_err(map_error)?;
        Ok(BankCounts {
            documents: documents as u64,
            memory_units: memory_units as u64,
            unconsolidated_units: unconsolidated_units as u64,
            observations: observations as u64,
            observation_sources: observation_sources as u64,
        })
    }
}

struct PgTx<'a> {
    conn: &'a mut PgConnection,
    sql: &'a Sql,
}

impl BankTx for PgTx<'_> {
    async fn document_hash(&mut self, document_id: &str) -> Result<Option<String>> {
        sqlx::query_scalar(q(&self.sql.document_hash))
            .persistent(self.sql.persistent)
            .bind(document_id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(map_error)
    }

    async fn unit_ids_of(&mut self, document_id: &str) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(q(&self.sql.unit_ids_of))
            .persistent(self.sql.persistent)
            .bind(document_id)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(map_error)
    }

    async fn citing_via_sources_table(&mut self, _units: &[Uuid]) -> Result<Vec<Cited>> {
        Err(Error::unsupported("observation_sources table", DRIVER))
    }

    async fn citing_via_source_array(&mut self, units: &[Uuid]) -> Result<Vec<Cited>> {
        let rows: Vec<(Uuid, Vec<Uuid>)> = sqlx::query_as(q(&self.sql.citing))
            .persistent(self.sql.persistent)
            .bind(units)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(map_error)?;
        Ok(rows
            .into_iter()
            .map(|(observation, sources)| Cited {
                observation,
                sources,
            })
            .collect())
    }

    async fn set_consolidated(&mut self, units: &[Uuid], consolidated: bool) -> Result<()> {
        sqlx::query(q(&self.sql.set_consolidated))
            .persistent(self.sql.persistent)
            .bind(units)
            .bind(consolidated)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn delete_observations(&mut self, ids: &[Uuid]) -> Result<u64> {
        sqlx::query(q(&self.sql.delete_observations))
            .persistent(self.sql.persistent)
            .bind(ids)
            .execute(&mut *self.conn)
            .await
            .map(|done| done.rows_affected())
            .map_err(map_error)
    }

    async fn delete_units(&mut self, ids: &[Uuid]) -> Result<()> {
        sqlx::query(q(&self.sql.delete_units))
            .persistent(self.sql.persistent)
            .bind(ids)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn upsert_document(&mut self, doc: &DocumentRow) -> Result<()> {
        sqlx::query(q(&self.sql.upsert_document))
            .persistent(self.sql.persistent)
            .bind(&doc.id)
            .bind(&doc.content_hash)
            .bind(&doc.tags)
            .bind(doc.unit_count as i32)
            .bind(doc.retained_at)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn insert_units(&mut self, units: &[Unit]) -> Result<()> {
        if units.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = units.iter().map(|u| u.id).collect();
        let documents: Vec<&str> = units.iter().map(|u| u.document_id.as_str()).collect();
        let positions: Vec<i32> = units.iter().map(|u| u.position as i32).collect();
        let texts: Vec<&str> = units.iter().map(|u| u.text.as_str()).collect();
        let terms: Vec<String> = units
            .iter()
            .map(|u| serde_json::to_string(&u.terms).expect("strings serialize"))
            .collect();
        sqlx::query(q(&self.sql.insert_units))
            .persistent(self.sql.persistent)
            .bind(&ids)
            .bind(&documents)
            .bind(&positions)
            .bind(&texts)
            .bind(&terms)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn unit_terms(&mut self) -> Result<Vec<UnitTerms>> {
        let rows: Vec<(Uuid, String, Vec<String>, bool)> = sqlx::query_as(q(&self.sql.unit_terms))
            .persistent(self.sql.persistent)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(map_error)?;
        Ok(rows
            .into_iter()
            .map(|(id, document_id, terms, consolidated)| UnitTerms {
                id,
                document_id,
                terms,
                consolidated,
            })
            .collect())
    }

    async fn observations_for_terms(&mut self, terms: &[String]) -> Result<Vec<Uuid>> {
        sqlx::query_scalar(q(&self.sql.observations_for_terms))
            .persistent(self.sql.persistent)
            .bind(terms)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(map_error)
    }

    async fn insert_observations(&mut self, observations: &[Observation]) -> Result<()> {
        if observations.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = observations.iter().map(|o| o.id).collect();
        let terms: Vec<&str> = observations.iter().map(|o| o.term.as_str()).collect();
        let texts: Vec<&str> = observations.iter().map(|o| o.text.as_str()).collect();
        let sources: Vec<String> = observations
            .iter()
            .map(|o| serde_json::to_string(&o.sources).expect("uuids serialize"))
            .collect();
        sqlx::query(q(&self.sql.insert_observations))
            .persistent(self.sql.persistent)
            .bind(&ids)
            .bind(&terms)
            .bind(&texts)
            .bind(&sources)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(map_error)
    }

    async fn insert_source_rows(&mut self, _observations: &[Observation]) -> Result<()> {
        Err(Error::unsupported("observation_sources table", DRIVER))
    }
}
