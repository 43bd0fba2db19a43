//! A bundle of real size: 2,000 small images in nested repositories (an operator-catalog
//! mirror), through the whole pipeline against real nats-server and docker-registry.
//! Every tag lands at its digest, the bundle is announced once, its images page through
//! the API, and nothing stored or sent grows with the image count.

use std::{collections::HashSet, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{catalog, tar_bytes},
};

const IMAGES: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_images_publish_page_and_announce_once() -> anyhow::Result<()> {
    // The janitor at its own pace (once a minute), not the tests' 200 ms: its sweeps are
    // not what this test is about, and at 2,000 images they cost a tenth of its time.
    let app = spawn_app(Options {
        janitor: Some(Default::default()),
        ..Options::default()
    })
    .await?;
    let b = catalog(IMAGES, "scale");
    let body = tar_bytes(&b.oci_files(""))?;
    let (st, r) = app.put("catalog.tar", body, None).await?;
    assert_eq!(st, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let rec = app.wait_done(&id, Duration::from_secs(600)).await?;
    assert_eq!(rec["phase"], "Published", "{}", rec["error"]);
    assert_eq!(rec["counts"]["total"], IMAGES as u64);
    assert_eq!(rec["counts"]["published"], IMAGES as u64);
    assert_eq!(rec["counts"]["failed"], 0);

    // Every tag points at its image's digest.
    let wrong: Vec<String> = futures::stream::iter(b.images.iter())
        .map(|img| {
            let app = &app;
            async move {
                let url = format!(
                    "{}/v2/{}/manifests/{}",
                    app.registry.url(),
                    img.repo,
                    img.tag
                );
                let resp = app
                    .reg_http
                    .head(url)
                    .header("accept", shipperd_tests::fixtures::OCI_MANIFEST)
                    .send()
                    .await?;
                let got = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                anyhow::Ok(
                    (got != img.digest).then(|| format!("{}:{} → {got:?}", img.repo, img.tag)),
                )
            }
        })
        .buffer_unordered(32)
        .try_filter_map(|w| async move { Ok(w) })
        .try_collect()
        .await?;
    assert!(
        wrong.is_empty(),
        "{} tags wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );

    // The status document holds a first page; the rest pages through, in index order.
    let first = rec["images"].as_array().unwrap();
    assert_eq!(first.len(), 100);
    assert_eq!(rec["images_next"], 100);
    let mut seen = HashSet::new();
    let mut offset = Some(0u64);
    let mut pages = 0;
    while let Some(o) = offset {
        let page: serde_json::Value = app
            .http
            .get(format!(
                "{}/v1/bundles/{id}/images?offset={o}&limit=1000",
                app.base
            ))
            .send()
            .await?
            .json()
            .await?;
        for img in page["images"].as_array().unwrap() {
            assert_eq!(img["phase"], "Published");
            assert!(seen.insert(img["index"].as_u64().unwrap()));
        }
        offset = page["next"].as_u64();
        pages += 1;
        assert!(pages <= 6, "paging does not end");
    }
    assert_eq!(seen.len(), IMAGES);
    let failed: serde_json::Value = app
        .http
        .get(format!("{}/v1/bundles/{id}/images?phase=Failed", app.base))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(failed["images"].as_array().unwrap().len(), 0);
    assert_eq!(failed["total"], 0);

    // The site's inventory lists every image and blob, compactly (a few MB at 20,000),
    // checked against the registry by a sample.
    let inv = app
        .http
        .get(format!("{}/v1/inventory", app.base))
        .send()
        .await?
        .bytes()
        .await?;
    let parsed = shipperd_model::Inventory::from_json(&inv).map_err(anyhow::Error::msg)?;
    let tags: usize = parsed.repositories.values().map(|r| r.tags.len()).sum();
    assert_eq!(tags, IMAGES);
    let distinct: HashSet<&String> = b.images.iter().flat_map(|i| &i.blobs).collect();
    assert_eq!(parsed.blobs.len(), distinct.len());
    let checked = parsed.checked.expect("checked against the registry");
    assert!(
        !checked.all && checked.missing == 0 && checked.blobs <= 64,
        "{checked:?}"
    );
    println!("inventory of {IMAGES} images: {} bytes", inv.len());
    assert!(
        inv.len() < 500_000,
        "{} bytes for {IMAGES} images",
        inv.len()
    );

    // Exactly one bundle.published, and it carries counts, not the images.
    let nats = async_nats::connect(app.nats.url()).await?;
    let js = async_nats::jetstream::new(nats.clone());
    let stream = js.get_stream("SHIPPERD").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "shipperd.events.bundle.>".into(),
            ..Default::default()
        })
        .await?;
    let mut msgs = consumer
        .batch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await?;
    let mut published = 0;
    while let Some(m) = msgs.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        assert!(
            m.payload.len() < 1024,
            "{} carries {} bytes",
            m.subject,
            m.payload.len()
        );
        if m.subject.as_str() == "shipperd.events.bundle.published" {
            published += 1;
        }
    }
    assert_eq!(published, 1);

    // The bundle's summary stays small however many images it has.
    let kv = js.get_key_value("shipperd-bundles").await?;
    let summary = kv.get(&id).await?.expect("the summary");
    assert!(
        summary.len() < 4096,
        "the summary is {} bytes",
        summary.len()
    );
    app.stop().await
}
