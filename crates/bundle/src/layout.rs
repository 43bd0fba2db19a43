//! Digests, descriptors, and the walk from an image's top manifest to everything it
//! needs: manifests (children first), blobs, and the referrers (signatures, SBOMs,
//! attestations) attached to any of its manifests. Every manifest the bundle carries is
//! checked for size, digest and shape as it is read. A manifest the bundle does not
//! carry (a differential, Day-2 bundle) is planned as absent: the target registry must
//! have it. Blobs' bytes are checked as publish sends them (and by the registry).

use std::{
    collections::{BTreeMap, HashSet},
    io::Read,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{BlobSource, Digest, Error, Limits, Result};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// On a bundle's `index.json` (`shipperd create --have`): the registry whose inventory
/// it was made against, leaving out what that registry holds; no other may take it.
pub const ANNOTATION_MADE_FOR: &str = "io.shipperd.inventory.registry";

/// How deep indexes and referrers may nest (index → index → manifest is depth 2).
const MAX_NESTING: usize = 4;

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor with only the required fields.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
            artifact_type: None,
        }
    }
}

/// A manifest or an index: the fields we need of either.
#[derive(Debug, Deserialize)]
pub struct ManifestDoc {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl ManifestDoc {
    /// Parses a manifest; `what` names it in errors.
    pub fn parse(what: &str, bytes: &[u8]) -> Result<Self> {
        let doc: ManifestDoc = serde_json::from_slice(bytes).map_err(|e| json_err(what, e))?;
        if doc.schema_version == Some(1) {
            return Err(Error::Json {
                path: what.to_string(),
                reason: "Docker schema 1 manifests are deprecated and not supported".into(),
            });
        }
        Ok(doc)
    }

    /// This manifest (`desc`, `len` bytes) as the referrers API lists it under its
    /// subject: its media type, annotations and artifact type (else its config's).
    pub fn referrer(&self, desc: &Descriptor, len: u64) -> Descriptor {
        let mut r = Descriptor::new(self.media_type(&desc.media_type), desc.digest.clone(), len);
        r.annotations = self.annotations.clone();
        r.artifact_type = self
            .artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()));
        r
    }

    /// The media type: the descriptor's, else the document's, else inferred from shape.
    pub fn media_type(&self, from_descriptor: &str) -> String {
        [from_descriptor, self.media_type.as_deref().unwrap_or("")]
            .into_iter()
            .find(|m| !m.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                if self.manifests.is_some() {
                    OCI_INDEX
                } else {
                    OCI_MANIFEST
                }
                .to_string()
            })
    }
}

/// Everything one image needs, in push order.
#[derive(Debug, Clone, Default)]
pub struct ImagePlan {
    /// Distinct blobs (configs and layers) of every manifest of the image and its
    /// referrers.
    pub blobs: Vec<Descriptor>,
    /// The image's manifests with their exact bytes, children before the index that lists
    /// them; the last one is the image's own top manifest (or index). `None`: the
    /// bundle does not carry it (nor, then, what it lists).
    pub manifests: Vec<(Descriptor, Option<Vec<u8>>)>,
    /// Referrers (with their own children first), pushed by digest after the image:
    /// (the subject digest, for the referrer itself; `None` for its children), the
    /// descriptor, the bytes.
    pub referrers: Vec<(Option<Digest>, Descriptor, Vec<u8>)>,
}

impl ImagePlan {
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }

    /// Every manifest digest of the image (not its referrers).
    pub fn manifest_digests(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().map(|(d, _)| &d.digest)
    }
}

/// Walks images over a bundle's blobs.
pub struct Walker<'a> {
    blobs: &'a dyn BlobSource,
    limits: &'a Limits,
}

