//! What went wrong talking to a registry, and whether trying again could help.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an unexpected status; `detail` holds its error codes
    /// and messages, `codes` the codes alone (`MANIFEST_BLOB_UNKNOWN`, ...).
    #[error("{host} answered {status}{detail}")]
    Status {
        host: String,
        status: u16,
        detail: String,
        codes: Vec<String>,
        retry_after: Option<Duration>,
    },
    /// The connection failed (refused, reset, cut mid-body); `cause` is the innermost
    /// reason (e.g. "Connection refused (os error 111)").
    #[error("connection to {host} failed: {detail}")]
    Transport {
        host: String,
        detail: String,
        cause: String,
    },
    /// Nothing moved for the stall timeout.
    #[error("no progress for {0:?}: the transfer stalled")]
    Stalled(Duration),
    /// The registry asked to log in again in the middle of a body that cannot be sent
    /// twice: the caller sends it again.
    #[error("the registry asked to log in again")]
    Relogin,
    /// The target's TLS settings (CA bundle) cannot be used.
    #[error("TLS settings: {0}")]
    Tls(String),
    /// The credentials were refused (or the registry wants some and the target has
    /// none): trying again will not help.
    #[error("login to {host} refused{}: {message}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    AuthDenied {
        host: String,
        status: Option<u16>,
        message: String,
    },
    /// The token service could not be reached or failed (it may recover).
    #[error("cannot log in to {host}: {message}")]
    AuthUnavailable { host: String, message: String },
    /// The registry said something the distribution protocol does not allow.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// Reading the blob from the bundle failed (the volume may recover).
    #[error("reading the bundle: {0}")]
    Read(String),
    /// The bundle's bytes are not what its digest says: nothing was committed.
    #[error("{0}")]
    Changed(String),
    /// A differential bundle leaves out a blob or manifest that the registry does not
    /// have either.
    #[error("{0}")]
    Missing(String),
    /// A bug: a reader thread panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A failed read of a blob's bytes, carried through the HTTP client as the request
/// body's error and recognised again by type.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The bytes are not the blob's (short, or another digest).
    #[error("{0}")]
    Changed(String),
    /// The bundle could not be read.
    #[error("{0}")]
    Unreadable(String),
    /// The reader panicked.
    #[error("{0}")]
    Panicked(String),
}

impl BodyError {
    pub(crate) fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

/// Statuses worth asking again (after a delay): the registry is busy or broken for now.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || status >= 500
}

/// The registry's code for a manifest naming a blob the repository does not link.
pub(crate) const MANIFEST_BLOB_UNKNOWN: &str = "MANIFEST_BLOB_UNKNOWN";

impl RegistryError {
    /// Could the same request succeed later? 429, 5xx, timeouts and broken connections
    /// may heal; a refusal (400, 401 after logging in again, 403, 404, 413, ...), a
    /// corrupt blob or bad TLS settings will not.
    pub fn is_transient(&self) -> bool {
        match self {
            // Every blob goes up before its manifest, so a blob the registry does not
            // know then was lost in a race (docker-registry 2.8 rewrites a link file in
            // place, and a concurrent read can miss it): pushing the image again heals.
            RegistryError::Status { codes, .. }
                if codes.iter().any(|c| c == MANIFEST_BLOB_UNKNOWN) =>
            {
                true
            }
            RegistryError::Status { status, .. } => retryable_status(*status),
            RegistryError::Transport { .. }
            | RegistryError::Stalled(_)
            | RegistryError::AuthUnavailable { .. }
            | RegistryError::Relogin
            | RegistryError::Protocol(_)
            | RegistryError::Read(_) => true,
            RegistryError::Changed(_)
            | RegistryError::Missing(_)
            | RegistryError::Tls(_)
            | RegistryError::AuthDenied { .. }
            | RegistryError::Internal(_) => false,
        }
    }

