//! Resolving each image to everything it needs (its manifests, an index's children
//! first read, then every config and layer), and fetching what the cache lacks: images
//! resolved and blobs downloaded several at once, each blob once however many images
//! share it, large ones resumed with `Range` (the registry client's), every one checked
//! against its digest before the cache keeps it.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{StreamExt as _, TryStreamExt as _};
use shipperd_bundle::{Descriptor, ManifestDoc};
use shipperd_model::{Digest, Reference};
use shipperd_registry::Registry;

use crate::{
    Error, Result,
    cache::Cache,
    list::Wanted,
    source::{Layout, Sources},
};

/// How deep indexes may nest.
const MAX_NESTING: usize = 4;
/// Most manifests one image may have (an index's children, theirs...).
const MAX_MANIFESTS: usize = 10_000;

/// Where one image's manifests and blobs are read from.
#[derive(Clone)]
pub enum Origin {
    Registry { reg: Arc<Registry>, repo: String },
    Layout(Arc<Layout>),
}

/// One image, resolved: its name in the bundle, its top manifest and all it needs.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Its name; for a referrer (listed unnamed: the site attaches it to its subject),
    /// the reference it was read by (`host/repo@digest`).
    pub name: Reference,
    /// Named in the bundle's `index.json` (`false`: a referrer).
    pub named: bool,
    pub top: Descriptor,
    /// Every manifest, the top first, each once.
    pub manifests: Vec<Descriptor>,
    /// Every config and layer, each once.
    pub blobs: Vec<Descriptor>,
}

impl Resolved {
    /// Bytes of its manifests and blobs.
    pub fn size(&self) -> u64 {
        self.manifests
            .iter()
            .chain(&self.blobs)
            .map(|d| d.size)
            .sum()
    }
}

/// What the run has done so far, read by a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub images: AtomicU64,
    pub images_done: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Of `bytes_done`, those fetched in this run (not found in the cache).
    pub bytes_fetched: AtomicU64,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Registry { reg, repo } => format!("{}/{repo}", reg.host()),
            Origin::Layout(l) => format!("oci:{}", l.dir.display()),
        }
    }

    /// The manifest `reference` (tag or digest) as stored; `None` when the source has
    /// no such manifest.
    async fn manifest(&self, reference: &str) -> Result<Option<(Vec<u8>, String)>> {
        match self {
            Origin::Registry { reg, repo } => {
                let pulled = reg
                    .manifest(repo, reference)
                    .await
                    .map_err(|e| Error::source(&self.describe(), reference, e))?;
                Ok(pulled.map(|p| (p.bytes.to_vec(), p.media_type)))
            }
            Origin::Layout(l) => {
                let digest = Digest::parse(reference)
                    .map_err(|e| Error::Input(format!("{}: {e}", self.describe())))?;
                let l = l.clone();
                let bytes = tokio::task::spawn_blocking(move || l.manifest(&digest))
                    .await
                    .expect("reading a manifest does not panic")?;
                Ok(Some((bytes, String::new())))
            }
        }
    }

    async fn blob(&self, desc: &Descriptor, cache: &Arc<Cache>) -> Result<()> {
        match self {
            Origin::Registry { reg, repo } => {
                reg.blob_to_file(repo, desc, &cache.partial(&desc.digest))
                    .await
                    .map_err(|e| Error::source(&self.describe(), desc.digest.as_str(), e))?;
                cache.commit(&desc.digest)
            }
            Origin::Layout(l) => {
                let (l, desc, cache) = (l.clone(), desc.clone(), cache.clone());
                tokio::task::spawn_blocking(move || l.copy_blob(&desc, &cache))
                    .await
                    .expect("copying a blob does not panic")
            }
        }
    }
}

