//! NATS JetStream transport shared by every ShipperD service; no domain rules live here
//! (those are in `shipperd-model`, and the bundle state built on this in
//! `shipperd-state`).
//!
//! - [`subjects`]: subject names, event types, stream, consumer and bucket names;
//! - [`Bus`]: a connection plus the JetStream context, and the stream/consumer/KV set-up
//!   every service runs at start (idempotent: any replica may run it);
//! - [`event`]: publishing and reading events (CloudEvents attributes and `traceparent`
//!   in NATS headers, protobuf body, `Nats-Msg-Id` for de-duplication);
//! - [`worker`]: the pull loop every stage uses (bounded concurrency, in-progress acks).

mod error;
pub mod event;
pub mod setup;
pub mod subjects;
pub mod trace;
pub mod worker;

pub use error::{Error, ErrorKind, Result};
pub use event::{EventKind, IncomingEvent};
pub use setup::{Bus, ConsumerSpec, Job};
