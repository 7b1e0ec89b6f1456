//! Mapping sqlx errors into `fascicle_api::Error`, and keeping passwords out of them.

use fascicle_api::{BackendErrorKind, Error};

pub(crate) const DRIVER: &str = "postgres";

/// Classifies a sqlx error by meaning.
pub fn map(error: sqlx::Error) -> Error {
    let kind = match &error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Two claims picked operations of one serialization key at once (claims filtered
            // by kind can): the index refused the second; claiming again resolves it.
            Some("23505") if db.constraint() == Some("operations_key_held") => {
                BackendErrorKind::Busy
            }
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

/// Connection parameters whose value is a secret: the password, the passphrase of the
/// client's TLS key, and fascicle's direct URL for `LISTEN` (which holds a password of
/// its own).
const SECRET_KEYS: &[&str] = &["password", "sslpassword", "fascicle_listen_url"];

/// What replaces a secret.
const MASK: &str = "***";

/// `url` with every password replaced by `***`, for messages and `Debug`; the scheme,
/// user, host, port, database and other parameters stay readable.
///
/// It covers the password of the userinfo (`postgres://user:secret@host/db`), which ends
/// at the *last* `@` of the URL, so that an unescaped `/`, `?`, `#` or `@` in it does not
/// leak its tail; the `password` and `sslpassword` query parameters, in any case and even
/// percent-encoded, up to the next parameter; and the same keys in libpq's key/value form
/// (`host=db password='s3cret'`), which is no URL but still ends up in error messages.
/// When the text is ambiguous, more is hidden rather than less.
pub fn redact_url(url: &str) -> String {
    // A scheme is a letter then letters, digits, `+`, `-` or `.`; text before `://`
    // that is no scheme (`://user:pass@…`, or a password holding `://`) is no URL.
    let is_scheme = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    match url.find("://").filter(|&end| is_scheme(&url[..end])) {
        Some(scheme_end) => {
            let (scheme, rest) = url.split_at(scheme_end + 3);
            format!("{scheme}{}", redact_query_passwords(&redact_userinfo(rest)))
        }
        // Key/value form, or a URL without `//` (`user:secret@host`): every rule applies.
        None => redact_query_passwords(&redact_userinfo(&redact_key_value_passwords(url))),
    }
}

/// `user:secret@host…` becomes `user:***@host…`: the userinfo is everything before the
/// last `@`, and its password everything after its first `:`.
fn redact_userinfo(rest: &str) -> String {
    if let Some(at) = rest.rfind('@')
        && let Some(colon) = rest[..at].find(':')
    {
        format!("{}:{MASK}{}", &rest[..colon], &rest[at..])
    } else {
        rest.to_string()
    }
}

/// Replaces the value of every `?key=` or `&key=` parameter named in [`SECRET_KEYS`]. The
/// value runs up to the next `&` that starts a `name=` parameter (or the next `?` that
/// does, outside a secret), so a password holding `&`, `?`, `#`, `/` or `@` is hidden
/// whole.
fn redact_query_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_secret = false;
    let mut rest = text;
    // The text before the first `?` or `&` is the host and path: never a parameter.
    let head_end = rest.find(['?', '&']).unwrap_or(rest.len());
    out.push_str(&rest[..head_end]);
    rest = &rest[head_end..];
    while let Some(delimiter) = rest.chars().next() {
        let end = rest[1..].find(['?', '&']).map_or(rest.len(), |i| i + 1);
        let segment = &rest[1..end];
        rest = &rest[end..];
        match segment.split_once('=') {
            // Inside the query a `?` is no separator (the parser splits on `&` only): a
            // secret value goes on past `?name=` (`password=ab?cd=ef` is one password).
            Some((key, _)) if looks_like_key(key) && !(in_secret && delimiter == '?') => {
                in_secret = is_secret_key(key);
                out.push(delimiter);
                if in_secret {
                    out.push_str(key);
                    out.push('=');
                    out.push_str(MASK);
                } else {
                    out.push_str(segment);
                }
            }
            // The rest of a secret value that held a `?` or `&`.
            _ if in_secret => {}
            _ => {
                out.push(delimiter);
                out.push_str(segment);
            }
        }
    }
    out
}

/// Replaces the value of every key named in [`SECRET_KEYS`] in libpq's key/value form:
/// `key = value` pairs apart by whitespace, a value quoted in `'…'` or bare, with `\`
/// escaping the next character in both.
fn redact_key_value_passwords(text: &str) -> String {
    let bytes = text.as_bytes();
    let is_space = |b: u8| b.is_ascii_whitespace();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if is_space(bytes[i]) {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !is_space(bytes[i]) {
            i += 1;
        }
        let key_end = i;
        let mut j = i;
        while j < bytes.len() && is_space(bytes[j]) {
            j += 1;
        }
        if j == bytes.len() || bytes[j] != b'=' {
            // A word that is not a key: copied; the scan resumes after it.
            out.extend_from_slice(&bytes[key_start..key_end]);
            continue;
        }
        j += 1;
        while j < bytes.len() && is_space(bytes[j]) {
            j += 1;
        }
        let value_start = j;
        if j < bytes.len() && bytes[j] == b'\'' {
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j += 1;
        } else {
            while j < bytes.len() && !is_space(bytes[j]) {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
        }
        let value_end = j.min(bytes.len());
        out.extend_from_slice(&bytes[key_start..value_start]);
        if is_secret_key(&text[key_start..key_end]) {
            out.extend_from_slice(MASK.as_bytes());
        } else {
            out.extend_from_slice(&bytes[value_start..value_end]);
        }
        i = value_end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `key` can name a parameter (`sslmode`, `options[search_path]`, `pass%77ord`).
fn looks_like_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.%+[]".contains(&b))
}

/// Whether `key`, percent-decoded and in any case, is one of [`SECRET_KEYS`].
fn is_secret_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(hi), Some(lo)) = (hex(hi), hex(lo))
        {
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            decoded.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let decoded = decoded.trim();
    SECRET_KEYS
        .iter()
        .any(|secret| decoded.eq_ignore_ascii_case(secret))
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

    /// Each form a password can take: (url, the secret, what must stay readable).
    const FORMS: &[(&str, &str, &[&str])] = &[
        // A query password holding `?name=`: one value to the parser (found by review).
        (
            "postgres://db/q?password=ab?cd=ef&sslmode=require",
            "cd=ef",
            &["db/q", "sslmode=require"],
        ),
        // In the userinfo, plain or with characters that end an authority when unescaped.
        (
            "postgres://app:plainsecret@db:5432/q",
            "plainsecret",
            &["app", "db:5432", "/q"],
        ),
        ("postgres://app:pa/ss@db/q", "pa/ss", &["app", "@db", "/q"]),
        (
            "postgres://app:pa/ss/deep@db/q",
            "ss/deep",
            &["app", "@db", "/q"],
        ),
        (
            "postgres://app:pa?ss@db/q?sslmode=require",
            "pa?ss",
            &["@db", "/q", "sslmode=require"],
        ),
        (
            "postgres://app:pa#ss@db:6432/q",
            "pa#ss",
            &["@db:6432", "/q"],
        ),
        (
            "postgres://app:p@ss/w?rd#x@db/q",
            "ss/w?rd#x",
            &["app", "@db", "/q"],
        ),
        (
            "postgresql://app:hunter2@db/q?application_name=me@work",
            "hunter2",
            &["postgresql://app"],
        ),
        ("postgres://:onlysecret@db/q", "onlysecret", &["@db", "/q"]),
        // As a query parameter, first or later, any case, ssl key passphrases too.
        (
            "postgres://app@db/q?password=qsecret",
            "qsecret",
            &["app@db", "/q"],
        ),
        (
            "postgres://db/q?sslmode=require&password=qsecret&application_name=x",
            "qsecret",
            &["db/q", "sslmode=require", "application_name=x"],
        ),
        ("postgres://db/q?PassWord=qsecret", "qsecret", &["db/q"]),
        (
            "postgres://db/q?sslpassword=keysecret&sslmode=verify-full",
            "keysecret",
            &["db/q", "sslmode=verify-full"],
        ),
        (
            "postgres://db/q?SSLPASSWORD=keysecret",
            "keysecret",
            &["db/q"],
        ),
        (
            "postgres://db/q?pass%77ord=encsecret",
            "encsecret",
            &["db/q"],
        ),
        (
            "postgres://db/q?password=with/slash@and?more#frag",
            "slash@and?more#frag",
            &["db/q"],
        ),
        (
            "postgres://db/q?password=amp&ersand&sslmode=require",
            "ersand",
            &["db/q", "sslmode=require"],
        ),
        ("postgres://db:5432/q?password=x@y", "x@y", &["db"]),
        ("postgres://db/q?password=s:ec@ret", "s:ec", &["db/q"]),
        // Both at once.
        (
            "postgres://app:first@db/q?password=second",
            "first",
            &["@db", "/q"],
        ),
        (
            "postgres://app:first@db/q?password=second",
            "second",
            &["@db", "/q"],
        ),
        // libpq's key/value form, which sqlx refuses, so it reaches an error message.
        (
            "host=db dbname=q password=kvsecret",
            "kvsecret",
            &["host=db", "dbname=q"],
        ),
        (
            "host=db password = 'kv secret\\' more' dbname=q",
            "secret",
            &["host=db", "dbname=q"],
        ),
        (
            "host=db PASSWORD=kvsecret sslpassword=kvkey",
            "kvkey",
            &["host=db"],
        ),
    ];

    #[test]
    fn every_password_form_is_redacted_and_the_rest_stays_readable() {
        for (url, secret, kept) in FORMS {
            let shown = redact_url(url);
            assert!(
                !shown.contains(secret),
                "{url:?} leaked {secret:?}: {shown:?}"
            );
            assert!(shown.contains("***"), "{url:?}: {shown:?}");
            for part in *kept {
                assert!(shown.contains(part), "{url:?} lost {part:?}: {shown:?}");
            }
        }
    }

    #[test]
    fn urls_without_passwords_are_unchanged() {
        for url in [
            "postgres://root@127.0.0.1:5432/test",
            "postgres://db/q?sslmode=require&application_name=worker",
            "postgres:///test?host=/var/run/postgresql",
            "postgres://db/q?application_name=me@work",
            "postgres://db/q?passwords_are_not_this=1",
            "host=db dbname=q user=app",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
