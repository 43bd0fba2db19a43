//! Every bundle ends, even when its worker dies: `shipperd all` runs as a child process
//! and is killed with SIGKILL as soon as an unpack attempt of the bundle begins (the
//! attempt is counted in the ledger before the work starts, so the test sees it). A
//! bundle killed on every attempt ends `Failed`, saying so; one killed twice still ends
//! `Published`.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;
use shipperd_tests::{
    fixtures::{TarCompression, compress, sample, tar_bytes},
    process::ShipperdProcess,
    servers::{Nats, Registry},
};

const ATTEMPTS: u32 = 3;

struct Run {
    nats: Nats,
    registry: Registry,
    _data: tempfile::TempDir,
    app: ShipperdProcess,
    http: reqwest::Client,
}

async fn start() -> anyhow::Result<Run> {
    shipperd_tests::init();
    let nats = Nats::start().await?;
    let registry = Registry::start().await?;
    let data = tempfile::tempdir()?;
    let attempts = ATTEMPTS.to_string();
    let args = shipperd_tests::process::all_args(
        &nats,
        data.path(),
        &registry,
        &[
            "--max-attempts",
            &attempts,
            "--ack-wait",
            "2s",
            "--min-free-bytes",
            "67108864",
        ],
    );
    let app = ShipperdProcess::start(env!("CARGO_BIN_EXE_shipperd-process"), args).await?;
    Ok(Run {
        nats,
        registry,
        _data: data,
        app,
        http: reqwest::Client::new(),
    })
}

/// A gzip tar with a large random layer: expanding it takes long enough (a debug build
/// hashes every byte) that a kill lands while the attempt runs.
fn slow_bundle(salt: &str) -> anyhow::Result<(shipperd_tests::fixtures::LayoutBuilder, Vec<u8>)> {
    let b = sample(salt, salt, 48);
    let tgz = compress(tar_bytes(&b.oci_files(""))?, TarCompression::Gzip)?;
    Ok((b, tgz))
}

impl Run {
    async fn put(&self, name: &str, body: Vec<u8>) -> anyhow::Result<String> {
        let r: Value = self
            .http
            .put(format!("{}/v1/bundles/{name}", self.app.base()))
            .body(body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(r["id"].as_str().context("no id")?.to_string())
    }

    async fn status(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/v1/bundles/{id}", self.app.base()))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Kills the process each time an unpack attempt of `id` begins, `kills` times,
    /// restarting it after each; then waits for the bundle to end. Returns its status.
    async fn kill_unpacks(&mut self, id: &str, kills: u32) -> anyhow::Result<Value> {
        let client = async_nats::connect(self.nats.url()).await?;
        let js = async_nats::jetstream::new(client);
        let kv = js
            .get_key_value(shipperd_bus::subjects::ATTEMPTS_BUCKET)
            .await?;
        let key = format!("{id}.bundle.received");
        let mut watch = kv.watch_with_history(&key).await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut killed = 0;
        while killed < kills {
            let entry = tokio::time::timeout_at(deadline.into(), watch.next())
                .await
                .with_context(|| {
                    format!("no unpack attempt after {killed} kills: {}", self.app.log())
                })?
                .context("the watch ended")??;
            let Ok(record) = serde_json::from_slice::<shipperd_pipeline::Record>(&entry.value)
            else {
                continue;
            };
            // A new attempt (not a heartbeat of one already killed).
            if record.started > killed && record.started > record.failed {
                self.app.kill();
                killed += 1;
                self.app.restart().await?;
            }
        }
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the bundle did not end: {:#}\n{}",
                self.status(id).await?,
                self.app.log()
            );
            let s = self.status(id).await?;
            if matches!(s["phase"].as_str(), Some("Published" | "Failed")) {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_whose_worker_is_killed_on_every_attempt_ends_failed_saying_so()
-> anyhow::Result<()> {
    let mut run = start().await?;
    let (_, tgz) = slow_bundle("killed-always")?;
    let id = run.put("killed-always.tar.gz", tgz).await?;
    let started = Instant::now();
    let s = run.kill_unpacks(&id, ATTEMPTS).await?;
    assert_eq!(s["phase"], "Failed", "{s:#}");
    let why = s["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with(&format!(
            "unpack did not finish in {ATTEMPTS} attempts: the worker stopped each time (last: "
        )),
        "{why}"
    );
    assert!(why.contains('/'), "names the worker (host/pid): {why}");
    // Bounded: the kills, and an ack wait (2 s) after each for the message to come back.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // Its expanded blobs are let go (nothing of a failed unpack stays in the blob store).
    assert_eq!(s["counts"]["total"], 0);
    drop(run.registry);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_whose_worker_is_killed_twice_still_ends_published() -> anyhow::Result<()> {
    let mut run = start().await?;
    let (b, tgz) = slow_bundle("killed-twice")?;
    // Named as its tag-only image's repository is (after the bundle).
    let id = run.put("killed-twice.tar.gz", tgz).await?;
    let s = run.kill_unpacks(&id, ATTEMPTS - 1).await?;
    assert_eq!(s["phase"], "Published", "{s:#}\n{}", run.app.log());
    assert_eq!(s["counts"]["published"], b.images.len() as u64, "{s:#}");
    let reg = run.registry.client()?;
    for img in &b.images {
        let url = format!("{}/v2/{}/tags/list", run.registry.url(), img.repo);
        let tags: Value = reg.get(url).send().await?.json().await?;
        assert_eq!(tags["tags"][0], img.tag.as_str(), "{}: {tags}", img.repo);
    }
    Ok(())
}
