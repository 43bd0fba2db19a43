//! The bundle store: `<data_dir>/bundles/<id>/bundle`, written once.
//!
//! Uploads stream into `<data_dir>/tmp/` while being hashed, are fsynced, then renamed
//! into place (same filesystem, so the rename is atomic: a stored bundle is always whole).
//! A temp file is removed whenever an upload does not complete.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use shipperd_bus::{
    BundleRecord, Bus, EventKind, Phase, StateStore,
    event::{encode, event_id},
};
use shipperd_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result, metrics::METRICS};

/// Result of taking a bundle in.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub record: BundleRecord,
    /// `false` when the bundle was known already (same bytes, same id).
    pub created: bool,
}

pub struct Store {
    bus: Bus,
    state: StateStore,
    data_dir: PathBuf,
    tmp_dir: PathBuf,
    max_bytes: u64,
}

/// Removes a temp file unless the upload completed.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a bundle is stored, relative to the data directory.
pub fn bundle_path(id: &str) -> String {
    format!("bundles/{id}/bundle")
}

/// Where a multi-part bundle's parts are stored, relative to the data directory.
pub fn parts_path(id: &str) -> String {
    format!("bundles/{id}/parts")
}

/// Most parts one multi-part bundle may have.
pub const MAX_PARTS: u32 = 9999;
/// Checksums of the parts received so far, beside them until completion.
const SUMS_DIR: &str = ".sums";

/// A part of a multi-part upload, taken in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Part {
    pub n: u32,
    pub sha256: String,
    pub size: u64,
}

