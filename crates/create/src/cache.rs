//! The cache directory (`--cache-dir`): every manifest and blob fetched, by digest, so
//! a create that was stopped (killed, a lost connection, a full disk) and run again
//! fetches only what it had not stored, and a later create of a similar set fetches
//! only what changed.
//!
//! - `blobs/sha256/<hex>`: complete and checked against its digest before it was moved
//!   here (a rename: a file here is whole);
//! - `partial/<hex>`: a blob being downloaded; the next run resumes it with `Range`.
//!
//! The files are read again and checked when the bundle is written, so a file damaged
//! in the cache (a crash before the disk wrote it) fails that run with its name, is
//! removed, and is fetched again by the next.

use std::path::{Path, PathBuf};

use shipperd_model::Digest;

use crate::{Error, Result};

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache at `root`, made when missing.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["blobs/sha256", "partial"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the whole, checked file of `digest` is (or would be).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Where a download of `digest` in progress is kept.
    pub fn partial(&self, digest: &Digest) -> PathBuf {
        self.root.join("partial").join(digest.hex())
    }

    /// Is `digest` here, whole (`size` bytes)?
    pub fn has(&self, digest: &Digest, size: u64) -> bool {
        std::fs::metadata(self.path(digest)).is_ok_and(|m| m.len() == size)
    }

    /// Keeps `bytes` (already checked to be `digest`'s).
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let tmp = self.partial(digest);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        self.commit(digest)
    }

    /// Moves the finished, checked download of `digest` into place.
    pub fn commit(&self, digest: &Digest) -> Result<()> {
        let (from, to) = (self.partial(digest), self.path(digest));
        std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))
    }

    /// The bytes of `digest` (a manifest), checked.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let p = self.path(digest);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        if Digest::of(&bytes) != *digest {
            let _ = std::fs::remove_file(&p);
            return Err(Error::Damaged(p.display().to_string()));
        }
        Ok(bytes)
    }

    /// Removes `digest`'s file (found damaged).
    pub fn forget(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.path(digest));
    }
}
