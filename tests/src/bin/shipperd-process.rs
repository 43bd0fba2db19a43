//! The `shipperd` binary, built with the test crate so that tests can run it as a child
//! process, and kill it (`CARGO_BIN_EXE_shipperd-process`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    shipperd::main(shipperd::cli::Cli::parse())
}
