//! One bundle is one trace: an upload that sends a W3C `traceparent` is continued by
//! ingest, and every event of the bundle, across unpack, publish and notify, carries
//! that trace, on NATS (headers) and on webhooks (the CloudEvents `traceparent`
//! extension attribute and the HTTP header); the spans an OTLP receiver gets form that
//! one trace (request, stages, images, blobs, webhooks). The same run's `/metrics`,
//! read by Prometheus' own parser, counts what happened. `shipperd all` runs as its own
//! process (its own metrics) with its real telemetry set-up.

use std::time::Duration;

use shipperd_tests::{
    eventually,
    fixtures::{Compression, sample},
    otlp::Receiver,
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
    let args = shipperd_tests::process::all_args(
        &nats,
        data.path(),
        &registry,
        &[
            "--webhook",
            &sink.url(),
            "--min-free-bytes",
            "67108864",
            "--sweep-every",
            "1s",
        ],
    );
    let otlp = Receiver::start().await?;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), otlp.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "200".to_string()),
    ];
    let app = ShipperdProcess::start_env(env!("CARGO_BIN_EXE_shipperd-process"), args, env).await?;

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

    // The spans: one trace, every span's parent in it (or the uploader's own span).
    let images = layout.images.len();
    let spans = eventually(
        "the bundle's spans at the receiver",
        Duration::from_secs(30),
        || async {
            let spans: Vec<_> = otlp
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == TRACE)
                .collect();
            let n = |name: &str| spans.iter().filter(|s| s.name == name).count();
            (n("publish") >= images && n("notify") >= 4 && n("commit") >= 1).then_some(spans)
        },
    )
    .await?;
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &spans {
        assert!(
            ids.contains(s.parent_span_id.as_str()) || s.parent_span_id == "00f067aa0ba902b7",
            "span {} has a parent outside the trace: {s:?}",
            s.name
        );
    }
    let names: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "http",
        "bundle.received",
        "unpack",
        "publish",
        "blob",
        "commit",
        "notify",
    ] {
        assert!(names.contains(want), "no {want} span in {names:?}");
    }
    let blob = spans.iter().find(|s| s.name == "blob").unwrap();
    let parent = spans
        .iter()
        .find(|s| s.span_id == blob.parent_span_id)
        .unwrap();
    assert_eq!(parent.name, "publish", "a blob's span is its image's child");
    assert!(spans.iter().all(|s| s.service == "shipperd"), "{spans:?}");

    // The metrics, as Prometheus' parser reads them.
    let metrics = eventually("the janitor's gauges", Duration::from_secs(30), || async {
        let m = scrape(&app.base()).await.ok()?;
        (value(&m, "shipperd_bundles", &[("phase", "Published")]) == Some(1.0)).then_some(m)
    })
    .await?;
    let n = images as f64;
    let v = |name: &str, labels: &[(&str, &str)]| value(&metrics, name, labels).unwrap_or(-1.0);
    assert_eq!(v("shipperd_ingest_bundles_received_total", &[]), 1.0);
    assert_eq!(v("shipperd_images_total", &[("outcome", "published")]), n);
    assert!(v("shipperd_publish_blobs_total", &[("how", "uploaded")]) >= n);
    assert!(v("shipperd_publish_pushed_bytes_total", &[]) > 0.0);
    assert!(
        v(
            "shipperd_registry_requests_total",
            &[("method", "PUT"), ("class", "2xx")]
        ) >= n
    );
    assert_eq!(
        v(
            "shipperd_stage_attempt_duration_seconds_count",
            &[("stage", "publish")]
        ),
        n
    );
    assert_eq!(
        v(
            "shipperd_stage_attempt_duration_seconds_count",
            &[("stage", "unpack")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "shipperd_stage_jobs_total",
            &[("stage", "publish"), ("outcome", "succeeded")]
        ),
        n
    );
    assert!(
        v(
            "shipperd_webhook_deliveries_total",
            &[("outcome", "delivered")]
        ) >= 4.0
    );
    assert!(v("shipperd_webhook_delivery_duration_seconds_count", &[]) >= 4.0);
    assert_eq!(v("shipperd_bundles", &[("phase", "Failed")]), 0.0);
    assert_eq!(
        v("shipperd_nats_consumer_pending", &[("consumer", "publish")]),
        0.0
    );
    assert!(v("shipperd_store_bytes", &[("kind", "bundles")]) > 0.0);
    assert!(v("shipperd_store_free_bytes", &[]) > 0.0);
    Ok(())
}

/// `/metrics` parsed by prometheus-client's OpenMetrics parser: every sample as
/// `{name, labels, value}`.
async fn scrape(base: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let resp = reqwest::get(format!("{base}/metrics")).await?;
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("metrics.txt"), &text)?;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let o = std::process::Command::new("python3")
        .env(
            "PYTHONPATH",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/pypi"),
        )
        .args(["-c", script])
        .arg(dir.path().join("metrics.txt"))
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "the parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// The sum of the samples named `name` whose labels include `labels`.
fn value(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .filter_map(|s| s["value"].as_f64())
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}
