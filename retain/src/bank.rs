//! The memory bank's logic, written once over the primitive steps each backend supplies
//! inside its own transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use fascicle::{Capabilities, Result};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::documents::{Document, content_hash, split_units, terms};

/// A stored document.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DocumentRow {
    pub(crate) id: String,
    pub(crate) content_hash: String,
    pub(crate) tags: Vec<String>,
    pub(crate) unit_count: i64,
    pub(crate) retained_at: DateTime<Utc>,
}

/// A memory unit: one paragraph of a document.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Unit {
    pub(crate) id: Uuid,
    pub(crate) document_id: String,
    pub(crate) position: i64,
    pub(crate) text: String,
    pub(crate) terms: Vec<String>,
    pub(crate) consolidated: bool,
}

/// What consolidation needs to know about a unit.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct UnitTerms {
    pub(crate) id: Uuid,
    pub(crate) document_id: String,
    pub(crate) terms: Vec<String>,
    pub(crate) consolidated: bool,
}

/// An observation and the memory units it cites.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Observation {
    pub(crate) id: Uuid,
    pub(crate) term: String,
    pub(crate) text: String,
    pub(crate) sources: Vec<Uuid>,
}

/// An observation citing some of the units asked about, with all of its sources.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Cited {
    pub(crate) observation: Uuid,
    pub(crate) sources: Vec<Uuid>,
}

/// How many rows the bank holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankCounts {
    /// Documents.
    pub documents: u64,
    /// Memory units (paragraphs) of those documents.
    pub memory_units: u64,
    /// Units no consolidation has covered yet.
    pub unconsolidated_units: u64,
    /// Observations.
    pub observations: u64,
    /// Citations: (observation, unit) pairs.
    pub observation_sources: u64,
}

/// What retaining some documents did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainReport {
    /// Documents seen for the first time.
    pub documents_new: u64,
    /// Documents whose content changed, replaced in full.
    pub documents_replaced: u64,
    /// Documents whose content did not change (left alone).
    pub documents_unchanged: u64,
    /// Memory units written.
    pub units_added: u64,
    /// Memory units of replaced documents deleted.
    pub units_removed: u64,
    /// Observations deleted because they cited a deleted unit.
    pub observations_invalidated: u64,
    /// Surviving units cited by those observations, marked unconsolidated again.
    pub sources_reset: u64,
}

impl RetainReport {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Self) {
        self.documents_new += other.documents_new;
        self.documents_replaced += other.documents_replaced;
        self.documents_unchanged += other.documents_unchanged;
        self.units_added += other.units_added;
        self.units_removed += other.units_removed;
        self.observations_invalidated += other.observations_invalidated;
        self.sources_reset += other.sources_reset;
    }
}

/// What a consolidation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolidateReport {
    /// Unconsolidated units it covered.
    pub units_consolidated: u64,
    /// Observations it wrote.
    pub observations_created: u64,
    /// Of those, observations of terms that had one already (replaced, with the
    /// union of sources).
    pub observations_replaced: u64,
    /// Of those, observations citing units of more than one document.
    pub cross_document_observations: u64,
}

/// What the sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sweep {
    pub(crate) observations_deleted: u64,
    pub(crate) sources_reset: u64,
}

/// The steps a backend performs inside one transaction. The two source layouts are
/// separate steps; a backend implements the one it uses and answers
/// `Error::Unsupported` for the other, so a wrong layout flag cannot go unnoticed.
pub(crate) trait BankTx {
    async fn document_hash(&mut self, document_id: &str) -> Result<Option<String>>;
    async fn unit_ids_of(&mut self, document_id: &str) -> Result<Vec<Uuid>>;
    /// Observations citing any of `units`, read from `observation_sources`.
    async fn citing_via_sources_table(&mut self, units: &[Uuid]) -> Result<Vec<Cited>>;
    /// Observations citing any of `units`, read from their source array.
    async fn citing_via_source_array(&mut self, units: &[Uuid]) -> Result<Vec<Cited>>;
    async fn set_consolidated(&mut self, units: &[Uuid], consolidated: bool) -> Result<()>;
    /// Deletes observations (and, in the table layout, their source rows); returns how
    /// many existed.
    async fn delete_observations(&mut self, ids: &[Uuid]) -> Result<u64>;
    async fn delete_units(&mut self, ids: &[Uuid]) -> Result<()>;
    async fn upsert_document(&mut self, doc: &DocumentRow) -> Result<()>;
    async fn insert_units(&mut self, units: &[Unit]) -> Result<()>;
    async fn unit_terms(&mut self) -> Result<Vec<UnitTerms>>;
    async fn observations_for_terms(&mut self, terms: &[String]) -> Result<Vec<Uuid>>;
    /// Inserts observation rows; in the array layout the sources go with the row.
    async fn insert_observations(&mut self, observations: &[Observation]) -> Result<()>;
    /// Inserts the `observation_sources` rows of `observations` (table layout only).
    async fn insert_source_rows(&mut self, observations: &[Observation]) -> Result<()>;
}

