//! `shipperd`: parses settings, starts telemetry, runs the chosen service(s).

use clap::Parser;
use shipperd::{
    App,
    cli::{Cli, Command, all_config},
    shutdown_on_signal,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was installed already"))?;
    let service = match &cli.command {
        Command::Ingest { .. } => "shipperd-ingest",
        Command::Unpack { .. } => "shipperd-unpack",
        Command::Publish { .. } => "shipperd-publish",
        Command::Notify { .. } => "shipperd-notify",
        Command::All { .. } => "shipperd",
    };
    let _telemetry = shipperd_telemetry::init(service)?;
    let shutdown = shutdown_on_signal();
    match cli.command {
        Command::Ingest { common, ingest } => {
            shipperd_ingest::run(ingest.config(&common), shutdown).await?
        }
        Command::Unpack { common, registry } => {
            shipperd_unpack::run(registry.unpack(&common), shutdown).await?
        }
        Command::Publish { common, registry } => {
            shipperd_publish::run(registry.publish(&common), shutdown).await?
        }
        Command::Notify { common, notify } => {
            shipperd_notify::run(notify.config(&common), shutdown).await?
        }
        Command::All {
            common,
            ingest,
            registry,
            notify,
        } => {
            let app = App::start(all_config(&common, &ingest, &registry, &notify)).await?;
            app.serve(shutdown).await?
        }
    }
    Ok(())
}
