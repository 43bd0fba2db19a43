//! Every Prometheus metric of ShipperD, in one registry per process, encoded by
//! `prometheus-client` in the OpenMetrics text format. A process serves what its
//! services recorded: `shipperd all` everything on ingest's `/metrics`, a service run
//! on its own on its `--metrics-listen` address.
//!
//! Labels are few and bounded: a stage, an outcome, a phase, a status class, a
//! configured target's name. Never a bundle, image, repository or URL.

use std::sync::LazyLock;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// Label sets: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The metrics; see each field for its name.
pub struct Metrics {
    // ingest
    /// `shipperd_ingest_bundles_received_total`
    pub bundles_received: Counter,
    /// `shipperd_ingest_bytes_received_total`
    pub bytes_received: Counter,
    /// `shipperd_ingest_uploads_rejected_total`
    pub uploads_rejected: Counter,
    /// `shipperd_ingest_connections_refused_total`
    pub connections_refused: Counter,
    /// `shipperd_bundles{phase}`: bundles known, by phase (ingest, at each sweep).
    pub bundles: Family<Labels, Gauge>,
    /// `shipperd_store_bytes{kind=bundles|uploads}`, `shipperd_store_free_bytes`.
    pub store_bytes: Family<Labels, Gauge>,
    pub store_free_bytes: Gauge,
    /// `shipperd_nats_consumer_pending{consumer}`: messages not yet delivered, and
    /// `shipperd_nats_consumer_ack_pending{consumer}`: delivered, not yet acknowledged.
    pub consumer_pending: Family<Labels, Gauge>,
    pub consumer_ack_pending: Family<Labels, Gauge>,
    // the stage runtime
    /// `shipperd_stage_jobs_total{stage, outcome=succeeded|failed|retried|busy}`
    pub stage_jobs: Family<Labels, Counter>,
    /// `shipperd_stage_attempt_duration_seconds{stage}`: unpack (a bundle), publish
    /// (an image), commit (a bundle's tags), janitor.
    pub stage_seconds: Histograms,
    // publish
    /// `shipperd_images_total{outcome=published|skipped|failed}`: images ended (counted
    /// once each).
    pub images: Family<Labels, Counter>,
    /// `shipperd_publish_bytes_pushed_total`: blob bytes sent to registries.
    pub bytes_pushed: Counter,
    /// `shipperd_publish_blobs_total{how=uploaded|mounted|present}`
    pub blobs: Family<Labels, Counter>,
    /// `shipperd_registry_requests_total{method, class=2xx|3xx|4xx|5xx|error}`
    pub registry_requests: Family<Labels, Counter>,
    /// `shipperd_registry_retries_total`: requests sent again after a 429, 5xx or a
    /// broken connection.
    pub registry_retries: Counter,
    // unpack
    /// `shipperd_signature_verifications_total{result=accepted|rejected, by=signed|unsigned|<reason>}`:
    /// images the site's signature policy was asked about.
    pub verifications: Family<Labels, Counter>,
    // notify
    /// `shipperd_webhook_deliveries_total{target, outcome=delivered|failed|retried}`
    pub webhook_deliveries: Family<Labels, Counter>,
    /// `shipperd_webhook_delivery_duration_seconds{target}`: each attempt.
    pub webhook_seconds: Histograms,
    // operator
    /// `shipperd_operator_reconciles_total{kind, result=ok|error}`
    pub reconciles: Family<Labels, Counter>,
    /// `shipperd_operator_reconcile_errors_total{kind, error=kube|bus|store|...}`
    pub reconcile_errors: Family<Labels, Counter>,
}

fn stage_histogram() -> Histogram {
    // 50 ms to about 20 minutes.
    Histogram::new(exponential_buckets(0.05, 2.5, 12))
}