fn check_expected(expected: Option<&str>, actual: &str) -> Result<()> {
    match expected {
        Some(e) if e != actual => Err(Error::ChecksumMismatch {
            expected: e.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=200).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

pub fn parse_checksum(s: &str) -> Result<String> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_prefix("sha256:").unwrap_or(&s).to_string();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(Error::BadChecksum(s))
    }
}

async fn restore(from: &Path, to: &Path) {
    if let Err(error) = tokio::fs::rename(from, to).await {
        tracing::error!(%error, from = %from.display(), to = %to.display(), "cannot put a dropped bundle back");
    }
}

impl Store {
    pub async fn open(bus: Bus, data_dir: &Path, max_bytes: u64) -> Result<Self> {
        let tmp_dir = data_dir.join("tmp");
        // Leftovers of uploads cut off by a crash are never whole bundles.
        if tmp_dir.exists() {
            tokio::fs::remove_dir_all(&tmp_dir)
                .await
                .map_err(|e| Error::io(&tmp_dir, e))?;
        }
        for d in [
            &tmp_dir,
            &data_dir.join("bundles"),
            &data_dir.join("uploads"),
        ] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| Error::io(d, e))?;
        }
        Ok(Store {
            state: bus.state().await?,
            bus,
            data_dir: data_dir.to_path_buf(),
            tmp_dir,
            max_bytes,
        })
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// A known bundle, if `expected` names one: lets a re-upload be answered before its
    /// body is read.
    pub async fn known(&self, id: &str) -> Result<Option<BundleRecord>> {
        Ok(self.state.get(id).await?.map(|(r, _)| r))
    }

    /// Takes a bundle in from a stream of chunks.
    pub async fn receive<S, E>(
        &self,
        name: &str,
        body: S,
        expected: Option<&str>,
        target: Option<&str>,
    ) -> Result<Accepted>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        validate_name(name)?;
        let tmp = TempFile {
            path: self.tmp_dir.join(format!("{}.part", uuid::Uuid::new_v4())),
            keep: false,
        };
        let (id, size) = self.write_stream(&tmp.path, body, self.max_bytes).await?;
        check_expected(expected, &id)?;
        METRICS.bytes_received.add(size);
        self.commit(name, tmp, id, size, target).await
    }

    /// Streams `body` into a new file at `path` (fsynced), hashing it; returns its sha256
    /// (hex) and size. Refuses empty bodies and bodies over `limit`.
    async fn write_stream<S, E>(
        &self,
        path: &Path,
        mut body: S,
        limit: u64,
    ) -> Result<(String, u64)>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::Incomplete {
                received: size,
                reason: e.to_string(),
            })?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(Error::TooLarge { limit });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| Error::io(path, e))?;
        }
        out.flush().await.map_err(|e| Error::io(path, e))?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(|e| Error::io(path, e))?;
        if size == 0 {
            return Err(Error::Empty);
        }
        Ok((hex::encode(hasher.finalize()), size))
    }

    /// Where the parts of the multi-part upload `name` wait for completion.
    fn upload_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("uploads").join(name)
    }

    /// Takes in part `n` (1-based) of the multi-part bundle `name`; a part sent again
    /// replaces the earlier one.
    pub async fn receive_part<S, E>(
        &self,
        name: &str,
        n: u32,
        body: S,
        expected: Option<&str>,
    ) -> Result<Part>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        validate_name(name)?;
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(Error::BadPart(format!(
                "part number {n} is outside 1..={MAX_PARTS}"
            )));
        }
        let dir = self.upload_dir(name);
        let sums = dir.join(SUMS_DIR);
        tokio::fs::create_dir_all(&sums)
            .await
            .map_err(|e| Error::io(&sums, e))?;
        let tmp = TempFile {
            path: self.tmp_dir.join(format!("{}.part", uuid::Uuid::new_v4())),
            keep: false,
        };
        let (sha256, size) = self.write_stream(&tmp.path, body, self.max_bytes).await?;
        check_expected(expected, &sha256)?;
        let part = dir.join(format!("{n:06}"));
        tokio::fs::write(sums.join(format!("{n:06}")), format!("{sha256} {size}\n"))
            .await
            .map_err(|e| Error::io(&sums, e))?;
        tokio::fs::rename(&tmp.path, &part)
            .await
            .map_err(|e| Error::io(&part, e))?;
        METRICS.bytes_received.add(size);
        Ok(Part { n, sha256, size })
    }

    /// Completes the multi-part upload `name` of `parts` parts: they become one bundle,
    /// read as their concatenation in part order. Its id is the sha256 of the list of
    /// part checksums (`shipperd-parts-v1`, then `<sha256> <size>` per part).
    pub async fn complete(&self, name: &str, parts: u32, target: Option<&str>) -> Result<Accepted> {
        validate_name(name)?;
        let dir = self.upload_dir(name);
        if !(1..=MAX_PARTS).contains(&parts) {
            return Err(Error::BadPart(format!(
                "parts={parts} is outside 1..={MAX_PARTS}"
            )));
        }
        let mut list = String::from("shipperd-parts-v1\n");
        let mut size = 0u64;
        for n in 1..=parts {
            let sum = tokio::fs::read_to_string(dir.join(SUMS_DIR).join(format!("{n:06}")))
                .await
                .map_err(|_| Error::BadPart(format!("part {n} of {name} has not been uploaded")))?;
            let bytes: u64 = sum
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            size += bytes;
            list.push_str(&sum);
        }
        let extra = dir.join(format!("{:06}", parts + 1));
        if tokio::fs::try_exists(&extra).await.unwrap_or(false) {
            return Err(Error::BadPart(format!(
                "{name} has a part {} but parts={parts} was given",
                parts + 1
            )));
        }
        let id = hex::encode(Sha256::digest(list.as_bytes()));
        let rel = parts_path(&id);
        let dest = self.data_dir.join(&rel);
        if !tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            let parent = dest.parent().expect("parts path has a parent");
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Error::io(parent, e))?;
            let _ = tokio::fs::remove_dir_all(dir.join(SUMS_DIR)).await;
            tokio::fs::rename(&dir, &dest)
                .await
                .map_err(|e| Error::io(&dest, e))?;
        } else {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        self.record(name, &id, size, rel, target).await
    }

    /// Takes in a file that is already on this machine (the drop directory): hashed in
    /// place, then moved into the store.
    pub async fn receive_file(
        &self,
        name: &str,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<Accepted> {
        let target = None;
        validate_name(name)?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).await.map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > self.max_bytes {
                return Err(Error::TooLarge {
                    limit: self.max_bytes,
                });
            }
            hasher.update(&buf[..n]);
        }
        if size == 0 {
            return Err(Error::Empty);
        }
        let id = hex::encode(hasher.finalize());
        check_expected(expected, &id)?;
        let mut tmp = TempFile {
            path: self.tmp_dir.join(format!("{}.part", uuid::Uuid::new_v4())),
            // The bytes are the user's only copy: on failure they go back, never away.
            keep: true,
        };
        if let Err(e) = tokio::fs::rename(path, &tmp.path).await {
            if e.kind() != std::io::ErrorKind::CrossesDevices {
                return Err(Error::io(path, e));
            }
            // The drop directory is on another filesystem: copy, then remove the original.
            tmp.keep = false;
            tokio::fs::copy(path, &tmp.path)
                .await
                .map_err(|e| Error::io(path, e))?;
            tokio::fs::remove_file(path)
                .await
                .map_err(|e| Error::io(path, e))?;
            tmp.keep = true;
        }
        let dest = match self.place(&mut tmp, &id).await {
            Ok(dest) => dest,
            Err(e) => {
                restore(&tmp.path, path).await;
                return Err(e);
            }
        };
        match self.record(name, &id, size, bundle_path(&id), target).await {
            Ok(a) => {
                // Known already: the stored copy stays, this one goes.
                tmp.keep = dest.is_some();
                METRICS.bytes_received.add(size);
                Ok(a)
            }
            Err(e) => {
                // Put the file back where the user left it, to be taken again later.
                restore(dest.as_deref().unwrap_or(&tmp.path), path).await;
                Err(e)
            }
        }
    }

    /// Moves a complete, hashed temp file into place and records the bundle.
    async fn commit(
        &self,
        name: &str,
        mut tmp: TempFile,
        id: String,
        size: u64,
        target: Option<&str>,
    ) -> Result<Accepted> {
        self.place(&mut tmp, &id).await?;
        self.record(name, &id, size, bundle_path(&id), target).await
    }

    /// Moves the temp file to `bundles/<id>/bundle`; returns that path if it moved it
    /// there (`None`: the same bytes were stored already, and the temp file is dropped).
    async fn place(&self, tmp: &mut TempFile, id: &str) -> Result<Option<PathBuf>> {
        let dest = self.data_dir.join(bundle_path(id));
        let dir = dest.parent().expect("bundle path has a parent");
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::io(dir, e))?;
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Ok(None);
        }
        tokio::fs::rename(&tmp.path, &dest)
            .await
            .map_err(|e| Error::io(&dest, e))?;
        tmp.keep = true;
        Ok(Some(dest))
    }

    /// Creates the bundle's record and announces it (or finds the existing one).
    async fn record(
        &self,
        name: &str,
        id: &str,
        size: u64,
        path: String,
        target: Option<&str>,
    ) -> Result<Accepted> {
        let mut record = BundleRecord::new(id.to_string(), name.to_string(), size, path);
        record.target = target.map(str::to_string);
        if self.state.create(&record).await? {
            tracing::info!(bundle_id = %id, name, size, "bundle received");
            METRICS.bundles_received.add(1);
            self.announce(&record).await?;
            return Ok(Accepted {
                record,
                created: true,
            });
        }
        let existing = self
            .known(id)
            .await?
            .ok_or_else(|| shipperd_bus::Error::NotFound(id.to_string()))?;
        if existing.phase == Phase::Received {
            // Possibly a crash between the record and its event last time: the event is
            // de-duplicated by id if it did go out.
            self.announce(&existing).await?;
        }
        tracing::info!(bundle_id = %id, name, "bundle already known");
        Ok(Accepted {
            record: existing,
            created: false,
        })
    }

    async fn announce(&self, rec: &BundleRecord) -> Result<()> {
        let body = v1::BundleReceived {
            bundle_id: rec.id.clone(),
            name: rec.name.clone(),
            size: rec.size,
            path: rec.path.clone(),
        };
        let id = event_id(EventKind::BundleReceived, &rec.id, None);
        self.bus
            .publish_event(EventKind::BundleReceived, &id, &rec.id, encode(&body))
            .await?;
        Ok(())
    }
}
