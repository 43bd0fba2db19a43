//! serve: bundles as a read-only OCI registry, read where they lie (Day 0: the bundle
//! that arrives on the bastion is the registry, before any cluster exists).
//!
//! Each bundle is opened as unpack opens it (squashfs and uncompressed tar in place,
//! compressed tar expanded once into a cache) and its images found the same way; what
//! is served is the pull half of the OCI distribution API: `/v2/`, manifests and blobs
//! by tag and digest (`GET`, `HEAD`, `Range`), `tags/list`, `_catalog` and referrers.
//! Several bundles: later ones win per tag. Pushes are refused as a registry refuses
//! them.

mod api;
mod auth;
mod verify;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use sha2::{Digest as _, Sha256};
use shipperd_bundle::{
    BundleFs, Descriptor, Digest, Guard, Limits, ManifestDoc, Walker, cas::Cas, catalog::Container,
    container, discover::BlobPaths,
};
use shipperd_model::{DataDir, Reference};
pub use shipperd_registry_targets::Mapping;
use shipperd_trust::Policies;
use tokio_util::sync::CancellationToken;

pub use shipperd_listener::{Bounds, TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bundle {path}: {source}")]
    Bundle {
        path: String,
        #[source]
        source: shipperd_bundle::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Listen(#[from] shipperd_listener::Error),
    #[error(transparent)]
    Mapping(#[from] shipperd_registry_targets::Error),
}

/// Settings of `shipperd serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bundles, in order: a later one wins a tag both name.
    pub bundles: Vec<PathBuf>,
    /// A directory whose bundle files are served too (after `bundles`, oldest first),
    /// looked at again every `watch_every`: a bundle copied in is served once complete.
    pub watch_dir: Option<PathBuf>,
    pub watch_every: Duration,
    pub listen: SocketAddr,
    /// Where each image is served: the path mapping of a registry target (its
    /// `keep_host`, `prefix` and `max_depth`), so the bastion answers at the paths
    /// the cluster will ask for (`prefix = "mirror"` serves `quay.io/org/app` at
    /// `mirror/org/app`).
    pub mapping: Mapping,
    /// Where compressed bundles are expanded (`None`: a temporary directory).
    pub cache_dir: Option<PathBuf>,
    /// TLS; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Tokens (one a line) a client must present: as a bearer token, or as the password
    /// of HTTP Basic (`podman login -p <token>`, any user name). `None`: open.
    pub auth_token_file: Option<PathBuf>,
    /// Users (`user:<bcrypt hash>` lines, `htpasswd -B`) who may log in with their
    /// passwords. With neither file, the registry is open.
    pub htpasswd: Option<PathBuf>,
    /// Where clients reach the server (`https://bastion.example:5000`, or
    /// `host[:port]`): the realm of the login challenge. `None`: the host each client
    /// asked for.
    pub advertise: Option<String>,
    /// The site's signature policy (`containers-policy.json`): an image it rejects, with
    /// the signatures its bundle carries, is not served (its tags and manifests answer
    /// 404, and the log says why). `None`: everything is served.
    pub policy: Option<PathBuf>,
    pub limits: Limits,
    pub bounds: Bounds,
}

/// One opened bundle and what it names.
pub(crate) struct Loaded {
    /// Its file (or directory of parts), for the log.
    pub name: String,
    pub fs: Box<dyn BundleFs>,
    pub paths: BlobPaths,
    /// (source, manifest): each tagged image as the bundle names it (not mapped yet).
    pub tags: Vec<(Reference, Descriptor)>,
    /// Repositories holding manifests by digest only.
    pub repos: Vec<Reference>,
    /// (subject, referrer).
    pub referrers: Vec<(Digest, Descriptor)>,
    /// A legacy `docker save` archive's made manifests, by digest.
    pub made: HashMap<Digest, Vec<u8>>,
    /// Which of its blobs were found to hash to their digests, or not.
    pub checked: verify::Checked,
    /// Under a signature policy: the manifests of the images it accepted (their
    /// children and referrers included), the only ones served.
    pub allowed: Option<HashSet<Digest>>,
    /// What a compressed bundle's expansion holds in the cache: let go when the bundle
    /// is no longer served (and no request reads it).
    pub _held: Option<Held>,
}

/// A bundle's claim on the cache's blobs.
pub(crate) struct Held {
    cas: Cas,
    key: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Off the request path: collecting reads the cache's directories.
        let (cas, key) = (self.cas.clone(), std::mem::take(&mut self.key));
        std::thread::spawn(move || cas.finish(&key));
    }
}

/// A tag's target: its manifest (read from the newest bundle holding it).
#[derive(Debug, Clone)]
pub(crate) struct Tagged {
    pub desc: Descriptor,
}

/// Everything served at one moment; replaced whole when the watched directory changes.
pub(crate) struct Index {
    pub bundles: Vec<Arc<Loaded>>,
    /// repository → tag → manifest.
    pub tags: BTreeMap<String, BTreeMap<String, Tagged>>,
    /// Repositories (those with tags, and those holding manifests by digest only).
    pub repos: BTreeSet<String>,
    /// subject digest → the manifests that refer to it.
    pub referrers: HashMap<Digest, Vec<Descriptor>>,
    /// subject digest → its referrers as an image index (what the referrers API answers,
    /// and the manifest of the fallback tag `sha256-<hex>` for clients without it), and
    /// that index's digest.
    pub fallback: HashMap<Digest, Digest>,
    /// Those indexes' bytes, by their digests.
    pub fallback_bytes: HashMap<Digest, Arc<[u8]>>,
    /// served repository → the registry host and repository it came from.
    pub sources: BTreeMap<String, (String, String)>,
    /// Under a signature policy: the only manifests served.
    pub allowed: Option<HashSet<Digest>>,
}

/// Manifests larger than this are not served (nor read).
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;

impl Index {
    /// A manifest's bytes, checked against its digest: from the newest bundle whose
    /// copy hashes to it (one whose copy does not is passed over, and said so).
    pub(crate) fn manifest(&self, digest: &Digest) -> Option<Vec<u8>> {
        if let Some(allowed) = &self.allowed
            && !allowed.contains(digest)
            && !self.fallback_bytes.contains_key(digest)
        {
            return None;
        }
        if let Some(made) = self.bundles.iter().rev().find_map(|b| b.made.get(digest)) {
            return Some(made.clone());
        }
        if let Some(bytes) = self.fallback_bytes.get(digest) {
            return Some(bytes.to_vec());
        }
        verify::candidates(self, digest)
            .into_iter()
            .find_map(|(b, path)| {
                let bytes = b.fs.read_small(&path, MAX_MANIFEST).ok()?;
                let good = hex::encode(Sha256::digest(&bytes)) == digest.hex();
                verify::noted(&b, &path, digest, good);
                good.then_some(bytes)
            })
    }

    /// The index of `bundles` (later ones win a tag), repositories where `mapping`
    /// puts them.
    pub(crate) fn of(bundles: Vec<Arc<Loaded>>, mapping: &Mapping) -> Index {
        let place = |source: &Reference| match mapping.repository(source) {
            Ok(r) => Some(r),
            Err(error) => {
                tracing::warn!(%error, %source, "not served: its repository cannot be mapped");
                None
            }
        };
        let mut tags: BTreeMap<String, BTreeMap<String, Tagged>> = BTreeMap::new();
        let mut repos = BTreeSet::new();
        let mut referrers: HashMap<Digest, Vec<Descriptor>> = HashMap::new();
        let mut sources = BTreeMap::new();
        let mut allowed: Option<HashSet<Digest>> = None;
        for b in &bundles {
            if let Some(a) = &b.allowed {
                allowed
                    .get_or_insert_with(HashSet::new)
                    .extend(a.iter().cloned());
            }
            for (source, desc) in &b.tags {
                let (Some(repo), Some(tag)) = (place(source), &source.tag) else {
                    continue;
                };
                if let Some(host) = &source.host {
                    sources.insert(repo.clone(), (host.clone(), source.repository.clone()));
                }
                repos.insert(repo.clone());
                tags.entry(repo)
                    .or_default()
                    .insert(tag.clone(), Tagged { desc: desc.clone() });
            }
            repos.extend(b.repos.iter().filter_map(place));
            for (subject, r) in &b.referrers {
                let list = referrers.entry(subject.clone()).or_default();
                if !list.iter().any(|d| d.digest == r.digest) {
                    list.push(r.clone());
                }
            }
        }
        let mut fallback = HashMap::new();
        let mut fallback_bytes = HashMap::new();
        for (subject, list) in &referrers {
            let bytes: Arc<[u8]> = referrers_index(list).into();
            let digest = Digest::of(&bytes);
            fallback.insert(subject.clone(), digest.clone());
            fallback_bytes.insert(digest, bytes);
        }
        Index {
            bundles,
            tags,
            repos,
            referrers,
            fallback,
            fallback_bytes,
            sources,
            allowed,
        }
    }
}

/// An OCI image index of `referrers` (the referrers API's answer).
pub(crate) fn referrers_index(referrers: &[Descriptor]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": referrers,
    }))
    .expect("JSON serializes")
}

