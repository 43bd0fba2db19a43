//! Room for uploads: how many are received at once, and whether the data volume (and
//! the configured total) has room for one, checked before it starts (when its length is
//! declared) and again as it is written. A declared length is reserved: what uploads
//! in progress said is still to come counts as taken, so two uploads that each fit
//! cannot together fill the volume. An upload that would fill the volume is cut
//! with 507 and nothing of it kept, so the stored bundles and the other services' work
//! files never meet a full disk because of an upload.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Error, Result};

/// How much the store takes in.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Uploads (bundles and parts) received at once; more are refused as busy (503).
    pub max_uploads: usize,
    /// Free bytes the data volume keeps: an upload that would leave less is refused
    /// (507), before it starts when its length is declared and while it is written.
    pub min_free_bytes: u64,
    /// Bytes the stored bundles, parts and uploads in progress may take together
    /// (0: no limit beyond the free space).
    pub max_stored_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uploads: 16,
            min_free_bytes: 1 << 30,
            max_stored_bytes: 0,
        }
    }
}

/// Bytes written between two looks at the free space.
const CHECK_EVERY: u64 = 8 << 20;
/// Deepest directory counted towards the stored bytes (`bundles/<id>/parts/<n>`).
const MAX_DEPTH: usize = 4;

pub(crate) struct Space {
    /// The directory uploads are written in (on the data volume).
    tmp: PathBuf,
    /// What counts towards `max_stored_bytes`: stored bundles, parts, temp files.
    counted: Vec<PathBuf>,
    min_free: u64,
    max_stored: u64,
    max_uploads: usize,
    slots: Arc<Semaphore>,
    /// Bytes of the uploads in progress in this process.
    in_flight: Arc<AtomicU64>,
    /// Bytes the uploads in progress declared and have not written yet.
    promised: Arc<AtomicU64>,
}

/// One upload's slot and the bytes it holds; released when dropped.
pub(crate) struct Claim {
    _slot: OwnedSemaphorePermit,
    tmp: PathBuf,
    min_free: u64,
    max_stored: u64,
    /// Stored bytes when the upload started (other uploads are in `in_flight`).
    stored: u64,
    declared: Option<u64>,
    in_flight: Arc<AtomicU64>,
    held: u64,
    promised: Arc<AtomicU64>,
    /// This upload's part of `promised`.
    promise: u64,
    next_check: u64,
}

fn free_bytes(path: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(|e| Error::io(path, e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Bytes of the files under `dir` (to `MAX_DEPTH`).
fn du(dir: &Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth < MAX_DEPTH => du(&e.path(), depth + 1),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// What the bundle store takes on its volume.
pub struct Usage {
    /// Stored bundles (and their parts).
    pub bundles: u64,
    /// Uploads in progress: parts of multi-part uploads, temp files.
    pub uploads: u64,
    /// Free on the volume, when it can be read.
    pub free: Option<u64>,
}

pub fn usage(data: &shipperd_model::DataDir) -> Usage {
    Usage {
        bundles: du(&data.bundles(), 0),
        uploads: du(&data.uploads(), 0) + du(&data.tmp(), 0),
        free: free_bytes(data.root()).ok(),
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Space {
    pub(crate) fn new(tmp: PathBuf, counted: Vec<PathBuf>, bounds: &Limits) -> Self {
        Space {
            tmp,
            counted,
            min_free: bounds.min_free_bytes,
            max_stored: bounds.max_stored_bytes,
            max_uploads: bounds.max_uploads.max(1),
            slots: Arc::new(Semaphore::new(bounds.max_uploads.max(1))),
            in_flight: Arc::new(AtomicU64::new(0)),
            promised: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A slot for an upload of `declared` bytes (if its length is known), if there is
    /// one free and room for it.
    pub(crate) async fn claim(&self, declared: Option<u64>) -> Result<Claim> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            Error::Busy(format!(
                "{} uploads are in progress, the most this server takes at once; try again shortly",
                self.max_uploads
            ))
        })?;
        let stored = if self.max_stored > 0 {
            let dirs = self.counted.clone();
            tokio::task::spawn_blocking(move || dirs.iter().map(|d| du(d, 0)).sum())
                .await
                .unwrap_or(0)
        } else {
            0
        };
        let mut claim = Claim {
            _slot: slot,
            tmp: self.tmp.clone(),
            min_free: self.min_free,
            max_stored: self.max_stored,
            stored,
            declared,
            in_flight: self.in_flight.clone(),
            held: 0,
            promised: self.promised.clone(),
            promise: 0,
            next_check: 0,
        };
        claim.check(0)?;
        Ok(claim)
    }
}

/// Moves this claim's part of a shared total from `from` to `to`.
fn move_by(total: &AtomicU64, from: u64, to: u64) {
    if to >= from {
        total.fetch_add(to - from, Ordering::Relaxed);
    } else {
        total.fetch_sub(from - to, Ordering::Relaxed);
    }
}

impl Claim {
    /// The upload has written `written` bytes so far.
    pub(crate) fn wrote(&mut self, written: u64) -> Result<()> {
        // (Less than before when a fetch starts over.)
        if written < self.held {
            self.next_check = written;
        }
        move_by(&self.in_flight, self.held, written);
        self.held = written;
        if written >= self.next_check {
            self.check(written)?;
            self.next_check = written + CHECK_EVERY;
        }
        Ok(())
    }

    fn check(&mut self, written: u64) -> Result<()> {
        // Still to come, as far as the client said: reserved (taken from what every
        // upload sees as room) before the room is looked at, so racing uploads see
        // each other's.
        let coming = self.declared.map_or(0, |d| d.saturating_sub(written));
        move_by(&self.promised, self.promise, coming);
        self.promise = coming;
        // What every upload in progress still said it would write, this one's included.
        let promised = self.promised.load(Ordering::Relaxed);
        let others = promised - coming;
        let free = free_bytes(&self.tmp)?;
        if free < self.min_free.saturating_add(promised) {
            return Err(Error::NoSpace(format!(
                "not enough room on the data volume: {} free, {} kept in reserve{}{}",
                human(free),
                human(self.min_free),
                if coming > 0 {
                    format!(", {} still to come", human(coming))
                } else {
                    String::new()
                },
                if others > 0 {
                    format!(", {} promised to other uploads in progress", human(others))
                } else {
                    String::new()
                }
            )));
        }
        if self.max_stored > 0 {
            // Every upload in progress (this one included), and what this one will add.
            let total = self.stored + self.in_flight.load(Ordering::Relaxed) + promised;
            if total > self.max_stored {
                return Err(Error::NoSpace(format!(
                    "the store would hold {} with this upload, over its limit of {}",
                    human(total),
                    human(self.max_stored)
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.held, Ordering::Relaxed);
        self.promised.fetch_sub(self.promise, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn declared_lengths_are_reserved_against_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = Limits {
            min_free_bytes: 0,
            ..Limits::default()
        };
        let space = Space::new(dir.path().to_path_buf(), Vec::new(), &bounds);
        let free = free_bytes(dir.path()).unwrap();
        let most = free / 10 * 6;
        let first = space.claim(Some(most)).await.expect("the first fits");
        let second = space.claim(Some(most)).await;
        assert!(
            matches!(second, Err(Error::NoSpace(ref m)) if m.contains("promised to other uploads")),
            "two uploads of 60% each cannot both start: {:?}",
            second.err()
        );
        drop(first);
        space
            .claim(Some(most))
            .await
            .expect("once the first ends, there is room again");
    }
}
