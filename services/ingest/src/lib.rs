//! ingest: takes bundles in and stores each once, checksummed.
//!
//! Bundles arrive by `PUT /v1/bundles/{name}` (streamed to disk, never whole in memory)
//! or by being copied into the drop directory (`oc rsync`, `kubectl cp`). The sha256 of
//! the bytes is the bundle's id: a bundle sent twice is stored and processed once. Once a
//! bundle is safely on disk its summary is created in KV and `bundle.received` is emitted.
//!
//! It also answers for bundles (status, paged image lists, retry, delete) and runs the
//! janitor: expiry of old files, re-driving bundles that stalled, recovering bundles
//! stored but never recorded.

mod check;
mod drop_dir;
mod grpc;
mod http;
mod inventory;
mod janitor;
mod metrics;
mod ui;
mod views;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

pub use grpc::{MAX_WATCHES, MAX_WATCHES_PER_CALLER};
pub use janitor::{Janitor, Settings as JanitorSettings};
use shipperd_bus::Bus;
use shipperd_listener::{Bounds, Tls, TlsFiles, auth, review};
use shipperd_model::DataDir;
use shipperd_store::Store;
pub use shipperd_store::{Error, Limits, Result};
use tokio_util::sync::CancellationToken;

/// Why ingest could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] shipperd_store::Error),
    #[error(transparent)]
    Listen(#[from] shipperd_listener::Error),
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
}

/// Tokens checked with the Kubernetes API (TokenReview, SubjectAccessReview).
#[derive(Clone)]
pub struct KubeAuth {
    pub client: kube::Client,
    /// Where a user must be allowed to create (get, delete) bundles.
    pub namespace: String,
}

impl std::fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuth")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Settings of the ingest service.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where NATS is and how to log in (servers, credentials, TLS, replicas).
    pub nats: shipperd_bus::NatsConfig,
    /// The bundle store, shared with the other services.
    pub data_dir: DataDir,
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// A second address answering only `/healthz`, `/readyz` and `/metrics` (plain
    /// HTTP, no token), so probes are answered even when the API's connections are all
    /// taken.
    pub health_listen: Option<SocketAddr>,
    /// Directory watched for bundles copied in; `None` to watch nothing.
    pub drop_dir: Option<PathBuf>,
    /// How often the drop directory is scanned.
    pub drop_poll: Duration,
    /// A drop-directory file neither renamed in nor matching its `.sha256` is taken
    /// once unchanged (and not open for writing) for this long.
    pub drop_quiet: Duration,
    /// Largest bundle accepted, in bytes.
    pub max_bundle_bytes: u64,
    /// What the janitor does, and how often.
    pub janitor: janitor::Settings,
    /// Bearer tokens (one per line) every `/v1` request must present; `None`: open.
    pub auth_token_file: Option<PathBuf>,
    /// `--auth kubernetes`: tokens not in the token file are reviewed by this cluster,
    /// for rights on bundles in this namespace.
    pub kube_auth: Option<KubeAuth>,
    /// Proxies (an OpenShift router, an ingress controller) whose `X-Forwarded-For` is
    /// believed: a request from one of them is from the last address before them, for
    /// counting bad tokens. Empty: every request is from its peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// TLS for the API; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Timeouts, rates and caps on clients.
    pub bounds: Bounds,
    /// What the store takes in: uploads at once, free space kept, bytes stored.
    pub limits: Limits,
    /// The registry targets, where this process has them (`shipperd all`): the
    /// inventory (`GET /v1/inventory`) is then checked against the registry.
    pub targets: Option<shipperd_registry_targets::LiveTargets>,
}

impl Config {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        listen: SocketAddr,
    ) -> Self {
        Config {
            nats: shipperd_bus::NatsConfig::new(nats_url),
            data_dir: DataDir::new(data_dir.into()),
            listen,
            health_listen: None,
            drop_dir: None,
            drop_poll: Duration::from_secs(2),
            drop_quiet: Duration::from_secs(30),
            max_bundle_bytes: 1 << 40,
            janitor: janitor::Settings::default(),
            auth_token_file: None,
            kube_auth: None,
            trusted_proxies: Vec::new(),
            tls: None,
            bounds: Bounds::default(),
            limits: Limits::default(),
            targets: None,
        }
    }
}

