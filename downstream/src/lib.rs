//! Every code example of the READMEs, compiled and run as the doctests of a crate that
//! depends on the `fascicle` facade alone (plus `tokio` and `serde`), as a downstream
//! user writes them. A README example that names `fascicle_api`, a driver crate,
//! `serde_json` or `mockall` does not compile here. The sections that need a driver
//! besides `memory` are behind the feature that enables it (all are on with
//! `--all-features`, as the test command runs).

/// The repository's README.
#[doc = include_str!("../../README.md")]
pub mod readme {}

/// The facade's README (`fascicle/README.md`).
#[cfg(feature = "sqlite")]
#[doc = include_str!("../../fascicle/README.md")]
pub mod facade {}

/// `queue-api/README.md`: types, the `Store` contract, the mocks.
#[doc = include_str!("../../queue-api/README.md")]
pub mod api {}

/// `driver-memory/README.md`.
#[doc = include_str!("../../driver-memory/README.md")]
pub mod memory {}

/// `driver-sqlite/README.md`.
#[cfg(feature = "sqlite")]
#[doc = include_str!("../../driver-sqlite/README.md")]
pub mod sqlite {}

/// `driver-postgres/README.md`.
#[cfg(feature = "postgres")]
#[doc = include_str!("../../driver-postgres/README.md")]
pub mod postgres {}

/// `conformance-tests/README.md`.
#[cfg(feature = "conformance")]
#[doc = include_str!("../../conformance-tests/README.md")]
pub mod conformance {}
