//! The content-addressed blob store for compressed bundles: `<data>/cas/blobs/sha256/<hex>`.
//!
//! A gzip, zstd or xz bundle cannot be read at random, so its blobs are expanded once,
//! each verified against its digest as it is written, and shared by every bundle that
//! holds them. `cas/refs/<bundle-id>` lists the blobs a bundle needs; when the bundle is
//! finished its refs go and [`Cas::collect`] deletes every blob no bundle lists.
//! Expansion holds a shared lock on `cas/lock` while it writes blobs and its refs;
//! collection takes the lock exclusively, so it never deletes a blob being claimed.

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

use crate::{DataDir, Error, Result};

/// Bytes written between two checks of the room left.
pub const ROOM_EVERY: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct Cas {
    data: DataDir,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What [`Cas::collect`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub blobs_removed: u64,
    pub bytes_removed: u64,
    pub blobs_kept: u64,
}

/// A shared hold on the store, taken while a bundle is being expanded.
pub struct Claim {
    _lock: File,
    refs: PathBuf,
    claimed: Vec<String>,
}

impl Claim {
    /// Writes the bundle's refs (all blobs it claimed), replacing earlier ones.
    pub fn commit(self) -> Result<()> {
        let tmp = self.refs.with_extension("tmp");
        let mut body = self.claimed.join("\n");
        body.push('\n');
        fs::write(&tmp, body).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &self.refs).map_err(io_err(&self.refs))
    }
}

impl Cas {
    pub fn new(data: &DataDir) -> Self {
        Cas { data: data.clone() }
    }

    /// The directory blobs are written to (on the data volume).
    pub fn dir(&self) -> PathBuf {
        self.data.cas_tmp()
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.data.cas_blob(hex)
    }

    fn lock_file(&self) -> Result<File> {
        for d in [
            self.data.cas_blobs(),
            self.data.cas_refs_dir(),
            self.data.cas_tmp(),
        ] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let p = self.data.cas_lock();
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    /// Claims more blobs for `bundle_id`, keeping those it claimed already (its refs are
    /// rewritten with both on commit).
    pub fn claim_more(&self, bundle_id: &str) -> Result<Claim> {
        let mut claim = self.claim(bundle_id)?;
        match fs::read_to_string(&claim.refs) {
            Ok(body) => claim
                .claimed
                .extend(body.lines().filter(|l| !l.is_empty()).map(str::to_string)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&claim.refs)(e)),
        }
        Ok(claim)
    }

    /// Starts claiming blobs for `bundle_id` (a shared lock until the claim is dropped).
    pub fn claim(&self, bundle_id: &str) -> Result<Claim> {
        let lock = self.lock_file()?;
        let p = self.data.cas_lock();
        lock.lock_shared().map_err(io_err(&p))?;
        Ok(Claim {
            _lock: lock,
            refs: self.data.cas_refs(bundle_id),
            claimed: Vec::new(),
        })
    }

    /// Stores `size` bytes from `reader` as blob `hex`, checking the digest; the blob is
    /// claimed for the bundle. Reading continues through a blob already stored (the
    /// stream must be consumed anyway) and checks it the same way. `room` is asked
    /// before writing and every [`ROOM_EVERY`] bytes (is there room left, is the work
    /// still wanted?); its error ends the put, nothing of the blob kept.
    pub fn put(
        &self,
        claim: &mut Claim,
        hex: &str,
        size: u64,
        reader: &mut dyn Read,
        member: &str,
        room: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        self.store(claim, Some(hex), size, reader, member, room)
            .map(drop)
    }

    /// Stores `size` bytes from `reader` under the digest they hash to, which is
    /// returned (a file whose name does not say its digest: a `docker save` archive's
    /// layer). Otherwise as [`Self::put`].
    pub fn put_hashed(
        &self,
        claim: &mut Claim,
        size: u64,
        reader: &mut dyn Read,
        member: &str,
        room: &dyn Fn() -> Result<()>,
    ) -> Result<String> {
        self.store(claim, None, size, reader, member, room)
    }

    /// Stores what `reader` gives, whatever its length, under the digest it hashes to
    /// (bytes ShipperD makes: a layer it compressed); returns the hex and the length.
    pub fn put_stream(
        &self,
        claim: &mut Claim,
        reader: &mut dyn Read,
        what: &str,
        room: &dyn Fn() -> Result<()>,
    ) -> Result<(String, u64)> {
        let mut counted = Counting {
            inner: reader,
            n: 0,
        };
        let hex = self.store(claim, None, None, &mut counted, what, room)?;
        Ok((hex, counted.n))
    }

