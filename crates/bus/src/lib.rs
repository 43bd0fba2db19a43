//! NATS JetStream transport shared by every ShipperD service; no domain rules live here
//! (those are in `shipperd-model`, and the bundle state built on this in
//! `shipperd-state`).
//!
//! - [`subjects`]: subject names, event types, stream, consumer and bucket names;
//! - [`NatsConfig`]: servers, credentials, TLS and replicas (secrets read from files);
//! - [`Bus`]: a connection plus the JetStream context, and the stream/consumer/KV set-up
//!   every service runs at start (idempotent: any replica may run it);
//! - [`event`]: publishing and reading events (CloudEvents attributes and `traceparent`
//!   in NATS headers, protobuf body);
//! - [`MessageId`]: every `Nats-Msg-Id`, the de-duplication exactly-once rests on;
//! - [`Error`]: failures with their cause kept, classified by type.
//!
//! The pull loop and the stage runtime are in `shipperd-pipeline`.

mod connect;
mod error;
pub mod event;
mod msgid;
pub mod setup;
pub mod subjects;
pub mod trace;

pub use connect::{NatsConfig, redact_url};
pub use error::{BoxError, Error, ErrorKind, Result, classify, lost_race};
pub use event::{EventKind, IncomingEvent};
pub use msgid::{MessageId, MessageIdError, Topic};
pub use setup::{Bus, ConsumerSpec, Job};
