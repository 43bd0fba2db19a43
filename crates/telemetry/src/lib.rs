//! Logging and tracing for every ShipperD service.
//!
//! - Logs: `tracing` to stderr, as text or one JSON object per line ([`LogFormat`]),
//!   filtered by `RUST_LOG` (default [`DEFAULT_FILTER`]: ShipperD at `info`, its
//!   dependencies at `warn`). The filter sits on the log layer only: a global `warn`
//!   filter would disable spans, and then no `traceparent` would be carried across
//!   services.
//! - Traces: the W3C TraceContext propagator and an SDK tracer provider are always
//!   installed (so trace context always flows through NATS headers); spans are exported
//!   over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

pub mod metrics;

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

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal only).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the fields,
    /// `target`, the current span and its parents), for log collectors.
    Json,
}

/// ShipperD's own crates at `info`, every dependency (NATS and Kubernetes clients,
/// hyper, rustls, the bundle readers) at `warn`. `RUST_LOG` replaces it.
pub const DEFAULT_FILTER: &str = "warn,shipperd=info";

/// Installs logging and tracing for `service` (e.g. `shipperd-ingest`).
pub fn init(service: &'static str) -> Result<Guard, Error> {
    init_with(service, LogFormat::Text)
}

/// [`init`] writing logs in `format`.
pub fn init_with(service: &'static str, format: LogFormat) -> Result<Guard, Error> {
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

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let fmt = match format {
        // Colours only on a terminal: log files and pipes get plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    };
    // Spans exported are ShipperD's (a bundle's trace: request, stages, images, blobs,
    // webhooks), not its dependencies', whatever RUST_LOG says about logs.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|_| Error::AlreadyInstalled)?;
    Ok(Guard { provider })
}
