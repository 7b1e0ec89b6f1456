//! Where the Postgres tests get their database: `DATABASE_URL`, one fresh schema per test.

#![allow(dead_code, unreachable_pub)]

use fascicle_conformance::Fixture;
use fascicle_postgres::sqlx::AssertSqlSafe;
use fascicle_postgres::{PostgresOptions, PostgresStore};

pub fn require_postgres() -> bool {
    std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The database URL, or the reason there is none (a failure when `REQUIRE_POSTGRES=1`).
pub fn database_url() -> Result<String, String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ if require_postgres() => {
            panic!("REQUIRE_POSTGRES=1 but DATABASE_URL is not set: cannot run the PostgreSQL tests")
        }
        _ => Err("DATABASE_URL is not set and no Docker engine is used; PostgreSQL tests skipped (set DATABASE_URL=postgres://… to run them)".into()),
    }
}

/// Prints a skip line past the test harness's output capture, once per test binary.
pub fn announce_skip(reason: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
    });
}

pub fn fresh_schema() -> String {
    format!("fascicle_t_{}", uuid::Uuid::new_v4().simple())
}

pub async fn drop_schema(store: &PostgresStore) {
    let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", store.schema());
    if let Err(e) = fascicle_postgres::sqlx::query(AssertSqlSafe(statement))
        .execute(store.pool())
        .await
    {
        eprintln!("could not drop test schema {}: {e}", store.schema());
    }
    store.pool().close().await;
}

/// A store on a fresh schema of the test database, or `None` (skip).
pub async fn fresh_store(url: &str) -> PostgresStore {
    PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(fresh_schema())
            .max_connections(6),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"))
}

/// The conformance factory: a fresh schema per case, dropped after it.
pub async fn fixture() -> Fixture {
    let url = match database_url() {
        Ok(url) => url,
        Err(reason) => return Fixture::skipped(reason),
    };
    let store = fresh_store(&url).await;
    let cleanup = store.clone();
    Fixture::new(store).with_cleanup(async move { drop_schema(&cleanup).await })
}
