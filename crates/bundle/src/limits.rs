//! Limits that keep a hostile or broken bundle from exhausting memory, disk or time.
//! Every one is configurable; the defaults fit real bundles (an OpenShift release plus
//! operator catalogs is some tens of thousands of entries) with room to spare.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Limits {
    /// Entries (files, directories, links) in one bundle.
    pub max_entries: u64,
    /// Bytes of one path inside a bundle.
    pub max_path_bytes: usize,
    /// A bundle may expand to at most this many times its stored size (the blobs its
    /// manifests declare, sparse squashfs files at full size; what a compressed tar
    /// expands to)...
    pub max_expansion_ratio: u64,
    /// ...or to this many bytes, whichever is larger (small bundles of zeros are fine).
    pub expansion_floor: u64,
    /// Free bytes the data volume keeps while a compressed bundle is expanded into the
    /// blob store: an expansion that would leave less fails its bundle.
    pub min_free_bytes: u64,
    /// Largest `index.json` of an OCI layout.
    pub max_index_bytes: u64,
    /// Largest manifest or image index (registries refuse larger ones too).
    pub max_manifest_bytes: u64,
    /// Largest non-blob file kept in memory when a compressed bundle is expanded, and
    /// the total of all of them.
    pub max_small_file_bytes: u64,
    pub max_small_total_bytes: u64,
    /// Images one bundle may name.
    pub max_images: usize,
    /// Bytes of tar headers read before one member: its header and its GNU long-name,
    /// long-link and PAX extension records (read into memory, so bounded).
    pub max_header_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 500_000,
            max_path_bytes: 4096,
            max_expansion_ratio: 64,
            expansion_floor: 1 << 30,
            min_free_bytes: 1 << 30,
            max_index_bytes: 16 << 20,
            max_manifest_bytes: 4 << 20,
            max_small_file_bytes: 16 << 20,
            max_small_total_bytes: 256 << 20,
            max_images: 20_000,
            max_header_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// The most a bundle of `stored` bytes may expand to.
    pub fn expansion_budget(&self, stored: u64) -> u64 {
        self.max_expansion_ratio
            .saturating_mul(stored)
            .max(self.expansion_floor)
    }
}

/// Checked while a bundle is read: the work may be called off (the bundle was deleted
/// meanwhile), and writing into the blob store must leave the data volume its reserve.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    stop: Arc<AtomicBool>,
}

impl Guard {
    /// Calls the work off: it fails with [`Error::Cancelled`] at its next check.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Fails when the work was called off.
    pub fn check(&self) -> Result<()> {
        if self.stopped() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Fails when the work was called off, or when the volume holding `dir` has less
    /// than `reserve` bytes free.
    pub fn room(&self, dir: &Path, reserve: u64) -> Result<()> {
        self.check()?;
        if reserve == 0 {
            return Ok(());
        }
        let Ok(st) = rustix::fs::statvfs(dir) else {
            return Ok(());
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < reserve {
            return Err(Error::NoRoom { free, reserve });
        }
        Ok(())
    }
}
