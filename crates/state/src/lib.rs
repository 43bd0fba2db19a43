//! Bundle state in NATS JetStream KV, on top of `shipperd-bus` (transport) and
//! `shipperd-model` (the records and their rules):
//!
//! - [`StateStore`]: the summaries and image states, compare-and-set updates, paging;
//! - [`finish`]: recording an image's outcome exactly once;
//! - [`lifecycle`]: announcing a bundle's end once, failing a broken bundle;
//! - [`dispatch`]: publish jobs for a bundle's images.

pub mod dispatch;
pub mod finish;
pub mod lifecycle;
mod store;

pub use store::{Page, StateStore, image_key};
