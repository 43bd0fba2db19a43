//! ingest's `/metrics`: every metric of this process (`shipperd_telemetry::metrics`),
//! with the gauges that describe the whole installation, set at each janitor sweep:
//! bundles by phase, the durable consumers' backlogs, the bundle store's disk.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use shipperd_model::{BundleSummary, Phase};
use shipperd_telemetry::metrics::label;
pub use shipperd_telemetry::metrics::metrics;

use shipperd_store::Store;

/// `GET /metrics`.
pub async fn serve() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            shipperd_telemetry::metrics::CONTENT_TYPE,
        )],
        shipperd_telemetry::metrics::render(),
    )
        .into_response()
}

const PHASES: [Phase; 6] = [
    Phase::Received,
    Phase::Unpacking,
    Phase::Publishing,
    Phase::Tagging,
    Phase::Published,
    Phase::Failed,
];

/// Sets the installation's gauges from a sweep's summaries.
pub async fn refresh(store: &Store, summaries: &[BundleSummary]) {
    let m = metrics();
    for p in PHASES {
        let n = summaries
            .iter()
            .filter(|s| s.phase == p && !s.deleting)
            .count();
        m.bundles
            .get_or_create(&label("phase", format!("{p:?}")))
            .set(n as i64);
    }
    match store.bus().consumers().await {
        Ok(consumers) => {
            for (name, pending, ack_pending) in consumers {
                m.consumer_pending
                    .get_or_create(&label("consumer", name.clone()))
                    .set(pending as i64);
                m.consumer_ack_pending
                    .get_or_create(&label("consumer", name))
                    .set(ack_pending as i64);
            }
        }
        Err(error) => tracing::debug!(%error, "cannot read the consumers' backlogs"),
    }
    let data = store.data().clone();
    let usage = tokio::task::spawn_blocking(move || shipperd_store::space::usage(&data)).await;
    if let Ok(u) = usage {
        m.store_bytes
            .get_or_create(&label("kind", "bundles"))
            .set(u.bundles as i64);
        m.store_bytes
            .get_or_create(&label("kind", "uploads"))
            .set(u.uploads as i64);
        if let Some(free) = u.free {
            m.store_free_bytes.set(free as i64);
        }
    }
}
