// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]

mod error;
mod lifecycle;
mod schema;
mod store;
mod tx;

/// Classifies a sqlx error from the caller's own statements (in a transaction shared
/// with `complete_in`) the way the driver classifies its own: busy, connection, timeout
/// and serialization failures are transient.
pub use error::map as map_error;
pub use error::redact_url;
pub use store::{NotificationListener, PostgresOptions, PostgresStore};

/// The schema version this build of the driver writes.
pub const SCHEMA_VERSION: i64 = schema::CURRENT_VERSION;

/// Re-exported so callers can hold the pool and transactions `submit_batch_in` takes.
pub use sqlx;
