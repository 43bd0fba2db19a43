//! The bus error type. Callers branch on [`Error::kind`] (retry or give up), never on text.

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// NATS was unreachable or timed out: retrying later may succeed.
    Transient,
    /// The data is malformed or the request can never succeed: do not retry.
    Permanent,
    /// A compare-and-set lost too many races in a row.
    Conflict,
    /// A record that should exist does not.
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{0} is not known")]
    NotFound(String),
    #[error("bundle {0} was changed concurrently too many times; giving up this update")]
    Conflict(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Nats(_) => ErrorKind::Transient,
            Error::Decode { .. } => ErrorKind::Permanent,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_) => ErrorKind::Conflict,
        }
    }

    pub fn nats(e: impl std::fmt::Display) -> Self {
        Error::Nats(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
