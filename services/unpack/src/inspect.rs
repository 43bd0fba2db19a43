//! Opening and checking one bundle (blocking: call from `spawn_blocking`).

use std::{collections::HashSet, path::Path};

use shipperd_bundle::{Format, Layout, LayoutImage, Result, SquashfsBundle, format};

/// What a checked bundle holds.
#[derive(Debug)]
pub struct Inventory {
    pub format: Format,
    pub images: Vec<InventoryImage>,
    /// Distinct blobs across all images (configs, layers, manifests).
    pub blob_count: u64,
    pub blob_bytes: u64,
}

#[derive(Debug)]
pub struct InventoryImage {
    pub source: shipperd_bundle::Reference,
    pub descriptor: shipperd_bundle::Descriptor,
    /// Media type of the top manifest (from the manifest when the index omits it).
    pub media_type: String,
}

/// Opens the bundle at `path`, names its images, and checks every blob they need.
pub fn inspect(path: &Path, bundle_name: &str) -> Result<Inventory> {
    let fmt = format::detect(path)?;
    if fmt != Format::Squashfs {
        return Err(shipperd_bundle::Error::Unsupported(fmt));
    }
    let fs = SquashfsBundle::open(path)?;
    let layout = Layout::new(&fs);
    let named = layout.images(bundle_name)?;
    let mut seen = HashSet::new();
    let mut blob_bytes = 0;
    let mut images = Vec::with_capacity(named.len());
    for LayoutImage { source, descriptor } in named {
        let name = source.to_string();
        let plan = layout.plan(&name, &descriptor)?;
        for blob in &plan.blobs {
            if seen.insert(blob.digest.clone()) {
                layout.verify_blob(&name, blob)?;
                blob_bytes += blob.size;
            }
        }
        for (m, bytes) in &plan.manifests {
            if seen.insert(m.digest.clone()) {
                blob_bytes += bytes.len() as u64;
            }
        }
        let media_type = plan
            .manifests
            .last()
            .map(|(d, _)| d.media_type.clone())
            .unwrap_or_default();
        images.push(InventoryImage {
            source,
            descriptor,
            media_type,
        });
    }
    Ok(Inventory {
        format: fmt,
        images,
        blob_count: seen.len() as u64,
        blob_bytes,
    })
}
