//! Opening and checking one bundle (blocking: call from `spawn_blocking`).
//!
//! Every image is walked: its manifests are read and checked, its blobs looked up (their
//! presence and size, not their bytes: those are hashed once, as publish sends them,
//! and by the registry). What the bundle does not carry (a differential bundle) is
//! planned as absent, for publish to find in the registry. Each image's plan (its
//! manifests' bytes, its blobs and where they are) is appended to the bundle's plans
//! file as soon as it is walked, so memory holds one image's manifests at a time, not
//! the bundle's.

use std::collections::{BTreeMap, HashMap, HashSet};

use shipperd_bundle::{
    BlobPaths, BundleFs, Catalog, Descriptor, Digest, Error, Format, Guard, Limits, Location,
    ManifestDoc, PlanWriter, Reference, Result, StoredPlan, Walker, cas::Cas, container, discover,
    docker,
};
use shipperd_model::{BundleId, DataDir, PlanRef};

use shipperd_trust::{BundleSignatures, Policies, Verdict, signature_name};

/// What a checked bundle holds.
#[derive(Debug)]
pub struct Inventory {
    pub format: Format,
    pub images: Vec<InventoryImage>,
    /// Distinct blobs across all images (configs, layers, manifests, referrers).
    pub blob_count: u64,
    pub blob_bytes: u64,
    /// Of those, the ones the bundle does not carry (the registry must have them).
    pub absent: u64,
    /// Manifests published with an image as its referrers (signatures, SBOMs, ...).
    pub referrers: u64,
    /// The registry a differential bundle was made against (`shipperd create --have`).
    pub made_for: Option<String>,
}

#[derive(Debug)]
pub struct InventoryImage {
    pub source: Reference,
    /// Its top manifest or index.
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Where its plan is in the plans file.
    pub plan: PlanRef,
    /// Bytes of its blobs, manifests and referrers.
    pub bytes: u64,
    /// An operator catalog (its config carries [`CATALOG_LABEL`]).
    pub catalog: bool,
    /// The signature policy's answer (none when no policy applies).
    pub verdict: Option<Verdict>,
}

/// The label of an operator catalog (file-based catalog) image's config.
pub const CATALOG_LABEL: &str = "operators.operatorframework.io.index.configs.v1";
/// Largest config read to look for it.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// How a bundle is read.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub limits: Limits,
    /// Gzip-compress a legacy `docker save` archive's layers into the CAS.
    pub compress_layers: bool,
    /// The signature policies every image must satisfy.
    pub policies: Option<std::sync::Arc<Policies>>,
}

