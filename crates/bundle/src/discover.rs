//! Finding the images in a bundle, whatever tool wrote it:
//!
//! - **OCI image layouts**: an `index.json` at the root, or beside an `oci-layout` file
//!   at any depth (Zarf keeps one under `images/`). Images are named by the
//!   `io.containerd.image.name` or `org.opencontainers.image.ref.name` annotation.
//! - **Registry storage trees** (`docker/registry/v2/`) at any prefix (Koffer:
//!   `platform/mirror/docker/registry/v2/`; oc-mirror at the root): repositories (nested
//!   names too) and tags from `<repo>/_manifests/tags/<tag>/current/link`; manifests kept
//!   only by digest from `_manifests/revisions/sha256/<hex>/link`.
//!
//! - **Legacy `docker save` archives** (a `manifest.json`, no layout, no tree): see
//!   [`crate::docker`].
//!
//! Blobs are found by their paths (`blobs/sha256/<hex>` or `blobs/sha256/<2>/<hex>/data`)
//! in any of them: a digest is the same bytes wherever it lives.

use std::collections::{BTreeMap, HashMap};

use crate::{
    BundleFs, Descriptor, Digest, Error, FsBlobs, Limits, Reference, Result,
    archive::blob_hex,
    docker::{self, DockerArchive},
    layout::{ANNOTATION_CONTAINERD_NAME, ANNOTATION_MADE_FOR, ANNOTATION_REF_NAME},
    reference::repository_from_bundle_name,
};

const TREE: &str = "docker/registry/v2/";
/// A link file holds `sha256:<64 hex>`, perhaps with a newline.
const MAX_LINK_BYTES: u64 = 1024;

/// An image the bundle names.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    /// The source reference (as the bundle names it, completed when it names a tag only).
    pub source: Reference,
    /// Its top manifest or index (size 0 when the bundle does not say).
    pub descriptor: Descriptor,
}

/// What a bundle holds, before any manifest is read.
#[derive(Debug, Default)]
pub struct Discovered {
    pub images: Vec<LayoutImage>,
    /// Manifests the bundle lists without a name: referrers, or images kept by digest
    /// (with the repository they were found in, for a registry tree).
    pub unnamed: Vec<(Option<String>, Descriptor)>,
    /// Every blob file: digest → path in the bundle.
    pub blob_paths: BlobPaths,
    /// Where the layouts were found, for logs (`oci:images/`, `registry:platform/mirror/`).
    pub roots: Vec<String>,
    /// Manifests the bundle does not carry but ShipperD made (a legacy `docker save`
    /// archive's, see [`crate::docker`]), by digest.
    pub made: HashMap<Digest, Vec<u8>>,
    /// The registry a differential bundle was made against (`shipperd create --have`:
    /// [`ANNOTATION_MADE_FOR`] on its `index.json`): it leaves out what that registry
    /// holds, so no other target may take it.
    pub made_for: Option<String>,
    /// Blobs ShipperD made and stored in the CAS (a docker archive's layers, compressed
    /// with `--compress-layers`), by digest: where their files are.
    pub stored: HashMap<Digest, std::path::PathBuf>,
}

impl Discovered {
    /// The blobs of `fs` (its files and the made manifests), for a [`crate::Walker`].
    pub fn blobs<'a>(&'a self, fs: &'a dyn BundleFs) -> FsBlobs<'a> {
        FsBlobs {
            fs,
            paths: &self.blob_paths,
            made: &self.made,
            stored: &self.stored,
        }
    }
}

/// Where each blob file of a bundle is, kept compact (a catalog bundle has tens of
/// thousands): by the bytes of its digest, the directory above it (an OCI layout's
/// `<root>blobs/sha256/`, a registry tree's likewise) and its form (`<hex>`, or
/// `<2 hex>/<hex>/data`); the path is built when asked for. The first file of a digest
/// wins.
#[derive(Debug, Default)]
pub struct BlobPaths {
    dirs: Vec<(String, bool)>,
    dir_index: HashMap<(String, bool), u32>,
    at: HashMap<[u8; 32], u32>,
    /// Blobs whose files are not named by their digest (a `docker save` archive's
    /// layers and configs).
    named: HashMap<[u8; 32], String>,
}

impl BlobPaths {
    /// Notes `path`, a blob file whose digest's hex is `hex` (see
    /// [`blob_hex`](crate::archive::blob_hex)).
    pub fn insert(&mut self, path: &str, hex: &str) {
        let Ok(digest) = Digest::from_hex(hex) else {
            return;
        };
        let key = digest.bytes();
        if self.at.contains_key(&key) {
            return;
        }
        let tree = path.ends_with("/data");
        let tail = if tree { 2 + 1 + 64 + 5 } else { 64 };
        let Some(dir) = path.get(..path.len().saturating_sub(tail)) else {
            return;
        };
        let entry = (dir.to_string(), tree);
        let n = match self.dir_index.get(&entry) {
            Some(n) => *n,
            None => {
                let n = self.dirs.len() as u32;
                self.dirs.push(entry.clone());
                self.dir_index.insert(entry, n);
                n
            }
        };
        self.at.insert(key, n);
    }

