//! The catalog of a checked bundle: where each blob its images need lives, written by
//! unpack next to the bundle (`bundles/<id>/catalog.json`) so that publish reads blobs
//! straight away, without opening or indexing the bundle again.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    BlobSource, Descriptor, Digest, Error, Result, SquashfsBundle, cas::Cas, parts::MultiFile,
};

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Container {
    Squashfs,
    Tar,
    Expanded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub size: u64,
    #[serde(flatten)]
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Catalog {
    pub container: Container,
    /// The bundle's files, relative to the data directory, in order.
    pub parts: Vec<String>,
    /// Every blob (manifests included) the bundle's images need.
    pub blobs: BTreeMap<String, BlobEntry>,
    /// Manifests that refer to another (OCI 1.1 `subject`): subject digest → referrers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub referrers: BTreeMap<String, Vec<Descriptor>>,
}

pub const CATALOG_FILE: &str = "catalog.json";

impl Catalog {
    /// Where the catalog of the bundle stored at `bundle_path` lives.
    pub fn path_for(bundle_path: &Path) -> PathBuf {
        bundle_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(CATALOG_FILE)
    }

    /// Writes the catalog atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec(self).expect("a catalog serialises");
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&raw).map_err(|e| Error::Json {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Opens the blobs for reading; `data_dir` is where `parts` and the store are.
    pub fn open(self, data_dir: &Path) -> Result<CatalogBlobs> {
        let parts: Vec<PathBuf> = self.parts.iter().map(|p| data_dir.join(p)).collect();
        let backing = match self.container {
            Container::Squashfs => {
                let [one] = parts.as_slice() else {
                    return Err(Error::Layout("a squashfs bundle has one part".into()));
                };
                Backing::Squashfs(Box::new(SquashfsBundle::open(one, &Default::default())?))
            }
            Container::Tar => Backing::Tar(MultiFile::open(&parts)?),
            Container::Expanded => Backing::Cas(Cas::new(data_dir)),
        };
        Ok(CatalogBlobs {
            catalog: self,
            backing,
        })
    }
}

enum Backing {
    Squashfs(Box<SquashfsBundle>),
    Tar(MultiFile),
    Cas(Cas),
}

/// The blobs of a catalogued bundle.
pub struct CatalogBlobs {
    catalog: Catalog,
    backing: Backing,
}

impl CatalogBlobs {
    pub fn referrers(&self, subject: &str) -> &[Descriptor] {
        self.catalog
            .referrers
            .get(subject)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

impl BlobSource for CatalogBlobs {
    fn blob(&self, digest: &Digest) -> Result<Option<(Box<dyn Read + '_>, u64)>> {
        let Some(entry) = self.catalog.blobs.get(digest.as_str()) else {
            return Ok(None);
        };
        let reader: Box<dyn Read + '_> = match (&self.backing, &entry.location) {
            (Backing::Squashfs(fs), Location::Path { path }) => {
                return crate::BundleFs::open(fs.as_ref(), path).map(Some);
            }
            (Backing::Tar(mf), Location::Range { offset }) => {
                Box::new(mf.range(*offset, entry.size))
            }
            (Backing::Cas(cas), Location::Cas { hex }) if hex == digest.hex() => {
                let p = cas.blob_path(hex);
                Box::new(std::fs::File::open(&p).map_err(|source| Error::Io {
                    path: p.display().to_string(),
                    source,
                })?)
            }
            _ => {
                return Err(Error::Layout(format!(
                    "the catalog's entry for {digest} does not match its container"
                )));
            }
        };
        Ok(Some((reader, entry.size)))
    }
}
