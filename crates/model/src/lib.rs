//! ShipperD's domain model, free of any transport or I/O.
//!
//! Values are parsed once where they enter (an HTTP path, a manifest, a KV key) and then
//! travel typed: [`BundleId`], [`Digest`], [`TargetName`], [`Reference`]. [`DataDir`] is
//! the one place that knows the layout of `--data-dir`. [`state`] holds the bundle and
//! image records and the rules that move them (the terminal-phase rule, the exactly-once
//! count of image outcomes) and the [`Effects`] each transition asks for. [`Secret`]
//! keeps credentials out of logs; [`Backoff`] is the one retry delay.

mod backoff;
mod data_dir;
mod digest;
pub mod effects;
mod error;
mod id;
pub mod inventory;
pub mod reference;
mod secret;
pub mod state;
pub mod webhooks;

pub use backoff::{Backoff, Retry, deadline, pause};
pub use data_dir::DataDir;
pub use digest::Digest;
pub use effects::{Effect, Effects};
pub use error::ParseError;
pub use id::{BundleId, TargetName};
pub use inventory::{Checked, Inventory, InventoryRepo};
pub use reference::{Reference, RegistryUrl, redact_url, url_origin};
pub use secret::Secret;
pub use state::{
    ANONYMOUS, BlobCounts, BundleSummary, Counts, DROP_DIRECTORY, ImagePhase, ImageState, Outcome,
    Phase, PlanRef,
};

/// Current time as RFC 3339 (UTC, microseconds): the timestamps of records and events.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// How long ago an RFC 3339 timestamp was (`None` if it does not parse; zero if it is in
/// the future).
pub fn age(rfc3339: &str) -> Option<std::time::Duration> {
    let at = humantime::parse_rfc3339_weak(rfc3339).ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default(),
    )
}

/// The text a panic carried (its `&str` or `String` payload).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Are `a` and `b` equal? Compared in constant time for equal lengths (give digests:
/// their length says nothing).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
