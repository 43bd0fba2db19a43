//! The carry side: `shipperd create` makes a bundle on the connected side from images in
//! registries and OCI layouts.
//!
//! 1. **Resolve** ([`collect::resolve`]): each image's manifests (an index and its
//!    children), read from the cache when held there by digest, else from the source.
//! 2. **Plan** ([`Planned`]): what the bundle carries, image by image, and its size;
//!    checked against the free space of the cache and the output's file system.
//! 3. **Fetch** ([`collect::fetch`]): the blobs the cache lacks, several at once, each
//!    once, resumed with `Range`, checked against their digests.
//! 4. **Write** ([`write::write`]): an OCI layout into a squashfs or a tar, from the
//!    cache, deterministic, every blob checked again as it is written.
//!
//! A run stopped anywhere and started again with the same arguments fetches only what
//! the cache lacks and writes the same bytes.

pub mod attach;
pub mod cache;
pub mod collect;
pub mod fbc;
pub mod isc;
pub mod list;
pub mod lookaside;
pub mod source;
pub mod write;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use shipperd_model::{Digest, Reference};

pub use collect::{Progress, Resolved};
pub use list::Wanted;
pub use source::SourceOptions;
pub use write::Format;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {cause}")]
    Source { what: String, cause: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("damaged: {0}")]
    Damaged(String),
    #[error("not enough free space in {path}: {need} bytes needed, {free} free ({what})")]
    NoSpace {
        path: String,
        need: u64,
        free: u64,
        what: &'static str,
    },
    #[error("{image}: {cause}")]
    Image { image: String, cause: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn source(what: &str, reference: &str, e: shipperd_registry::RegistryError) -> Self {
        Error::Source {
            what: format!("{what} ({reference})"),
            cause: e.cause(),
        }
    }

    /// This error, said of `image` (once).
    pub fn for_image(self, image: &Reference) -> Self {
        match self {
            Error::Image { .. } => self,
            other => Error::Image {
                image: image.to_string(),
                cause: Box::new(other),
            },
        }
    }
}

/// What to make.
#[derive(Debug, Clone)]
pub struct Options {
    pub images: Vec<Wanted>,
    /// Operator catalogs to carry, with the bundles and related images they select.
    pub catalogs: Vec<isc::CatalogSpec>,
    /// Repositories (`host/repo`) never carried (`blockedImages`).
    pub blocked: Vec<String>,
    pub output: PathBuf,
    /// `None`: from the output's name (squashfs when it says nothing).
    pub format: Option<Format>,
    pub cache_dir: PathBuf,
    pub sources: SourceOptions,
    /// Images resolved, and blobs fetched, at once.
    pub concurrency: usize,
    /// The site's inventory (`shipperd inventory`): carry only what it lacks.
    pub have: Option<shipperd_model::Inventory>,
    /// Carry what is attached to each image (cosign tags, referrers; see [`attach`]).
    pub attached: bool,
    /// Which manifests of multi-platform indexes are carried.
    pub platforms: collect::Platforms,
    /// Split the bundle into parts of at most this many bytes (tar formats).
    pub max_part_size: Option<u64>,
    /// Where simple-signing signatures are (`--registries.d`).
    pub lookasides: Option<Arc<lookaside::Lookasides>>,
}

impl Options {
    pub fn format(&self) -> Format {
        self.format
            .or_else(|| Format::from_name(&self.output))
            .unwrap_or(Format::Squashfs)
    }
}

/// One image of a plan, as `--plan` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub name: String,
    pub digest: Digest,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub manifests: usize,
    pub blobs: usize,
    /// Bytes of its manifests and blobs.
    pub size: u64,
    /// A referrer of another image (listed unnamed).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub referrer: bool,
    /// With `--have`: the site holds it already (its manifest in the repository it
    /// lands in): listed, carrying nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// Bytes it adds to the bundle (what it needs that the site, and the images before
    /// it, do not have).
    pub carried: u64,
}

