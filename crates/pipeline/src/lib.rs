//! The stage runtime: every worker of the pipeline (unpack, publish, the commit job) is a
//! small [`Stage`] (`decode -> handle -> Result<Done, E: Classify>`) on one [`Runtime`],
//! which owns what each used to repeat: spans with the job's trace context, panics,
//! progress acks, attempts counted durably before the work ([`attempts`]), one retry
//! policy ([`shipperd_model::Backoff`]), settling, per-stage [`metrics`], and performing
//! the effects the work returned (through `shipperd-state`'s executor).
//!
//! [`pull`] is the consumer loop under it, shared with notify; [`Service`] the start-up
//! of a stage service and [`ServiceConfig`] its settings.

pub mod attempts;
pub mod metrics;
pub mod pull;
mod runtime;
mod service;

pub use attempts::{Ledger, Record, Spent};
pub use runtime::{Attempt, Class, Classify, Done, GiveUp, Runtime, Settings, Stage};
pub use service::{Service, ServiceConfig};
