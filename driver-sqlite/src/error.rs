//! Mapping rusqlite errors into `fascicle_api::Error`.

use fascicle_api::{BackendErrorKind, Error};
use rusqlite::ErrorCode;

pub(crate) const DRIVER: &str = "sqlite";

/// Classifies a rusqlite error by meaning.
pub fn map(error: rusqlite::Error) -> Error {
    if let rusqlite::Error::SqliteFailure(failure, _) = &error {
        let kind = match failure.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => BackendErrorKind::Busy,
            ErrorCode::ConstraintViolation
                if matches!(
                    failure.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                ) =>
            {
                return Error::Conflict(format!("operation id already exists ({error})"));
            }
            ErrorCode::ConstraintViolation
                if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
            {
                return Error::NotFound(format!("the parent operation does not exist ({error})"));
            }
            ErrorCode::CannotOpen | ErrorCode::SystemIoFailure | ErrorCode::DiskFull => {
                BackendErrorKind::Connection
            }
            _ => BackendErrorKind::Other,
        };
        return Error::backend(DRIVER, kind, error);
    }
    Error::backend(DRIVER, BackendErrorKind::Other, error)
}

/// An error met while opening or migrating `location`, in words a person can act on.
pub(crate) fn storage(location: &str, error: rusqlite::Error) -> Error {
    let reason = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::NotADatabase => {
                "the file is not a SQLite database (or is encrypted or corrupt); point fascicle at a new path or restore the file".to_string()
            }
            ErrorCode::CannotOpen => {
                "cannot open the database file: check that the directory exists and is writable".to_string()
            }
            ErrorCode::ReadOnly | ErrorCode::PermissionDenied => {
                "the database is read-only: fascicle needs write access to the file and its directory".to_string()
            }
            ErrorCode::DatabaseCorrupt => "the database file is corrupt".to_string(),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return map(error);
            }
            _ => format!("cannot use the database: {error}"),
        },
        _ => format!("cannot use the database: {error}"),
    };
    Error::Storage {
        location: location.to_string(),
        reason,
    }
}

/// A background task died (panicked or was cancelled) while holding a connection.
pub(crate) fn task(error: tokio::task::JoinError) -> Error {
    Error::backend(DRIVER, BackendErrorKind::Other, error)
}
