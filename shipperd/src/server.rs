//! Where a client command finds the API (HTTP for status and uploads, gRPC for
//! watches): the flags every client command shares.

use std::path::PathBuf;

use clap::Args;

/// Where the API is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The ingest API.
    #[arg(long, env = "SHIPPERD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A file holding the bearer token to send (e.g. `oc whoami -t > token`).
    #[arg(long, env = "SHIPPERD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to.
    #[arg(long, env = "SHIPPERD_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
