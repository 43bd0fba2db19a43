//! The whole pipeline in-process against real servers: [`spawn_app`] starts nats-server,
//! docker-registry and every ShipperD service (`shipperd all`, as a library) on free
//! loopback ports, each test with its own data directory.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use serde_json::Value;
use shipperd::{AllConfig, App};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::{
    eventually,
    servers::{Nats, Registry},
};

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub webhooks: Vec<String>,
    pub secret: Option<String>,
    pub prefix: String,
    pub drop_dir: bool,
    /// The drop directory's quiet time (default 1 s here).
    pub drop_quiet: Option<Duration>,
    /// First retry delay of a failed image push (default 200 ms).
    pub publish_retry: Option<Duration>,
    /// Bundle limits for unpack (default: the service's defaults).
    pub limits: Option<shipperd_bundle::Limits>,
    /// Unpack's `--compress-layers`.
    pub compress_layers: bool,
    /// Unpack's `--policy` (the site-wide signature policy).
    pub policy: Option<PathBuf>,
    /// A targets file (TOML) instead of the one loopback target; `{registry}` in it
    /// becomes the test registry's URL, relative paths are taken from the data dir.
    pub targets_toml: Option<String>,
    /// Also write the targets (TOML, `{registry}` replaced) to `<data>/targets.toml`
    /// and have unpack and publish follow that file (re-read when it changes).
    pub follow_targets: bool,
    /// Have notify follow `<data>/webhooks.toml` (written by the test or the operator).
    pub follow_webhooks: bool,
    /// Bearer tokens (the lines of `<data>/tokens`) the API requires.
    pub auth_tokens: Option<String>,
    /// `--auth kubernetes` against this API server URL, for rights in this namespace.
    pub kube_auth: Option<(String, String)>,
    /// Proxies (addresses or CIDRs) whose `X-Forwarded-For` ingest believes.
    pub trusted_proxies: Vec<String>,
    /// Files written into the data dir before the targets file is read.
    pub files: Vec<(String, Vec<u8>)>,
    /// Transfer settings of the default loopback target.
    pub transfer: Option<shipperd_registry_targets::Transfer>,
    /// Least time between two progress reports of one image (default 2 s).
    pub progress_interval: Option<Duration>,
    /// Images one publish service works on at once (default: the service's default).
    pub publish_concurrency: Option<usize>,
    /// Publish services beside the one in `shipperd all` (replicas of it).
    pub extra_publishers: usize,
    /// Attempts at one image (and bundle) before an error that may heal fails it.
    pub max_attempts: Option<u32>,
    /// The stages' ack wait (default: the services').
    pub ack_wait: Option<Duration>,
    /// The janitor's settings (default: sweeps every 200 ms, otherwise the service's).
    pub janitor: Option<shipperd_ingest::JanitorSettings>,
    /// Connect every service to this NATS (a cluster, a locked-down server) instead of
    /// the test's own plain one (`TestApp::nats`, then idle).
    pub nats: Option<shipperd_bus::NatsConfig>,
}

pub struct TestApp {
    pub nats: Nats,
    pub registry: Registry,
    pub data: TempDir,
    pub drop_dir: Option<PathBuf>,
    /// `http://127.0.0.1:PORT` of the ingest API.
    pub base: String,
    pub http: reqwest::Client,
    /// For checks against the registry (its CA, its auth).
    pub reg_http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app(opts: Options) -> anyhow::Result<TestApp> {
    crate::init();
    spawn_app_with(opts, Registry::start().await?).await
}

/// [`spawn_app`] with a registry the test started (e.g. to put a proxy in front).
pub async fn spawn_app_with(opts: Options, registry: Registry) -> anyhow::Result<TestApp> {
    crate::init();
    let nats = Nats::start().await?;
    let data = crate::servers::server_dir()?;
    for (name, bytes) in &opts.files {
        let path = data.path().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes)?;
    }
    let targets = match &opts.targets_toml {
        Some(t) => shipperd_registry_targets::Targets::parse(
            &t.replace("{registry}", &registry.url()),
            data.path(),
        )?,
        None => shipperd_registry_targets::Targets::single(
            &registry.url(),
            &opts.prefix,
            None,
            None,
            false,
        )?
        .with_transfer(|t| {
            if let Some(x) = &opts.transfer {
                *t = x.clone();
            }
        }),
    };
    let targets_file = match (&opts.targets_toml, opts.follow_targets) {
        (Some(t), true) => {
            let path = data.path().join("targets.toml");
            std::fs::write(&path, t.replace("{registry}", &registry.url()))?;
            Some(path)
        }
        _ => None,
    };
    let drop_dir = opts.drop_dir.then(|| data.path().join("drop"));
    let listen = "127.0.0.1:0".parse().unwrap();

