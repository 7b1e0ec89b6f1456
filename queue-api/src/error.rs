//! The one public error type.

use std::fmt;

/// A boxed error from a driver's private error type (`sqlx::Error`, `rusqlite::Error`, …).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout fascicle.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error fascicle returns, classified by meaning rather than by backend.
///
/// Drivers map their own errors into these variants; no driver type appears here.
/// [`Error::is_transient`] says whether retrying the same call may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller's input was rejected before anything was written.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The named operation or batch does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The write conflicts with stored state (an id already taken, a state that moved on).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The driver does not implement this operation.
    #[error("`{operation}` is not supported by the {driver} driver")]
    Unsupported {
        /// The operation that was asked for.
        operation: &'static str,
        /// The driver that declined it.
        driver: &'static str,
    },
    /// The storage cannot be used as it is: a schema from a newer fascicle, a file that
    /// is not a database, a path that cannot be written.
    #[error("{location}: {reason}")]
    Storage {
        /// What was being opened: a file path, a schema name, a redacted URL.
        location: String,
        /// What is wrong with it, in words a person can act on.
        reason: String,
    },
    /// The backend failed while executing a request.
    #[error("{driver} backend error ({kind}): {source}")]
    Backend {
        /// The driver that failed.
        driver: &'static str,
        /// A portable classification of the failure.
        kind: BackendErrorKind,
        /// The driver's own error.
        #[source]
        source: BoxError,
    },
}

/// Portable classification of a backend failure, in the manner of sqlx's `ErrorKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The database was busy or locked and the wait ran out; retrying may succeed.
    Busy,
    /// The connection was lost or could not be made; retrying may succeed.
    Connection,
    /// A timeout elapsed (statement timeout, pool acquire timeout).
    Timeout,
    /// A serialization failure or deadlock was detected; retrying may succeed.
    Serialization,
    /// A fault injected by a test wrapper.
    Injected,
    /// Anything else; retrying will not help by itself.
    Other,
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Busy => "busy",
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::Serialization => "serialization",
            Self::Injected => "injected fault",
            Self::Other => "other",
        })
    }
}

impl Error {
    /// Builds a [`Error::Backend`] from any driver error.
    pub fn backend(
        driver: &'static str,
        kind: BackendErrorKind,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Backend {
            driver,
            kind,
            source: source.into(),
        }
    }

    /// Builds an [`Error::Unsupported`].
    pub fn unsupported(operation: &'static str, driver: &'static str) -> Self {
        Self::Unsupported { operation, driver }
    }

    /// Whether retrying the same call later may succeed (busy database, dropped
    /// connection, timeout, serialization failure).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Backend { kind, .. } => matches!(
                kind,
                BackendErrorKind::Busy
                    | BackendErrorKind::Connection
                    | BackendErrorKind::Timeout
                    | BackendErrorKind::Serialization
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backend_busy_like_errors_are_transient() {
        let busy = Error::backend("test", BackendErrorKind::Busy, "locked");
        assert!(busy.is_transient());
        let other = Error::backend("test", BackendErrorKind::Other, "syntax");
        assert!(!other.is_transient());
        assert!(!Error::InvalidInput("x".into()).is_transient());
        assert_eq!(
            Error::unsupported("claim", "memory").to_string(),
            "`claim` is not supported by the memory driver"
        );
    }
}
