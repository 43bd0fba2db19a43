//! One bundle is one trace: an upload that sends a W3C `traceparent` is continued by
//! ingest, and every event of the bundle, across unpack, publish and notify, carries
//! that trace, on NATS (headers) and on webhooks (the CloudEvents `traceparent`
//! extension attribute and the HTTP header). `shipperd all` runs as its own process
//! with its real telemetry set-up.

use std::time::Duration;

use shipperd_tests::{
    eventually,
    fixtures::{Compression, sample},
    process::ShipperdProcess,
    servers::{Nats, Registry},
    webhook::WebhookSink,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_is_one_trace_from_upload_to_webhook() -> anyhow::Result<()> {
    shipperd_tests::init();
    let nats = Nats::start().await?;
    let registry = Registry::start().await?;
    let sink = WebhookSink::start().await?;
    let data = tempfile::tempdir()?;
    let args = [
        "--nats-url",
        &nats.url(),
        "--data-dir",
        &data.path().display().to_string(),
        "--registry",
        &registry.url(),
        "--webhook",
        &sink.url(),
        "--min-free-bytes",
        "67108864",
    ]
    .map(String::from)
    .to_vec();
    let app = ShipperdProcess::start(env!("CARGO_BIN_EXE_shipperd-process"), args).await?;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("t.squashfs");
    let layout = sample("traces", "t", 0);
    layout.write_squashfs(&path, Compression::Gzip)?;
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/bundles/t.squashfs", app.base()))
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .body(std::fs::read(&path)?)
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await?["id"]
        .as_str()
        .unwrap()
        .to_string();

    let deliveries = eventually(
        "bundle.published at the webhook",
        Duration::from_secs(60),
        || async {
            let d = sink.deliveries();
            d.iter()
                .any(|d| d.event_type() == "io.shipperd.bundle.published")
                .then_some(d)
        },
    )
    .await?;
    let ours: Vec<_> = deliveries
        .iter()
        .filter(|d| d.event["subject"] == id.as_str())
        .collect();
    let types: Vec<&str> = ours.iter().map(|d| d.event_type()).collect();
    for want in [
        "io.shipperd.bundle.received",
        "io.shipperd.bundle.unpacked",
        "io.shipperd.image.published",
        "io.shipperd.bundle.published",
    ] {
        assert!(types.contains(&want), "{want} missing from {types:?}");
    }
    for d in &ours {
        let attr = d.event["traceparent"].as_str().unwrap_or_default();
        assert!(
            attr.starts_with(&format!("00-{TRACE}-")),
            "{} is not in the upload's trace: {attr:?}",
            d.event_type()
        );
        assert_eq!(d.traceparent.as_deref(), Some(attr), "{}", d.event_type());
    }
    Ok(())
}
