// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::sync::Arc;

/// serde_json's `json!`, for payloads: `fascicle::json!({ "document": "a.txt" })`.
pub use fascicle_api::serde_json::json;
pub use fascicle_api::*;

/// The conformance suite every driver runs (`suite!`, `Fixture`, the cases), at this
/// facade's version.
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub use fascicle_conformance as conformance;
/// The in-process memory driver.
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use fascicle_memory as memory;
/// The PostgreSQL driver.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use fascicle_postgres as postgres;
/// The embedded SQLite driver.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use fascicle_sqlite as sqlite;

/// Which driver a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Postgres,
    Sqlite,
    SqliteTemporary,
    Memory,
}

/// Splits a URL into the driver it names and the part that driver takes.
fn parse(url: &str) -> Result<(Scheme, &str)> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::InvalidInput(
            "the database URL is empty; try sqlite://fascicle.db".into(),
        ));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Scheme::Postgres, url));
    }
    if url == "sqlite::memory:" || url == "sqlite://:memory:" {
        return Ok((Scheme::SqliteTemporary, ""));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.trim().is_empty() {
            return Err(Error::InvalidInput(
                "sqlite:// needs a file path, e.g. sqlite://fascicle.db".into(),
            ));
        }
        return Ok((Scheme::Sqlite, path));
    }
    if url == "memory://" || url == "memory:" {
        return Ok((Scheme::Memory, ""));
    }
    // A scheme is a letter, then letters, digits, `+`, `-` or `.`; one letter is a Windows
    // drive (`C:\q.db`), a path. Only the scheme is quoted back: what follows may hold a
    // password.
    let is_scheme = |s: &str| {
        s.len() > 1
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    if let Some((scheme, after)) = url.split_once(':')
        && is_scheme(scheme)
    {
        let hint = match scheme {
            "postgres" | "postgresql" => format!("write {scheme}://user:password@host/db"),
            _ => "use postgres://, sqlite://path or memory:// (a path holding `:` is \
                  written sqlite://path)"
                .to_string(),
        };
        let written = if after.starts_with("//") { "://" } else { ":" };
        return Err(Error::InvalidInput(format!(
            "unknown database URL scheme `{scheme}{written}`; {hint}"
        )));
    }
    if url.contains("://") {
        return Err(Error::InvalidInput(
            "the database URL has no scheme before `://`; use postgres://, sqlite://path or \
             memory://"
                .into(),
        ));
    }
    // A bare path is a SQLite file.
    Ok((Scheme::Sqlite, url))
}

#[allow(dead_code)]
fn not_compiled(driver: &str, feature: &str) -> Error {
    Error::InvalidInput(format!(
        "this build of fascicle has no {driver} driver; enable the cargo feature `{feature}` of the `fascicle` crate"
    ))
}

/// Opens the store a URL names, among the drivers compiled in:
///
/// | URL | driver | feature |
/// |---|---|---|
/// | `postgres://user:pass@host/db`, `postgresql://…` | [`postgres::PostgresStore`] (schema `fascicle`) | `postgres` |
/// | `sqlite://path/to/file.db`, `sqlite:file.db`, or a bare path | [`sqlite::SqliteStore`] | `sqlite` (default) |
/// | `sqlite::memory:` | a private SQLite database deleted with the store | `sqlite` |
/// | `memory://` | [`memory::MemoryStore`] | `memory` |
///
/// A scheme whose driver is not compiled in is an `Error::InvalidInput` naming the
/// feature to enable; an unknown scheme (any `name:` prefix of two letters or more) is one
/// naming the accepted schemes, so a SQLite path holding `:` is written `sqlite://path`.
/// Passwords never appear in errors.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    Ok(open(url).await?.store())
}

/// A store opened by URL, as its concrete driver type: for driver-specific APIs such as
/// a transaction that spans the caller's own tables (`SqliteStore::transaction`,
/// `PostgresStore::complete_in`). Only the drivers compiled in are variants.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Driver {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    Postgres(postgres::PostgresStore),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    Sqlite(sqlite::SqliteStore),
    /// Memory.
    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    Memory(memory::MemoryStore),
}

