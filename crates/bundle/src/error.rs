//! Errors from reading a bundle. Every message names the file, blob or image at fault,
//! so a person can act on it.

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bundle itself is broken, hostile or unsupported: fail it, do not retry.
    Invalid,
    /// The bundle file could not be read from the store (I/O): retrying may help.
    Io,
    /// The work was called off (the bundle was deleted meanwhile).
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the bundle file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unsupported bundle format: {0} (ShipperD reads squashfs, and tar plain or compressed with gzip, zstd or xz)"
    )]
    Unsupported(crate::Format),
    #[error("unsafe bundle: {0}")]
    Hostile(String),
    #[error("corrupt bundle: {0}")]
    Corrupt(String),
    #[error("not a readable squashfs image: {0}")]
    Squashfs(String),
    #[error("{0} is missing from the bundle")]
    Missing(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("cannot read {path} from the bundle: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is {size} bytes, over the limit of {limit}")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{path} is not valid JSON of the expected shape: {reason}")]
    Json { path: String, reason: String },
    #[error("blob {digest} of image {image}: {problem}")]
    Blob {
        image: String,
        digest: String,
        problem: String,
    },
    #[error("image {image}: {problem}")]
    Image { image: String, problem: String },
    #[error("invalid bundle layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Parse(#[from] shipperd_model::ParseError),
    #[error("reading the bundle was called off (it was deleted)")]
    Cancelled,
    #[error(
        "no room to expand the bundle: the data volume has {free} bytes free and keeps {reserve} \
         free (--min-free-bytes); free some space, then retry the bundle"
    )]
    NoRoom { free: u64, reserve: u64 },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Invalid,
        }
    }

    pub(crate) fn read(path: &str, e: impl std::fmt::Display) -> Self {
        Error::Read {
            path: path.to_string(),
            reason: e.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