    let mut ingest = shipperd_ingest::Config::new(nats.url(), data.path(), listen);
    ingest.drop_dir = drop_dir.clone();
    // As `shipperd all`: the inventory is checked against the registry.
    ingest.targets = Some(shipperd_registry_targets::LiveTargets::new(
        targets.clone(),
        targets_file.clone(),
    ));
    if let Some(t) = &opts.auth_tokens {
        let f = data.path().join("tokens");
        std::fs::write(&f, t)?;
        ingest.auth_token_file = Some(f);
    }
    if let Some((api, namespace)) = &opts.kube_auth {
        let client = kube::Client::try_from(kube::Config::new(api.parse()?))?;
        ingest.kube_auth = Some(shipperd_ingest::KubeAuth {
            client,
            namespace: namespace.clone(),
        });
    }
    ingest.trusted_proxies = opts
        .trusted_proxies
        .iter()
        .map(|n| n.parse())
        .collect::<Result<_, _>>()?;
    ingest.drop_poll = Duration::from_millis(200);
    ingest.drop_quiet = opts.drop_quiet.unwrap_or(Duration::from_secs(1));
    // A machine with little free disk still runs the suite (the reserve has tests of
    // its own).
    ingest.limits.min_free_bytes = 64 << 20;
    ingest.janitor = opts
        .janitor
        .clone()
        .unwrap_or_else(|| shipperd_ingest::JanitorSettings {
            every: Duration::from_millis(200),
            ..Default::default()
        });
    let mut unpack = shipperd_unpack::Config::new(nats.url(), data.path(), targets.clone());
    unpack.service.targets_file = targets_file.clone();
    unpack.compress_layers = opts.compress_layers;
    unpack.policy = opts.policy.clone();
    if let Some(l) = &opts.limits {
        unpack.limits = l.clone();
    }
    let retry = opts.publish_retry.unwrap_or(Duration::from_millis(200));
    unpack.service.stage.backoff.base = retry;
    if let Some(n) = opts.max_attempts {
        unpack.service.stage.max_attempts = n;
    }
    if let Some(w) = opts.ack_wait {
        unpack.service.stage.ack_wait = w;
    }
    let mut publish = shipperd_publish::Config::new(nats.url(), data.path(), targets);
    publish.service.targets_file = targets_file;
    publish.service.stage.backoff.base = retry;
    if let Some(w) = opts.ack_wait {
        publish.service.stage.ack_wait = w;
    }
    if let Some(p) = opts.progress_interval {
        publish.progress_interval = p;
    }
    if let Some(c) = opts.publish_concurrency {
        publish.service.stage.concurrency = c;
    }
    if let Some(n) = opts.max_attempts {
        publish.service.stage.max_attempts = n;
    }
    if let Some(n) = &opts.nats {
        ingest.nats = n.clone();
        unpack.service.nats = n.clone();
        publish.service.nats = n.clone();
    }
    let shutdown = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..opts.extra_publishers {
        let p = Box::pin(shipperd_publish::Publish::start(publish.clone())).await?;
        replicas.push(tokio::spawn(p.serve(shutdown.clone())));
    }
    let mut notify = shipperd_notify::Config::new(nats.url(), opts.webhooks.clone());
    if let Some(n) = &opts.nats {
        notify.nats = n.clone();
    }
    notify.secret = opts.secret.as_deref().map(shipperd_model::Secret::new);
    notify.timeout = Duration::from_secs(2);
    notify.retry_initial = Duration::from_millis(100);
    notify.retry_max = Duration::from_millis(500);
    if opts.follow_webhooks {
        notify.webhooks_file = Some(data.path().join("webhooks.toml"));
        // The tests' webhook receivers are on loopback.
        notify.egress.allow = vec!["127.0.0.0/8".parse()?];
    }

