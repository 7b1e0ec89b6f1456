// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]

mod error;
mod lifecycle;
mod schema;
mod store;
mod tx;

/// Classifies a rusqlite error from the caller's own statements (in a transaction shared
/// with `complete_in`) the way the driver classifies its own: busy, connection, timeout
/// and serialization failures are transient.
pub use error::map as map_error;
pub use store::{SqliteOptions, SqliteStore, Synchronous};

/// The rusqlite this driver is built with, for [`SqliteStore::transaction`] callers.
pub use rusqlite;

/// Records completions inside a [`SqliteStore::transaction`], so a handler's own writes
/// and its operation's completion commit together. Same fencing and aggregation as
/// `Store::complete`; `Applied::LeaseLost` means nothing was changed and the caller
/// should return an error to roll its writes back.
pub fn complete_in(
    tx: &rusqlite::Transaction<'_>,
    completions: &[fascicle_api::Completion],
) -> fascicle_api::Result<Vec<fascicle_api::Applied>> {
    lifecycle::complete(tx, completions, chrono::Utc::now())
}

/// The schema version this build of the driver writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = schema::CURRENT_VERSION;
