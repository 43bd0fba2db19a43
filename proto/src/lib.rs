//! ShipperD's wire schema: events and jobs, generated from `shipperd/v1/*.proto`.

/// Version 1 of the schema.
pub mod v1 {
    #![allow(clippy::doc_markdown)]
    include!(concat!(env!("OUT_DIR"), "/shipperd.v1.rs"));
}

pub use prost::Message;
