//! Fault-injection tests for fascicle (see `tests/` and `docs/RELIABILITY.md`).
//!
//! The `chaos-worker` binary is a worker process the crash tests start, kill with
//! SIGKILL and restart: it runs a `chaos` handler that logs each execution to a file
//! (so re-executions after a crash can be counted) and takes a few milliseconds.

/// The operation kind the chaos worker handles.
pub const KIND: &str = "chaos";
