//! Every bundle ends, and can be operated on: a registry that fails every request ends
//! the bundle `Failed` with a reason; a registry outage longer than the retry budget
//! fails it and `retry` finishes it once the registry is back; `DELETE` removes the
//! stored bundle, its blobs and its state; a retried old bundle never moves a tag a
//! newer bundle set; a bundle stored but never recorded is recovered by the janitor.

use std::time::Duration;

use serde_json::Value;
use shipperd_model::{BundleId, BundleSummary, DataDir};
use shipperd_tests::{
    app::{Options, TestApp, spawn_app, spawn_app_with},
    eventually,
    fixtures::{LayoutBuilder, TarCompression, compress, sample, tar_bytes},
    proxy::{Fault, Proxy},
    servers::Registry,
};

const DONE: Duration = Duration::from_secs(90);

/// A target through `proxy` that gives up quickly: two tries per request.
fn proxied(proxy: &Proxy) -> String {
    format!(
        r#"
        [[target]]
        name = "proxied"
        url = "{}"
        transfer = {{ retries = 2, retry_base = 0.02, retry_max = 0.05 }}
        "#,
        proxy.url()
    )
}

/// The app publishing through `proxy`, an image failing after two attempts.
async fn spawn_failing(proxy: &Proxy, registry: Registry) -> anyhow::Result<TestApp> {
    spawn_app_with(
        Options {
            targets_toml: Some(proxied(proxy)),
            max_attempts: Some(2),
            publish_retry: Some(Duration::from_millis(50)),
            ..Default::default()
        },
        registry,
    )
    .await
}

async fn put(app: &TestApp, name: &str, body: Vec<u8>) -> anyhow::Result<String> {
    let (st, r) = app.put(name, body, None).await?;
    anyhow::ensure!(st == 202, "{st}: {r}");
    Ok(r["id"].as_str().unwrap().to_string())
}