/// What `policies` lets a bundle serve: the top manifests of the images it accepts, their
/// children (an index's platforms) and their referrers. Each rejected image is logged
/// with its reason.
fn accepted(
    policies: &Policies,
    fs: &dyn BundleFs,
    found: &shipperd_bundle::Discovered,
    walker: &Walker<'_>,
    referrers: &[(Digest, Descriptor)],
    path: &Path,
) -> HashSet<Digest> {
    let mut by_subject: BTreeMap<Digest, Vec<Descriptor>> = BTreeMap::new();
    for (s, d) in referrers {
        by_subject.entry(s.clone()).or_default().push(d.clone());
    }
    let named: Vec<(Reference, Digest)> = found
        .images
        .iter()
        .map(|i| (i.source.clone(), i.descriptor.digest.clone()))
        .collect();
    let signatures = shipperd_trust::BundleSignatures::index(
        fs,
        walker,
        &found.blob_paths,
        &found.images,
        &by_subject,
    );
    let verdicts = shipperd_trust::check_all(policies, &named, &signatures);
    shipperd_trust::count_metrics(&verdicts);
    let mut allowed = HashSet::new();
    for (img, v) in found.images.iter().zip(&verdicts) {
        match v {
            Ok(_) => {
                let top = &img.descriptor;
                allowed.insert(top.digest.clone());
                let what = format!("manifest {}", top.digest);
                if let Ok(Some(bytes)) = walker.manifest_bytes(&what, top)
                    && let Ok(doc) = ManifestDoc::parse(&what, &bytes)
                {
                    allowed.extend(doc.manifests.iter().flatten().map(|c| c.digest.clone()));
                }
            }
            Err(refused) => tracing::warn!(
                bundle = %path.display(),
                image = %img.source,
                reason = %refused.reason,
                "not served: the signature policy rejects it"
            ),
        }
    }
    let subjects: Vec<Digest> = allowed.iter().cloned().collect();
    for s in subjects {
        allowed.extend(
            by_subject
                .get(&s)
                .into_iter()
                .flatten()
                .map(|d| d.digest.clone()),
        );
    }
    allowed
}