/// What a bundle would carry.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub output: PathBuf,
    pub format: &'static str,
    pub images: Vec<PlannedImage>,
    /// Distinct manifests and blobs carried, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Of `bytes`, those the cache lacks (to fetch).
    pub to_fetch: u64,
    /// With `--have`: the registry it is made for, the images the site holds whole, and
    /// the blobs (and their bytes) left out because the site holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub made_for: Option<String>,
    pub held_images: usize,
    pub held_blobs: usize,
    pub held_bytes: u64,
    #[serde(skip)]
    resolved: Vec<Resolved>,
    #[serde(skip)]
    origins: Vec<collect::Origin>,
    /// Lookaside signatures carried (`sigstore/...`).
    pub signatures: usize,
    #[serde(skip)]
    carried: BTreeMap<Digest, u64>,
    #[serde(skip)]
    extras: BTreeMap<String, (Digest, u64)>,
}

/// What [`create`] made.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub output: PathBuf,
    pub images: usize,
    pub files: usize,
    /// The bundle's size, and the bytes fetched from sources in this run.
    pub size: u64,
    pub fetched: u64,
    /// The sha256 of the whole bundle (the parts' concatenation).
    pub sha256: String,
    /// With `--max-part-size`: the parts, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PathBuf>,
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Squashfs => "squashfs",
        Format::Tar => "tar",
        Format::TarZstd => "tar.zst",
    }
}

/// Resolves every image and says what the bundle would carry; fetches no blob (but an
/// operator catalog's, to read it).
pub async fn plan(opts: &Options, progress: &Progress) -> Result<Planned> {
    let cache = Arc::new(cache::Cache::open(&opts.cache_dir)?);
    plan_with(opts, progress, &cache).await
}

async fn plan_with(
    opts: &Options,
    progress: &Progress,
    cache: &Arc<cache::Cache>,
) -> Result<Planned> {
    let cache = cache.clone();
    let sources = source::Sources::new(opts.sources.clone())?;
    let wanted = with_catalogs(opts, &sources, &cache, progress).await?;
    progress
        .images
        .store(wanted.len() as u64, Ordering::Relaxed);
    let (mut resolved, mut origins): (Vec<_>, Vec<_>) = futures::stream::iter(&wanted)
        .map(|w| {
            let (sources, cache) = (&sources, &cache);
            async move {
                let r = collect::resolve(w, sources, cache, &opts.platforms).await;
                progress.images_done.fetch_add(1, Ordering::Relaxed);
                r
            }
        })
        .buffered(opts.concurrency.max(1))
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .unzip();
    if opts.attached {
        let found = attach::find(&resolved, &origins, opts.concurrency).await?;
        progress
            .images
            .fetch_add(found.len() as u64, Ordering::Relaxed);
        let more: Vec<(Resolved, collect::Origin)> = futures::stream::iter(found)
            .map(|(w, named)| {
                let (sources, cache) = (&sources, &cache);
                async move {
                    let (mut r, o) =
                        collect::resolve(&w, sources, cache, &Default::default()).await?;
                    r.named = named;
                    progress.images_done.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, Error>((r, o))
                }
            })
            .buffered(opts.concurrency.max(1))
            .try_collect()
            .await?;
        for (r, o) in more {
            resolved.push(r);
            origins.push(o);
        }
    }
    let have = opts.have.as_ref();
    let mut carried = BTreeMap::new();
    let mut held = std::collections::BTreeSet::new();
    let mut images = Vec::with_capacity(resolved.len());
    for r in &resolved {
        let source = format!(
            "{}/{}",
            r.name.host.as_deref().unwrap_or("docker.io"),
            r.name.repository
        );
        let whole = have.is_some_and(|h| h.has_manifest(&source, &r.top.digest));
        let mut added = 0;
        if !whole {
            for d in &r.manifests {
                if carried.insert(d.digest.clone(), d.size).is_none() {
                    added += d.size;
                }
            }
            for d in &r.blobs {
                if have.is_some_and(|h| h.has_blob(&d.digest)) {
                    held.insert((d.digest.clone(), d.size));
                } else if carried.insert(d.digest.clone(), d.size).is_none() {
                    added += d.size;
                }
            }
        }
        images.push(PlannedImage {
            referrer: !r.named,
            name: r.name.to_string(),
            digest: r.top.digest.clone(),
            media_type: r.top.media_type.clone(),
            manifests: r.manifests.len(),
            blobs: r.blobs.len(),
            size: r.size(),
            held: whole,
            carried: added,
        });
    }
    let extras = signatures(opts, &resolved, &cache).await?;
    let to_fetch = carried
        .iter()
        .filter(|(d, size)| !cache.has(d, **size))
        .map(|(_, s)| s)
        .sum();
    Ok(Planned {
        output: opts.output.clone(),
        format: format_name(opts.format()),
        files: carried.len(),
        bytes: carried.values().sum(),
        to_fetch,
        made_for: have.map(|h| h.registry.clone()),
        held_images: images.iter().filter(|i| i.held).count(),
        held_blobs: held.len(),
        held_bytes: held.iter().map(|(_, s)| s).sum(),
        signatures: extras.len(),
        extras,
        images,
        resolved,
        origins,
        carried,
    })
}