/// The origin and the name of `wanted`, and the reference of its top manifest there.
fn origin_of(wanted: &Wanted, sources: &Sources) -> Result<(Origin, Reference, String)> {
    match wanted {
        Wanted::Registry(r) => {
            let reg = sources.registry(r)?;
            let reference = match (&r.digest, &r.tag) {
                (Some(d), _) => d.to_string(),
                (None, Some(t)) => t.clone(),
                (None, None) => unreachable!("a parsed reference names a tag or digest"),
            };
            let origin = Origin::Registry {
                reg,
                repo: r.repository.clone(),
            };
            Ok((origin, r.clone(), reference))
        }
        Wanted::Layout {
            dir,
            reference,
            name,
        } => {
            let layout = Layout::open(dir)?;
            let (desc, own) = layout.find(reference.as_deref())?;
            let name = match (name, own) {
                (Some(n), _) => n.clone(),
                (None, Some(own)) => Reference::parse(&own)
                    .ok()
                    .filter(|r| r.host.is_some())
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "oci:{}: the image is named {own:?}, not a full reference \
                             (host/repository:tag): give the name to carry it under after it",
                            dir.display()
                        ))
                    })?,
                (None, None) => {
                    return Err(Error::Input(format!(
                        "oci:{}: the image has no name: give the name to carry it under after it",
                        dir.display()
                    )));
                }
            };
            Ok((
                Origin::Layout(Arc::new(layout)),
                name,
                desc.digest.to_string(),
            ))
        }
    }
}

/// One platform, `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(Error::Input(format!(
                "platform {s:?}: os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8"
            ))),
        }
    }

    /// Is a manifest of `platform` (an index entry's) one of this?
    fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform.get(k).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| field("variant") == Some(v))
    }
}

/// Which manifests of a multi-platform index are carried.
#[derive(Debug, Clone, Default)]
pub struct Platforms {
    /// Empty: every one (the index whole).
    pub wanted: Vec<Platform>,
    /// Write a new index of only those (another digest); else the index is carried as
    /// it is, naming manifests the bundle leaves out (a registry must accept that, or
    /// hold them already).
    pub rewrite: bool,
}

impl Platforms {
    /// Is the entry `child` of an index carried? An entry without a platform is.
    fn keeps(&self, child: &Descriptor) -> bool {
        match &child.platform {
            _ if self.wanted.is_empty() => true,
            None => true,
            Some(p) => self.wanted.iter().any(|w| w.matches(p)),
        }
    }
}

/// Resolves `wanted`: its manifests are read (from the cache when held there, else
/// from the source, and kept) and walked to every blob; of a multi-platform index only
/// the manifests of `platforms`.
pub async fn resolve(
    wanted: &Wanted,
    sources: &Sources,
    cache: &Arc<Cache>,
    platforms: &Platforms,
) -> Result<(Resolved, Origin)> {
    let (origin, name, reference) = origin_of(wanted, sources)?;
    let fail = |e: Error| e.for_image(&name);
    let (mut bytes, said) = manifest(&origin, &reference, cache)
        .await
        .map_err(fail)?
        .ok_or_else(|| fail(Error::NotFound(origin.describe())))?;
    let mut doc = ManifestDoc::parse(&name.to_string(), &bytes)
        .map_err(|e| fail(Error::Input(e.to_string())))?;
    if let Some(children) = &mut doc.manifests {
        let before = children.len();
        children.retain(|c| platforms.keeps(c));
        if children.is_empty() {
            return Err(fail(Error::Input(
                "its index has no manifest of the platforms asked for".into(),
            )));
        }
        if platforms.rewrite && children.len() < before {
            if name.digest.is_some() {
                return Err(fail(Error::Input(
                    "it is named by digest, and a rewritten index has another: name it by tag"
                        .into(),
                )));
            }
            bytes = rewritten(&bytes, platforms).map_err(fail)?;
            cache.put(&Digest::of(&bytes), &bytes).map_err(fail)?;
        }
    }
    let digest = Digest::of(&bytes);
    let top = Descriptor::new(doc.media_type(&said), digest, bytes.len() as u64);
    let mut out = Resolved {
        named: true,
        name: name.clone(),
        top: top.clone(),
        manifests: vec![top.clone()],
        blobs: Vec::new(),
    };
    let mut seen = HashSet::from([top.digest.clone()]);
    let mut blobs_seen = HashSet::new();
    // (document, depth): a breadth-first walk, each manifest read once.
    let mut queue = std::collections::VecDeque::from([(doc, 0usize)]);
    while let Some((doc, depth)) = queue.pop_front() {
        for child in doc.manifests.iter().flatten() {
            if depth + 1 > MAX_NESTING {
                return Err(fail(Error::Input(format!(
                    "indexes nest deeper than {MAX_NESTING}"
                ))));
            }
            if !seen.insert(child.digest.clone()) {
                continue;
            }
            if seen.len() > MAX_MANIFESTS {
                return Err(fail(Error::Input(format!(
                    "more than {MAX_MANIFESTS} manifests"
                ))));
            }
            let (bytes, _) = manifest(&origin, child.digest.as_str(), cache)
                .await
                .map_err(fail)?
                .ok_or_else(|| {
                    fail(Error::NotFound(format!(
                        "{} (manifest {} of its index)",
                        origin.describe(),
                        child.digest
                    )))
                })?;
            let child_doc = ManifestDoc::parse(child.digest.as_str(), &bytes)
                .map_err(|e| fail(Error::Input(e.to_string())))?;
            let mut d = child.clone();
            d.media_type = child_doc.media_type(&child.media_type);
            out.manifests.push(d);
            queue.push_back((child_doc, depth + 1));
        }
        for b in doc.config.iter().chain(&doc.layers) {
            if blobs_seen.insert(b.digest.clone()) {
                out.blobs.push(b.clone());
            }
        }
    }
    Ok((out, origin))
}

