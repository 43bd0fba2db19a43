//! One target registry, spoken to in the distribution protocol directly (reqwest):
//! retries with backoff and jitter on 429, 5xx and broken connections (honouring
//! `Retry-After`), stall detection, a cap on concurrent uploads, upload leases shared
//! by replicas, and logins through oci-client's token handling (basic auth, or a bearer
//! token from the registry's token service; two-repository tokens for mounts are ours).
//!
//! Pushing blobs: [`blob`]; manifests and referrers: [`manifest`]; reading a registry
//! (manifests, blobs with resume, tags and referrers): [`pull`].

mod auth;
pub mod blob;
mod error;
mod lease;
pub mod manifest;
mod progress;
pub mod pull;
mod watch;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::kv;
use reqwest::{Method, RequestBuilder, Response, header::HeaderValue};
use shipperd_model::{Backoff, Digest};
use shipperd_registry_targets::{Target, Transfer};

pub use blob::BlobOutcome;
pub use error::RegistryError;
pub use progress::Progress;
pub use pull::Pulled;
pub(crate) use watch::Moved;

/// A request to send: method, URL (absolute, or a path under the registry), and how to
/// add headers and body on each attempt.
pub(crate) struct Call<'a> {
    pub method: Method,
    pub url: String,
    pub repo: &'a str,
    /// For a cross-repository mount: the repository read from (the login needs both).
    pub from: Option<&'a str>,
    pub build: &'a (dyn Fn(RequestBuilder) -> RequestBuilder + Send + Sync),
    /// Statuses that mean success.
    pub ok: &'a [u16],
    /// The body can be sent only once (a stream from the bundle).
    pub once: bool,
}

pub struct Registry {
    target: Target,
    http: reqwest::Client,
    base: String,
    auth: auth::Auth,
    /// digest → a repository of this registry known to hold it (for mounts), open
    /// upload sessions of large blobs (for resuming after a crash) and upload leases,
    /// shared by replicas; none for a client that shares nothing ([`Registry::reader`]).
    blobs: Option<kv::Store>,
    /// Prefix of this registry's keys in `blobs` (KV keys cannot hold `:`).
    key_prefix: String,
    /// Uploads moving bytes at once, over every image.
    uploads: Arc<tokio::sync::Semaphore>,
    /// One lock per blob digest being pushed by this process: images sharing a layer
    /// wait for the first push, then mount instead of uploading it again.
    inflight: std::sync::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Who we are in upload leases (see [`lease`]): host name and a random number.
    holder: String,
    /// (repository, blob) pairs this process saw the registry link (hashed), so the
    /// next image of a repository needs no request for them. Cleared when it holds
    /// [`MAX_LINKED`], or when the registry says a manifest names an unknown blob.
    linked: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// Most (repository, blob) pairs [`Registry`] remembers.
const MAX_LINKED: usize = 200_000;

impl Registry {
    /// A client of `target` sharing what it learns with other replicas through `blobs`
    /// (the `shipperd-blobs` bucket).
    pub fn new(target: Target, blobs: kv::Store) -> Result<Self, RegistryError> {
        Self::build(target, Some(blobs), auth::Access::PullPush)
    }

    /// A client of `target` that shares nothing: it remembers no blob locations and no
    /// upload sessions beyond its own life, and uploads without leases. For reading a
    /// registry, or one process writing alone.
    pub fn reader(target: Target) -> Result<Self, RegistryError> {
        Self::build(target, None, auth::Access::PullPush)
    }

    /// A client of a registry read from only (a source of `shipperd create`): it shares
    /// nothing, and logs in asking for `pull` alone, which read-only credentials and
    /// anonymous users are given.
    pub fn source(target: Target) -> Result<Self, RegistryError> {
        Self::build(target, None, auth::Access::Pull)
    }

    fn build(
        target: Target,
        blobs: Option<kv::Store>,
        access: auth::Access,
    ) -> Result<Self, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("shipperd/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &target.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::Tls(format!("CA bundle: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        if target.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(RegistryError::transport)?;
        let scheme = if target.url.https { "https" } else { "http" };
        let base = format!("{scheme}://{}", target.url.host);
        let key_prefix = registry_key_prefix(&target.url.host);
        Ok(Registry {
            auth: auth::Auth::new(&target, http.clone(), base.clone(), access)?,
            uploads: Arc::new(tokio::sync::Semaphore::new(target.transfer.concurrency)),
            target,
            http,
            base,
            blobs,
            key_prefix,
            inflight: Default::default(),
            holder: format!(
                "{}/{:016x}",
                std::env::var("HOSTNAME").unwrap_or_default(),
                rand::random::<u64>()
            ),
            linked: Default::default(),
        })
    }

    fn linked_key(repo: &str, digest: &Digest) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (repo, digest.as_str()).hash(&mut h);
        h.finish()
    }

