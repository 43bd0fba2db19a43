//! What can go wrong with a stored bundle, and (with the `axum` feature) the HTTP
//! status each maps to.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid bundle name {0:?}: use 1-200 characters from A-Z a-z 0-9 . _ -, not starting with '.'"
    )]
    BadName(String),
    #[error("invalid sha256 {0:?}: expected 64 hex characters")]
    BadChecksum(String),
    #[error(
        "checksum mismatch: the upload hashes to {actual}, the request said {expected}; nothing was kept"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("bundle is larger than the limit of {limit} bytes; nothing was kept")]
    TooLarge { limit: u64 },
    #[error("the upload was cut off after {received} bytes ({reason}); nothing was kept")]
    Incomplete { received: u64, reason: String },
    #[error("the upload was too slow and was cut ({0}); nothing was kept")]
    TooSlow(String),
    /// A body stream broke (becomes [`Error::Incomplete`] with the bytes received).
    #[error("{0}")]
    Stream(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}; nothing was kept")]
    NoSpace(String),
    #[error("the bundle is empty")]
    Empty,
    #[error("multi-part upload: {0}")]
    BadPart(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no bundle with id {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("bundle store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
}

impl Error {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Could the same request succeed later (NATS or the disk was in trouble)? A bus
    /// error says so by its kind (a malformed or missing record will not heal).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Bus(e) => e.is_transient(),
            Error::Io { .. } => true,
            _ => false,
        }
    }

    #[cfg(feature = "axum")]
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            Error::BadName(_)
            | Error::BadChecksum(_)
            | Error::ChecksumMismatch { .. }
            | Error::Incomplete { .. }
            | Error::BadPart(_)
            | Error::BadRequest(_)
            | Error::Empty => StatusCode::BAD_REQUEST,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Stream(_) => StatusCode::BAD_REQUEST,
            Error::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Io { source, .. } if is_enospc(source) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Gone(_) => StatusCode::GONE,
            Error::Bus(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            Error::Bus(e) if e.kind() == shipperd_bus::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            Error::Bus(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Is `e` "no space left on device"?
pub fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = axum::Json(serde_json::json!({ "error": self.to_string() }));
        if status == axum::http::StatusCode::SERVICE_UNAVAILABLE {
            return (status, [(axum::http::header::RETRY_AFTER, "5")], body).into_response();
        }
        (status, body).into_response()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
