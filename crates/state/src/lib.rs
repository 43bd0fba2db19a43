//! Bundle state in NATS JetStream KV, on top of `shipperd-bus` (transport) and
//! `shipperd-model` (the records and their rules):
//!
//! - [`StateStore`]: the summaries and image states, compare-and-set updates, paging;
//! - [`finish`]: recording an image's outcome exactly once;
//! - [`effects`]: the one executor of the effects state transitions return (jobs,
//!   events, the end of a bundle, its blobs let go).

pub mod effects;
pub mod finish;
mod store;

pub use effects::{Executor, Report};
pub use store::{Change, Page, StateStore, image_key};
