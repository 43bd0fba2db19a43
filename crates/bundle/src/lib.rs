//! Reading bundles without extracting them.
//!
//! - [`format`]: what container a bundle is, by magic bytes (never by name);
//! - [`container`]: opening one: squashfs and uncompressed tar in place, compressed tar
//!   expanded once into the content-addressed store ([`cas`]); one file or several parts;
//! - [`discover`]: the OCI image layouts, registry storage trees or `docker save`
//!   archive inside ([`docker`]), and the images they name;
//! - [`layout`]: digests, descriptors, and the walk from an image to everything it needs;
//! - [`catalog`]: how to open a checked bundle again, and where a blob's bytes are;
//! - [`plan`]: each image's publish plan, stored once by unpack;
//! - [`limits`]: the bounds that keep hostile bundles harmless.

pub mod archive;
pub mod cas;
pub mod catalog;
pub mod container;
pub mod discover;
pub mod docker;
mod error;
pub mod format;
pub mod fuzzing;
pub mod layout;
pub mod limits;
pub mod parts;
pub mod paths;
pub mod plan;
pub mod squashfs;
pub mod squashfs_tables;

pub use catalog::{BlobStore, Catalog, Location};
pub use discover::{BlobPaths, Discovered, LayoutImage, discover};
pub use error::{Error, ErrorKind, Result};
pub use format::Format;
pub use layout::{Descriptor, ImagePlan, ManifestDoc, Walker};
pub use limits::{Guard, Limits};
pub use plan::{PlanBlobs, PlanWriter, StoredPlan, read_plan};
pub use shipperd_model::{BundleId, DataDir, Digest, Reference, RegistryUrl, reference};
pub use squashfs::SquashfsBundle;

use std::io::Read;

/// Random access to the files of an opened bundle. Paths are relative to the bundle's
/// root, `/`-separated, e.g. `blobs/sha256/<hex>`; symbolic links inside the bundle are
/// followed.
pub trait BundleFs: Send + Sync {
    /// Opens one regular file for streaming; returns the reader and the file's length.
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)>;

    /// Opens one regular file from byte `start` on (a `Range` request); returns the
    /// reader of the rest and the file's whole length. By default it reads past the
    /// first `start` bytes; containers that can seek do.
    fn open_from(&self, path: &str, start: u64) -> Result<(Box<dyn Read + '_>, u64)> {
        let (mut reader, len) = self.open(path)?;
        std::io::copy(&mut (&mut reader).take(start), &mut std::io::sink())
            .map_err(|e| Error::read(path, e))?;
        Ok((reader, len))
    }

    /// Is there a regular file at `path`?
    fn exists(&self, path: &str) -> bool;

    /// Every path in the bundle (files, links, other entries), in no particular order.
    fn files(&self) -> Vec<&str>;

    /// Where the regular file at `path` lives, for the catalog, and its length.
    fn locate(&self, path: &str) -> Result<(Location, u64)>;

    /// Reads a whole small file (index.json, a manifest), refusing files over `limit`.
    fn read_small(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let (reader, len) = self.open(path)?;
        if len > limit {
            return Err(Error::TooLarge {
                path: path.to_string(),
                size: len,
                limit,
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        reader
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::read(path, e))?;
        Ok(buf)
    }
}

/// Blobs by digest, wherever a bundle keeps them.
pub trait BlobSource: Send + Sync {
    /// The blob's bytes and length, or `None` when the bundle does not hold it.
    fn blob(&self, digest: &Digest) -> Result<Option<(Box<dyn Read + '_>, u64)>>;
}

/// The blobs of an opened bundle, by the paths [`discover`] found, and the manifests
/// it made ([`Discovered::blobs`]).
pub struct FsBlobs<'a> {
    pub fs: &'a dyn BundleFs,
    pub paths: &'a discover::BlobPaths,
    pub made: &'a std::collections::HashMap<Digest, Vec<u8>>,
    pub stored: &'a std::collections::HashMap<Digest, std::path::PathBuf>,
}

impl BlobSource for FsBlobs<'_> {
    fn blob(&self, digest: &Digest) -> Result<Option<(Box<dyn Read + '_>, u64)>> {
        if let Some(bytes) = self.made.get(digest) {
            return Ok(Some((Box::new(bytes.as_slice()), bytes.len() as u64)));
        }
        if let Some(path) = self.stored.get(digest) {
            let io = |source| Error::Io {
                path: path.display().to_string(),
                source,
            };
            let file = std::fs::File::open(path).map_err(io)?;
            let len = file.metadata().map_err(io)?.len();
            return Ok(Some((Box::new(file), len)));
        }
        match self.paths.get(digest) {
            Some(p) => self.fs.open(&p).map(Some),
            None => Ok(None),
        }
    }
}
