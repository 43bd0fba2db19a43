//! The plain way to push an OCI layout into a registry, as a parallel HTTP client would
//! (the ceiling `scripts/bench-scale.sh` measures ShipperD against): images
//! `connections` at a time; per blob a `HEAD`, then a cross-repository mount when an
//! earlier image pushed that blob, else `POST` + `PUT` (one push of a digest at a time);
//! then the manifest `PUT` by tag.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;

struct Pusher {
    http: reqwest::Client,
    base: String,
    layout: std::path::PathBuf,
    /// digest → a repository it was pushed to.
    pushed: Mutex<HashMap<String, String>>,
    /// One push of a digest at a time (docker-registry 2.8 can lose a blob's link when
    /// two uploads of it into one repository cross).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    requests: AtomicU64,
}

impl Pusher {
    fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        self.layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(req.send().await?)
    }

    async fn blob(&self, repo: &str, digest: &str) -> anyhow::Result<()> {
        let lock = self
            .locks
            .lock()
            .unwrap()
            .entry(digest.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let head = self
            .send(
                self.http
                    .head(format!("{}/v2/{repo}/blobs/{digest}", self.base)),
            )
            .await?;
        if head.status() == 200 {
            return Ok(());
        }
        let from = self.pushed.lock().unwrap().get(digest).cloned();
        if from.as_deref() == Some(repo) {
            // Another image of this repository pushed it since the HEAD.
            return Ok(());
        }
        if let Some(from) = from {
            let r = self
                .send(self.http.post(format!(
                    "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
                    self.base
                )))
                .await?;
            if r.status() == 201 {
                return Ok(());
            }
        }
        let r = self
            .send(
                self.http
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.base)),
            )
            .await?;
        anyhow::ensure!(r.status() == 202, "POST upload: {}", r.status());
        let loc = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .context("no Location")?
            .to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let body = tokio::fs::read(self.blob_path(digest)).await?;
        let r = self
            .send(
                self.http
                    .put(format!("{loc}{sep}digest={digest}"))
                    .header("content-type", "application/octet-stream")
                    .body(body),
            )
            .await?;
        anyhow::ensure!(r.status() == 201, "PUT blob: {}", r.status());
        self.pushed
            .lock()
            .unwrap()
            .insert(digest.to_string(), repo.to_string());
        Ok(())
    }

    /// The image `desc` names: its repository, tag, media type and manifest bytes.
    async fn manifest(&self, desc: &Value) -> anyhow::Result<Manifest> {
        let name = desc["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("an image without a ref.name")?;
        let r = shipperd_model::Reference::parse(name)?;
        let tag = r.tag.clone().context("an image without a tag")?;
        let digest = desc["digest"].as_str().context("no digest")?;
        Ok(Manifest {
            repo: r.repository,
            tag,
            media_type: desc["mediaType"].as_str().unwrap_or_default().to_string(),
            bytes: tokio::fs::read(self.blob_path(digest)).await?,
        })
    }

    /// PUTs `m` under `tag`.
    async fn put_manifest(&self, m: &Manifest, tag: &str) -> anyhow::Result<()> {
        let resp = self
            .send(
                self.http
                    .put(format!("{}/v2/{}/manifests/{tag}", self.base, m.repo))
                    .header("content-type", m.media_type.clone())
                    .body(m.bytes.clone()),
            )
            .await?;
        if resp.status() != 201 {
            let status = resp.status();
            anyhow::bail!(
                "PUT manifest {}:{tag}: {status}: {}",
                m.repo,
                resp.text().await?
            );
        }
        Ok(())
    }

    /// PUTs the image's manifest again under its tag with `suffix` appended: the
    /// request a tag-last commit adds per image (the registry has the manifest by then).
    async fn retag(&self, desc: Value, suffix: &str) -> anyhow::Result<()> {
        let m = self.manifest(&desc).await?;
        self.put_manifest(&m, &format!("{}{suffix}", m.tag)).await
    }

    async fn image(&self, desc: Value) -> anyhow::Result<()> {
        let man = self.manifest(&desc).await?;
        let m: Value = serde_json::from_slice(&man.bytes)?;
        let mut blobs = vec![
            m["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ];
        for l in m["layers"].as_array().into_iter().flatten() {
            blobs.push(l["digest"].as_str().unwrap_or_default().to_string());
        }
        for b in blobs {
            self.blob(&man.repo, &b).await?;
        }
        self.put_manifest(&man, &man.tag).await
    }
}

/// An image's top manifest, as the layout holds it.
struct Manifest {
    repo: String,
    tag: String,
    media_type: String,
    bytes: Vec<u8>,
}

/// Pushes every image `layout/index.json` names, `connections` at a time; prints the
/// figures. With `retag`, then PUTs every manifest again under a second tag,
/// `retag` images at a time, and prints that too: what tagging last adds at the
/// registry, measured without ShipperD.
pub async fn run(
    layout: &Path,
    registry: &str,
    connections: usize,
    retag: Option<usize>,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let images: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
    let n = images.len();
    let pusher = Arc::new(Pusher {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()?,
        base: registry.trim_end_matches('/').to_string(),
        layout: layout.to_path_buf(),
        pushed: Mutex::default(),
        locks: Mutex::default(),
        requests: AtomicU64::new(0),
    });
    let started = Instant::now();
    let mut results = futures::stream::iter(images.clone())
        .map(|desc| {
            let p = pusher.clone();
            async move { p.image(desc).await }
        })
        .buffer_unordered(connections.max(1));
    while let Some(r) = results.next().await {
        r?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "raw push: {n} images in {secs:.2} s, {:.1} images/s, {} requests ({:.1} per image)",
        n as f64 / secs,
        pusher.requests.load(Ordering::Relaxed),
        pusher.requests.load(Ordering::Relaxed) as f64 / n.max(1) as f64
    );
    if let Some(at_once) = retag {
        let started = Instant::now();
        let mut results = futures::stream::iter(images)
            .map(|desc| {
                let p = pusher.clone();
                async move { p.retag(desc, "-again").await }
            })
            .buffer_unordered(at_once.max(1));
        while let Some(r) = results.next().await {
            r?;
        }
        let t = started.elapsed().as_secs_f64();
        println!(
            "raw retag: {n} manifests PUT again under a second tag in {t:.2} s, {:.0} tags/s \
             ({at_once} at once); push + retag {:.2} s, {:.1} images/s",
            n as f64 / t,
            secs + t,
            n as f64 / (secs + t)
        );
    }
    Ok(())
}
