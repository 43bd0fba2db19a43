//! What went wrong talking to a registry, and whether trying again could help.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an unexpected status; `detail` holds its error codes.
    #[error("{status}{detail}")]
    Status {
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The connection failed (refused, reset, cut mid-body).
    #[error("connection failed: {0}")]
    Transport(String),
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
    /// Logging in failed.
    #[error("authentication: {0}")]
    Auth(String),
    /// The registry said something the distribution protocol does not allow.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// Reading the blob from the bundle failed (the volume may recover).
    #[error("reading the bundle: {0}")]
    Read(String),
    /// The bundle's bytes are not what its digest says: nothing was committed.
    #[error("{0}")]
    Changed(String),
}

impl RegistryError {
    /// Could the same request succeed later?
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => {
                matches!(status, 401 | 403 | 404 | 408 | 409 | 429) || *status >= 500
            }
            RegistryError::Transport(_)
            | RegistryError::Stalled(_)
            | RegistryError::Auth(_)
            | RegistryError::Relogin
            | RegistryError::Protocol(_)
            | RegistryError::Read(_) => true,
            RegistryError::Changed(_) | RegistryError::Tls(_) => false,
        }
    }

    /// Worth retrying at once (after a backoff) within the same job.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => matches!(status, 408 | 429) || *status >= 500,
            RegistryError::Transport(_) | RegistryError::Stalled(_) | RegistryError::Relogin => {
                true
            }
            _ => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn transport(e: reqwest::Error) -> Self {
        use std::error::Error as _;
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        RegistryError::Transport(msg)
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

/// The registry's error codes from a JSON error body: `": DIGEST_INVALID: ..."`.
pub(crate) fn detail(body: &[u8]) -> String {
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
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| format!(": {}: {}", e.code, e.message))
            .collect(),
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            let text = text.trim();
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
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
        assert_eq!(detail(b), ": DIGEST_INVALID: provided digest did not match");
        assert_eq!(detail(b""), "");
    }
}