    // Boxed: the services' start-ups are large futures, and a test's runs on its own
    // thread's stack.
    let app = Box::pin(App::start(AllConfig {
        ingest,
        unpack,
        publish,
        notify,
    }))
    .await?;
    let base = format!("http://{}", app.ingest_addr());
    let reg_http = registry.client()?;
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        app.serve(stop).await?;
        for r in replicas {
            r.await??;
        }
        Ok(())
    });
    Ok(TestApp {
        nats,
        registry,
        data,
        drop_dir,
        base,
        http: reqwest::Client::new(),
        reg_http,
        shutdown,
        task: Some(task),
    })
}

impl TestApp {
    /// `PUT /v1/bundles/{name}`; returns the status and the JSON answer.
    pub async fn put(
        &self,
        name: &str,
        body: Vec<u8>,
        sha256: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut url = format!("{}/v1/bundles/{name}", self.base);
        if let Some(s) = sha256 {
            url.push_str(&format!("?sha256={s}"));
        }
        let resp = self.http.put(url).body(body).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// `PUT /v1/bundles/{name}?{query}` (e.g. `target=quay`).
    pub async fn put_with(
        &self,
        name: &str,
        body: Vec<u8>,
        query: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/v1/bundles/{name}?{query}", self.base);
        let resp = self.http.put(url).body(body).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// A multi-part upload: each part `PUT`, then `POST .../complete?parts=N`.
    pub async fn put_parts(&self, name: &str, parts: Vec<Vec<u8>>) -> anyhow::Result<(u16, Value)> {
        let n = parts.len() as u32;
        let numbered = parts.into_iter().zip(1..).map(|(b, i)| (i, b)).collect();
        let id = self.upload_parts(name, numbered).await?;
        self.complete(name, &id, n).await
    }

    /// `PUT`s parts by number (the first starts the upload); returns the upload id.
    pub async fn upload_parts(
        &self,
        name: &str,
        parts: Vec<(u32, Vec<u8>)>,
    ) -> anyhow::Result<String> {
        let mut id: Option<String> = None;
        for (n, body) in parts {
            let mut url = format!("{}/v1/uploads/{name}/parts/{n}", self.base);
            if let Some(id) = &id {
                url.push_str(&format!("?upload_id={id}"));
            }
            let resp = self.http.put(url).body(body).send().await?;
            anyhow::ensure!(resp.status() == 201, "part {n}: {}", resp.status());
            let part: Value = resp.json().await?;
            id = part["upload_id"].as_str().map(str::to_string);
        }
        Ok(id.unwrap_or_default())
    }

    /// `POST .../complete?parts=N`.
    pub async fn complete(&self, name: &str, id: &str, parts: u32) -> anyhow::Result<(u16, Value)> {
        let url = format!(
            "{}/v1/uploads/{name}/complete?parts={parts}&upload_id={id}",
            self.base
        );
        let resp = self.http.post(url).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Checks that every image of `layout` is in the registry (under `prefix`), byte for
    /// byte: the tag points at the digest, every manifest and blob hashes to its digest.
    pub async fn assert_published(
        &self,
        layout: &crate::fixtures::LayoutBuilder,
        prefix: &str,
    ) -> anyhow::Result<()> {
        use crate::fixtures::sha256;
        for img in &layout.images {
            let repo = format!("{prefix}{}", img.repo);
            let (top, _) = self
                .manifest(&repo, &img.tag)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{repo}:{} is not tagged", img.tag))?;
            anyhow::ensure!(
                sha256(&top) == img.digest,
                "{repo}:{} has another digest",
                img.tag
            );
            for m in &img.manifests {
                let (bytes, _) = self
                    .manifest(&repo, m)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{repo}@{m} missing"))?;
                anyhow::ensure!(&sha256(&bytes) == m, "{repo}@{m} corrupt");
            }
            for b in &img.blobs {
                let bytes = self
                    .blob(&repo, b)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("blob {b} missing in {repo}"))?;
                anyhow::ensure!(&sha256(&bytes) == b, "blob {b} corrupt in {repo}");
            }
        }
        Ok(())
    }

    /// `POST {path}` (e.g. `/v1/bundles/{id}/retry`); the status and the JSON answer.
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .send()
            .await?;
        Ok((
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        ))
    }

    /// `GET /v1/bundles/{id}`, `None` on 404.
    pub async fn bundle(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let resp = self
            .http
            .get(format!("{}/v1/bundles/{id}", self.base))
            .send()
            .await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        Ok(Some(resp.error_for_status()?.json().await?))
    }

    /// `GET /v1/bundles`.
    pub async fn bundles(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self
            .http
            .get(format!("{}/v1/bundles", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["bundles"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until the bundle is `Published` or `Failed`; returns its status document.
    pub async fn wait_done(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        eventually(&format!("bundle {id} to finish"), timeout, || async {
            let b = self.bundle(id).await.ok()??;
            matches!(b["phase"].as_str(), Some("Published" | "Failed")).then_some(b)
        })
        .await
    }

    /// Stops the services and waits for them to drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .context("services did not stop within 60 s")???;
        }
        Ok(())
    }

    /// A manifest from the registry: (bytes, content type).
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let accept = [
            crate::fixtures::OCI_INDEX,
            crate::fixtures::OCI_MANIFEST,
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
        .join(", ");
        let resp = self
            .reg_http
            .get(format!(
                "{}/v2/{repo}/manifests/{reference}",
                self.registry.url()
            ))
            .header("accept", accept)
            .send()
            .await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        let resp = resp.error_for_status()?;
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Some((resp.bytes().await?.to_vec(), ct)))
    }

    /// A blob from the registry, `None` on 404.
    pub async fn blob(&self, repo: &str, digest: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let resp = self
            .reg_http
            .get(format!("{}/v2/{repo}/blobs/{digest}", self.registry.url()))
            .send()
            .await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        Ok(Some(resp.error_for_status()?.bytes().await?.to_vec()))
    }

    /// Repositories in the registry.
    pub async fn catalog(&self) -> anyhow::Result<Vec<String>> {
        let v: Value = self
            .reg_http
            .get(format!("{}/v2/_catalog", self.registry.url()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v["repositories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect())
    }

    /// Tags of a repository (empty when it has none or does not exist).
    pub async fn tags(&self, repo: &str) -> anyhow::Result<Vec<String>> {
        let resp = self
            .reg_http
            .get(format!("{}/v2/{repo}/tags/list", self.registry.url()))
            .send()
            .await?;
        if resp.status() == 404 {
            return Ok(vec![]);
        }
        let v: Value = resp.error_for_status()?.json().await?;
        Ok(v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect())
    }

    /// Files left in the ingest temp directory (should be none between uploads).
    pub fn temp_files(&self) -> usize {
        // Every replica's temp directory (`tmp/<instance>/`).
        std::fs::read_dir(self.data.path().join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(1))
            .sum()
    }

    /// Stored bundles in the data directory.
    pub fn stored_bundles(&self) -> usize {
        std::fs::read_dir(self.data.path().join("bundles"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Runs skopeo with `args`; its output, or an error with what it said.
pub fn skopeo(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("skopeo")
        .args(args)
        .output()
        .context("running skopeo (scripts/install-deps.sh installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "skopeo {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// `skopeo inspect --raw` of an image in the test registry (plain http).
pub fn skopeo_raw(image: &str) -> anyhow::Result<Vec<u8>> {
    skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ])
}