async fn delete(app: &TestApp, path: &str) -> anyhow::Result<(u16, Value)> {
    let resp = app
        .http
        .delete(format!("{}{path}", app.base))
        .send()
        .await?;
    Ok((
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_failing_every_request_fails_the_bundle_with_a_reason() -> anyhow::Result<()> {
    shipperd_tests::init();
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    proxy.rule(|_, _| Fault::Status(500, None));
    let app = spawn_failing(&proxy, registry).await?;
    let b = sample("every", "every", 0);
    let id = put(&app, "every.tar", tar_bytes(&b.oci_files(""))?).await?;
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let n = b.images.len();
    assert_eq!(
        rec["error"].as_str().unwrap_or_default(),
        format!(
            // A HEAD's answer has no body: the status is all the registry said.
            "{n} of {n} images failed: 127.0.0.1:{} answered 500 ({n} images)",
            proxy.addr.port()
        )
    );
    assert_eq!(rec["counts"]["failed"], n as u64);
    for img in rec["images"].as_array().unwrap() {
        assert_eq!(img["phase"], "Failed", "{img}");
        assert!(
            img["error"].as_str().unwrap().contains("answered 500"),
            "{img}"
        );
    }
    // Each image was tried twice (`max_attempts`), then given up; nothing was tagged.
    for img in rec["images"].as_array().unwrap() {
        assert_eq!(img["attempts"], 2, "{img}");
    }
    assert!(
        !proxy
            .log()
            .iter()
            .any(|s| s.method == "PUT" && s.path.contains("/manifests/")),
        "no manifest was pushed"
    );
    app.stop().await
}

/// Tags are set only once every image is in the registry; a registry that refuses them
/// fails the bundle (its images' content stays), and a retry sets them without pushing
/// anything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_commit_fails_the_bundle_and_retry_sets_the_tags() -> anyhow::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    shipperd_tests::init();
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    let refuse = Arc::new(AtomicBool::new(true));
    let r = refuse.clone();
    proxy.rule(move |method, path| {
        let tag_put = method == "PUT"
            && path
                .rsplit_once("/manifests/")
                .is_some_and(|(_, reference)| !reference.starts_with("sha256:"));
        if tag_put && r.load(Ordering::Relaxed) {
            Fault::Status(500, None)
        } else {
            Fault::Pass
        }
    });
    let app = spawn_failing(&proxy, registry).await?;
    let b = sample("commit", "commit", 0);
    let id = put(&app, "commit.tar", tar_bytes(&b.oci_files(""))?).await?;
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let why = rec["error"].as_str().unwrap_or_default();
    assert!(why.starts_with("setting the tags failed"), "{why}");
    assert!(why.contains("answered 500"), "{why}");
    assert_eq!(rec["counts"]["published"], b.images.len() as u64, "{rec:#}");
    for img in rec["images"].as_array().unwrap() {
        assert_eq!(
            (&img["phase"], &img["tagged"]),
            (&"Published".into(), &false.into())
        );
    }
    for img in &b.images {
        assert!(
            app.tags(&img.repo).await?.is_empty(),
            "{} was tagged",
            img.repo
        );
        // The content went up by digest.
        assert!(app.manifest(&img.repo, &img.digest).await?.is_some());
    }

    refuse.store(false, Ordering::Relaxed);
    let before = proxy.log().len();
    let (st, r) = app.post(&format!("/v1/bundles/{id}/retry")).await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    let again = &proxy.log()[before..];
    assert!(
        !again.iter().any(|s| s.path.contains("/blobs/")),
        "a retried commit pushed blobs again: {again:?}"
    );
    assert!(again.iter().any(|s| s.method == "PUT"));
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_publishes_what_an_outage_longer_than_the_budget_failed() -> anyhow::Result<()> {
    let mut app = spawn_app(Options {
        max_attempts: Some(2),
        publish_retry: Some(Duration::from_millis(50)),
        transfer: Some(shipperd_registry_targets::Transfer {
            retries: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    app.registry.kill();
    let b = sample("outage-retry", "ret", 0);
    let id = put(&app, "ret.tar", tar_bytes(&b.oci_files(""))?).await?;
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let n = b.images.len();
    let why = rec["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with(&format!(
            "{n} of {n} images failed: connection to {} failed: ",
            app.registry.host()
        )) && why.ends_with(&format!("({n} images)")),
        "{why}"
    );

    // Retry only a Failed bundle; the registry is back, so this time it lands.
    app.registry.restart().await?;
    let (st, r) = app.post(&format!("/v1/bundles/{id}/retry")).await?;
    assert_eq!(st, 202, "{r}");
    assert_eq!(r["generation"], 1);
    assert_eq!(r["images"], n as u64);
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["counts"]["published"], n as u64);
    assert_eq!(rec["counts"]["failed"], 0);
    app.assert_published(&b, "").await?;
    let (st, r) = app.post(&format!("/v1/bundles/{id}/retry")).await?;
    assert_eq!(st, 409, "a Published bundle is not retried: {r}");
    let (st, _) = app
        .post(&format!("/v1/bundles/{}/retry", "0".repeat(64)))
        .await?;
    assert_eq!(st, 404);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_removes_the_stored_bundle_its_blobs_and_its_state() -> anyhow::Result<()> {
    let mut app = spawn_app(Options {
        max_attempts: Some(1),
        transfer: Some(shipperd_registry_targets::Transfer {
            retries: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let data = DataDir::new(app.data.path());
    let blobs_in_store = || {
        std::fs::read_dir(data.cas_blobs())
            .map(|d| d.count())
            .unwrap_or(0)
    };

    // A published bundle: its files and state go, its images stay in the registry.
    let b = sample("delete", "del", 0);
    let id = put(&app, "del.tar", tar_bytes(&b.oci_files(""))?).await?;
    assert_eq!(app.wait_done(&id, DONE).await?["phase"], "Published");
    let bid = BundleId::parse(&id)?;
    assert!(data.bundle_dir(&bid).exists());
    let (st, r) = delete(&app, &format!("/v1/bundles/{id}")).await?;
    assert_eq!(st, 200, "{r}");
    assert!(app.bundle(&id).await?.is_none());
    assert!(!data.bundle_dir(&bid).exists());
    let nats = async_nats::connect(app.nats.url()).await?;
    let js = async_nats::jetstream::new(nats);
    let images = js.get_key_value("shipperd-images").await?;
    assert!(
        images.get(format!("{id}.0")).await?.is_none(),
        "image state gone"
    );
    app.assert_published(&b, "").await?;
    let (st, _) = delete(&app, &format!("/v1/bundles/{id}")).await?;
    assert_eq!(st, 404);

    // A compressed bundle that failed keeps its expanded blobs (for a retry) until it
    // is deleted.
    app.registry.kill();
    let z = sample("delete-zst", "delz", 0);
    let zst = compress(tar_bytes(&z.oci_files(""))?, TarCompression::Zstd)?;
    let id = put(&app, "delz.tar.zst", zst).await?;
    assert_eq!(app.wait_done(&id, DONE).await?["phase"], "Failed");
    assert!(blobs_in_store() > 0, "kept for a retry");
    let (st, r) = delete(&app, &format!("/v1/bundles/{id}")).await?;
    assert_eq!(st, 200, "{r}");
    assert_eq!(blobs_in_store(), 0, "released and collected");
    assert!(app.bundles().await?.is_empty());
    app.registry.restart().await?;
    app.stop().await
}

/// One image at `repo:tag` whose content depends on `salt`.
fn one_image(salt: &str, repo: &str, tag: &str) -> LayoutBuilder {
    let mut b = LayoutBuilder::new();
    let l = b.layer(
        &[("etc/version", salt.as_bytes().to_vec())],
        flate2::Compression::fast(),
    );
    b.image(
        serde_json::json!({ "org.opencontainers.image.ref.name": format!("example.com/{repo}:{tag}") }),
        &[l],
        repo,
        tag,
    );
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_older_bundle_never_moves_a_tag_back() -> anyhow::Result<()> {
    shipperd_tests::init();
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    let app = spawn_app_with(
        Options {
            targets_toml: Some(proxied(&proxy)),
            max_attempts: Some(1),
            ..Default::default()
        },
        registry,
    )
    .await?;
    // The older bundle fails at its manifest; a newer one of the same tag lands.
    let old = one_image("old", "tags/app", "1.0");
    let new = one_image("new", "tags/app", "1.0");
    let old_digest = old.images[0].digest.clone();
    proxy.rule(|m, p| {
        if m == "PUT" && p.contains("/manifests/") {
            Fault::Status(503, None)
        } else {
            Fault::Pass
        }
    });
    let old_id = put(&app, "old.tar", tar_bytes(&old.oci_files(""))?).await?;
    assert_eq!(app.wait_done(&old_id, DONE).await?["phase"], "Failed");
    proxy.rule(|_, _| Fault::Pass);
    let new_id = put(&app, "new.tar", tar_bytes(&new.oci_files(""))?).await?;
    assert_eq!(app.wait_done(&new_id, DONE).await?["phase"], "Published");
    let (m, _) = app.manifest("tags/app", "1.0").await?.expect("tagged");
    assert_eq!(shipperd_tests::fixtures::sha256(&m), new.images[0].digest);

    // The older bundle, retried, lands by digest and leaves the tag to the newer one.
    let (st, r) = app.post(&format!("/v1/bundles/{old_id}/retry")).await?;
    assert_eq!(st, 202, "{r}");
    assert_eq!(app.wait_done(&old_id, DONE).await?["phase"], "Published");
    let (m, _) = app.manifest("tags/app", "1.0").await?.expect("tagged");
    assert_eq!(
        shipperd_tests::fixtures::sha256(&m),
        new.images[0].digest,
        "the tag stays with the newer bundle"
    );
    assert!(app.manifest("tags/app", &old_digest).await?.is_some());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_finishes_what_a_crash_left() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        janitor: Some(shipperd_ingest::JanitorSettings {
            every: Duration::from_millis(200),
            stale_after: Duration::from_secs(1),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let data = DataDir::new(app.data.path());

    // Stored, never recorded (a crash between the two): recorded from its metadata.
    let a = sample("crash-a", "cra", 0);
    let bytes = tar_bytes(&a.oci_files(""))?;
    let id = BundleId::parse(&shipperd_tests::fixtures::sha256(&bytes)[7..])?;
    std::fs::create_dir_all(data.bundle_dir(&id))?;
    std::fs::write(data.bundle_file(&id), &bytes)?;
    std::fs::write(
        data.meta(&id),
        serde_json::to_vec(&serde_json::json!({
            "name": "cra.tar", "size": bytes.len(), "path": DataDir::bundle_file_rel(&id),
        }))?,
    )?;
    let rec = app.wait_done(id.as_str(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&a, "").await?;

    // Recorded, never announced (a crash between those two): announced again once it
    // has sat in Received for `stale_after`.
    let b = sample("crash-b", "crb", 0);
    let bytes = tar_bytes(&b.oci_files(""))?;
    let id = BundleId::parse(&shipperd_tests::fixtures::sha256(&bytes)[7..])?;
    std::fs::create_dir_all(data.bundle_dir(&id))?;
    std::fs::write(data.bundle_file(&id), &bytes)?;
    let bus = shipperd_bus::Bus::connect(&app.nats.url(), "test").await?;
    let state = shipperd_state::StateStore::open(&bus).await?;
    let summary = BundleSummary::new(
        id.clone(),
        "crb.tar".into(),
        bytes.len() as u64,
        DataDir::bundle_file_rel(&id),
        None,
    );
    assert!(state.create(&summary).await?);
    let rec = app.wait_done(id.as_str(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;

    // Every image in the registry, its commit job lost (a crash before it was sent):
    // committed again once it has sat in Tagging for `stale_after`.
    state
        .update(&id, |s| {
            s.phase = shipperd_model::Phase::Tagging;
            s.tag_cursor = 0;
            s.finished_at = None;
            Some(())
        })
        .await?
        .expect("updated");
    let rec = eventually("the janitor to commit it again", DONE, || async {
        let s = state.summary(&id).await.ok()??;
        (s.phase == shipperd_model::Phase::Published).then_some(s)
    })
    .await?;
    assert!(rec.redrives >= 1, "{rec:?}");
    assert_eq!(rec.tag_cursor, rec.counts.total);
    app.assert_published(&b, "").await?;

    // A directory nothing records and nothing explains is left alone until its grace
    // period ends (an upload may be between its two steps).
    let stray = data.bundles().join("f".repeat(64));
    std::fs::create_dir_all(&stray)?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(stray.exists());
    eventually(
        "the janitor to have swept",
        Duration::from_secs(5),
        || async {
            app.bundles()
                .await
                .ok()
                .filter(|b| b.len() == 2)
                .map(|_| ())
        },
    )
    .await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_bundles_their_status_and_abandoned_uploads_expire() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        janitor: Some(shipperd_ingest::JanitorSettings {
            every: Duration::from_millis(200),
            keep_finished: Duration::from_secs(1),
            keep_uploads: Duration::from_secs(1),
            keep_status: Duration::from_secs(6),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let data = DataDir::new(app.data.path());
    // A part of a multi-part upload that is never completed.
    let resp = app
        .http
        .put(format!("{}/v1/uploads/abandoned/parts/1", app.base))
        .body(b"half a bundle".to_vec())
        .send()
        .await?;
    assert_eq!(resp.status(), 201);
    assert!(data.upload("abandoned").exists());

    let b = sample("expire", "exp", 0);
    let id = put(&app, "exp.tar", tar_bytes(&b.oci_files(""))?).await?;
    assert_eq!(app.wait_done(&id, DONE).await?["phase"], "Published");
    let bid = BundleId::parse(&id)?;
    let rec = eventually("the stored bundle to expire", DONE, || async {
        let rec = app.bundle(&id).await.ok()??;
        rec["expired_at"].is_string().then_some(rec)
    })
    .await?;
    assert_eq!(rec["phase"], "Published", "the status stays");
    assert!(!data.bundle_dir(&bid).exists());
    eventually("the abandoned upload to go", DONE, || async {
        (!data.upload("abandoned").exists()).then_some(())
    })
    .await?;
    // Uploading it again is answered as a known bundle (its body is read: the files
    // are gone, so they are stored again).
    let (st, r) = app
        .put("exp.tar", tar_bytes(&b.oci_files(""))?, Some(&id))
        .await?;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["status"], "Published");
    // Later its status goes too (summary and image states), so sweeps and listings
    // stay bounded by what is recent; its files with it.
    eventually("the status to go", DONE, || async {
        app.bundle(&id).await.ok()?.is_none().then_some(())
    })
    .await?;
    let images = app
        .http
        .get(format!("{}/v1/bundles/{id}/images", app.base))
        .send()
        .await?;
    assert_eq!(images.status(), 404);
    assert!(app.bundles().await?.iter().all(|b| b["id"] != id.as_str()));
    assert!(!data.bundle_dir(&bid).exists());
    let js = async_nats::jetstream::new(async_nats::connect(app.nats.url()).await?);
    let kv = js
        .get_key_value(shipperd_bus::subjects::IMAGES_BUCKET)
        .await?;
    let mut keys = kv.keys().await?;
    while let Some(k) = futures::StreamExt::next(&mut keys).await {
        assert!(
            !k?.starts_with(&id),
            "an image key of the forgotten bundle stays"
        );
    }
    app.stop().await
}