impl Driver {
    /// The same store behind the driver-independent interface (sharing its connections).
    pub fn store(&self) -> Arc<dyn Store> {
        match *self {
            #[cfg(feature = "postgres")]
            Self::Postgres(ref store) => Arc::new(store.clone()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(ref store) => Arc::new(store.clone()),
            #[cfg(feature = "memory")]
            Self::Memory(ref store) => Arc::new(store.clone()),
        }
    }
}

/// [`connect`], keeping the driver's concrete type.
pub async fn open(url: &str) -> Result<Driver> {
    let (scheme, rest) = parse(url)?;
    match scheme {
        Scheme::Postgres => open_postgres(rest).await,
        Scheme::Sqlite => open_sqlite(Some(rest)).await,
        Scheme::SqliteTemporary => open_sqlite(None).await,
        Scheme::Memory => open_memory(),
    }
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Driver> {
    Ok(Driver::Postgres(
        postgres::PostgresStore::connect(url).await?,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Driver> {
    Err(not_compiled("PostgreSQL", "postgres"))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: Option<&str>) -> Result<Driver> {
    Ok(Driver::Sqlite(match path {
        Some(path) => sqlite::SqliteStore::open(path).await?,
        None => sqlite::SqliteStore::open_temporary().await?,
    }))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_path: Option<&str>) -> Result<Driver> {
    Err(not_compiled("SQLite", "sqlite"))
}

#[cfg(feature = "memory")]
fn open_memory() -> Result<Driver> {
    Ok(Driver::Memory(memory::MemoryStore::new()))
}

#[cfg(not(feature = "memory"))]
fn open_memory() -> Result<Driver> {
    Err(not_compiled("memory", "memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_their_driver() {
        assert_eq!(parse("postgres://u:p@h/db").unwrap().0, Scheme::Postgres);
        assert_eq!(parse("postgresql://h/db").unwrap().0, Scheme::Postgres);
        assert_eq!(parse("sqlite://q.db").unwrap(), (Scheme::Sqlite, "q.db"));
        assert_eq!(parse("sqlite:q.db").unwrap(), (Scheme::Sqlite, "q.db"));
        assert_eq!(
            parse("./data/q.db").unwrap(),
            (Scheme::Sqlite, "./data/q.db")
        );
        assert_eq!(parse("sqlite::memory:").unwrap().0, Scheme::SqliteTemporary);
        assert_eq!(parse("memory://").unwrap().0, Scheme::Memory);
        for bad in [
            "",
            "sqlite://",
            "sqlite:",
            "mysql://root@h/db",
            "redis://h",
            "postgres:app:secret@db/q",
            "://app:secret@db",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidInput(_))), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any text as a database URL: a driver and its part, or `InvalidInput` that
        /// names the accepted schemes, and never quotes what follows `://` (a password
        /// may be there) (issue #19). Never a panic.
        #[test]
        fn any_url_is_a_driver_or_a_typed_error_that_echoes_no_secret(
            scheme in "[a-z+.-]{0,10}",
            separator in proptest::prop_oneof![
                proptest::prelude::Just("://"),
                proptest::prelude::Just(":"),
                proptest::prelude::Just(""),
            ],
            rest in "[^\u{0}]{0,30}",
        ) {
            let url = format!("{scheme}{separator}{rest}");
            match parse(&url) {
                Ok((Scheme::Sqlite, path)) => proptest::prop_assert!(!path.is_empty()),
                Ok(_) => {}
                Err(Error::InvalidInput(message)) => {
                    proptest::prop_assert!(
                        message.contains("sqlite://") || message.contains("postgres"),
                        "the refusal names no accepted scheme: {}", message
                    );
                    if rest.trim().len() >= 6 && !separator.is_empty() {
                        proptest::prop_assert!(
                            !message.contains(rest.trim()),
                            "the refusal quotes the URL: {}", message
                        );
                    }
                }
                Err(other) => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }

    #[test]
    fn a_missing_driver_names_the_feature() {
        let message = not_compiled("PostgreSQL", "postgres").to_string();
        assert!(message.contains("cargo feature `postgres`"), "{message}");
    }
}
