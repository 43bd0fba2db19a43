//! The HTTP listener every ShipperD server runs on (ingest's API, `shipperd serve`):
//! HTTP/1.1 and h2 on one port, TLS followed as its files change, connections bounded
//! in all and per client, cut when silent, and request bodies that must keep a pace
//! (`conn`, `tls`); and who may come in: bearer tokens from a token file or reviewed by
//! the Kubernetes API, with failed attempts counted per client (`auth`, `review`).

pub mod auth;
mod conn;
pub mod review;
mod tls;

use std::net::SocketAddr;

pub use auth::{Caller, Failures, Gate, MAX_FAILURES, Tokens};
pub use conn::{
    Bounds, Client, DRAIN_TIME, MAX_DRAIN, Paced, PacedError, drain_unread_body, serve,
};
pub use tls::{Tls, TlsFiles};

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("{0}")]
    Tls(String),
}

/// Binds `addr`, saying which address could not be had.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Bind(addr, e))
}
