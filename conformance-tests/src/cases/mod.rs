//! The conformance cases. Each takes the store under test and panics on a violation of
//! the `Store` contract. The [`suite!`](crate::suite) macro runs all of them.

mod cancel;
mod coverage;
mod dependencies;
mod election;
mod flow;
mod instances;
mod lifecycle;
mod many;
mod membership;
mod nested;
mod races;
mod schedule;
mod streamed;
mod submit;
mod unique;
mod worker;
mod workflow;

pub use cancel::*;
pub use coverage::TRANSITION_CASES;
pub use dependencies::*;
pub use election::*;
pub use flow::*;
pub use instances::*;
pub use lifecycle::*;
pub use many::*;
pub use membership::*;
pub use nested::*;
pub use races::*;
pub use schedule::*;
pub use streamed::*;
pub use submit::*;
pub use unique::*;
pub use worker::*;
pub use workflow::*;

crate::__for_each_case!(__case_table;);
