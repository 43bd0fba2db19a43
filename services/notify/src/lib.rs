//! notify: fans every ShipperD event out to webhooks as signed CloudEvents.
//!
//! Each webhook target has its own durable consumer (`notify-<hash of URL>`) on the
//! events stream, so targets progress independently: a slow or dead target only delays
//! its own deliveries. A delivery is a `POST` of the CloudEvents JSON (structured mode)
//! with Standard Webhooks headers; a non-2xx answer, a timeout or a refused connection
//! leaves the event unacked and it comes back after a growing delay (at-least-once, the
//! same `webhook-id` on every retry).
//!
//! Besides the `--webhook` flags, a webhooks file (TOML, `[[webhook]]` with `url`,
//! optional `secret_file` and `types`) is followed: read again when it changes (every
//! 2 s), a target added starts, one removed stops, one changed restarts with its new
//! secret and event types. The operator writes it from `WebhookTarget` resources.

pub mod sign;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{Message, consumer::DeliverPolicy};
use sha2::{Digest, Sha256};
use shipperd_bus::{
    Bus, ConsumerSpec, IncomingEvent,
    subjects::{EVENTS_STREAM, EVENTS_SUBJECTS, NOTIFY_CONSUMER_PREFIX},
};
use shipperd_model::{Secret, url_origin as redact};
use shipperd_pipeline::pull::{self, Outcome};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    #[error("invalid webhook URL {0:?}: must start with http:// or https://")]
    BadUrl(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the notify service.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where NATS is and how to log in (servers, credentials, TLS, replicas).
    pub nats: shipperd_bus::NatsConfig,
    /// Webhook URLs; each gets every event.
    pub webhooks: Vec<String>,
    /// Signing secret (`whsec_<base64>` or raw); without one, deliveries are unsigned.
    pub secret: Option<Secret>,
    /// Time allowed for one delivery attempt.
    pub timeout: Duration,
    /// Delay before the first retry; doubles per attempt up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Attempts per event and target before giving up on it (-1: never give up).
    pub max_deliver: i64,
    /// Deliveries in flight per target.
    pub concurrency: usize,
    /// A webhooks file to follow (see the module's doc).
    pub webhooks_file: Option<std::path::PathBuf>,
    /// Where a namespace's webhook (a `WebhookTarget`, in the webhooks file) may lead:
    /// public addresses, and the networks the admin allows.
    pub egress: shipperd_registry_targets::Egress,
}

impl Config {
    pub fn new(nats_url: impl Into<String>, webhooks: Vec<String>) -> Self {
        Config {
            nats: shipperd_bus::NatsConfig::new(nats_url),
            webhooks,
            secret: None,
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_deliver: 200,
            concurrency: 4,
            webhooks_file: None,
            egress: Default::default(),
        }
    }
}

/// `host[:port]` of a URL (what metrics call a webhook).
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_string();
            Some(match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host,
            })
        })
        .unwrap_or_else(|| "invalid".into())
}

/// The durable consumer name of a webhook target.
pub fn consumer_name(url: &str) -> String {
    let h = Sha256::digest(url.as_bytes());
    format!("{NOTIFY_CONSUMER_PREFIX}{}", hex::encode(&h[..8]))
}

struct Target {
    url: String,
    /// The URL's host and port: its label in metrics (the path and query may carry a
    /// token; the host does not, and there are as few as there are webhooks).
    host: String,
    http: reqwest::Client,
    key: Option<Vec<u8>>,
    /// Event types sent (empty: all).
    types: Vec<String>,
    /// Only events of bundles this namespace brought in (see [`Owners`]).
    scope: Option<Scope>,
    config: Config,
}

/// A namespace's webhook: the namespace, and how to learn whose a bundle is.
struct Scope {
    namespace: String,
    owners: Arc<Owners>,
}

/// Whose each bundle is (`BundleSummary::owner`, or the upload namespace), read from
/// the state once per bundle and kept (a bounded cache).
pub struct Owners {
    state: shipperd_state::StateStore,
    upload_namespace: Option<String>,
    known: std::sync::Mutex<lru::LruCache<String, Option<String>>>,
}