    /// Did this process see `repo` get `digest`?
    pub(crate) fn is_linked(&self, repo: &str, digest: &Digest) -> bool {
        self.linked
            .lock()
            .expect("not poisoned")
            .contains(&Self::linked_key(repo, digest))
    }

    pub(crate) fn mark_linked(&self, repo: &str, digest: &Digest) {
        let mut set = self.linked.lock().expect("not poisoned");
        if set.len() >= MAX_LINKED {
            set.clear();
        }
        set.insert(Self::linked_key(repo, digest));
    }

    pub fn host(&self) -> &str {
        &self.target.url.host
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub(crate) fn transfer(&self) -> &Transfer {
        &self.target.transfer
    }

    /// `/v2/...` paths become absolute; absolute URLs (upload locations) stay.
    pub(crate) fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }

    /// One attempt: auth header, body from `build`, watched for stalls. A 401 logs in
    /// again once. Any status comes back as a response; only `ok` ones as `Ok`.
    pub(crate) async fn send_once(
        &self,
        call: &Call<'_>,
        moved: &Moved,
    ) -> Result<Response, RegistryError> {
        let stall = self.target.transfer.stall_timeout;
        let mut relogged = false;
        loop {
            let mut req = (call.build)(self.http.request(call.method.clone(), self.url(&call.url)));
            if let Some(h) = self.auth.header(call.repo, call.from).await? {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            let sent = watch::watched(req.send(), moved, stall).await;
            let class = match &sent {
                Ok(Ok(resp)) => shipperd_telemetry::metrics::status_class(resp.status().as_u16()),
                _ => "error",
            };
            shipperd_telemetry::metrics::metrics()
                .registry_requests
                .get_or_create(&shipperd_telemetry::metrics::labels(
                    ("method", call.method.as_str()),
                    ("class", class),
                ))
                .inc();
            let resp = sent
                .map_err(RegistryError::Stalled)?
                .map_err(RegistryError::transport)?;
            let status = resp.status().as_u16();
            if call.ok.contains(&status) {
                return Ok(resp);
            }
            if status == 401 && !relogged {
                relogged = true;
                self.auth.login(call.repo, call.from).await?;
                if call.once {
                    return Err(RegistryError::Relogin);
                }
                continue;
            }
            let retry_after = error::retry_after(resp.headers());
            let body = tokio::time::timeout(stall, resp.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let (detail, codes) = error::detail(&body);
            if codes.iter().any(|c| c == error::MANIFEST_BLOB_UNKNOWN) {
                // What we believed linked may not be: look again next time.
                self.linked.lock().expect("not poisoned").clear();
            }
            return Err(RegistryError::Status {
                host: self.target.url.host.clone(),
                status,
                detail,
                codes,
                retry_after,
            });
        }
    }

    /// [`Registry::send_once`] with retries on 429, 5xx and broken or stalled
    /// connections: after `Retry-After` when the registry gives one, else after the
    /// target's backoff, `retries` attempts in all.
    pub(crate) async fn send(&self, call: &Call<'_>) -> Result<Response, RegistryError> {
        use backon::Retryable as _;
        let t = &self.target.transfer;
        (|| async { self.send_once(call, &Moved::default()).await })
            .retry(self.retry_delays().builder(t.retries as usize))
            .when(RegistryError::is_retryable)
            .adjust(|e, d| e.retry_after().or(d))
            .notify(|error, delay| {
                shipperd_telemetry::metrics::metrics().registry_retries.inc();
                tracing::debug!(%error, ?delay, url = %shipperd_model::redact_url(&call.url), "registry request failed; retrying");
            })
            .await
    }

    fn retry_delays(&self) -> Backoff {
        let t = &self.target.transfer;
        Backoff::new(t.retry_base, t.retry_max)
    }

    /// The wait after failed attempt `attempt + 1`: what the registry asked for, else
    /// the target's backoff.
    pub(crate) fn backoff(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
    ) -> shipperd_model::Retry {
        self.retry_delays().retry_or(attempt + 1, retry_after)
    }

    fn blob_key(&self, digest: &Digest) -> String {
        format!("{}.{}", self.key_prefix, digest.hex())
    }
}

use shipperd_bus::subjects::registry_key_prefix;

/// The `shipperd-blobs` key of the upload lease on `digest` at registry `host`
/// (`host[:port]`); see [`lease`].
pub fn lease_key(host: &str, digest: &Digest) -> String {
    format!("lease.{}.{}", registry_key_prefix(host), digest.hex())
}

/// Standard request builders.
pub(crate) fn no_body(b: RequestBuilder) -> RequestBuilder {
    b
}

pub(crate) fn accept_manifests(b: RequestBuilder) -> RequestBuilder {
    b.header(
        reqwest::header::ACCEPT,
        HeaderValue::from_static(manifest::ACCEPT),
    )
}
