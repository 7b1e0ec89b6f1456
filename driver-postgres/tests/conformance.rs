//! The shared conformance suite on PostgreSQL: a fresh schema per case.

mod common;

mod conformance {
    fascicle_conformance::suite!(crate::common::fixture());
}
