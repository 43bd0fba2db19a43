//! The layout of `--data-dir`, the volume every service shares. Nothing else spells a
//! path under it.
//!
//! ```text
//! <data>/tmp/                       uploads being received (removed when they fail)
//! <data>/uploads/<name>/            parts of an unfinished multi-part upload
//! <data>/bundles/<id>/bundle        a stored bundle (one file) ...
//! <data>/bundles/<id>/parts/        ... or its parts, read as their concatenation
//! <data>/bundles/<id>/meta.json     name, size and target, written before the bundle
//!                                   is recorded (lets a crash in between be recovered)
//! <data>/bundles/<id>/catalog.json  how to open the bundle (container, parts)
//! <data>/bundles/<id>/plans         each image's publish plan, one after another
//! <data>/cas/blobs/sha256/<hex>     blobs of compressed bundles, shared
//! <data>/cas/refs/<id>              the blobs one bundle needs
//! <data>/cas/lock, <data>/cas/tmp/  the store's lock and its partial writes
//! ```

use std::path::{Path, PathBuf};

use crate::BundleId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Partial uploads.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Unfinished multi-part uploads, one directory per name.
    /// Fetches of `url` sources in progress: `<sha256>.part` (what arrived, on the
    /// shared volume so another replica resumes it) and `<sha256>.lock`.
    pub fn fetches(&self) -> PathBuf {
        self.root.join("fetch")
    }

    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// The parts of the multi-part upload `name` (a validated bundle name).
    pub fn upload(&self, name: &str) -> PathBuf {
        self.uploads().join(name)
    }

    pub fn bundles(&self) -> PathBuf {
        self.root.join("bundles")
    }

    /// Everything kept for one bundle.
    pub fn bundle_dir(&self, id: &BundleId) -> PathBuf {
        self.bundles().join(id.as_str())
    }

    /// Where a one-file bundle is stored, relative to the data directory (as records
    /// and events carry it).
    pub fn bundle_file_rel(id: &BundleId) -> String {
        format!("bundles/{id}/bundle")
    }

    /// Where a multi-part bundle's parts are stored, relative to the data directory.
    pub fn bundle_parts_rel(id: &BundleId) -> String {
        format!("bundles/{id}/parts")
    }

    /// A path a record carries (relative to the data directory), made absolute. Only
    /// paths this type made are accepted.
    pub fn resolve(&self, id: &BundleId, rel: &str) -> Option<PathBuf> {
        (rel == Self::bundle_file_rel(id) || rel == Self::bundle_parts_rel(id))
            .then(|| self.root.join(rel))
    }

    pub fn bundle_file(&self, id: &BundleId) -> PathBuf {
        self.root.join(Self::bundle_file_rel(id))
    }

    pub fn bundle_parts(&self, id: &BundleId) -> PathBuf {
        self.root.join(Self::bundle_parts_rel(id))
    }

    pub fn meta(&self, id: &BundleId) -> PathBuf {
        self.bundle_dir(id).join("meta.json")
    }

    pub fn catalog(&self, id: &BundleId) -> PathBuf {
        self.bundle_dir(id).join("catalog.json")
    }

    /// The release signatures a bundle carries (oc-mirror's `working-dir/signatures/`),
    /// taken out by unpack: `<tag>-sha256-<hex>` files.
    pub fn signatures(&self, id: &BundleId) -> PathBuf {
        self.bundle_dir(id).join("signatures")
    }

    pub fn plans(&self, id: &BundleId) -> PathBuf {
        self.bundle_dir(id).join("plans")
    }

    /// A path under the data directory as records show it (relative, `/`-separated).
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    pub fn cas(&self) -> PathBuf {
        self.root.join("cas")
    }

    pub fn cas_blobs(&self) -> PathBuf {
        self.cas().join("blobs/sha256")
    }

    /// A blob of the content-addressed store, by its 64 hex characters.
    pub fn cas_blob(&self, hex: &str) -> PathBuf {
        self.cas_blobs().join(hex)
    }

    pub fn cas_refs_dir(&self) -> PathBuf {
        self.cas().join("refs")
    }

    /// The blobs `id` needs from the content-addressed store.
    pub fn cas_refs(&self, id: &str) -> PathBuf {
        self.cas_refs_dir().join(id)
    }

    pub fn cas_lock(&self) -> PathBuf {
        self.cas().join("lock")
    }

    pub fn cas_tmp(&self) -> PathBuf {
        self.cas().join("tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let d = DataDir::new("/data");
        let id = BundleId::parse(&"a".repeat(64)).unwrap();
        assert_eq!(
            d.bundle_file(&id),
            PathBuf::from(format!("/data/bundles/{id}/bundle"))
        );
        assert_eq!(
            d.resolve(&id, &DataDir::bundle_parts_rel(&id)),
            Some(d.bundle_parts(&id))
        );
        assert_eq!(d.resolve(&id, "../../etc/passwd"), None);
        assert_eq!(d.relative(&d.plans(&id)), format!("bundles/{id}/plans"));
    }
}