/// The lookaside signatures of every named image (at its top digest), kept in the
/// cache: path in the bundle → digest and size.
async fn signatures(
    opts: &Options,
    resolved: &[Resolved],
    cache: &cache::Cache,
) -> Result<BTreeMap<String, (Digest, u64)>> {
    let mut out = BTreeMap::new();
    let Some(l) = &opts.lookasides else {
        return Ok(out);
    };
    let found: Vec<Vec<(String, Vec<u8>)>> =
        futures::stream::iter(resolved.iter().filter(|r| r.named))
            .map(|r| async move {
                l.signatures(&r.name, &r.top.digest)
                    .await
                    .map_err(|e| e.for_image(&r.name))
            })
            .buffered(opts.concurrency.max(1))
            .try_collect()
            .await?;
    for (path, bytes) in found.into_iter().flatten() {
        let d = Digest::of(&bytes);
        cache.put(&d, &bytes)?;
        out.insert(path, (d, bytes.len() as u64));
    }
    Ok(out)
}

/// The images to carry: those asked for, and each catalog with the images its packages
/// select (its blobs fetched now, to read it); none of a blocked repository.
async fn with_catalogs(
    opts: &Options,
    sources: &source::Sources,
    cache: &Arc<cache::Cache>,
    progress: &Progress,
) -> Result<Vec<Wanted>> {
    let mut seen: std::collections::HashSet<Wanted> = opts.images.iter().cloned().collect();
    let mut wanted = opts.images.clone();
    let mut add = |w: Wanted, wanted: &mut Vec<Wanted>| {
        if seen.insert(w.clone()) {
            wanted.push(w);
        }
    };
    for spec in &opts.catalogs {
        let w = Wanted::Registry(spec.catalog.clone());
        let (r, origin) = collect::resolve(&w, sources, cache, &opts.platforms).await?;
        collect::fetch(
            std::slice::from_ref(&r),
            &[origin],
            &|_| false,
            cache,
            opts.concurrency,
            progress,
        )
        .await?;
        let (c, top, s) = (cache.clone(), r.top.digest.clone(), spec.clone());
        let refs = tokio::task::spawn_blocking(move || fbc::select(&c, &top, &s))
            .await
            .expect("reading a catalog does not panic")
            .map_err(|e| e.for_image(&spec.catalog))?;
        tracing::info!(catalog = %spec.catalog, images = refs.len(), "catalog resolved");
        add(w, &mut wanted);
        for r in refs {
            let r = list::full_reference(&r)
                .map_err(|e| Error::Input(format!("catalog {} names {r}: {e}", spec.catalog)))?;
            add(Wanted::Registry(r), &mut wanted);
        }
    }
    wanted.retain(|w| match w {
        Wanted::Registry(r) => {
            let repo = isc::repository_of(r);
            !opts.blocked.contains(&repo)
        }
        Wanted::Layout { .. } => true,
    });
    Ok(wanted)
}

