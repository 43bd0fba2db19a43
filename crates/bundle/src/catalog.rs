//! What unpack leaves beside a checked bundle for publish: the catalog
//! (`catalog.json`: how to open the bundle's bytes again) and where each blob's bytes
//! are ([`Location`], carried in each image's plan, see [`crate::plan`]), so that publish
//! reads blobs straight away, without opening, indexing or walking the bundle again.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{BundleId, DataDir, Error, Limits, Result, SquashfsBundle, cas::Cas, parts::MultiFile};

/// Where one blob's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "camelCase")]
pub enum Location {
    /// A file of a squashfs bundle.
    Path { path: String },
    /// A byte offset of an uncompressed tar (across its parts).
    Range { offset: u64 },
    /// A blob of the content-addressed store.
    Cas { hex: String },
    /// Not in the bundle (a differential bundle): the target registry must have it.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Container {
    Squashfs,
    Tar,
    Expanded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Catalog {
    pub container: Container,
    /// The bundle's files, relative to the data directory, in order.
    pub parts: Vec<String>,
    /// The limits the bundle was accepted with (a squashfs is opened again with them).
    #[serde(default)]
    pub limits: Limits,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `body` to `path` atomically (temp file, fsync, rename).
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let tmp = crate::cas::temp_beside(path);
    std::fs::write(&tmp, body).map_err(io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Catalog {
    pub fn save(&self, data: &DataDir, id: &BundleId) -> Result<()> {
        let body = serde_json::to_vec(self).expect("a catalog serialises");
        write_atomic(&data.catalog(id), &body)
    }

    pub fn load(data: &DataDir, id: &BundleId) -> Result<Self> {
        let path = data.catalog(id);
        let raw = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&raw).map_err(|e| Error::Json {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Opens the bundle's bytes for reading blobs by [`Location`].
    pub fn open(&self, data: &DataDir) -> Result<BlobStore> {
        let parts: Vec<PathBuf> = self.parts.iter().map(|p| data.root().join(p)).collect();
        let backing = match self.container {
            Container::Squashfs => {
                let [one] = parts.as_slice() else {
                    return Err(Error::Layout("a squashfs bundle has one part".into()));
                };
                Backing::Squashfs(Box::new(SquashfsBundle::open(one, &self.limits)?))
            }
            Container::Tar => Backing::Tar(MultiFile::open(&parts)?),
            Container::Expanded => Backing::Cas,
        };
        Ok(BlobStore {
            backing,
            cas: Cas::new(data),
        })
    }
}

enum Backing {
    Squashfs(Box<SquashfsBundle>),
    Tar(MultiFile),
    /// Expanded: every blob is in the CAS.
    Cas,
}

/// An opened bundle's bytes, read by location. One per bundle and process is enough:
/// every read opens its own stream.
pub struct BlobStore {
    backing: Backing,
    /// Blobs ShipperD made (compressed layers) are in the CAS, whatever the container.
    cas: Cas,
}

impl BlobStore {
    /// The `size` bytes at `at` (a blob whose digest has `hex`).
    pub fn read(&self, at: &Location, size: u64, hex: &str) -> Result<Box<dyn Read + '_>> {
        Ok(match (&self.backing, at) {
            (Backing::Squashfs(fs), Location::Path { path }) => {
                crate::BundleFs::open(fs.as_ref(), path)?.0
            }
            (Backing::Tar(mf), Location::Range { offset }) => Box::new(mf.range(*offset, size)),
            (_, Location::Cas { hex: h }) if h == hex => {
                let p = self.cas.blob_path(h);
                Box::new(std::fs::File::open(&p).map_err(io(&p))?)
            }
            _ => {
                return Err(Error::Layout(format!(
                    "the plan's location of sha256:{hex} does not match the bundle's container"
                )));
            }
        })
    }
}