    fn store(
        &self,
        claim: &mut Claim,
        expect: Option<&str>,
        size: impl Into<Option<u64>>,
        reader: &mut dyn Read,
        member: &str,
        room: &dyn Fn() -> Result<()>,
    ) -> Result<String> {
        let size = size.into();
        // Known digest: nothing is written when the store has it already.
        let have = expect.is_some_and(|hex| self.blob_path(hex).exists());
        let tmp = self
            .data
            .cas_tmp()
            .join(format!(
                "{}.{}",
                expect.unwrap_or("new"),
                std::process::id()
            ))
            .with_extension(format!("{:x}", rand_suffix()));
        let mut out: Box<dyn Write> = if have {
            Box::new(io::sink())
        } else {
            Box::new(io::BufWriter::with_capacity(
                1 << 20,
                File::create(&tmp).map_err(io_err(&tmp))?,
            ))
        };
        let result = (|| {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            room()?;
            loop {
                let n = reader.read(&mut buf).map_err(|e| Error::read(member, e))?;
                if n == 0 {
                    break;
                }
                if (total % ROOM_EVERY) + n as u64 >= ROOM_EVERY {
                    room()?;
                }
                total += n as u64;
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
            }
            out.flush().map_err(io_err(&tmp))?;
            drop(out);
            let actual = hex::encode(hasher.finalize());
            if let Some(size) = size
                && total != size
            {
                return Err(Error::read(
                    member,
                    format!(
                        "the archive says {size} bytes, {total} could be read: the bundle is truncated"
                    ),
                ));
            }
            if let Some(hex) = expect
                && actual != hex
            {
                return Err(Error::Hostile(format!(
                    "blob file {member} is named for sha256:{hex} but its content hashes to sha256:{actual}"
                )));
            }
            if !have {
                let dest = self.blob_path(&actual);
                if dest.exists() {
                    let _ = fs::remove_file(&tmp);
                } else {
                    File::open(&tmp)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err(&tmp))?;
                    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
                }
            }
            Ok(actual)
        })();
        if result.is_err() && !have {
            let _ = fs::remove_file(&tmp);
        }
        let hex = result?;
        claim.claimed.push(hex.clone());
        Ok(hex)
    }

    /// Forgets every bundle's claims (a cache whose owner starts again and claims
    /// what it still needs); the next [`Self::collect`] deletes the rest.
    pub fn forget_all(&self) -> Result<()> {
        let refs = self.data.cas_refs_dir();
        let entries = match fs::read_dir(&refs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&refs)(e)),
        };
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(())
    }

    /// Forgets the blobs `bundle_id` claimed (it is finished).
    pub fn release(&self, bundle_id: &str) -> Result<()> {
        let p = self.data.cas_refs(bundle_id);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&p)(e)),
            _ => Ok(()),
        }
    }

    /// A bundle is finished: [`Self::release`] its blobs, then [`Self::collect`]. Errors
    /// are logged, not returned: a later collection catches up.
    pub fn finish(&self, bundle_id: &str) {
        match self.release(bundle_id).and_then(|()| self.collect()) {
            Ok(Some(c)) if c.blobs_removed > 0 => tracing::info!(
                removed = c.blobs_removed,
                bytes = c.bytes_removed,
                kept = c.blobs_kept,
                "blob store collected"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, bundle_id, "cannot collect the blob store"),
        }
    }

    /// Deletes every blob (and stray temp file) no bundle claims. Returns `None` when an
    /// expansion holds the store: the next collection will do it.
    pub fn collect(&self) -> Result<Option<Collected>> {
        let lock = self.lock_file()?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&self.data.cas())(e)),
        }
        let mut live = HashSet::new();
        let refs = self.data.cas_refs_dir();
        for e in fs::read_dir(&refs).map_err(io_err(&refs))? {
            let p = e.map_err(io_err(&refs))?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                continue;
            }
            let body = fs::read_to_string(&p).map_err(io_err(&p))?;
            live.extend(body.lines().map(str::to_string));
        }
        let tmp = self.data.cas_tmp();
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let mut done = Collected::default();
        let blobs = self.data.cas_blobs();
        for e in fs::read_dir(&blobs).map_err(io_err(&blobs))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                done.blobs_kept += 1;
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(e.path()).is_ok() {
                done.blobs_removed += 1;
                done.bytes_removed += size;
            }
        }
        Ok(Some(done))
    }
}

struct Counting<'a> {
    inner: &'a mut dyn Read,
    n: u64,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

pub(crate) fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A temp file beside `path`, its own (two writers never share one).
pub(crate) fn temp_beside(path: &std::path::Path) -> std::path::PathBuf {
    path.with_extension(format!("{}.{:x}.tmp", std::process::id(), rand_suffix()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_checked_shared_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::new(&DataDir::new(dir.path()));
        let data = b"hello blob";
        let hex = hex::encode(Sha256::digest(data));
        let mut a = cas.claim("a").unwrap();
        cas.put(&mut a, &hex, 10, &mut &data[..], "x", &|| Ok(()))
            .unwrap();
        let bad = hex::encode(Sha256::digest(b"other"));
        let e = cas.put(
            &mut a,
            &bad,
            10,
            &mut &data[..],
            "blobs/sha256/bad",
            &|| Ok(()),
        );
        assert!(e.unwrap_err().to_string().contains("hashes to"));
        assert!(!cas.blob_path(&bad).exists());
        // By what it hashes to: the same blob, stored once.
        let got = cas
            .put_hashed(&mut a, 10, &mut &data[..], "x/layer.tar", &|| Ok(()))
            .unwrap();
        assert_eq!(got, hex);
        assert!(
            cas.put_hashed(&mut a, 9, &mut &data[..], "x", &|| Ok(()))
                .is_err()
        );
        assert!(
            cas.put(&mut a, &hex, 11, &mut &data[..], "x", &|| Ok(()))
                .is_err()
        );
        a.commit().unwrap();
        let mut b = cas.claim("b").unwrap();
        cas.put(&mut b, &hex, 10, &mut &data[..], "x", &|| Ok(()))
            .unwrap();
        // b holds the lock: no collection now.
        assert_eq!(cas.collect().unwrap(), None);
        b.commit().unwrap();
        cas.release("a").unwrap();
        assert_eq!(cas.collect().unwrap().unwrap().blobs_kept, 1);
        cas.release("b").unwrap();
        let c = cas.collect().unwrap().unwrap();
        assert_eq!((c.blobs_removed, c.bytes_removed), (1, 10));
        assert!(!cas.blob_path(&hex).exists());
    }
}