fn webhook_histogram() -> Histogram {
    // 5 ms to about 20 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

struct Process {
    metrics: Metrics,
    registry: Registry,
}

static PROCESS: LazyLock<Process> = LazyLock::new(|| {
    let m = Metrics {
        bundles_received: Counter::default(),
        bytes_received: Counter::default(),
        uploads_rejected: Counter::default(),
        connections_refused: Counter::default(),
        bundles: Family::default(),
        store_bytes: Family::default(),
        store_free_bytes: Gauge::default(),
        consumer_pending: Family::default(),
        consumer_ack_pending: Family::default(),
        stage_jobs: Family::default(),
        stage_seconds: Family::new_with_constructor(stage_histogram),
        images: Family::default(),
        bytes_pushed: Counter::default(),
        blobs: Family::default(),
        registry_requests: Family::default(),
        registry_retries: Counter::default(),
        webhook_deliveries: Family::default(),
        verifications: Family::default(),
        webhook_seconds: Family::new_with_constructor(webhook_histogram),
        reconciles: Family::default(),
        reconcile_errors: Family::default(),
    };
    let mut r = Registry::with_prefix("shipperd");
    {
        let i = r.sub_registry_with_prefix("ingest");
        i.register(
            "bundles_received",
            "New bundles stored",
            m.bundles_received.clone(),
        );
        i.register(
            "bytes_received",
            "Bytes of complete uploads and drops",
            m.bytes_received.clone(),
        );
        i.register(
            "uploads_rejected",
            "Uploads and drops refused or cut off",
            m.uploads_rejected.clone(),
        );
        i.register(
            "connections_refused",
            "Connections closed at once: the connection caps were reached",
            m.connections_refused.clone(),
        );
    }
    r.register("bundles", "Bundles known, by phase", m.bundles.clone());
    r.register_with_unit(
        "store",
        "Bytes of the bundle store, by kind (stored bundles, uploads in progress)",
        Unit::Bytes,
        m.store_bytes.clone(),
    );
    r.register_with_unit(
        "store_free",
        "Free bytes on the bundle store's volume",
        Unit::Bytes,
        m.store_free_bytes.clone(),
    );
    r.register(
        "nats_consumer_pending",
        "Messages of a durable consumer not yet delivered",
        m.consumer_pending.clone(),
    );
    r.register(
        "nats_consumer_ack_pending",
        "Messages of a durable consumer delivered and not yet acknowledged",
        m.consumer_ack_pending.clone(),
    );
    r.register(
        "stage_jobs",
        "Attempts at jobs by stage and how they ended",
        m.stage_jobs.clone(),
    );
    r.register_with_unit(
        "stage_attempt_duration",
        "Time one attempt at a job took, by stage",
        Unit::Seconds,
        m.stage_seconds.clone(),
    );
    r.register("images", "Images ended, by outcome", m.images.clone());
    r.register(
        "signature_verifications",
        "Images checked against the signature policy, by result",
        m.verifications.clone(),
    );
    r.register_with_unit(
        "publish_pushed",
        "Blob bytes sent to registries",
        Unit::Bytes,
        m.bytes_pushed.clone(),
    );
    r.register(
        "publish_blobs",
        "Blobs an image needed, by how they got there (uploaded, mounted from another repository, present)",
        m.blobs.clone(),
    );
    r.register(
        "registry_requests",
        "Requests to registries by method and status class (error: no answer)",
        m.registry_requests.clone(),
    );
    r.register(
        "registry_retries",
        "Registry requests sent again after a 429, a 5xx or a broken connection",
        m.registry_retries.clone(),
    );
    r.register(
        "webhook_deliveries",
        "Webhook delivery attempts by target and outcome",
        m.webhook_deliveries.clone(),
    );
    r.register_with_unit(
        "webhook_delivery_duration",
        "Time one webhook delivery attempt took, by target",
        Unit::Seconds,
        m.webhook_seconds.clone(),
    );
    r.register(
        "operator_reconciles",
        "Reconciles by resource kind and result",
        m.reconciles.clone(),
    );
    r.register(
        "operator_reconcile_errors",
        "Failed reconciles by resource kind and kind of error",
        m.reconcile_errors.clone(),
    );
    Process {
        metrics: m,
        registry: r,
    }
});

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &PROCESS.metrics
}

/// The media type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric, in the OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    encode(&mut out, &PROCESS.registry).expect("writing to a String does not fail");
    out
}

/// One label.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

/// Two labels.
pub fn labels(a: (&'static str, &str), b: (&'static str, &str)) -> Labels {
    vec![(a.0, a.1.to_string()), (b.0, b.1.to_string())]
}

/// The class of an HTTP status: `2xx` ... `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_units_and_labels() {
        let m = metrics();
        m.bytes_received.inc_by(5);
        m.images.get_or_create(&label("outcome", "published")).inc();
        m.stage_seconds
            .get_or_create(&label("stage", "publish"))
            .observe(0.2);
        let text = render();
        assert!(
            text.contains("shipperd_ingest_bytes_received_total 5"),
            "{text}"
        );
        assert!(
            text.contains("shipperd_images_total{outcome=\"published\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shipperd_stage_attempt_duration_seconds_count{stage=\"publish\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(status_class(404), "4xx");
    }
}
