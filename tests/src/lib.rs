//! ShipperD's test harness: real nats-server and docker-registry processes on free
//! loopback ports ([`servers`]), real OCI images squashed into real bundles
//! ([`fixtures`]), a webhook receiver ([`webhook`]) and the whole pipeline in-process
//! ([`app`]).

// Tests wait for servers, clients and clocks in every way; the rule that every wait has
// a name (clippy.toml) is for the product's code.
#![allow(clippy::disallowed_methods)]

pub mod app;
pub mod browser;
pub mod docker_save;
pub mod fixtures;
pub mod image;
pub mod kube_api;
pub mod kube_auth;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod rawpush;
pub mod servers;
pub mod token;
pub mod webhook;

use std::time::{Duration, Instant};

/// Polls `GET {base}/v1/bundles/{id}` (with `token`, when given) until the bundle is
/// `Published` or `Failed`, or fails after `timeout`; returns its status document.
pub async fn bundle_ended(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    eventually(&format!("bundle {id} to end"), timeout, || async {
        let mut req = http.get(format!("{base}/v1/bundles/{id}?limit=0"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
        matches!(v["phase"].as_str(), Some("Published" | "Failed")).then_some(v)
    })
    .await
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Installs the ring TLS provider and a test log subscriber (once per process).
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
