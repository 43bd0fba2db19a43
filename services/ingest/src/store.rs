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
        for d in [&tmp_dir, &data_dir.join("bundles")] {
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
        mut body: S,
        expected: Option<&str>,
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
        let file = tokio::fs::File::create(&tmp.path)
            .await
            .map_err(|e| Error::io(&tmp.path, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::Incomplete {
                received: size,
                reason: e.to_string(),
            })?;
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(Error::TooLarge {
                    limit: self.max_bytes,
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| Error::io(&tmp.path, e))?;
        }
        out.flush().await.map_err(|e| Error::io(&tmp.path, e))?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(|e| Error::io(&tmp.path, e))?;
        if size == 0 {
            return Err(Error::Empty);
        }
        let id = hex::encode(hasher.finalize());
        if let Some(expected) = expected
            && expected != id
        {
            return Err(Error::ChecksumMismatch {
                expected: expected.to_string(),
                actual: id,
            });
        }
        METRICS.bytes_received.add(size);
        self.commit(name, tmp, id, size).await
    }

    /// Takes in a file that is already on this machine (the drop directory): hashed in
    /// place, then moved into the store.
    pub async fn receive_file(&self, name: &str, path: &Path) -> Result<Accepted> {
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
        match self.record(name, &id, size).await {
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
    ) -> Result<Accepted> {
        self.place(&mut tmp, &id).await?;
        self.record(name, &id, size).await
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
    async fn record(&self, name: &str, id: &str, size: u64) -> Result<Accepted> {
        let record = BundleRecord::new(id.to_string(), name.to_string(), size, bundle_path(id));
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
