//! The memory bank in the SQLite store's file: observation sources in the
//! `bank_observation_sources` junction table.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use async_trait::async_trait;
use chrono::Utc;
use fascicle::sqlite::rusqlite::{self, OptionalExtension, params};
use fascicle::sqlite::{SqliteStore, complete_in, map_error};
use fascicle::{Applied, Context, Error, Result, Store};
use uuid::Uuid;

use crate::backend::{Backend, Done};
use crate::bank::{
    BankCounts, BankTx, Cited, DocumentRow, Observation, Unit, UnitTerms, Work, execute,
};

const DRIVER: &str = "sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bank_documents (
    id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    tags TEXT NOT NULL,
    unit_count INTEGER NOT NULL,
    retained_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bank_memory_units (
    id BLOB PRIMARY KEY,
    document_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    terms TEXT NOT NULL,
    consolidated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS bank_memory_units_document ON bank_memory_units (document_id);
CREATE TABLE IF NOT EXISTS bank_observations (
    id BLOB PRIMARY KEY,
    term TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bank_observations_term ON bank_observations (term);
CREATE TABLE IF NOT EXISTS bank_observation_sources (
    observation_id BLOB NOT NULL REFERENCES bank_observations (id) ON DELETE CASCADE,
    memory_id BLOB NOT NULL,
    PRIMARY KEY (observation_id, memory_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bank_observation_sources_memory ON bank_observation_sources (memory_id);
";

/// Marks the error that rolls a unit of work back when its lease was lost.
const LEASE_LOST: &str = "fascicle-retain: lease lost; bank writes rolled back";

#[derive(Debug)]
pub(crate) struct SqliteBackend {
    store: SqliteStore,
}

impl SqliteBackend {
    pub(crate) fn new(store: SqliteStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn migrate(&self) -> Result<()> {
        self.store
            .transaction(|tx| tx.execute_batch(SCHEMA).map_err(map_error))
            .await
    }

    async fn run(&self, work: Work, ctx: Option<Context>) -> Result<Done> {
        let capabilities = self.store.capabilities();
        let outcome = self
            .store
            .transaction(move |tx| {
                let mut bank = SqliteTx(tx);
                let report = ready(execute(&mut bank, capabilities, &work, Utc::now()))?;
                match ctx {
                    Some(ctx) => {
                        let result = serde_json::to_value(report).map_err(|e| {
                            Error::InvalidInput(format!("the report cannot be serialized: {e}"))
                        })?;
                        if complete_in(tx, &[ctx.completion(result)])?[0] == Applied::LeaseLost {
                            // Rolls the bank writes back.
                            return Err(Error::Conflict(LEASE_LOST.into()));
                        }
                        Ok(Done::Completed)
                    }
                    None => Ok(Done::Written(report)),
                }
            })
            .await;
        match outcome {
            Err(Error::Conflict(message)) if message == LEASE_LOST => Ok(Done::LeaseLost),
            other => other,
        }
    }

    async fn counts(&self) -> Result<BankCounts> {
        self.store
            .transaction(|tx| {
                let count = |sql: &str| -> Result<u64> {
                    tx.query_row(sql, [], |row| row.get::<_, i64>(0))
                        .map(|n| n as u64)
                        .map_err(map_error)
                };
                Ok(BankCounts {
                    documents: count("SELECT count(*) FROM bank_documents")?,
                    memory_units: count("SELECT count(*) FROM bank_memory_units")?,
                    unconsolidated_units: count(
                        "SELECT count(*) FROM bank_memory_units WHERE consolidated = 0",
                    )?,
                    observations: count("SELECT count(*) FROM bank_observations")?,
                    observation_sources: count("SELECT count(*) FROM bank_observation_sources")?,
                })
            })
            .await
    }
}

/// The output of a future that never waits: the SQLite steps are synchronous calls on
/// the blocking thread that holds the transaction.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("SQLite bank steps never wait"),
    }
}

struct SqliteTx<'a, 'c>(&'a rusqlite::Transaction<'c>);

fn uuid_of(bytes: Vec<u8>) -> rusqlite::Result<Uuid> {
    Uuid::from_slice(&bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn json_list(text: String) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).expect("a list of strings serializes")
}

impl SqliteTx<'_, '_> {
    fn each(&self, sql: &str, ids: &[Uuid]) -> Result<u64> {
        let mut statement = self.0.prepare_cached(sql).map_err(map_error)?;
        let mut changed = 0;
        for id in ids {
            changed += statement.execute([id.as_bytes()]).map_err(map_error)? as u64;
        }
        Ok(changed)
    }
}

impl BankTx for SqliteTx<'_, '_> {
    async fn document_hash(&mut self, document_id: &str) -> Result<Option<String>> {
        self.0
            .prepare_cached("SELECT content_hash FROM bank_documents WHERE id = ?1")
            .and_then(|mut s| s.query_row([document_id], |row| row.get(0)).optional())
            .map_err(map_error)
    }

    async fn unit_ids_of(&mut self, document_id: &str) -> Result<Vec<Uuid>> {
        let mut statement = self
            .0
            .prepare_cached(
                "SELECT id FROM bank_memory_units WHERE document_id = ?1 ORDER BY position",
            )
            .map_err(map_error)?;
        statement
            .query_map([document_id], |row| uuid_of(row.get(0)?))
            .and_then(|rows| rows.collect())
            .map_err(map_error)
    }

    async fn citing_via_sources_table(&mut self, units: &[Uuid]) -> Result<Vec<Cited>> {
        let mut citing = self
            .0
            .prepare_cached(
                "SELECT DISTINCT observation_id FROM bank_observation_sources WHERE memory_id = ?1",
            )
            .map_err(map_error)?;
        let mut observations = std::collections::BTreeSet::new();
        for unit in units {
            let rows = citing
                .query_map([unit.as_bytes()], |row| uuid_of(row.get(0)?))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Uuid>>>())
                .map_err(map_error)?;
            observations.extend(rows);
        }
        let mut sources = self
            .0
            .prepare_cached(
                "SELECT memory_id FROM bank_observation_sources WHERE observation_id = ?1",
            )
            .map_err(map_error)?;
        observations
            .into_iter()
            .map(|observation| {
                let sources = sources
                    .query_map([observation.as_bytes()], |row| uuid_of(row.get(0)?))
                    .and_then(|rows| rows.collect())
                    .map_err(map_error)?;
                Ok(Cited {
                    observation,
                    sources,
                })
            })
            .collect()
    }

    async fn citing_via_source_array(&mut self, _units: &[Uuid]) -> Result<Vec<Cited>> {
        Err(Error::unsupported("observation source arrays", DRIVER))
    }

    async fn set_consolidated(&mut self, units: &[Uuid], consolidated: bool) -> Result<()> {
        let sql = if consolidated {
            "UPDATE bank_memory_units SET consolidated = 1 WHERE id = ?1"
        } else {
            "UPDATE bank_memory_units SET consolidated = 0 WHERE id = ?1"
        };
        self.each(sql, units).map(drop)
    }

    async fn delete_observations(&mut self, ids: &[Uuid]) -> Result<u64> {
        // The source rows go with them (ON DELETE CASCADE).
        self.each("DELETE FROM bank_observations WHERE id = ?1", ids)
    }

    async fn delete_units(&mut self, ids: &[Uuid]) -> Result<()> {
        self.each("DELETE FROM bank_memory_units WHERE id = ?1", ids)
            .map(drop)
    }

    async fn upsert_document(&mut self, doc: &DocumentRow) -> Result<()> {
        self.0
            .prepare_cached(
                "INSERT INTO bank_documents (id, content_hash, tags, unit_count, retained_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET content_hash = excluded.content_hash,
                     tags = excluded.tags, unit_count = excluded.unit_count,
                     retained_at = excluded.retained_at",
            )
            .and_then(|mut s| {
                s.execute(params![
                    doc.id,
                    doc.content_hash,
                    to_json(&doc.tags),
                    doc.unit_count,
                    doc.retained_at.timestamp_micros()
                ])
            })
            .map(drop)
            .map_err(map_error)
    }

    async fn insert_units(&mut self, units: &[Unit]) -> Result<()> {
        let mut statement = self
            .0
            .prepare_cached(
                "INSERT INTO bank_memory_units (id, document_id, position, text, terms, consolidated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(map_error)?;
        for u in units {
            statement
                .execute(params![
                    u.id.as_bytes(),
                    u.document_id,
                    u.position,
                    u.text,
                    to_json(&u.terms),
                    u.consolidated
                ])
                .map_err(map_error)?;
        }
        Ok(())
    }

    async fn unit_terms(&mut self) -> Result<Vec<UnitTerms>> {
        let mut statement = self
            .0
            .prepare_cached(
                "SELECT id, document_id, terms, consolidated FROM bank_memory_units ORDER BY id",
            )
            .map_err(map_error)?;
        statement
            .query_map([], |row| {
                Ok(UnitTerms {
                    id: uuid_of(row.get(0)?)?,
                    document_id: row.get(1)?,
                    terms: json_list(row.get(2)?)?,
                    consolidated: row.get(3)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(map_error)
    }

    async fn observations_for_terms(&mut self, terms: &[String]) -> Result<Vec<Uuid>> {
        let mut statement = self
            .0
            .prepare_cached("SELECT id FROM bank_observations WHERE term = ?1")
            .map_err(map_error)?;
        let mut ids = Vec::new();
        for term in terms {
            let rows = statement
                .query_map([term], |row| uuid_of(row.get(0)?))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Uuid>>>())
                .map_err(map_error)?;
            ids.extend(rows);
        }
        Ok(ids)
    }

    async fn insert_observations(&mut self, observations: &[Observation]) -> Result<()> {
        let now = Utc::now().timestamp_micros();
        let mut statement = self
            .0
            .prepare_cached(
                "INSERT INTO bank_observations (id, term, text, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(map_error)?;
        for o in observations {
            statement
                .execute(params![o.id.as_bytes(), o.term, o.text, now])
                .map_err(map_error)?;
        }
        Ok(())
    }

    async fn insert_source_rows(&mut self, observations: &[Observation]) -> Result<()> {
        let mut statement = self
            .0
            .prepare_cached(
                "INSERT INTO bank_observation_sources (observation_id, memory_id) VALUES (?1, ?2)",
            )
            .map_err(map_error)?;
        for o in observations {
            for source in &o.sources {
                statement
                    .execute([o.id.as_bytes(), source.as_bytes()])
                    .map_err(map_error)?;
            }
        }
        Ok(())
    }
}
