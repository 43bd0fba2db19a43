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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
};

use sha2::{Digest as _, Sha256};
use shipperd_bundle::{
    BundleFs, Descriptor, Digest, FsBlobs, Guard, Limits, ManifestDoc, Walker, cas::Cas, container,
    discover::BlobPaths,
};
use shipperd_model::DataDir;
use tokio_util::sync::CancellationToken;

pub use shipperd_ingest::{Bounds, TlsFiles};

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
    Serve(#[from] shipperd_ingest::Error),
}

/// Settings of `shipperd serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bundles, in order: a later one wins a tag both name.
    pub bundles: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// Put before every repository (`mirror` serves `quay.io/org/app` as
    /// `mirror/org/app`).
    pub prefix: String,
    /// Where compressed bundles are expanded (`None`: a temporary directory).
    pub cache_dir: Option<PathBuf>,
    /// TLS; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Tokens (one a line) a client must present: as a bearer token, or as the password
    /// of HTTP Basic (`podman login -p <token>`, any user name). `None`: open.
    pub auth_token_file: Option<PathBuf>,
    pub limits: Limits,
    pub bounds: Bounds,
}

/// One opened bundle.
pub(crate) struct Opened {
    pub fs: Box<dyn BundleFs>,
    pub paths: BlobPaths,
}

/// A tag's target: its manifest (read from the newest bundle holding it).
#[derive(Debug, Clone)]
pub(crate) struct Tagged {
    pub desc: Descriptor,
}

/// Everything served, built once at start.
pub(crate) struct Index {
    pub bundles: Vec<Opened>,
    /// repository → tag → manifest.
    pub tags: BTreeMap<String, BTreeMap<String, Tagged>>,
    /// Repositories (those with tags, and those holding manifests by digest only).
    pub repos: BTreeSet<String>,
    /// subject digest → the manifests that refer to it.
    pub referrers: HashMap<Digest, Vec<Descriptor>>,
    /// Kept while served: where compressed bundles were expanded.
    _cache: Option<tempfile::TempDir>,
}

/// Manifests larger than this are not served (nor read).
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;

impl Index {
    /// The bundle holding `digest`, the newest first.
    pub(crate) fn holder(&self, digest: &Digest) -> Option<(usize, String)> {
        self.bundles
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, b)| b.paths.get(digest).map(|p| (i, p)))
    }

    /// A manifest's bytes, checked against its digest.
    pub(crate) fn manifest(&self, digest: &Digest) -> Option<Vec<u8>> {
        let (i, path) = self.holder(digest)?;
        let bytes = self.bundles[i].fs.read_small(&path, MAX_MANIFEST).ok()?;
        let sum = hex::encode(Sha256::digest(&bytes));
        (sum == digest.hex()).then_some(bytes)
    }
}

fn open_all(config: &Config) -> Result<Index, Error> {
    let (cache, data) = match &config.cache_dir {
        Some(d) => (None, DataDir::new(d.clone())),
        None => {
            let t = tempfile::tempdir()?;
            let d = DataDir::new(t.path().to_path_buf());
            (Some(t), d)
        }
    };
    let cas = Cas::new(&data);
    let guard = Guard::default();
    let mut bundles = Vec::new();
    let mut tags: BTreeMap<String, BTreeMap<String, Tagged>> = BTreeMap::new();
    let mut repos = BTreeSet::new();
    let mut referrers: HashMap<Digest, Vec<Descriptor>> = HashMap::new();
    let prefix = config.prefix.trim_matches('/');
    let place = |repo: &str| {
        if prefix.is_empty() {
            repo.to_string()
        } else {
            format!("{prefix}/{repo}")
        }
    };
    for (i, path) in config.bundles.iter().enumerate() {
        let err = |source| Error::Bundle {
            path: path.display().to_string(),
            source,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The cache key: which bundle, by its place in the list and its path.
        let key = hex::encode(Sha256::digest(format!("{i}:{}", path.display())));
        let opened = container::open(path, &cas, &key, &config.limits, &guard).map_err(err)?;
        let found =
            shipperd_bundle::discover(opened.fs.as_ref(), &name, &config.limits).map_err(err)?;
        {
            let blobs = FsBlobs {
                fs: opened.fs.as_ref(),
                paths: &found.blob_paths,
            };
            let walker = Walker::new(&blobs, &config.limits);
            for img in &found.images {
                let Some(tag) = img.source.tag.clone() else {
                    continue;
                };
                let repo = place(&img.source.repository);
                repos.insert(repo.clone());
                tags.entry(repo).or_default().insert(
                    tag,
                    Tagged {
                        desc: img.descriptor.clone(),
                    },
                );
            }
            for (repo, desc) in &found.unnamed {
                if let Some(r) = repo {
                    repos.insert(place(r));
                }
                let what = format!("manifest {}", desc.digest);
                let Ok(Some(bytes)) = walker.manifest_bytes(&what, desc) else {
                    continue;
                };
                let Ok(doc) = ManifestDoc::parse(&what, &bytes) else {
                    continue;
                };
                if let Some(subject) = &doc.subject {
                    let mut r = Descriptor::new(
                        doc.media_type(&desc.media_type),
                        desc.digest.clone(),
                        bytes.len() as u64,
                    );
                    r.annotations = doc.annotations.clone();
                    r.artifact_type = doc
                        .artifact_type
                        .clone()
                        .or_else(|| doc.config.as_ref().map(|c| c.media_type.clone()));
                    let list = referrers.entry(subject.digest.clone()).or_default();
                    if !list.iter().any(|d| d.digest == r.digest) {
                        list.push(r);
                    }
                }
            }
        }
        tracing::info!(bundle = %path.display(), format = ?opened.format, images = found.images.len(), "serving");
        bundles.push(Opened {
            fs: opened.fs,
            paths: found.blob_paths,
        });
    }
    Ok(Index {
        bundles,
        tags,
        repos,
        referrers,
        _cache: cache,
    })
}

/// A started server: bundles opened, port bound.
pub struct Serve {
    config: Config,
    index: Arc<Index>,
    listener: tokio::net::TcpListener,
}

impl Serve {
    pub async fn start(config: Config) -> Result<Self, Error> {
        let c = config.clone();
        let index = tokio::task::spawn_blocking(move || open_all(&c))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        Ok(Serve {
            config,
            index: Arc::new(index),
            listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Every `repository:tag` served.
    pub fn refs(&self) -> Vec<String> {
        self.index
            .tags
            .iter()
            .flat_map(|(r, t)| t.keys().map(move |t| format!("{r}:{t}")))
            .collect()
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        tracing::info!(addr = %self.local_addr(), bundles = self.index.bundles.len(), repositories = self.index.repos.len(), "serving bundles as a registry");
        let app = api::router(self.index.clone(), self.config.auth_token_file.clone());
        shipperd_ingest::serve_router(
            self.listener,
            app,
            self.config.tls.clone(),
            &self.config.bounds,
            shutdown,
        )
        .await?;
        Ok(())
    }
}
