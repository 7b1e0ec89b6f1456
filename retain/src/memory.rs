//! The memory bank in process, next to a `MemoryStore`: observations keep their sources
//! as a native list.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use fascicle::memory::MemoryStore;
use fascicle::{Applied, Context, Error, Result, Store};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::backend::{Backend, Done};
use crate::bank::{
    BankCounts, BankTx, Cited, DocumentRow, Observation, Unit, UnitTerms, Work, execute,
};

const DRIVER: &str = "memory";

#[derive(Clone, Debug, Default)]
struct Data {
    documents: BTreeMap<String, DocumentRow>,
    units: HashMap<Uuid, Unit>,
    observations: HashMap<Uuid, Observation>,
}

/// The memory bank of a [`MemoryStore`]. A unit of work runs on a copy of the bank
/// under the bank's lock; the copy replaces the bank only if the operation's completion
/// was recorded, so the writes and the completion take effect together.
#[derive(Debug)]
pub(crate) struct MemoryBackend {
    store: MemoryStore,
    data: Arc<Mutex<Data>>,
}

impl MemoryBackend {
    pub(crate) fn new(store: MemoryStore) -> Self {
        Self {
            store,
            data: Arc::default(),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn migrate(&self) -> Result<()> {
        Ok(())
    }

    async fn run(&self, work: Work, ctx: Option<Context>) -> Result<Done> {
        let capabilities = self.store.capabilities();
        let mut data = self.data.lock().await;
        let mut tx = MemoryTx(data.clone());
        let report = execute(&mut tx, capabilities, &work, Utc::now()).await?;
        let done = match ctx {
            Some(ctx) => {
                let completion = ctx.completion(serde_json::to_value(report).map_err(|e| {
                    Error::InvalidInput(format!("the report cannot be serialized: {e}"))
                })?);
                if self.store.complete(&[completion]).await?[0] == Applied::LeaseLost {
                    return Ok(Done::LeaseLost);
                }
                Done::Completed
            }
            None => Done::Written(report),
        };
        *data = tx.0;
        Ok(done)
    }

    async fn counts(&self) -> Result<BankCounts> {
        let data = self.data.lock().await;
        Ok(BankCounts {
            documents: data.documents.len() as u64,
            memory_units: data.units.len() as u64,
            unconsolidated_units: data.units.values().filter(|u| !u.consolidated).count() as u64,
            observations: data.observations.len() as u64,
            observation_sources: data
                .observations
                .values()
                .map(|o| o.sources.len() as u64)
                .sum(),
        })
    }
}

struct MemoryTx(Data);

impl BankTx for MemoryTx {
    async fn document_hash(&mut self, document_id: &str) -> Result<Option<String>> {
        Ok(self
            .0
            .documents
            .get(document_id)
            .map(|d| d.content_hash.clone()))
    }

    async fn unit_ids_of(&mut self, document_id: &str) -> Result<Vec<Uuid>> {
        let mut units: Vec<&Unit> = self
            .0
            .units
            .values()
            .filter(|u| u.document_id == document_id)
            .collect();
        units.sort_by_key(|u| u.position);
        Ok(units.iter().map(|u| u.id).collect())
    }

    async fn citing_via_sources_table(&mut self, _units: &[Uuid]) -> Result<Vec<Cited>> {
        Err(Error::unsupported("observation_sources table", DRIVER))
    }

    async fn citing_via_source_array(&mut self, units: &[Uuid]) -> Result<Vec<Cited>> {
        let wanted: HashSet<&Uuid> = units.iter().collect();
        Ok(self
            .0
            .observations
            .values()
            .filter(|o| o.sources.iter().any(|s| wanted.contains(s)))
            .map(|o| Cited {
                observation: o.id,
                sources: o.sources.clone(),
            })
            .collect())
    }

    async fn set_consolidated(&mut self, units: &[Uuid], consolidated: bool) -> Result<()> {
        for id in units {
            if let Some(unit) = self.0.units.get_mut(id) {
                unit.consolidated = consolidated;
            }
        }
        Ok(())
    }

    async fn delete_observations(&mut self, ids: &[Uuid]) -> Result<u64> {
        Ok(ids
            .iter()
            .filter(|id| self.0.observations.remove(id).is_some())
            .count() as u64)
    }

    async fn delete_units(&mut self, ids: &[Uuid]) -> Result<()> {
        for id in ids {
            self.0.units.remove(id);
        }
        Ok(())
    }

    async fn upsert_document(&mut self, doc: &DocumentRow) -> Result<()> {
        self.0.documents.insert(doc.id.clone(), doc.clone());
        Ok(())
    }

    async fn insert_units(&mut self, units: &[Unit]) -> Result<()> {
        for unit in units {
            self.0.units.insert(unit.id, unit.clone());
        }
        Ok(())
    }

    async fn unit_terms(&mut self) -> Result<Vec<UnitTerms>> {
        let mut units: Vec<UnitTerms> = self
            .0
            .units
            .values()
            .map(|u| UnitTerms {
                id: u.id,
                document_id: u.document_id.clone(),
                terms: u.terms.clone(),
                consolidated: u.consolidated,
            })
            .collect();
        units.sort_by_key(|u| u.id);
        Ok(units)
    }

    async fn observations_for_terms(&mut self, terms: &[String]) -> Result<Vec<Uuid>> {
        let wanted: HashSet<&String> = terms.iter().collect();
        Ok(self
            .0
            .observations
            .values()
            .filter(|o| wanted.contains(&o.term))
            .map(|o| o.id)
            .collect())
    }

    async fn insert_observations(&mut self, observations: &[Observation]) -> Result<()> {
        for o in observations {
            self.0.observations.insert(o.id, o.clone());
        }
        Ok(())
    }

    async fn insert_source_rows(&mut self, _observations: &[Observation]) -> Result<()> {
        Err(Error::unsupported("observation_sources table", DRIVER))
    }
}
