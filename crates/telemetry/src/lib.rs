//! Logging and tracing for every ShipperD service.
//!
//! - Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`). The filter sits
//!   on the log layer only: a global `warn` filter would disable spans, and then no
//!   `traceparent` would be carried across services.
//! - Traces: the W3C TraceContext propagator and an SDK tracer provider are always
//!   installed (so trace context always flows through NATS headers); spans are exported
//!   over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer provider alive; flushes spans when dropped.
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs logging and tracing for `service` (e.g. `shipperd-ingest`).
pub fn init(service: &'static str) -> Result<Guard, Error> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and pipes get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(filter);
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|_| Error::AlreadyInstalled)?;
    Ok(Guard { provider })
}
