// The README's examples are compiled and run as a downstream crate would (facade only)
// by `downstream/`; here it is the crate's documentation.
#![cfg_attr(not(doctest), doc = include_str!("../README.md"))]

mod store;
mod tx;

pub use store::MemoryStore;