/// Opens the bundle `id` stored at `rel_path` (relative to `data`), names its images,
/// looks up every blob they need, and saves the catalog and the images' plans beside it.
pub fn inspect(
    data: &DataDir,
    id: &BundleId,
    rel_path: &str,
    bundle_name: &str,
    options: &Options,
    guard: &Guard,
) -> Result<Inventory> {
    let limits = &options.limits;
    let path = data
        .resolve(id, rel_path)
        .ok_or_else(|| Error::Layout(format!("{rel_path} is not where bundle {id} is kept")))?;
    let cas = Cas::new(data);
    let parts = shipperd_bundle::parts::part_paths(&path)?;
    let stored: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let opened = container::open(&path, &cas, id.as_str(), limits, guard)?;
    let fs = opened.fs.as_ref();
    let mut found = discover(fs, bundle_name, limits)?;
    if options.compress_layers && !found.made.is_empty() {
        let mut claim = cas.claim_more(id.as_str())?;
        let dir = cas.dir();
        let room = || guard.room(&dir, limits.min_free_bytes);
        let done = docker::compress_layers(&mut found, fs, &cas, &mut claim, &room)?;
        claim.commit()?;
        tracing::info!(
            layers = done.layers,
            bytes = done.bytes_in,
            compressed = done.bytes_out,
            "docker archive layers compressed"
        );
    }
    tracing::debug!(roots = ?found.roots, images = found.images.len(), "layouts found");
    let made_for = found.made_for.clone();
    let blobs = found.blobs(fs);
    let walker = Walker::new(&blobs, limits);

    // Unnamed manifests: referrers of another manifest, or images kept by digest only.
    let mut referrers: BTreeMap<Digest, Vec<Descriptor>> = BTreeMap::new();
    let mut by_digest = Vec::new();
    for (repo, desc) in &found.unnamed {
        let what = format!("manifest {}", desc.digest);
        let Some(bytes) = walker.manifest_bytes(&what, desc)? else {
            // A revision the bundle names but does not carry: unless an image reaches
            // it, it is an image by digest, which the registry must have.
            if let Some(repo) = repo {
                by_digest.push((repo.clone(), desc.clone()));
            }
            continue;
        };
        let doc = ManifestDoc::parse(&what, &bytes)?;
        match &doc.subject {
            Some(subject) => {
                let list = referrers.entry(subject.digest.clone()).or_default();
                if !list.iter().any(|d| d.digest == desc.digest) {
                    list.push(doc.referrer(desc, bytes.len() as u64));
                }
            }
            None => {
                if let Some(repo) = repo {
                    by_digest.push((repo.clone(), desc.clone()));
                }
            }
        }
    }
    let lookup = |d: &Digest| referrers.get(d).cloned().unwrap_or_default();

    let mut plans = PlanWriter::create(&data.plans(id))?;
    let mut check = Checker {
        fs,
        walker: &walker,
        paths: &found.blob_paths,
        made_blobs: &found.stored,
        needed: HashMap::new(),
        absent: HashSet::new(),
        reached: HashSet::new(),
        referrers: 0,
        declared: 0,
        stored,
        budget: limits.expansion_budget(stored),
        ratio: limits.max_expansion_ratio,
    };
    let mut images = Vec::new();
    for img in &found.images {
        guard.check()?;
        images.push(check.image(img.source.clone(), &img.descriptor, &lookup, &mut plans)?);
    }
    // A manifest of a registry tree that no tag reaches is published by digest.
    for (repo, desc) in by_digest {
        if check.reached.contains(&desc.digest.bytes()) {
            continue;
        }
        let source = Reference::parse(&format!("{repo}@{}", desc.digest))?;
        images.push(check.image(source, &desc, &lookup, &mut plans)?);
    }
    if images.len() > limits.max_images {
        return Err(Error::Hostile(format!(
            "the bundle holds {} images, over the limit of {} (maxImages)",
            images.len(),
            limits.max_images
        )));
    }
    plans.finish()?;
    if let Some(policies) = &options.policies {
        let signatures =
            BundleSignatures::index(fs, &walker, &found.blob_paths, &found.images, &referrers);
        let named: Vec<(Reference, Digest)> = images
            .iter()
            .map(|i| (i.source.clone(), i.digest.clone()))
            .collect();
        guard.check()?;
        let verdicts = shipperd_trust::check_all(policies, &named, &signatures);
        for (img, v) in images.iter_mut().zip(verdicts) {
            img.verdict = Some(v);
        }
    }
    let catalog = Catalog {
        container: opened.container,
        parts: parts.iter().map(|p| data.relative(p)).collect(),
        limits: limits.clone(),
    };
    catalog.save(data, id)?;
    save_signatures(fs, data, id)?;
    Ok(Inventory {
        format: opened.format,
        blob_count: check.needed.len() as u64,
        blob_bytes: check.needed.values().sum(),
        absent: check.absent.len() as u64,
        referrers: check.referrers,
        images,
        made_for,
    })
}

/// Where oc-mirror keeps release signatures in its archives (`working-dir/` at the root,
/// or below a prefix).
const SIGNATURES_DIR: &str = "working-dir/signatures/";
/// At most this many signature files are taken from a bundle, each at most this long:
/// a release's signature is a few KiB.
const MAX_SIGNATURES: usize = 256;
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

/// Copies the release signatures the bundle carries (oc-mirror's
/// `working-dir/signatures/<tag>-sha256-<hex>`) beside it, for the operator's
/// `mirrored-release-signatures` ConfigMap. Bounded in number and size; anything else
/// under that directory is ignored.
fn save_signatures(fs: &dyn BundleFs, data: &DataDir, id: &BundleId) -> Result<()> {
    let mut names: Vec<(&str, &str)> = fs
        .files()
        .into_iter()
        .filter_map(|path| {
            let at = path.find(SIGNATURES_DIR)?;
            if at > 0 && !path[..at].ends_with('/') {
                return None;
            }
            let name = &path[at + SIGNATURES_DIR.len()..];
            signature_name(name).then_some((path, name))
        })
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    names.dedup_by(|a, b| a.1 == b.1);
    if names.len() > MAX_SIGNATURES {
        tracing::warn!(
            found = names.len(),
            kept = MAX_SIGNATURES,
            "more release signatures than expected; keeping the first"
        );
        names.truncate(MAX_SIGNATURES);
    }
    let dir = data.signatures(id);
    let io = |p: &std::path::Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    for (path, name) in names {
        match fs.read_small(path, MAX_SIGNATURE_BYTES) {
            Ok(bytes) => {
                let to = dir.join(name);
                std::fs::write(&to, bytes).map_err(io(&to))?;
            }
            Err(error) => {
                tracing::warn!(%error, path, "a release signature is not readable; left out")
            }
        }
    }
    Ok(())
}