/// A started ingest service: connected, topology declared, port bound.
pub struct Ingest {
    config: Config,
    store: Arc<Store>,
    listener: tokio::net::TcpListener,
    health: Option<tokio::net::TcpListener>,
    tls: Option<Arc<Tls>>,
}

impl Ingest {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let bus = Bus::connect_with(&config.nats, "shipperd-ingest").await?;
        bus.ensure_topology().await?;
        // Bad TLS files stop the start-up, before anything listens.
        let tls = config.tls.clone().map(Tls::load).transpose()?.map(Arc::new);
        let store = Arc::new(
            Store::open(bus, &config.data_dir, config.max_bundle_bytes)
                .await?
                .with_limits(config.limits.clone()),
        );
        if let Some(drop) = &config.drop_dir {
            tokio::fs::create_dir_all(drop)
                .await
                .map_err(|e| Error::io(drop, e))?;
            store.recover_taken(drop).await;
        }
        let listener = shipperd_listener::bind(config.listen).await?;
        let health = match config.health_listen {
            Some(addr) => Some(shipperd_listener::bind(addr).await?),
            None => None,
        };
        Ok(Ingest {
            config,
            store,
            listener,
            health,
            tls,
        })
    }

    /// The address the HTTP API listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address the probes' own listener is bound to, if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.local_addr(), tls = self.tls.is_some(), "ingest listening");
        if let Some(listener) = self.health {
            tracing::info!(addr = ?listener.local_addr().ok(), "probes listening");
            let probes = http::probes(self.store.clone());
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, probes)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "the probes' listener failed");
                }
            });
        }
        // Opening the janitor's ledger is a JetStream request: with NATS gone it would
        // hold up a SIGTERM until it timed out.
        let janitor = tokio::select! {
            j = Janitor::new(self.store.clone(), self.config.janitor.clone()) => j?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let janitor = tokio::spawn(janitor.run(shutdown.clone()));
        let watcher = self.config.drop_dir.clone().map(|dir| {
            tokio::spawn(drop_dir::watch(
                dir,
                self.config.drop_poll,
                self.config.drop_quiet,
                self.store.clone(),
                shutdown.clone(),
            ))
        });
        let uploads = http::Uploads {
            namespace: self.config.kube_auth.as_ref().map(|k| k.namespace.clone()),
            bounds: self.config.bounds.clone(),
            targets: self.config.targets.clone(),
        };
        if let Some(t) = &self.config.targets {
            shipperd_pipeline::Service::follow_targets(t, &shutdown);
        }
        let mut app = http::router(self.store.clone(), uploads, shutdown.clone());
        let gate = auth::Gate {
            tokens: self.config.auth_token_file.clone().map(auth::Tokens::new),
            review: self
                .config
                .kube_auth
                .clone()
                .map(|k| review::Review::new(k.client, k.namespace)),
            failures: auth::Failures::default(),
            trusted_proxies: self.config.trusted_proxies.clone(),
            grpc_prefix: grpc::PATH,
        };
        if gate.tokens.is_none() && gate.review.is_none() {
            tracing::warn!(
                "no --auth-token-file and no --auth kubernetes: the API is open to whoever reaches it"
            );
            if self.config.listen.ip().is_loopback() {
                // Open on loopback: for this machine's own clients only, not for a web
                // page whose name a DNS rebinding points here.
                app = app.layer(axum::middleware::from_fn(auth::loopback_host));
            }
        } else {
            app = app.layer(axum::middleware::from_fn_with_state(
                Arc::new(gate),
                auth::require,
            ));
        }
        let app = app.layer(axum::middleware::from_fn(
            shipperd_listener::drain_unread_body,
        ));
        shipperd_listener::serve(
            self.listener,
            app,
            self.tls,
            &self.config.bounds,
            shutdown.clone(),
        )
        .await;
        if let Some(w) = watcher {
            let _ = w.await;
        }
        let _ = janitor.await;
        Ok(())
    }
}

/// Starts and runs the ingest service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Ingest::start(config).await?.serve(shutdown).await
}
