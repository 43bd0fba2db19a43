//! `shipperd`: parses the command line and runs it (see `shipperd::run`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shipperd::run(shipperd::cli::Cli::parse()).await
}
