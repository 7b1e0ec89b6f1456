#![doc = include_str!("../README.md")]

mod store;
mod tx;

pub use store::MemoryStore;