/// `index` with only the manifests `platforms` keeps (every other field as it was).
fn rewritten(index: &[u8], platforms: &Platforms) -> Result<Vec<u8>> {
    let mut v: serde_json::Value =
        serde_json::from_slice(index).map_err(|e| Error::Input(format!("its index: {e}")))?;
    if let Some(list) = v.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|entry| {
            serde_json::from_value::<Descriptor>(entry.clone()).is_ok_and(|d| platforms.keeps(&d))
        });
    }
    Ok(serde_json::to_vec(&v).expect("a JSON value serialises"))
}

/// The manifest `reference` of `origin`: from the cache when it is a digest held
/// there, else read and kept.
async fn manifest(
    origin: &Origin,
    reference: &str,
    cache: &Arc<Cache>,
) -> Result<Option<(Vec<u8>, String)>> {
    if let Ok(d) = Digest::parse(reference)
        && cache.path(&d).exists()
    {
        match cache.read(&d) {
            Ok(bytes) => return Ok(Some((bytes, String::new()))),
            Err(e) => {
                tracing::warn!(error = %e, "a cached manifest was damaged; fetching it again")
            }
        }
    }
    let Some((bytes, media_type)) = origin.manifest(reference).await? else {
        return Ok(None);
    };
    cache.put(&Digest::of(&bytes), &bytes)?;
    Ok(Some((bytes, media_type)))
}

/// Fetches every blob of `images` the cache lacks, `concurrency` at once, each once.
/// `origins[i]` is where `images[i]` is read from.
pub async fn fetch(
    images: &[Resolved],
    origins: &[Origin],
    skip: &dyn Fn(&Digest) -> bool,
    cache: &Arc<Cache>,
    concurrency: usize,
    progress: &Progress,
) -> Result<()> {
    // Each blob once, from the first image that needs it.
    let mut todo: BTreeMap<Digest, (Descriptor, usize)> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        for b in &img.blobs {
            if !skip(&b.digest) {
                todo.entry(b.digest.clone()).or_insert((b.clone(), i));
            }
        }
    }
    let total: u64 = todo.values().map(|(d, _)| d.size).sum();
    progress.bytes.fetch_add(total, Ordering::Relaxed);
    futures::stream::iter(todo.into_values())
        .map(|(desc, i)| async move {
            if !cache.has(&desc.digest, desc.size) {
                origins[i]
                    .blob(&desc, cache)
                    .await
                    .map_err(|e| e.for_image(&images[i].name))?;
                progress
                    .bytes_fetched
                    .fetch_add(desc.size, Ordering::Relaxed);
            }
            progress.bytes_done.fetch_add(desc.size, Ordering::Relaxed);
            Ok::<_, Error>(())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await
}