impl Owners {
    fn new(state: shipperd_state::StateStore, upload_namespace: Option<String>) -> Self {
        Owners {
            state,
            upload_namespace,
            known: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).expect("not zero"),
            )),
        }
    }

    /// The namespace bundle `id` belongs to (`None`: none known; such events go to no
    /// namespace's webhook).
    async fn of(&self, id: &str) -> Option<String> {
        if let Some(o) = self.known.lock().expect("not poisoned").get(id) {
            return o.clone();
        }
        let bundle = shipperd_model::BundleId::parse(id).ok()?;
        let owner = match self.state.summary(&bundle).await {
            Ok(Some(s)) => s.owner.or_else(|| self.upload_namespace.clone()),
            // Gone, or unreadable now: not cached, and not sent.
            _ => return None,
        };
        self.known
            .lock()
            .expect("not poisoned")
            .put(id.to_string(), owner.clone());
        owner
    }
}

pub use shipperd_model::webhooks::{WebhookSpec, WebhooksFile};

/// A running webhook's key: a namespace's and the admin's webhook to the same URL are
/// two.
fn key_of(spec: &WebhookSpec) -> String {
    match &spec.namespace {
        Some(ns) => format!("{ns}/{}", spec.url),
        None => spec.url.clone(),
    }
}

/// A webhook of the file, with its signing key (read from its `secret_file`).
pub type Webhook = (WebhookSpec, Option<Vec<u8>>);

/// Reads a webhooks file: each webhook with its secret (read now) and types, and the
/// upload namespace.
pub fn read_webhooks(path: &std::path::Path) -> Result<(Vec<Webhook>, Option<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: WebhooksFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let uploads = file.upload_namespace;
    file.webhook
        .into_iter()
        .map(|w| {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(Error::BadUrl(redact(&w.url)).to_string());
            }
            let key = match &w.secret_file {
                Some(f) => {
                    let raw =
                        std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                    Some(sign::key(raw.trim()))
                }
                None => None,
            };
            Ok((w, key))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|w| (w, uploads))
}

/// A started notify service.
pub struct Notify {
    targets: Vec<(Arc<Target>, async_nats::jetstream::consumer::PullConsumer)>,
    bus: Bus,
    state: shipperd_state::StateStore,
    http: reqwest::Client,
    /// For namespaces' webhooks: names resolve only to the addresses `config.egress`
    /// allows.
    guarded: reqwest::Client,
    config: Config,
}