fn json_err(path: &str, e: impl std::fmt::Display) -> Error {
    Error::Json {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

impl<'a> Walker<'a> {
    pub fn new(blobs: &'a dyn BlobSource, limits: &'a Limits) -> Self {
        Walker { blobs, limits }
    }

    /// Reads a manifest blob, checking its size (when the descriptor gives one) and
    /// digest. Returns the bytes, or `None` when the bundle does not carry it.
    pub fn manifest_bytes(&self, image: &str, desc: &Descriptor) -> Result<Option<Vec<u8>>> {
        let digest = &desc.digest;
        let Some((reader, len)) = self.blobs.blob(digest)? else {
            return Ok(None);
        };
        let limit = self.limits.max_manifest_bytes;
        if len > limit {
            return Err(blob_err(
                image,
                digest,
                format!("manifest is {len} bytes, over the limit of {limit} (maxManifestBytes)"),
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        reader
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::read(digest.as_str(), e))?;
        if desc.size != 0 && bytes.len() as u64 != desc.size {
            return Err(blob_err(
                image,
                digest,
                format!(
                    "manifest is {} bytes, its descriptor says {}",
                    bytes.len(),
                    desc.size
                ),
            ));
        }
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(blob_err(
                image,
                digest,
                format!("manifest content hashes to {actual}"),
            ));
        }
        Ok(Some(bytes))
    }

    /// Walks an image from its top descriptor: every manifest (children first), every
    /// blob it needs, and the referrers `referrers(digest)` names for any manifest.
    /// Checks manifest digests; a manifest the bundle lacks is planned as absent.
    pub fn plan(
        &self,
        image: &str,
        top: &Descriptor,
        referrers: &dyn Fn(&Digest) -> Vec<Descriptor>,
    ) -> Result<ImagePlan> {
        let mut plan = ImagePlan::default();
        let mut seen_blobs = HashSet::new();
        let mut manifests = Vec::new();
        self.walk(
            image,
            top,
            0,
            &mut manifests,
            &mut plan.blobs,
            &mut seen_blobs,
        )?;
        plan.manifests = manifests;
        // Referrers of the image's manifests, then of those referrers, bounded.
        let mut seen: HashSet<Digest> = plan.manifest_digests().cloned().collect();
        let mut subjects: Vec<Digest> = seen.iter().cloned().collect();
        subjects.sort();
        for depth in 0..MAX_NESTING {
            let mut next = Vec::new();
            for subject in &subjects {
                for r in referrers(subject) {
                    if !seen.insert(r.digest.clone()) {
                        continue;
                    }
                    let mut found = Vec::new();
                    self.walk(
                        image,
                        &r,
                        depth + 1,
                        &mut found,
                        &mut plan.blobs,
                        &mut seen_blobs,
                    )?;
                    let last = found.len().saturating_sub(1);
                    for (i, (d, b)) in found.into_iter().enumerate() {
                        seen.insert(d.digest.clone());
                        next.push(d.digest.clone());
                        // Referrers are found among the bundle's manifests: present.
                        if let Some(b) = b {
                            plan.referrers
                                .push(((i == last).then(|| subject.clone()), d, b));
                        }
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            subjects = next;
        }
        Ok(plan)
    }

    fn walk(
        &self,
        image: &str,
        desc: &Descriptor,
        depth: usize,
        manifests: &mut Vec<(Descriptor, Option<Vec<u8>>)>,
        blobs: &mut Vec<Descriptor>,
        seen_blobs: &mut HashSet<Digest>,
    ) -> Result<()> {
        if depth > MAX_NESTING {
            return Err(Error::Image {
                image: image.to_string(),
                problem: format!("indexes nest deeper than {MAX_NESTING} levels"),
            });
        }
        let Some(bytes) = self.manifest_bytes(image, desc)? else {
            // Not carried (a differential bundle): the registry must have it, and so
            // everything it lists.
            manifests.push((desc.clone(), None));
            return Ok(());
        };
        let doc = ManifestDoc::parse(
            &format!("manifest {} of image {image}", desc.digest),
            &bytes,
        )?;
        let media_type = doc.media_type(&desc.media_type);
        if is_index(&media_type) {
            for child in doc.manifests.as_deref().unwrap_or_default() {
                if manifests.iter().any(|(d, _)| d.digest == child.digest) {
                    continue;
                }
                self.walk(image, child, depth + 1, manifests, blobs, seen_blobs)?;
            }
        } else {
            let config = doc.config.as_ref().ok_or_else(|| Error::Image {
                image: image.to_string(),
                problem: format!("manifest {} has no config", desc.digest),
            })?;
            for blob in std::iter::once(config).chain(doc.layers.iter()) {
                // Foreign (non-distributable) layers live at their URLs, not in bundles.
                if !blob.urls.is_empty() && self.blobs.blob(&blob.digest)?.is_none() {
                    continue;
                }
                if seen_blobs.insert(blob.digest.clone()) {
                    blobs.push(blob.clone());
                }
            }
        }
        let mut desc = desc.clone();
        desc.media_type = media_type;
        desc.size = bytes.len() as u64;
        if desc.artifact_type.is_none() {
            desc.artifact_type = doc
                .artifact_type
                .clone()
                .or_else(|| doc.config.as_ref().map(|c| c.media_type.clone()));
        }
        if desc.annotations.is_empty() {
            desc.annotations = doc.annotations.clone();
        }
        manifests.push((desc, Some(bytes)));
        Ok(())
    }

    /// Is the blob in the bundle (`false`: absent, a differential bundle), and of the
    /// size its manifest states? Reads none of its bytes: they are hashed as publish
    /// sends them.
    pub fn blob_present(&self, image: &str, blob: &Descriptor) -> Result<bool> {
        let Some((_, len)) = self.blobs.blob(&blob.digest)? else {
            return Ok(false);
        };
        if len != blob.size {
            return Err(blob_err(
                image,
                &blob.digest,
                format!(
                    "is {len} bytes in the bundle, the manifest says {}",
                    blob.size
                ),
            ));
        }
        Ok(true)
    }

    /// Streams one blob, checking that it is present, of the stated size, and hashes to
    /// its digest.
    pub fn verify_blob(&self, image: &str, blob: &Descriptor) -> Result<()> {
        let digest = &blob.digest;
        let Some((mut reader, len)) = self.blobs.blob(digest)? else {
            return Err(blob_err(image, digest, "missing from the bundle"));
        };
        if len != blob.size {
            return Err(blob_err(
                image,
                digest,
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
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::read(digest.as_str(), e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        let actual = Digest::from_sha256(&hasher.finalize().into());
        if total != blob.size || actual != blob.digest {
            return Err(blob_err(
                image,
                digest,
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