    /// Notes `path`, a file whose digest is `digest` though its name does not say so.
    pub fn insert_named(&mut self, digest: &Digest, path: &str) {
        let key = digest.bytes();
        if !self.at.contains_key(&key) {
            self.named.entry(key).or_insert_with(|| path.to_string());
        }
    }

    /// The path of blob `digest` in the bundle, if it has one.
    pub fn get(&self, digest: &Digest) -> Option<String> {
        let key = digest.bytes();
        let Some(n) = self.at.get(&key) else {
            return self.named.get(&key).cloned();
        };
        let (dir, tree) = &self.dirs[*n as usize];
        let hex = digest.hex();
        Some(if *tree {
            format!("{dir}{}/{hex}/data", &hex[..2])
        } else {
            format!("{dir}{hex}")
        })
    }

    pub fn len(&self) -> usize {
        self.at.len() + self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn discover(fs: &dyn BundleFs, bundle_name: &str, limits: &Limits) -> Result<Discovered> {
    let mut found = Discovered::default();
    let mut oci_roots = Vec::new();
    let mut tree_roots: Vec<String> = Vec::new();
    let mut files = fs.files();
    files.sort_unstable();
    for f in &files {
        if let Some(hex) = blob_hex(f) {
            found.blob_paths.insert(f, hex);
        }
        if let Some(dir) = f.strip_suffix("index.json")
            && (dir.is_empty() || (dir.ends_with('/') && fs.exists(&format!("{dir}oci-layout"))))
            && !dir.contains(TREE)
        {
            oci_roots.push(dir.to_string());
        }
        if let Some(i) = f.find(TREE) {
            let root = &f[..i + TREE.len()];
            if !tree_roots.iter().any(|r| r == root) {
                tree_roots.push(root.to_string());
            }
        }
    }
    let fallback_repo = repository_from_bundle_name(bundle_name);
    if oci_roots.is_empty() && tree_roots.is_empty() {
        return match docker::read(fs, limits)? {
            Some(archive) => Ok(docker_images(archive, found, &fallback_repo)),
            None => Err(Error::Layout(
                "found neither an OCI image layout (index.json), a registry storage tree (docker/registry/v2/) nor a docker archive's manifest.json in the bundle".into(),
            )),
        };
    }
    let mut names = BTreeMap::new();
    for root in &oci_roots {
        found.roots.push(format!("oci:{root}"));
        let made_for = oci_images(
            fs,
            root,
            &fallback_repo,
            limits,
            &mut names,
            &mut found.unnamed,
        )?;
        found.made_for = found.made_for.or(made_for);
    }
    for root in &tree_roots {
        found.roots.push(format!("registry:{root}"));
        tree_images(fs, &files, root, &mut names, &mut found.unnamed)?;
    }
    if names.len() > limits.max_images {
        return Err(Error::Hostile(format!(
            "the bundle names {} images, over the limit of {} (maxImages)",
            names.len(),
            limits.max_images
        )));
    }
    found.images = names.into_values().collect();
    if found.images.is_empty() && found.unnamed.is_empty() {
        return Err(Error::Layout(format!(
            "the bundle names no images (an OCI layout's index.json needs the {ANNOTATION_REF_NAME} or {ANNOTATION_CONTAINERD_NAME} annotation; a registry tree needs tags)"
        )));
    }
    Ok(found)
}

/// The images of a legacy `docker save` archive; an image without a tag is kept by
/// digest in the repository named after the bundle.
fn docker_images(archive: DockerArchive, mut found: Discovered, fallback_repo: &str) -> Discovered {
    found.roots.push("docker-archive:".into());
    for (digest, path) in &archive.files {
        found.blob_paths.insert_named(digest, path);
    }
    found.images = archive.images;
    found.unnamed = archive
        .untagged
        .into_iter()
        .map(|d| (Some(fallback_repo.to_string()), d))
        .collect();
    found.made = archive.made;
    found
}

/// The images of the OCI layout at `root`; the registry it was made against, if any.
fn oci_images(
    fs: &dyn BundleFs,
    root: &str,
    fallback_repo: &str,
    limits: &Limits,
    names: &mut BTreeMap<String, LayoutImage>,
    unnamed: &mut Vec<(Option<String>, Descriptor)>,
) -> Result<Option<String>> {
    let path = format!("{root}index.json");
    let raw = fs.read_small(&path, limits.max_index_bytes)?;
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(&raw).map_err(|e| Error::Json {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    drop(raw);
    let made_for = index.annotations.get(ANNOTATION_MADE_FOR).cloned();
    for mut desc in index.manifests {
        match image_name(&desc, fallback_repo)? {
            Some(name) => {
                // Named: the annotations did their work (the manifest's own travel
                // with its bytes), and a catalog's tens of thousands of them add up.
                desc.annotations = BTreeMap::new();
                names.entry(name.to_string()).or_insert(LayoutImage {
                    source: name,
                    descriptor: desc,
                });
            }
            None => unnamed.push((None, desc)),
        }
    }
    Ok(made_for)
}

/// The tagged images (and untagged revisions) of the registry storage tree at `root`.
fn tree_images(
    fs: &dyn BundleFs,
    files: &[&str],
    root: &str,
    names: &mut BTreeMap<String, LayoutImage>,
    unnamed: &mut Vec<(Option<String>, Descriptor)>,
) -> Result<()> {
    let repos = format!("{root}repositories/");
    for f in files {
        let Some(rest) = f.strip_prefix(repos.as_str()) else {
            continue;
        };
        let Some((repo, under)) = rest.split_once("/_manifests/") else {
            continue;
        };
        let tag = under
            .strip_prefix("tags/")
            .and_then(|t| t.strip_suffix("/current/link"));
        let revision = under
            .strip_prefix("revisions/sha256/")
            .and_then(|t| t.strip_suffix("/link"));
        if tag.is_none() && revision.is_none() {
            continue;
        }
        let digest = read_link(fs, f)?;
        let desc = Descriptor::new("", digest.clone(), 0);
        if let Some(tag) = tag {
            let source = Reference::parse(&format!("{repo}:{tag}"))
                .map_err(|e| Error::Layout(format!("{f}: {e}")))?;
            names.entry(source.to_string()).or_insert(LayoutImage {
                source,
                descriptor: desc,
            });
        } else if let Some(hex) = revision {
            if hex != digest.hex() {
                return Err(Error::Hostile(format!(
                    "link file {f} is under revision {hex} but holds {digest}"
                )));
            }
            Reference::parse(&format!("{repo}@{digest}"))
                .map_err(|e| Error::Layout(format!("{f}: {e}")))?;
            unnamed.push((Some(repo.to_string()), desc));
        }
    }
    Ok(())
}

/// Reads a link file: one sha256 digest. The blob it names may be absent from the
/// bundle (a differential bundle leaves out what an earlier one carried): the walk plans
/// it as absent, and publish finds it in the registry or fails the image naming it.
fn read_link(fs: &dyn BundleFs, path: &str) -> Result<Digest> {
    let raw = fs.read_small(path, MAX_LINK_BYTES)?;
    let text = String::from_utf8_lossy(&raw);
    Digest::parse(text.trim()).map_err(|_| {
        Error::Hostile(format!(
            "link file {path} holds {:?}, not a sha256 digest",
            text.chars().take(100).collect::<String>()
        ))
    })
}

/// The source reference an `index.json` entry names, if any.
pub(crate) fn image_name(desc: &Descriptor, fallback_repo: &str) -> Result<Option<Reference>> {
    if let Some(full) = desc.annotations.get(ANNOTATION_CONTAINERD_NAME) {
        return Ok(Some(Reference::parse(full)?));
    }
    let Some(name) = desc.annotations.get(ANNOTATION_REF_NAME) else {
        return Ok(None);
    };
    if name.contains('/') || name.contains(':') || name.contains('@') {
        Ok(Some(Reference::parse(name)?))
    } else {
        // A tag alone, as skopeo and oras write it.
        Ok(Some(Reference::parse(&format!("{fallback_repo}:{name}"))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::OCI_MANIFEST;

    #[test]
    fn names_from_annotations() {
        let mut d = Descriptor::new(
            OCI_MANIFEST,
            Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            1,
        );
        assert!(image_name(&d, "b").unwrap().is_none());
        d.annotations
            .insert(ANNOTATION_REF_NAME.into(), "1.0".into());
        assert_eq!(
            image_name(&d, "bun").unwrap().unwrap().to_string(),
            "bun:1.0"
        );
        d.annotations
            .insert(ANNOTATION_REF_NAME.into(), "quay.io/a/b:2".into());
        assert_eq!(
            image_name(&d, "bun").unwrap().unwrap().to_string(),
            "quay.io/a/b:2"
        );
        d.annotations.insert(
            ANNOTATION_CONTAINERD_NAME.into(),
            "docker.io/library/x:3".into(),
        );
        assert_eq!(
            image_name(&d, "bun").unwrap().unwrap().to_string(),
            "docker.io/library/x:3"
        );
    }
}
