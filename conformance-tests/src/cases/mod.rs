//! The conformance cases. Each takes the store under test and panics on a violation of
//! the `Store` contract. The [`suite!`](crate::suite) macro runs all of them.

mod lifecycle;
mod submit;

pub use lifecycle::*;
pub use submit::*;