/// Walks images one by one, looking each distinct blob up once.
struct Checker<'a> {
    fs: &'a dyn BundleFs,
    walker: &'a Walker<'a>,
    paths: &'a BlobPaths,
    /// Blobs ShipperD stored in the CAS (compressed layers).
    made_blobs: &'a HashMap<Digest, std::path::PathBuf>,
    /// Every distinct blob and manifest (by its hash's bytes), with its size.
    needed: HashMap<[u8; 32], u64>,
    /// Those the bundle does not carry.
    absent: HashSet<[u8; 32]>,
    /// Manifests some image reaches.
    reached: HashSet<[u8; 32]>,
    referrers: u64,
    /// Bytes the blobs the bundle carries declare, and what it may declare: the
    /// stored bytes times the expansion limit (`--max-expansion`).
    declared: u64,
    stored: u64,
    budget: u64,
    ratio: u64,
}

impl Checker<'_> {
    fn image(
        &mut self,
        source: Reference,
        top: &Descriptor,
        lookup: &dyn Fn(&Digest) -> Vec<Descriptor>,
        plans: &mut PlanWriter,
    ) -> Result<InventoryImage> {
        let name = source.to_string();
        let plan = self.walker.plan(&name, top, lookup)?;
        for blob in &plan.blobs {
            let key = blob.digest.bytes();
            if !self.needed.contains_key(&key) {
                if self.walker.blob_present(&name, blob)? {
                    self.declare(&name, blob)?;
                } else {
                    self.absent.insert(key);
                }
                self.needed.insert(key, blob.size);
            }
        }
        for (m, bytes) in &plan.manifests {
            let key = m.digest.bytes();
            self.reached.insert(key);
            match bytes {
                Some(b) => self.needed.insert(key, b.len() as u64),
                None => {
                    self.absent.insert(key);
                    self.needed.insert(key, m.size)
                }
            };
        }
        for (_, m, bytes) in &plan.referrers {
            self.referrers += 1;
            self.needed.insert(m.digest.bytes(), bytes.len() as u64);
        }
        let catalog = self.is_catalog(&plan);
        let d = plan.manifests.last().map_or(top, |(d, _)| d);
        let (digest, media_type, size) = (d.digest.clone(), d.media_type.clone(), d.size);
        let stored = StoredPlan::new(plan, |d| self.locate(d))?;
        let bytes = stored.bytes_total();
        let at = plans.append(&stored)?;
        Ok(InventoryImage {
            source,
            digest,
            media_type,
            size,
            plan: at,
            bytes,
            catalog,
            verdict: None,
        })
    }

    /// Does the image's config (its first platform's, for an index) carry the catalog
    /// label? One small read; `false` when the bundle does not carry the config.
    fn is_catalog(&self, plan: &shipperd_bundle::ImagePlan) -> bool {
        let config = plan.manifests.iter().rev().find_map(|(_, bytes)| {
            ManifestDoc::parse("manifest", bytes.as_deref()?)
                .ok()?
                .config
        });
        let Some(config) = config.filter(|c| c.size <= MAX_CONFIG_BYTES) else {
            return false;
        };
        let Some(path) = self.paths.get(&config.digest) else {
            return false;
        };
        let Ok(bytes) = self.fs.read_small(&path, MAX_CONFIG_BYTES) else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .is_some_and(|v| v["config"]["Labels"].get(CATALOG_LABEL).is_some())
    }

    /// Counts a blob the bundle carries against the expansion budget: a bundle cannot
    /// hold more than its stored bytes allow (a squashfs' sparse or highly compressed
    /// files come back at their full size, and publish would send all of it).
    fn declare(&mut self, image: &str, blob: &Descriptor) -> Result<()> {
        self.declared = self.declared.saturating_add(blob.size);
        if self.declared > self.budget {
            return Err(Error::Hostile(format!(
                "blob {} of image {image} declares {} bytes, taking the bundle's blobs to {} \
                 bytes: more than the {} bytes a bundle of {} bytes may expand to \
                 (--max-expansion {})",
                blob.digest, blob.size, self.declared, self.budget, self.stored, self.ratio
            )));
        }
        Ok(())
    }

    fn locate(&self, digest: &Digest) -> Result<Location> {
        if self.made_blobs.contains_key(digest) {
            return Ok(Location::Cas {
                hex: digest.hex().to_string(),
            });
        }
        match self.paths.get(digest) {
            Some(p) => Ok(self.fs.locate(&p)?.0),
            None => Ok(Location::Absent),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_files_are_named_as_oc_mirror_names_them() {
        let hex = "ab".repeat(32);
        assert!(shipperd_trust::signature_name(&format!(
            "4.18.1-x86_64-sha256-{hex}"
        )));
        for bad in [
            format!("../x-sha256-{hex}"),
            format!("a/b-sha256-{hex}"),
            format!("-sha256-{hex}"),
            format!("4.18-sha256-{}", "AB".repeat(32)),
            "4.18-sha256-abc".to_string(),
            "notes".to_string(),
        ] {
            assert!(!shipperd_trust::signature_name(&bad), "{bad}");
        }
    }
}
