//! The OCI image layout inside a bundle: `index.json` names the images (by the
//! `org.opencontainers.image.ref.name` or `io.containerd.image.name` annotation), manifests
//! and indexes are blobs under `blobs/sha256/`, and every blob is checked for size and
//! digest before anything is published.

use std::{
    collections::{BTreeMap, HashSet},
    io::Read,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{BundleFs, Error, Reference, Result, reference::repository_from_bundle_name};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Largest `index.json` accepted.
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
/// Largest manifest or image index accepted (registries cap these at 4 MiB too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// How deep indexes may nest (index → index → manifest is depth 2).
const MAX_NESTING: usize = 4;

/// A validated `sha256:<64 lowercase hex>` digest. Anything else is refused, so a digest
/// can never smuggle a path (`..`, `/`) into a blob path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::Digest(s.to_string()))?;
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Digest(s.to_string()))
        } else {
            Err(Error::Digest(s.to_string()))
        }
    }

    pub fn of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path of this blob in an OCI layout.
    pub fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }
}

/// A manifest or an index: the fields we need of either.
#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// An image named by the layout's `index.json`.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    /// The source reference (as the bundle names it, completed when it names a tag only).
    pub source: Reference,
    pub descriptor: Descriptor,
}

/// Everything one image needs, in push order.
#[derive(Debug, Clone, Default)]
pub struct ImagePlan {
    /// Distinct blobs (configs and layers) of every manifest of the image.
    pub blobs: Vec<Descriptor>,
    /// Manifests with their exact bytes, children before the index that lists them; the
    /// last one is the image's own top manifest (or index).
    pub manifests: Vec<(Descriptor, Vec<u8>)>,
}

impl ImagePlan {
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

/// An OCI image layout at the root of a bundle.
pub struct Layout<'a> {
    fs: &'a dyn BundleFs,
}

