//! Opening and checking one bundle (blocking: call from `spawn_blocking`).

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
};

use shipperd_bundle::{
    Catalog, Descriptor, Digest, Error, Format, FsBlobs, Limits, ManifestDoc, Reference, Result,
    Walker, cas::Cas, catalog::BlobEntry, container, discover,
};

/// What a checked bundle holds.
#[derive(Debug)]
pub struct Inventory {
    pub format: Format,
    pub images: Vec<InventoryImage>,
    /// Distinct blobs across all images (configs, layers, manifests, referrers).
    pub blob_count: u64,
    pub blob_bytes: u64,
    /// Manifests published with an image as its referrers (signatures, SBOMs, ...).
    pub referrers: u64,
}

#[derive(Debug)]
pub struct InventoryImage {
    pub source: Reference,
    /// The top manifest or index, with its media type and size filled in.
    pub descriptor: Descriptor,
}

/// Opens the bundle stored at `data_dir/rel_path`, names its images, checks every blob
/// they need, and saves the bundle's catalog beside it.
pub fn inspect(
    data_dir: &Path,
    rel_path: &str,
    bundle_name: &str,
    bundle_id: &str,
    limits: &Limits,
) -> Result<Inventory> {
    let path = data_dir.join(rel_path);
    let cas = Cas::new(data_dir);
    let opened = container::open(&path, &cas, bundle_id, limits)?;
    let fs = opened.fs.as_ref();
    let found = discover(fs, bundle_name, limits)?;
    tracing::debug!(roots = ?found.roots, images = found.images.len(), "layouts found");
    let blobs = FsBlobs {
        fs,
        paths: &found.blob_paths,
    };
    let walker = Walker::new(&blobs, limits);

    // Unnamed manifests: referrers of another manifest, or images kept by digest only.
    let mut referrers: BTreeMap<String, Vec<Descriptor>> = BTreeMap::new();
    let mut by_digest = Vec::new();
    for (repo, desc) in &found.unnamed {
        let what = format!("manifest {}", desc.digest);
        let bytes = walker.manifest_bytes(&what, desc)?;
        let doc = ManifestDoc::parse(&what, &bytes)?;
        match &doc.subject {
            Some(subject) => {
                subject.digest()?;
                let list = referrers.entry(subject.digest.clone()).or_default();
                if !list.iter().any(|d| d.digest == desc.digest) {
                    list.push(Descriptor {
                        media_type: doc.media_type(&desc.media_type),
                        digest: desc.digest.clone(),
                        size: bytes.len() as u64,
                        annotations: doc.annotations.clone(),
                        artifact_type: doc
                            .artifact_type
                            .clone()
                            .or_else(|| doc.config.as_ref().map(|c| c.media_type.clone())),
                        ..Default::default()
                    });
                }
            }
            None => {
                if let Some(repo) = repo {
                    by_digest.push((repo.clone(), desc.clone()));
                }
            }
        }
    }
    let lookup = |d: &str| referrers.get(d).cloned().unwrap_or_default();

    let mut needed: BTreeMap<String, u64> = BTreeMap::new();
    let mut verified = HashSet::new();
    let reached = std::cell::RefCell::new(HashSet::new());
    let mut images = Vec::new();
    let mut referrer_count = 0u64;
    let mut check = |source: Reference, top: &Descriptor| -> Result<InventoryImage> {
        let name = source.to_string();
        let plan = walker.plan(&name, top, &lookup)?;
        for blob in &plan.blobs {
            if verified.insert(blob.digest.clone()) {
                walker.verify_blob(&name, blob)?;
                needed.insert(blob.digest.clone(), blob.size);
            }
        }
        for (m, bytes) in &plan.manifests {
            reached.borrow_mut().insert(m.digest.clone());
            needed.insert(m.digest.clone(), bytes.len() as u64);
        }
        for (_, m, bytes) in &plan.referrers {
            referrer_count += 1;
            needed.insert(m.digest.clone(), bytes.len() as u64);
        }
        let descriptor = plan
            .manifests
            .last()
            .map(|(d, _)| d.clone())
            .unwrap_or_else(|| top.clone());
        Ok(InventoryImage { source, descriptor })
    };
    for img in &found.images {
        images.push(check(img.source.clone(), &img.descriptor)?);
    }
    // A manifest of a registry tree that no tag reaches is published by digest.
    for (repo, desc) in by_digest {
        if reached.borrow().contains(&desc.digest) {
            continue;
        }
        let source = Reference::parse(&format!("{repo}@{}", desc.digest))?;
        images.push(check(source, &desc)?);
    }
    if images.len() > limits.max_images {
        return Err(Error::Hostile(format!(
            "the bundle holds {} images, over the limit of {} (maxImages)",
            images.len(),
            limits.max_images
        )));
    }

    let mut catalog = Catalog {
        container: opened.container,
        parts: shipperd_bundle::parts::part_paths(&path)?
            .iter()
            .map(|p| {
                p.strip_prefix(data_dir)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        blobs: BTreeMap::new(),
        referrers,
    };
    let blob_bytes = needed.values().sum();
    for digest in needed.keys() {
        let d = Digest::parse(digest)?;
        let p = found
            .blob_paths
            .get(d.as_str())
            .ok_or_else(|| Error::Missing(d.to_string()))?;
        let (location, size) = fs.locate(p)?;
        catalog
            .blobs
            .insert(digest.clone(), BlobEntry { size, location });
    }
    catalog.save(&Catalog::path_for(&path))?;
    Ok(Inventory {
        format: opened.format,
        blob_count: needed.len() as u64,
        blob_bytes,
        referrers: referrer_count,
        images,
    })
}