/// Opens the bundle at `path` (`key` names its expansion in `cas`) and reads what it
/// names.
pub(crate) fn load(
    path: &Path,
    key: &str,
    cas: &Cas,
    limits: &Limits,
    policies: Option<&Policies>,
) -> Result<Loaded, Error> {
    let err = |source| Error::Bundle {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A directory: the parts of one bundle, in name order.
    let parts = if path.is_dir() {
        let mut files = files_in(path);
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let opened = container::open_parts(&parts, cas, key, limits, &Guard::default()).map_err(err)?;
    let found = shipperd_bundle::discover(opened.fs.as_ref(), &name, limits).map_err(err)?;
    let mut tags = Vec::new();
    let mut repos = Vec::new();
    let mut referrers = Vec::new();
    let mut allowed = None;
    {
        let blobs = found.blobs(opened.fs.as_ref());
        let walker = Walker::new(&blobs, limits);
        for img in &found.images {
            if img.source.tag.is_some() {
                tags.push((img.source.clone(), img.descriptor.clone()));
            }
        }
        for (repo, desc) in &found.unnamed {
            if let Some(r) = repo {
                repos.push(Reference {
                    host: None,
                    repository: r.clone(),
                    tag: None,
                    digest: Some(desc.digest.clone()),
                });
            }
            let what = format!("manifest {}", desc.digest);
            let Ok(Some(bytes)) = walker.manifest_bytes(&what, desc) else {
                continue;
            };
            let Ok(doc) = ManifestDoc::parse(&what, &bytes) else {
                continue;
            };
            if let Some(subject) = &doc.subject {
                referrers.push((
                    subject.digest.clone(),
                    doc.referrer(desc, bytes.len() as u64),
                ));
            }
        }
        if let Some(p) = policies {
            let a = accepted(p, opened.fs.as_ref(), &found, &walker, &referrers, path);
            tags.retain(|(_, d): &(Reference, Descriptor)| a.contains(&d.digest));
            repos.clear();
            allowed = Some(a);
        }
    }
    tracing::info!(bundle = %path.display(), format = ?opened.format, images = tags.len(), "serving");
    Ok(Loaded {
        name: path.display().to_string(),
        checked: verify::Checked::default(),
        allowed,
        fs: opened.fs,
        paths: found.blob_paths,
        tags,
        repos,
        referrers,
        made: found.made,
        _held: (opened.container == Container::Expanded).then(|| Held {
            cas: cas.clone(),
            key: key.to_string(),
        }),
    })
}

/// The cache key of a bundle file: its path (a changed file is a new key).
fn key_of(path: &Path, stamp: &Stamp) -> String {
    hex::encode(Sha256::digest(format!("{}:{stamp:?}", path.display())))
}

/// A file's length and modification time: it changes when the file does.
type Stamp = Option<(u64, std::time::SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// The regular files of `dir` whose names do not start with `.` (symbolic links and
/// files being copied in under a dot name are left alone).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect()
}

/// The bundles of the watched directory: regular files not starting with `.`, oldest
/// first (a newer bundle wins a tag), each with its stamp.
fn listed(dir: &Path) -> Vec<(PathBuf, Stamp)> {
    let mut files: Vec<(PathBuf, Stamp)> = files_in(dir)
        .into_iter()
        .map(|p| {
            let s = stamp(&p);
            (p, s)
        })
        .collect();
    files.sort_by(|a, b| {
        let t = |s: &Stamp| s.map(|(_, t)| t);
        t(&a.1).cmp(&t(&b.1)).then_with(|| a.0.cmp(&b.0))
    });
    files
}

/// What is loaded, and from where.
struct Bundles {
    cas: Cas,
    _cache: Option<tempfile::TempDir>,
    limits: Limits,
    mapping: Mapping,
    /// The bundles named on the command line, in order.
    fixed: Vec<Arc<Loaded>>,
    /// The watched directory's, by path: the stamp they were loaded at (and `None` for
    /// one that failed to load: tried again when it changes).
    watched: BTreeMap<PathBuf, (Stamp, Option<Arc<Loaded>>)>,
    /// The signature policy every image served must satisfy.
    policies: Option<Arc<Policies>>,
}

impl Bundles {
    fn new(config: &Config) -> Result<Self, Error> {
        let (cache, data) = match &config.cache_dir {
            Some(d) => (None, DataDir::new(d.clone())),
            None => {
                let t = tempfile::tempdir()?;
                let d = DataDir::new(t.path().to_path_buf());
                (Some(t), d)
            }
        };
        let cas = Cas::new(&data);
        // A cache kept from an earlier run: what is served now claims its blobs again
        // as it is loaded; the rest goes at the first collection.
        cas.forget_all()
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        let policies = match &config.policy {
            Some(p) => Policies::load(std::slice::from_ref(p))
                .map_err(|e| Error::Io(std::io::Error::other(format!("--policy: {e}"))))?
                .map(Arc::new),
            None => None,
        };
        let mut fixed = Vec::new();
        for path in &config.bundles {
            let key = key_of(path, &stamp(path));
            fixed.push(Arc::new(load(
                path,
                &key,
                &cas,
                &config.limits,
                policies.as_deref(),
            )?));
        }
        Ok(Bundles {
            cas,
            _cache: cache,
            limits: config.limits.clone(),
            mapping: config.mapping.clone(),
            fixed,
            watched: BTreeMap::new(),
            policies,
        })
    }

    /// Looks at `dir` again: loads new and changed files once they stay the same
    /// between two looks (a file still being copied in is not read), forgets removed
    /// ones. Says whether anything served changed.
    fn rescan(&mut self, dir: &Path, seen: &mut HashMap<PathBuf, Stamp>) -> bool {
        let files = listed(dir);
        let mut changed = false;
        let present: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        let before = self.watched.len();
        self.watched.retain(|p, _| present.contains(p));
        changed |= self.watched.len() != before;
        for (path, st) in &files {
            if self.watched.get(path).is_some_and(|(s, _)| s == st) {
                continue;
            }
            // Unchanged since the last look: complete.
            let steady = seen.get(path) == Some(st);
            seen.insert(path.clone(), *st);
            if !steady {
                continue;
            }
            let loaded = match load(
                path,
                &key_of(path, st),
                &self.cas,
                &self.limits,
                self.policies.as_deref(),
            ) {
                Ok(l) => Some(Arc::new(l)),
                Err(error) => {
                    tracing::warn!(%error, "a bundle of the watched directory cannot be served");
                    None
                }
            };
            changed |= loaded.is_some() || self.watched.contains_key(path);
            self.watched.insert(path.clone(), (*st, loaded));
        }
        seen.retain(|p, _| present.contains(p));
        changed
    }

    fn index(&self, dir: Option<&Path>) -> Index {
        let mut all = self.fixed.clone();
        if dir.is_some() {
            // Oldest first, as the directory lists them now.
            let mut watched: Vec<(Stamp, &PathBuf, Arc<Loaded>)> = self
                .watched
                .iter()
                .filter_map(|(p, (s, l))| l.clone().map(|l| (*s, p, l)))
                .collect();
            watched.sort_by(|a, b| a.0.map(|s| s.1).cmp(&b.0.map(|s| s.1)).then(a.1.cmp(b.1)));
            all.extend(watched.into_iter().map(|(_, _, l)| l));
        }
        Index::of(all, &self.mapping)
    }
}

/// What requests read: the index of the moment (swapped whole when bundles change).
pub(crate) type Shared = Arc<RwLock<Arc<Index>>>;

pub(crate) fn current(shared: &Shared) -> Arc<Index> {
    shared.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A started server: bundles opened, port bound.
pub struct Serve {
    config: Config,
    bundles: Arc<Mutex<Bundles>>,
    index: Shared,
    listener: tokio::net::TcpListener,
}

impl Serve {
    pub async fn start(config: Config) -> Result<Self, Error> {
        config.mapping.validate()?;
        let c = config.clone();
        let (bundles, index) = tokio::task::spawn_blocking(move || {
            let mut b = Bundles::new(&c)?;
            if let Some(dir) = &c.watch_dir {
                // At start, what is there is taken as it is.
                let mut seen: HashMap<PathBuf, Stamp> = listed(dir).into_iter().collect();
                b.rescan(dir, &mut seen);
            }
            let index = b.index(c.watch_dir.as_deref());
            // Blobs of a kept cache that nothing served now claims.
            if let Err(error) = b.cas.collect() {
                tracing::warn!(%error, "cannot collect the cache");
            }
            Ok::<_, Error>((b, index))
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        Ok(Serve {
            config,
            bundles: Arc::new(Mutex::new(bundles)),
            index: Arc::new(RwLock::new(Arc::new(index))),
            listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Every `repository:tag` served now.
    pub fn refs(&self) -> Vec<String> {
        current(&self.index)
            .tags
            .iter()
            .flat_map(|(r, t)| t.keys().map(move |t| format!("{r}:{t}")))
            .collect()
    }

    /// The `imageDigestSources` of an OpenShift `install-config.yaml` for what is served
    /// at `mirror` (`host:port`), and the CA for `additionalTrustBundle` when given.
    pub fn install_config(&self, mirror: &str, ca_pem: Option<&str>) -> String {
        let index = current(&self.index);
        let mut out = String::from("imageDigestSources:\n");
        for (repo, (host, source)) in &index.sources {
            out.push_str(&format!(
                "- mirrors:\n  - {mirror}/{repo}\n  source: {host}/{source}\n"
            ));
        }
        if let Some(ca) = ca_pem {
            out.push_str("additionalTrustBundle: |\n");
            for line in ca.lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
        out
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        tracing::info!(addr = %self.local_addr(), bundles = current(&self.index).bundles.len(), "serving bundles as a registry");
        if let Some(dir) = self.config.watch_dir.clone() {
            let (bundles, index, every, stop) = (
                self.bundles.clone(),
                self.index.clone(),
                self.config.watch_every,
                shutdown.clone(),
            );
            tokio::spawn(async move {
                let mut seen = HashMap::new();
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = shipperd_model::pause(every) => {}
                    }
                    let (bundles, index, dir) = (bundles.clone(), index.clone(), dir.clone());
                    let mut seen_now = std::mem::take(&mut seen);
                    let done = tokio::task::spawn_blocking(move || {
                        let mut b = bundles.lock().unwrap_or_else(|p| p.into_inner());
                        if b.rescan(&dir, &mut seen_now) {
                            let next = Arc::new(b.index(Some(&dir)));
                            tracing::info!(
                                bundles = next.bundles.len(),
                                repositories = next.repos.len(),
                                "the watched directory changed; serving it now"
                            );
                            *index.write().unwrap_or_else(|p| p.into_inner()) = next;
                        }
                        seen_now
                    })
                    .await;
                    seen = done.unwrap_or_default();
                }
            });
        }
        let app = api::router(
            self.index.clone(),
            self.config.auth_token_file.clone(),
            self.config.htpasswd.clone(),
            self.config.advertise.clone(),
            self.config.tls.is_some(),
        );
        let tls = self
            .config
            .tls
            .clone()
            .map(shipperd_listener::Tls::load)
            .transpose()?
            .map(Arc::new);
        shipperd_listener::serve(self.listener, app, tls, &self.config.bounds, shutdown).await;
        Ok(())
    }
}
