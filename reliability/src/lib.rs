#![doc = include_str!("../README.md")]

pub mod generated;

/// The operation kind the chaos worker handles.
pub const KIND: &str = "chaos";

use fascicle::postgres::sqlx::{self, AssertSqlSafe};
use fascicle::postgres::{PostgresOptions, PostgresStore};

/// The PostgreSQL the tests use: `DATABASE_URL`, or `None` after one skip line naming
/// `what` did not run. With `REQUIRE_POSTGRES=1` a missing URL is a failure.
pub fn postgres_url(what: &str) -> Option<String> {
    let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        assert!(
            std::env::var("REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "REQUIRE_POSTGRES=1 but DATABASE_URL is not set"
        );
        eprintln!("SKIPPED: DATABASE_URL is not set; {what} did not run");
    }
    url
}

/// A store on a fresh schema `<prefix>_<random>` of `url`, configured by `options`.
pub async fn fresh_postgres(
    url: &str,
    prefix: &str,
    options: impl FnOnce(PostgresOptions) -> PostgresOptions,
) -> PostgresStore {
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    PostgresStore::connect_with(options(PostgresOptions::new(url).schema(schema)))
        .await
        .expect("cannot connect to DATABASE_URL")
}

/// Drops the store's schema and everything in it.
pub async fn drop_schema(store: &PostgresStore) {
    let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", store.schema());
    if let Err(e) = sqlx::query(AssertSqlSafe(statement))
        .execute(store.pool())
        .await
    {
        eprintln!("could not drop test schema {}: {e}", store.schema());
    }
}

/// Every driver's store for one test case: memory, SQLite (`<dir>/<file>`) and, with
/// `DATABASE_URL`, PostgreSQL on a fresh schema `<prefix>_<random>` — also returned apart,
/// to drop afterwards ([`drop_schema`]). `what` names the case in the skip line.
pub async fn every_store(
    dir: &std::path::Path,
    file: &str,
    what: &str,
    prefix: &str,
) -> (
    Vec<std::sync::Arc<dyn fascicle::Store>>,
    Option<PostgresStore>,
) {
    let mut stores: Vec<std::sync::Arc<dyn fascicle::Store>> = vec![
        fascicle::connect("memory://")
            .await
            .expect("the memory store"),
        fascicle::connect(&format!("sqlite://{}", dir.join(file).display()))
            .await
            .expect("the SQLite store"),
    ];
    let postgres = match postgres_url(what) {
        Some(url) => Some(fresh_postgres(&url, prefix, |o| o).await),
        None => None,
    };
    if let Some(store) = &postgres {
        stores.push(std::sync::Arc::new(store.clone()));
    }
    (stores, postgres)
}