/// Deletes every observation citing any of `memory_ids`, and marks the other units
/// those observations cited as unconsolidated, so the next consolidation rebuilds what
/// they supported. The layout comes from the store's own
/// [`Capabilities::uses_observation_sources_table`], never from the caller.
pub(crate) async fn delete_stale_observations_for_memories<T: BankTx>(
    tx: &mut T,
    capabilities: Capabilities,
    memory_ids: &[Uuid],
) -> Result<Sweep> {
    if memory_ids.is_empty() {
        return Ok(Sweep::default());
    }
    let cited = if capabilities.uses_observation_sources_table {
        tx.citing_via_sources_table(memory_ids).await?
    } else {
        tx.citing_via_source_array(memory_ids).await?
    };
    if cited.is_empty() {
        return Ok(Sweep::default());
    }
    let going: BTreeSet<Uuid> = memory_ids.iter().copied().collect();
    let survivors: Vec<Uuid> = cited
        .iter()
        .flat_map(|c| c.sources.iter().copied())
        .filter(|id| !going.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    tx.set_consolidated(&survivors, false).await?;
    let ids: Vec<Uuid> = cited.iter().map(|c| c.observation).collect();
    let observations_deleted = tx.delete_observations(&ids).await?;
    Ok(Sweep {
        observations_deleted,
        sources_reset: survivors.len() as u64,
    })
}

/// Full-replace document tracking for each document: unchanged content is left alone;
/// changed content has its old units' observations swept, its old units deleted, and
/// its new units written.
pub(crate) async fn retain_documents<T: BankTx>(
    tx: &mut T,
    capabilities: Capabilities,
    documents: &[Document],
    now: DateTime<Utc>,
) -> Result<RetainReport> {
    let mut report = RetainReport::default();
    for doc in documents {
        let hash = content_hash(doc);
        let previous = tx.document_hash(&doc.document_id).await?;
        match &previous {
            Some(old) if *old == hash => {
                report.documents_unchanged += 1;
                continue;
            }
            Some(_) => report.documents_replaced += 1,
            None => report.documents_new += 1,
        }
        if previous.is_some() {
            let old = tx.unit_ids_of(&doc.document_id).await?;
            let sweep = delete_stale_observations_for_memories(tx, capabilities, &old).await?;
            report.observations_invalidated += sweep.observations_deleted;
            report.sources_reset += sweep.sources_reset;
            tx.delete_units(&old).await?;
            report.units_removed += old.len() as u64;
        }
        let units: Vec<Unit> = split_units(&doc.text)
            .into_iter()
            .enumerate()
            .map(|(position, text)| Unit {
                id: Uuid::now_v7(),
                document_id: doc.document_id.clone(),
                position: position as i64,
                terms: terms(&text),
                text,
                consolidated: false,
            })
            .collect();
        tx.upsert_document(&DocumentRow {
            id: doc.document_id.clone(),
            content_hash: hash,
            tags: doc.tags.clone(),
            unit_count: units.len() as i64,
            retained_at: now,
        })
        .await?;
        tx.insert_units(&units).await?;
        report.units_added += units.len() as u64;
    }
    Ok(report)
}

/// Builds observations for the unconsolidated units: one per term they mention that at
/// least two units of the bank mention, citing every such unit (so an observation may
/// span several documents). An existing observation of the same term is replaced.
pub(crate) async fn consolidate<T: BankTx>(
    tx: &mut T,
    capabilities: Capabilities,
) -> Result<ConsolidateReport> {
    let units = tx.unit_terms().await?;
    let pending: Vec<&UnitTerms> = units.iter().filter(|u| !u.consolidated).collect();
    if pending.is_empty() {
        return Ok(ConsolidateReport::default());
    }
    let mut by_term: HashMap<&str, Vec<&UnitTerms>> = HashMap::new();
    for unit in &units {
        for term in &unit.terms {
            by_term.entry(term.as_str()).or_default().push(unit);
        }
    }
    let wanted: BTreeSet<&str> = pending
        .iter()
        .flat_map(|u| u.terms.iter().map(String::as_str))
        .filter(|t| by_term.get(t).is_some_and(|units| units.len() >= 2))
        .collect();
    let wanted: Vec<String> = wanted.into_iter().map(str::to_string).collect();
    let replaced = tx.observations_for_terms(&wanted).await?;
    tx.delete_observations(&replaced).await?;
    let mut report = ConsolidateReport {
        units_consolidated: pending.len() as u64,
        observations_replaced: replaced.len() as u64,
        ..Default::default()
    };
    let observations: Vec<Observation> = wanted
        .iter()
        .map(|term| {
            let cited = &by_term[term.as_str()];
            let documents: BTreeMap<&str, usize> =
                cited.iter().fold(BTreeMap::new(), |mut m, u| {
                    *m.entry(u.document_id.as_str()).or_default() += 1;
                    m
                });
            if documents.len() > 1 {
                report.cross_document_observations += 1;
            }
            let names: Vec<&str> = documents.keys().copied().collect();
            Observation {
                id: Uuid::now_v7(),
                term: term.clone(),
                text: format!(
                    "{term} is mentioned in {} passages of {}",
                    cited.len(),
                    names.join(", ")
                ),
                sources: cited.iter().map(|u| u.id).collect(),
            }
        })
        .collect();
    report.observations_created = observations.len() as u64;
    tx.insert_observations(&observations).await?;
    if capabilities.uses_observation_sources_table {
        tx.insert_source_rows(&observations).await?;
    }
    let ids: Vec<Uuid> = pending.iter().map(|u| u.id).collect();
    tx.set_consolidated(&ids, true).await?;
    Ok(report)
}

/// One unit of work for a backend.
#[derive(Clone, Debug)]
pub(crate) enum Work {
    Retain(Vec<Document>),
    Consolidate,
}

/// What a unit of work did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum WorkReport {
    Retain(RetainReport),
    Consolidate(ConsolidateReport),
}

/// Runs `work` on `tx`.
pub(crate) async fn execute<T: BankTx>(
    tx: &mut T,
    capabilities: Capabilities,
    work: &Work,
    now: DateTime<Utc>,
) -> Result<WorkReport> {
    Ok(match work {
        Work::Retain(documents) => {
            WorkReport::Retain(retain_documents(tx, capabilities, documents, now).await?)
        }
        Work::Consolidate => WorkReport::Consolidate(consolidate(tx, capabilities).await?),
    })
}
