//! The bundle store, without HTTP: bundles and the parts of multi-part uploads
//! written once under the data directory, hashed as they arrive and checksummed
//! (`store`); the space they may take and the uploads at once (`space`); the writer
//! that hashes on its own thread (`disk`); bundles fetched from URLs, resumed with
//! `Range` (`fetch`); and what may be done to a stored bundle: list, retry, delete,
//! expire (`ops`). ingest serves it over HTTP and gRPC; the operator fetches into it and
//! deletes from it.

mod disk;
mod error;
pub mod fetch;
pub mod ops;
pub mod space;
mod store;

pub use error::{Error, Result, is_enospc};
pub use fetch::{FetchSettings, FetchSource};
pub use space::Limits;
pub use store::{
    Accepted, Meta, Opened, Origin, Part, Store, UploadId, instance, parse_checksum, validate_name,
};
