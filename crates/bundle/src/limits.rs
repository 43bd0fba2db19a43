//! Limits that keep a hostile or broken bundle from exhausting memory, disk or time.
//! Every one is configurable; the defaults fit real bundles (an OpenShift release plus
//! operator catalogs is some tens of thousands of entries) with room to spare.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Limits {
    /// Entries (files, directories, links) in one bundle.
    pub max_entries: u64,
    /// Bytes of one path inside a bundle.
    pub max_path_bytes: usize,
    /// A compressed bundle may expand to at most this many times its own size...
    pub max_expansion_ratio: u64,
    /// ...or to this many bytes, whichever is larger (small bundles of zeros are fine).
    pub expansion_floor: u64,
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
            max_expansion_ratio: 100,
            expansion_floor: 1 << 30,
            max_index_bytes: 16 << 20,
            max_manifest_bytes: 4 << 20,
            max_small_file_bytes: 16 << 20,
            max_small_total_bytes: 256 << 20,
            max_images: 20_000,
            max_header_bytes: 1 << 20,
        }
    }
}