/// Makes the bundle `opts` asks for.
pub async fn create(opts: &Options, progress: &Progress) -> Result<Created> {
    if opts.max_part_size.is_some() && opts.format() == Format::Squashfs {
        return Err(Error::Input(
            "a squashfs is one file and cannot be split: --max-part-size is for tar bundles".into(),
        ));
    }
    if opts.max_part_size == Some(0) {
        return Err(Error::Input("--max-part-size must be above 0".into()));
    }
    let cache = Arc::new(cache::Cache::open(&opts.cache_dir)?);
    let planned = plan_with(opts, progress, &cache).await?;
    let names: Vec<(Option<String>, shipperd_bundle::Descriptor)> = planned
        .resolved
        .iter()
        .map(|r| (r.named.then(|| r.name.to_string()), r.top.clone()))
        .collect();
    let contents = write::Contents {
        index: write::index_json(&names, planned.made_for.as_deref()),
        files: planned.carried,
        extras: planned.extras,
    };
    // Space: the cache takes what is fetched, the output the whole bundle (where both
    // are on one file system, both).
    let out_dir = opts
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let bundle = planned.bytes + write::overhead(planned.files, contents.index.len());
    check_space(&opts.cache_dir, out_dir, planned.to_fetch, bundle)?;
    let carried = &contents.files;
    collect::fetch(
        &planned.resolved,
        &planned.origins,
        &|d| !carried.contains_key(d),
        &cache,
        opts.concurrency,
        progress,
    )
    .await?;
    let (out, format) = (opts.output.clone(), opts.format());
    let cache2 = cache.clone();
    let size = tokio::task::spawn_blocking(move || write::write(&out, format, &contents, &cache2))
        .await
        .expect("writing does not panic")?;
    let sha256 = {
        let out = opts.output.clone();
        tokio::task::spawn_blocking(move || file_sha256(&out))
            .await
            .expect("hashing does not panic")?
    };
    let parts = match opts.max_part_size {
        Some(max) => {
            let out = opts.output.clone();
            tokio::task::spawn_blocking(move || write::split(&out, max))
                .await
                .expect("splitting does not panic")?
        }
        None => Vec::new(),
    };
    Ok(Created {
        output: opts.output.clone(),
        images: planned.images.len(),
        files: planned.files,
        size,
        fetched: progress.bytes_fetched.load(Ordering::Relaxed),
        sha256,
        parts,
    })
}

fn file_sha256(p: &Path) -> Result<String> {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(p, e))?;
    Ok(hex::encode(h.finalize()))
}

fn free_space(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some((st.f_fsid, st.f_bavail.saturating_mul(st.f_frsize)))
}

/// Refuses a run whose downloads (into `cache`) and bundle (into `out`) do not fit.
fn check_space(cache: &Path, out: &Path, fetch: u64, bundle: u64) -> Result<()> {
    let (Some((cache_fs, cache_free)), Some((out_fs, out_free))) =
        (free_space(cache), free_space(out))
    else {
        return Ok(());
    };
    let no_space = |path: &Path, need, free, what| Error::NoSpace {
        path: path.display().to_string(),
        need,
        free,
        what,
    };
    if cache_fs == out_fs {
        if fetch + bundle > out_free {
            return Err(no_space(
                out,
                fetch + bundle,
                out_free,
                "the blobs to fetch into the cache and the bundle",
            ));
        }
        return Ok(());
    }
    if fetch > cache_free {
        return Err(no_space(cache, fetch, cache_free, "the blobs to fetch"));
    }
    if bundle > out_free {
        return Err(no_space(out, bundle, out_free, "the bundle"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_that_does_not_fit_is_refused_before_anything_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, out) = (dir.path(), dir.path());
        check_space(cache, out, 1 << 20, 1 << 20).unwrap();
        let err = check_space(cache, out, 1 << 60, 1 << 60).unwrap_err();
        assert!(
            matches!(&err, Error::NoSpace { what, .. } if what.contains("fetch") && what.contains("bundle")),
            "{err}"
        );
        assert!(err.to_string().contains("not enough free space"), "{err}");
    }
}
