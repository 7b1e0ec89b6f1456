#![doc = include_str!("../README.md")]

/// The operation kind the chaos worker handles.
pub const KIND: &str = "chaos";
