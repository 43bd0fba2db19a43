//! `shipperd`: parses the command line and runs it (see `shipperd::run`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    shipperd::main(shipperd::cli::Cli::parse())
}
