//! Reading bundles without extracting them.
//!
//! - [`format`]: what container a bundle is, by magic bytes (never by name);
//! - [`squashfs`]: random access to the files of a squashfs bundle (backhand);
//! - [`layout`]: the OCI image layout inside a bundle: images, manifests, blobs;
//! - [`reference`]: image names (`[host/]repo[:tag][@digest]`) and where they land.

mod error;
pub mod format;
pub mod layout;
pub mod reference;
pub mod squashfs;

pub use error::{Error, ErrorKind, Result};
pub use format::Format;
pub use layout::{Descriptor, Digest, ImagePlan, Layout, LayoutImage};
pub use reference::{Reference, RegistryUrl};
pub use squashfs::SquashfsBundle;

use std::io::Read;

/// Random access to the files of an opened bundle. Paths are relative to the bundle's
/// root, `/`-separated, e.g. `blobs/sha256/<hex>`.
pub trait BundleFs: Send + Sync {
    /// Opens one regular file for streaming; returns the reader and the file's length.
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)>;

    /// Is there a regular file at `path`?
    fn exists(&self, path: &str) -> bool;

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
