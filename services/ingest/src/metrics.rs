//! Prometheus counters of the ingest service, rendered in the text exposition format.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Metrics {
    pub bundles_received: Counter,
    pub bytes_received: Counter,
    pub uploads_rejected: Counter,
    pub connections_refused: Counter,
}

pub static METRICS: Metrics = Metrics {
    bundles_received: Counter::new(),
    bytes_received: Counter::new(),
    uploads_rejected: Counter::new(),
    connections_refused: Counter::new(),
};

pub fn render() -> String {
    let rows = [
        (
            "shipperd_ingest_bundles_received_total",
            "New bundles stored.",
            &METRICS.bundles_received,
        ),
        (
            "shipperd_ingest_bytes_received_total",
            "Bytes of complete uploads and drops.",
            &METRICS.bytes_received,
        ),
        (
            "shipperd_ingest_uploads_rejected_total",
            "Uploads and drops refused or cut off.",
            &METRICS.uploads_rejected,
        ),
        (
            "shipperd_ingest_connections_refused_total",
            "Connections closed at once because the connection cap was reached.",
            &METRICS.connections_refused,
        ),
    ];
    let mut out = String::new();
    for (name, help, c) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            c.get()
        ));
    }
    out
}
