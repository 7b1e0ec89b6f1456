//! Mapping sqlx errors into `fascicle_api::Error`, and keeping passwords out of them.

use fascicle_api::{BackendErrorKind, Error};

pub(crate) const DRIVER: &str = "postgres";

/// Classifies a sqlx error by meaning.
pub fn map(error: sqlx::Error) -> Error {
    let kind = match &error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("23505") => {
                return Error::Conflict(format!("operation id already exists ({})", db.message()));
            }
            Some("23503") => {
                return Error::NotFound(format!(
                    "the parent operation does not exist ({})",
                    db.message()
                ));
            }
            Some("22P05") | Some("22021") => {
                return Error::InvalidInput(format!(
                    "PostgreSQL cannot store this text: {}",
                    db.message()
                ));
            }
            Some("40001") | Some("40P01") => BackendErrorKind::Serialization,
            Some("57014") => BackendErrorKind::Timeout,
            Some(code) if code.starts_with("08") || code.starts_with("57P") || code == "53300" => {
                BackendErrorKind::Connection
            }
            _ => BackendErrorKind::Other,
        },
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => BackendErrorKind::Connection,
        sqlx::Error::PoolTimedOut => BackendErrorKind::Timeout,
        _ => BackendErrorKind::Other,
    };
    Error::backend(DRIVER, kind, error)
}

/// `url` with any password replaced by `***`, for messages and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    format!(
        "{}{}@{}",
        &url[..scheme_end + 3],
        redacted_userinfo,
        &rest[at + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://app:s3cr@t@db:5432/q?sslmode=require"),
            "postgres://app:***@db:5432/q?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(redact_url("postgres:///test"), "postgres:///test");
    }
}