impl Notify {
    pub async fn start(config: Config) -> Result<Self> {
        for url in &config.webhooks {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::BadUrl(redact(url)));
            }
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = || {
            reqwest::Client::builder()
                .timeout(config.timeout)
                .connect_timeout(config.timeout)
                .user_agent(concat!("shipperd/", env!("CARGO_PKG_VERSION")))
                // A redirect would send the signed event (and the URL's token) elsewhere.
                .redirect(reqwest::redirect::Policy::none())
        };
        let http = builder()
            .build()
            .map_err(|e| Error::Client(e.to_string()))?;
        let guarded = builder()
            .dns_resolver(config.egress.resolver())
            .no_proxy()
            .build()
            .map_err(|e| Error::Client(e.to_string()))?;
        if config.secret.is_none() && !config.webhooks.is_empty() {
            tracing::warn!("no webhook secret set: deliveries are not signed");
        }
        let bus = Bus::connect_with(&config.nats, "shipperd-notify").await?;
        bus.ensure_topology().await?;
        let mut targets = Vec::new();
        for url in &config.webhooks {
            let consumer = bus
                .consumer(&ConsumerSpec {
                    stream: EVENTS_STREAM,
                    durable: consumer_name(url),
                    filter: EVENTS_SUBJECTS.into(),
                    ack_wait: config.timeout + Duration::from_secs(30),
                    max_deliver: config.max_deliver,
                    max_ack_pending: 1000,
                    // A new target hears what happens from now on, not the stream's past.
                    deliver_policy: DeliverPolicy::New,
                })
                .await?;
            let target = Target {
                host: host_of(url),
                url: url.clone(),
                http: http.clone(),
                key: config.secret.as_ref().map(|s| sign::key(s.expose())),
                types: Vec::new(),
                scope: None,
                config: config.clone(),
            };
            targets.push((Arc::new(target), consumer));
        }
        let state = shipperd_state::StateStore::open(&bus).await?;
        Ok(Notify {
            targets,
            state,
            bus,
            http,
            guarded,
            config,
        })
    }

    async fn consumer(&self, key: &str) -> Result<async_nats::jetstream::consumer::PullConsumer> {
        Ok(self
            .bus
            .consumer(&ConsumerSpec {
                stream: EVENTS_STREAM,
                durable: consumer_name(key),
                filter: EVENTS_SUBJECTS.into(),
                ack_wait: self.config.timeout + Duration::from_secs(30),
                max_deliver: self.config.max_deliver,
                max_ack_pending: 1000,
                deliver_policy: DeliverPolicy::New,
            })
            .await?)
    }

    /// Follows the webhooks file until `shutdown`: targets started, stopped and
    /// restarted as it changes.
    async fn follow(&self, path: std::path::PathBuf, shutdown: CancellationToken) {
        type Running = (WebhookSpec, Option<Vec<u8>>, CancellationToken);
        let mut running: std::collections::HashMap<String, Running> = Default::default();
        let mut last: Option<Vec<u8>> = None;
        let mut owners: Option<Arc<Owners>> = None;
        while !shutdown.is_cancelled() {
            let raw = std::fs::read(&path).ok();
            if raw != last {
                last = raw;
                match read_webhooks(&path) {
                    Err(error) => {
                        tracing::warn!(%error, "the webhooks file does not parse; keeping the webhooks read before")
                    }
                    Ok((wanted, uploads)) => {
                        if owners
                            .as_ref()
                            .is_none_or(|o: &Arc<Owners>| o.upload_namespace != uploads)
                        {
                            // Another upload namespace: every webhook starts again with it.
                            running.retain(|_, (_, _, stop)| {
                                stop.cancel();
                                false
                            });
                            owners = Some(Arc::new(Owners::new(self.state.clone(), uploads)));
                        }
                        let owners = owners.clone().expect("set above");
                        let urls: Vec<String> = wanted.iter().map(|(w, _)| key_of(w)).collect();
                        running.retain(|url, (_, _, stop)| {
                            let keep = urls.contains(url);
                            if !keep {
                                stop.cancel();
                            }
                            keep
                        });
                        for (spec, key) in wanted {
                            let id = key_of(&spec);
                            // A namespace's webhook reaches public addresses only, and
                            // the networks the admin allows.
                            let http = match &spec.namespace {
                                None => self.http.clone(),
                                Some(ns) => match self.config.egress.check_url(&spec.url) {
                                    Ok(()) => self.guarded.clone(),
                                    Err(why) => {
                                        tracing::warn!(url = %redact(&spec.url), namespace = %ns, why, "webhook refused");
                                        continue;
                                    }
                                },
                            };
                            if let Some((w, k, stop)) = running.get(&id) {
                                if *w == spec && *k == key {
                                    continue;
                                }
                                stop.cancel();
                            }
                            match self.consumer(&id).await {
                                Ok(consumer) => {
                                    let stop = shutdown.child_token();
                                    let target = Arc::new(Target {
                                        host: host_of(&spec.url),
                                        url: spec.url.clone(),
                                        http,
                                        key: key.clone(),
                                        types: spec.types.clone(),
                                        scope: spec.namespace.clone().map(|namespace| Scope {
                                            namespace,
                                            owners: owners.clone(),
                                        }),
                                        config: self.config.clone(),
                                    });
                                    tracing::info!(url = %redact(&spec.url), namespace = ?spec.namespace, types = ?spec.types, "webhook started");
                                    tokio::spawn(serve_target(
                                        target,
                                        consumer,
                                        self.bus.client.clone(),
                                        stop.clone(),
                                    ));
                                    running.insert(id, (spec, key, stop));
                                }
                                Err(error) => {
                                    tracing::warn!(%error, "cannot start a webhook; will try again");
                                    last = None;
                                }
                            }
                        }
                    }
                }
            }
            tokio::select! {
                () = shipperd_model::pause(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    pub async fn serve(mut self, shutdown: CancellationToken) -> Result<()> {
        tracing::info!(webhooks = self.targets.len(), "notify running");
        let mut tasks = tokio::task::JoinSet::new();
        for (target, consumer) in std::mem::take(&mut self.targets) {
            tasks.spawn(serve_target(
                target,
                consumer,
                self.bus.client.clone(),
                shutdown.clone(),
            ));
        }
        match self.config.webhooks_file.clone() {
            Some(path) => self.follow(path, shutdown.clone()).await,
            None if tasks.is_empty() => shutdown.cancelled().await,
            None => {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

async fn serve_target(
    target: Arc<Target>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    nats: async_nats::Client,
    stop: CancellationToken,
) {
    let concurrency = target.config.concurrency;
    let drain = pull::Drain {
        time: Duration::from_secs(15),
        nats: Some(nats),
    };
    pull::run(
        "notify",
        consumer,
        concurrency,
        drain,
        stop,
        move |msg, _| {
            let target = target.clone();
            async move { deliver(&target, msg).await }
        },
    )
    .await
}

/// Starts and runs the notify service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Notify::start(config).await?.serve(shutdown).await
}

async fn deliver(target: &Target, msg: Message) {
    let event = match IncomingEvent::parse(msg.headers.as_ref(), msg.payload.clone()) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, subject = %msg.subject, "not a ShipperD event; skipping");
            return pull::settle(&msg, Outcome::Term).await;
        }
    };
    if !target.types.is_empty() && !target.types.iter().any(|t| t == event.kind.type_name()) {
        return pull::settle(&msg, Outcome::Ack).await;
    }
    // A namespace's webhook hears only of its own bundles.
    if let Some(scope) = &target.scope
        && scope.owners.of(&event.subject).await.as_deref() != Some(scope.namespace.as_str())
    {
        return pull::settle(&msg, Outcome::Ack).await;
    }
    let span = tracing::info_span!("notify", event = %event.id, target = %redact(&target.url));
    shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
    let outcome = post(target, &event, pull::delivered(&msg))
        .instrument(span)
        .await;
    pull::settle(&msg, outcome).await;
}

async fn post(target: &Target, event: &IncomingEvent, attempt: i64) -> Outcome {
    let body = match event.to_cloudevent_json() {
        Ok(v) => serde_json::to_vec(&v).expect("JSON values serialize"),
        Err(error) => {
            tracing::error!(%error, "cannot render event; skipping");
            return Outcome::Term;
        }
    };
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let mut req = target
        .http
        .post(&target.url)
        .header("content-type", "application/cloudevents+json")
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", ts.to_string());
    // The trace the event belongs to, as an HTTP header too (W3C Trace Context).
    if let Some(tp) = &event.traceparent {
        req = req.header("traceparent", tp);
        if let Some(ts) = &event.tracestate {
            req = req.header("tracestate", ts);
        }
    }
    if let Some(key) = &target.key {
        req = req.header(
            "webhook-signature",
            sign::signature(key, &event.id, ts, &body),
        );
    }
    let m = shipperd_telemetry::metrics::metrics();
    let counted = |outcome: &str| {
        m.webhook_deliveries
            .get_or_create(&shipperd_telemetry::metrics::labels(
                ("target", &target.host),
                ("outcome", outcome),
            ))
            .inc();
    };
    let began = std::time::Instant::now();
    let sent = req.body(body).send().await;
    m.webhook_seconds
        .get_or_create(&shipperd_telemetry::metrics::label(
            "target",
            target.host.clone(),
        ))
        .observe(began.elapsed().as_secs_f64());
    let failure = match sent {
        Ok(resp) if resp.status().is_success() => {
            tracing::debug!(status = %resp.status(), "delivered");
            counted("delivered");
            return Outcome::Ack;
        }
        Ok(resp) if resp.status().is_redirection() => format!(
            "answered {} (redirects are not followed: configure the webhook's final URL)",
            resp.status()
        ),
        Ok(resp) => format!("answered {}", resp.status()),
        // Without the URL: its query string often carries a token.
        Err(e) => format!("{}", e.without_url()),
    };
    let max = target.config.max_deliver;
    if max > 0 && attempt >= max {
        tracing::error!(attempt, failure, "giving up on this event for this webhook");
        counted("failed");
        return Outcome::Term;
    }
    counted("retried");
    let delay = shipperd_model::Backoff::new(target.config.retry_initial, target.config.retry_max)
        .delay(attempt.clamp(1, 64) as u32);
    tracing::warn!(
        attempt,
        failure,
        ?delay,
        "webhook delivery failed; will retry"
    );
    Outcome::Retry(delay)
}