    /// Worth retrying at once (after a backoff) within the same job.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => retryable_status(*status),
            RegistryError::Transport { .. }
            | RegistryError::Stalled(_)
            | RegistryError::Relogin => true,
            _ => false,
        }
    }

    /// A blob upload the registry refused because the bytes do not hash to the digest
    /// (`DIGEST_INVALID`): the bundle's copy is corrupt. Anything else unchanged.
    pub(crate) fn for_blob(self, digest: &shipperd_model::Digest) -> Self {
        match self {
            RegistryError::Status {
                host,
                status: 400,
                codes,
                ..
            } if codes.iter().any(|c| c == "DIGEST_INVALID") => RegistryError::Changed(format!(
                "blob {digest} is corrupt in the bundle: {host} found that its bytes do not \
                 hash to it (DIGEST_INVALID)"
            )),
            other => other,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The failure without what is particular to one image or blob, so that the
    /// failures of many images group under one cause.
    pub fn cause(&self) -> String {
        match self {
            RegistryError::Status {
                host,
                status,
                detail,
                ..
            } => format!("{host} answered {status}{detail}"),
            RegistryError::Transport { host, cause, .. } => {
                format!("connection to {host} failed: {cause}")
            }
            RegistryError::Stalled(d) => format!("transfers stalled (no progress for {d:?})"),
            RegistryError::Relogin => "the registry kept asking to log in again".into(),
            RegistryError::Tls(m) => format!("TLS settings: {m}"),
            RegistryError::AuthDenied { host, status, .. } => format!(
                "login to {host} refused{}",
                status.map(|s| format!(" ({s})")).unwrap_or_default()
            ),
            RegistryError::AuthUnavailable { host, .. } => format!("cannot log in to {host}"),
            RegistryError::Protocol(_) => "the registry broke the distribution protocol".into(),
            RegistryError::Read(_) => "cannot read the stored bundle".into(),
            // A defect of the bundle: what to act on is the blob itself.
            RegistryError::Changed(m) | RegistryError::Missing(m) => m.clone(),
            RegistryError::Internal(m) => format!("internal error: {m}"),
        }
    }

    /// A failed request, from the HTTP client's error: a body that failed because the
    /// bundle's bytes are wrong or unreadable says so; anything else is the connection.
    pub(crate) fn transport(e: reqwest::Error) -> Self {
        use std::error::Error as _;
        let host = e
            .url()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_string(),
                })
            })
            .unwrap_or_else(|| "the registry".into());
        // The URL can carry an upload session's state (`?_state=...`, signed by the
        // registry): the host says where, and the status and events never show it.
        let e = e.without_url();
        let mut detail = e.to_string();
        let mut cause = detail.clone();
        let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
        while let Some(s) = src {
            let body = s.downcast_ref::<BodyError>().or_else(|| {
                s.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<BodyError>())
            });
            match body {
                Some(BodyError::Changed(m)) => return RegistryError::Changed(m.clone()),
                Some(BodyError::Unreadable(m)) => return RegistryError::Read(m.clone()),
                Some(BodyError::Panicked(m)) => return RegistryError::Internal(m.clone()),
                None => {}
            }
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            cause = s.to_string();
            src = s.source();
        }
        RegistryError::Transport {
            host,
            detail,
            cause,
        }
    }
}

/// `Retry-After` as seconds or an HTTP date, capped at five minutes.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate(v)?,
    };
    Some(d.min(Duration::from_secs(300)))
}

fn httpdate(v: &str) -> Option<Duration> {
    let at = humantime::parse_rfc3339_weak(&rfc1123_to_rfc3339(v)?).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → `1994-11-06 08:49:37`.
fn rfc1123_to_rfc3339(v: &str) -> Option<String> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x == mon)? + 1;
    Some(format!("{year}-{m:02}-{day:0>2} {time}"))
}

/// The registry's error codes and messages from a JSON error body
/// (`": DIGEST_INVALID: ..."`), and the codes alone.
pub(crate) fn detail(body: &[u8]) -> (String, Vec<String>) {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => (
            e.errors
                .iter()
                .map(|e| format!(": {}: {}", e.code, e.message))
                .collect(),
            e.errors.into_iter().map(|e| e.code).collect(),
        ),
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            let text = text.trim();
            if text.is_empty() {
                (String::new(), Vec::new())
            } else {
                (format!(": {text}"), Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "99999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(300)));
    }

    #[test]
    fn error_bodies() {
        let b =
            br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match"}]}"#;
        assert_eq!(
            detail(b),
            (
                ": DIGEST_INVALID: provided digest did not match".to_string(),
                vec!["DIGEST_INVALID".to_string()]
            )
        );
        assert_eq!(detail(b""), (String::new(), vec![]));
    }
}
