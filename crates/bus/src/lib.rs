//! NATS JetStream plumbing shared by every ShipperD service.
//!
//! - [`subjects`]: subject names, event types, stream and consumer names;
//! - [`Bus`]: a connection plus the JetStream context, and the stream/consumer set-up
//!   every service runs at start (idempotent: any replica may run it);
//! - [`event`]: publishing and reading events (CloudEvents attributes and `traceparent`
//!   in NATS headers, protobuf body, `Nats-Msg-Id` for de-duplication);
//! - [`state`]: the per-bundle record in the `shipperd-bundles` KV bucket, updated with
//!   compare-and-set;
//! - [`worker`]: the pull loop every stage uses (bounded concurrency, in-progress acks).

mod error;
pub mod event;
pub mod lifecycle;
mod secret;
pub mod setup;
pub mod state;
pub mod subjects;
pub mod trace;
pub mod worker;

pub use error::{Error, ErrorKind, Result};
pub use event::{EventKind, IncomingEvent};
pub use secret::Secret;
pub use setup::{Bus, ConsumerSpec};
pub use state::{BundleRecord, ImagePhase, ImageRecord, Phase, StateStore};