fn json_err(path: &str, e: impl std::fmt::Display) -> Error {
    Error::Json {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

impl<'a> Layout<'a> {
    pub fn new(fs: &'a dyn BundleFs) -> Self {
        Layout { fs }
    }

    /// Reads `index.json` and names its images. `bundle_name` supplies the repository
    /// for images named by a tag alone.
    pub fn images(&self, bundle_name: &str) -> Result<Vec<LayoutImage>> {
        if !self.fs.exists("index.json") {
            return Err(Error::Layout(
                "no index.json at the bundle's root (an OCI image layout is expected)".into(),
            ));
        }
        let raw = self.fs.read_small("index.json", MAX_INDEX_BYTES)?;
        let index: ManifestDoc =
            serde_json::from_slice(&raw).map_err(|e| json_err("index.json", e))?;
        let fallback_repo = repository_from_bundle_name(bundle_name);
        let mut images = Vec::new();
        let mut seen = HashSet::new();
        for desc in index.manifests.unwrap_or_default() {
            desc.digest()?;
            let Some(name) = image_name(&desc, &fallback_repo)? else {
                tracing::debug!(digest = %desc.digest, "index.json entry without a name; not published on its own");
                continue;
            };
            if seen.insert(name.to_string()) {
                images.push(LayoutImage {
                    source: name,
                    descriptor: desc,
                });
            }
        }
        if images.is_empty() {
            return Err(Error::Layout(format!(
                "index.json names no images (set the {ANNOTATION_REF_NAME} or {ANNOTATION_CONTAINERD_NAME} annotation)"
            )));
        }
        Ok(images)
    }

    /// Reads a manifest blob, checking its size and digest.
    fn manifest_bytes(&self, image: &str, desc: &Descriptor) -> Result<Vec<u8>> {
        let digest = desc.digest()?;
        let path = digest.blob_path();
        if !self.fs.exists(&path) {
            return Err(blob_err(
                image,
                &digest,
                "manifest is missing from the bundle",
            ));
        }
        let bytes = self.fs.read_small(&path, MAX_MANIFEST_BYTES)?;
        if bytes.len() as u64 != desc.size {
            return Err(blob_err(
                image,
                &digest,
                format!(
                    "manifest is {} bytes, its descriptor says {}",
                    bytes.len(),
                    desc.size
                ),
            ));
        }
        let actual = Digest::of(&bytes);
        if actual != digest {
            return Err(blob_err(
                image,
                &digest,
                format!("manifest content hashes to {actual}"),
            ));
        }
        Ok(bytes)
    }

    /// Walks an image from its top descriptor: every manifest (children first) and every
    /// blob it needs. Checks manifest digests; blobs are checked by [`Self::verify_blob`].
    pub fn plan(&self, image: &str, top: &Descriptor) -> Result<ImagePlan> {
        let mut plan = ImagePlan::default();
        let mut seen_blobs = HashSet::new();
        self.walk(image, top, 0, &mut plan, &mut seen_blobs)?;
        Ok(plan)
    }

    fn walk(
        &self,
        image: &str,
        desc: &Descriptor,
        depth: usize,
        plan: &mut ImagePlan,
        seen_blobs: &mut HashSet<String>,
    ) -> Result<()> {
        if depth > MAX_NESTING {
            return Err(Error::Image {
                image: image.to_string(),
                problem: format!("indexes nest deeper than {MAX_NESTING} levels"),
            });
        }
        let bytes = self.manifest_bytes(image, desc)?;
        let doc: ManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| json_err(&format!("manifest {} of image {image}", desc.digest), e))?;
        let media_type = [
            desc.media_type.as_str(),
            doc.media_type.as_deref().unwrap_or(""),
        ]
        .into_iter()
        .find(|m| !m.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            if doc.manifests.is_some() {
                OCI_INDEX
            } else {
                OCI_MANIFEST
            }
            .to_string()
        });
        if is_index(&media_type) {
            for child in doc.manifests.as_deref().unwrap_or_default() {
                if plan.manifests.iter().any(|(d, _)| d.digest == child.digest) {
                    continue;
                }
                self.walk(image, child, depth + 1, plan, seen_blobs)?;
            }
        } else {
            let config = doc.config.as_ref().ok_or_else(|| Error::Image {
                image: image.to_string(),
                problem: format!("manifest {} has no config", desc.digest),
            })?;
            for blob in std::iter::once(config).chain(doc.layers.iter()) {
                let digest = blob.digest()?;
                // Foreign (non-distributable) layers live at their URLs, not in bundles.
                if !blob.urls.is_empty() && !self.fs.exists(&digest.blob_path()) {
                    continue;
                }
                if seen_blobs.insert(blob.digest.clone()) {
                    plan.blobs.push(blob.clone());
                }
            }
        }
        let mut desc = desc.clone();
        desc.media_type = media_type;
        plan.manifests.push((desc, bytes));
        Ok(())
    }

    /// Streams one blob, checking that it is present, of the stated size, and hashes to
    /// its digest.
    pub fn verify_blob(&self, image: &str, blob: &Descriptor) -> Result<()> {
        let digest = blob.digest()?;
        let path = digest.blob_path();
        if !self.fs.exists(&path) {
            return Err(blob_err(image, &digest, "missing from the bundle"));
        }
        let (mut reader, len) = self.fs.open(&path)?;
        if len != blob.size {
            return Err(blob_err(
                image,
                &digest,
                format!(
                    "is {len} bytes in the bundle, the manifest says {}",
                    blob.size
                ),
            ));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| Error::read(&path, e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if total != blob.size || actual != blob.digest {
            return Err(blob_err(
                image,
                &digest,
                format!("content is corrupt: {total} bytes hashing to {actual}"),
            ));
        }
        Ok(())
    }
}

fn blob_err(image: &str, digest: &Digest, problem: impl Into<String>) -> Error {
    Error::Blob {
        image: image.to_string(),
        digest: digest.to_string(),
        problem: problem.into(),
    }
}

/// The source reference an `index.json` entry names, if any.
fn image_name(desc: &Descriptor, fallback_repo: &str) -> Result<Option<Reference>> {
    if let Some(full) = desc.annotations.get(ANNOTATION_CONTAINERD_NAME) {
        return Reference::parse(full).map(Some);
    }
    let Some(name) = desc.annotations.get(ANNOTATION_REF_NAME) else {
        return Ok(None);
    };
    if name.contains('/') || name.contains(':') || name.contains('@') {
        Reference::parse(name).map(Some)
    } else {
        // A tag alone, as skopeo and oras write it.
        Reference::parse(&format!("{fallback_repo}:{name}")).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strict() {
        let ok = format!("sha256:{}", "0a".repeat(32));
        assert!(Digest::parse(&ok).is_ok());
        for bad in [
            "sha512:00".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
            "sha256:".to_string(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_from_annotations() {
        let mut d = Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            annotations: BTreeMap::new(),
            platform: None,
            urls: vec![],
        };
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
