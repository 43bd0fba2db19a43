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
//! removed, and is fetched again by the next. One create uses a cache at a time (an
//! exclusive `flock` on `lock`, released when the process ends however it ends).

use std::path::{Path, PathBuf};

use shipperd_model::Digest;

use crate::{Error, Result};

pub struct Cache {
    root: PathBuf,
    /// Held while this process uses the cache.
    _lock: std::fs::File,
}

/// Distinguishes the temporary files of small writes (two images may share a manifest
/// and keep it at the same moment).
static TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Cache {
    /// The cache at `root`, made when missing; refused while another process uses it.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["blobs/sha256", "partial"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        let lp = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lp)
            .map_err(|e| Error::io(&lp, e))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(Error::Input(format!(
                "another shipperd create is using the cache {}: wait for it, or give another --cache-dir",
                root.display()
            )));
        }
        // Small writes a stopped run left half done (blobs' partial files are resumed).
        if let Ok(dir) = std::fs::read_dir(root.join("partial")) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Cache {
            root: root.to_path_buf(),
            _lock: lock,
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
        let n = TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .root
            .join("partial")
            .join(format!("{}.{n}.tmp", digest.hex()));
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        let to = self.path(digest);
        std::fs::rename(&tmp, &to).map_err(|e| Error::io(&to, e))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_create_uses_a_cache_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Cache::open(dir.path()).unwrap();
        let err = Cache::open(dir.path())
            .err()
            .expect("the second is refused");
        assert!(err.to_string().contains("another shipperd create"), "{err}");
        std::fs::write(dir.path().join("partial/x.1.tmp"), b"half").unwrap();
        drop(first);
        let _again = Cache::open(dir.path()).unwrap();
        assert!(
            !dir.path().join("partial/x.1.tmp").exists(),
            "left-over writes go"
        );
    }
}
