//! Where the Postgres tests get their database: `DATABASE_URL`, one fresh schema per test.

#![allow(dead_code, unreachable_pub)]

pub mod pooler;

use std::sync::OnceLock;

use fascicle_conformance::Fixture;
use fascicle_postgres::sqlx::AssertSqlSafe;
use fascicle_postgres::{PostgresOptions, PostgresStore};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

pub fn require_postgres() -> bool {
    std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// Where the tests' PostgreSQL comes from: `DATABASE_URL`, else a throw-away container
/// when a Docker engine answers. Dropping it stops the container.
pub struct Database {
    pub url: String,
    _container: Option<ContainerAsync<Postgres>>,
}

/// The test database, or the reason there is none (a failure when `REQUIRE_POSTGRES=1`).
pub async fn database() -> Result<Database, String> {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        return Ok(Database {
            url,
            _container: None,
        });
    }
    match start_container().await {
        Ok(database) => Ok(database),
        Err(reason) if require_postgres() => panic!(
            "REQUIRE_POSTGRES=1 but DATABASE_URL is not set and no PostgreSQL container could be started ({reason}): cannot run the PostgreSQL tests"
        ),
        Err(reason) => Err(format!(
            "DATABASE_URL is not set and no Docker engine answered ({reason}); PostgreSQL tests skipped (set DATABASE_URL=postgres://… to run them)"
        )),
    }
}

/// Once Docker has failed to answer, later tests in this binary skip without retrying.
static DOCKER_UNAVAILABLE: OnceLock<String> = OnceLock::new();

async fn start_container() -> Result<Database, String> {
    if let Some(reason) = DOCKER_UNAVAILABLE.get() {
        return Err(reason.clone());
    }
    let started = async {
        let container = Postgres::default()
            .with_tag("16-alpine")
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let host = container.get_host().await.map_err(|e| e.to_string())?;
        let port = container
            .get_host_port_ipv4(5432)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(Database {
            url: format!("postgres://postgres:postgres@{host}:{port}/postgres"),
            _container: Some(container),
        })
    }
    .await;
    if let Err(reason) = &started {
        let _ = DOCKER_UNAVAILABLE.set(reason.clone());
    }
    started
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

/// The conformance factory: a fresh schema per case, dropped after it (with the
/// container, when the tests started one).
pub async fn fixture() -> Fixture {
    let database = match database().await {
        Ok(database) => database,
        Err(reason) => return Fixture::skipped(reason),
    };
    let store = fresh_store(&database.url).await;
    let cleanup = store.clone();
    let tamper = store.clone();
    let (url, schema) = (database.url.clone(), store.schema().to_string());
    Fixture::new(store)
        // A second pool on the same schema, as a second process would open: it connects
        // and runs the (idempotent, advisory-locked) migration again.
        .with_twin(move || {
            open_twin(
                PostgresOptions::new(url.clone())
                    .schema(schema.clone())
                    .max_connections(6),
            )
        })
        .with_tamper(move |parent, total| tamper_total(tamper.clone(), parent, total))
        .with_cleanup(async move {
            drop_schema(&cleanup).await;
            drop(database);
        })
}

/// A second store on a case's schema, opened with `options` as a second process would.
pub async fn open_twin(options: PostgresOptions) -> std::sync::Arc<dyn fascicle_api::Store> {
    let twin = PostgresStore::connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("cannot open a second pool on the schema: {e}"));
    std::sync::Arc::new(twin)
}

/// The suite's tampering: overwrites a parent's stored child total, through `store`
/// (a direct connection).
pub async fn tamper_total(store: PostgresStore, parent: fascicle_api::OperationId, total: u64) {
    let statement = format!(
        "UPDATE {}.operations SET children_total = $2 WHERE id = $1",
        store.schema()
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(parent.as_uuid())
        .bind(total as i64)
        .execute(store.pool())
        .await
        .unwrap();
}

/// A direct store (two connections) on `schema`: for clean-up and tampering beside a
/// store under test that reaches the schema another way.
pub async fn direct_store(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect_with(
        PostgresOptions::new(url)
            .schema(schema.to_string())
            .max_connections(2),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"))
}
