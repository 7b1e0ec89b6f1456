#![doc = include_str!("../README.md")]

mod error;
mod lifecycle;
mod schema;
mod store;
mod tx;

pub use store::{SqliteOptions, SqliteStore, Synchronous};

/// The schema version this build of the driver writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = schema::CURRENT_VERSION;
