//! End to end: a bundle PUT to ingest lands in a real docker-registry with every digest
//! unchanged, and a signed webhook hears every step.

use std::{collections::HashSet, time::Duration};

use shipperd_tests::{
    app::{Options, skopeo_raw, spawn_app},
    eventually,
    fixtures::{Compression, sample, sha256},
    webhook::WebhookSink,
};

const SECRET: &str = "whsec_c2hpcHBlcmQtdGVzdC1zZWNyZXQ=";
const DONE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundle_lands_in_registry_and_webhook_hears_it() -> anyhow::Result<()> {
    let hook = WebhookSink::start().await?;
    let app = spawn_app(Options {
        webhooks: vec![hook.url()],
        secret: Some(SECRET.into()),
        prefix: "mirror".into(),
        ..Default::default()
    })
    .await?;
    let layout = sample("e2e", "sample", 0);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("sample.squashfs");
    layout.write_squashfs(&file, Compression::Gzip)?;
    let bytes = std::fs::read(&file)?;
    let id = sha256(&bytes)[7..].to_string();

    let (status, body) = app.put("sample.squashfs", bytes.clone(), Some(&id)).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["size"], bytes.len() as u64);
    assert_eq!(body["status"], "Received");

    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["format"], "squashfs");
    let images = rec["images"].as_array().unwrap();
    assert_eq!(images.len(), layout.images.len());

    for want in &layout.images {
        let repo = format!("mirror/{}", want.repo);
        let target = format!("{}/{repo}:{}", app.registry.host(), want.tag);
        let img = images
            .iter()
            .find(|i| i["target"] == target.as_str())
            .unwrap_or_else(|| panic!("no image with target {target} in {rec:#}"));
        assert_eq!(img["phase"], "Published");
        assert_eq!(img["digest"], want.digest.as_str());

        // The tag points at the very bytes of the bundle's manifest.
        let (manifest, ct) = app.manifest(&repo, &want.tag).await?.expect("tag exists");
        assert_eq!(sha256(&manifest), want.digest, "{target}");
        assert_eq!(ct, want.media_type);
        assert_eq!(
            sha256(&skopeo_raw(&target)?),
            want.digest,
            "skopeo sees {target}"
        );
        for m in &want.manifests {
            let (bytes, _) = app
                .manifest(&repo, m)
                .await?
                .expect("child manifest exists");
            assert_eq!(&sha256(&bytes), m);
        }
        for blob in &want.blobs {
            let pulled = app
                .blob(&repo, blob)
                .await?
                .unwrap_or_else(|| panic!("{repo} lacks {blob}"));
            assert_eq!(&sha256(&pulled), blob);
            assert_eq!(&pulled, &layout.blobs[blob]);
        }
    }

    // Every step was heard, signed, once per event.
    eventually("bundle.published webhook", DONE, || async {
        (!hook.of_type("io.shipperd.bundle.published").is_empty()).then_some(())
    })
    .await?;
    let deliveries = hook.deliveries();
    let key = shipperd_notify::sign::key(SECRET);
    for d in &deliveries {
        assert!(d.signed_with(&key), "bad signature on {}", d.id);
        assert_eq!(d.content_type, "application/cloudevents+json");
        assert_eq!(d.event["specversion"], "1.0");
        assert_eq!(d.event["id"], d.id.as_str());
        assert_eq!(d.event["subject"], id.as_str());
    }
    let ids: HashSet<_> = deliveries.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids.len(), deliveries.len(), "no event delivered twice here");
    assert_eq!(hook.of_type("io.shipperd.bundle.received").len(), 1);
    let unpacked = hook.of_type("io.shipperd.bundle.unpacked");
    assert_eq!(unpacked.len(), 1);
    // Events carry counts, never lists of images.
    assert_eq!(
        unpacked[0].event["data"]["imageCount"],
        layout.images.len() as u64
    );
    assert!(unpacked[0].event["data"].get("images").is_none());
    let published = hook.of_type("io.shipperd.image.published");
    assert_eq!(published.len(), layout.images.len());
    let indexes: HashSet<_> = published
        .iter()
        .map(|d| d.event["data"]["image"]["index"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(indexes.len(), layout.images.len());
    let done = hook.of_type("io.shipperd.bundle.published");
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].event["data"]["images"]["published"],
        layout.images.len() as u64
    );
    assert!(hook.of_type("io.shipperd.bundle.failed").is_empty());
    assert!(hook.of_type("io.shipperd.image.failed").is_empty());
    // The shared layer went up once and was mounted (or found) for the other repositories.
    let pushed: u64 = published
        .iter()
        .map(|d| d.event["data"]["blobsPushed"].as_u64().unwrap_or(0))
        .sum();
    let distinct: HashSet<_> = layout.images.iter().flat_map(|i| i.blobs.clone()).collect();
    assert!(
        pushed <= distinct.len() as u64,
        "pushed {pushed} > {} distinct blobs",
        distinct.len()
    );

    app.stop().await
}
