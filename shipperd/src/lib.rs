//! The `shipperd` binary's wiring: command-line settings (flags with env twins) and
//! running every service in one process (`shipperd all`, the local and edge default).

pub mod cli;
pub mod client;
pub mod natscreds;
mod run;
pub mod server;
pub mod watch;

pub use run::run;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// Settings of every service, for running them together.
#[derive(Debug, Clone)]
pub struct AllConfig {
    pub ingest: shipperd_ingest::Config,
    pub unpack: shipperd_unpack::Config,
    pub publish: shipperd_publish::Config,
    pub notify: shipperd_notify::Config,
}

/// Every service, started (connected, consumers declared, port bound).
pub struct App {
    ingest: shipperd_ingest::Ingest,
    unpack: shipperd_unpack::Unpack,
    publish: shipperd_publish::Publish,
    notify: shipperd_notify::Notify,
}

impl App {
    /// Starts notify first and ingest last, so every consumer exists before the first
    /// bundle can arrive.
    pub async fn start(config: AllConfig) -> anyhow::Result<Self> {
        let notify = shipperd_notify::Notify::start(config.notify).await?;
        let publish = shipperd_publish::Publish::start(config.publish).await?;
        let unpack = shipperd_unpack::Unpack::start(config.unpack).await?;
        let ingest = shipperd_ingest::Ingest::start(config.ingest).await?;
        Ok(App {
            ingest,
            unpack,
            publish,
            notify,
        })
    }

    /// Where the ingest HTTP API listens.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest.local_addr()
    }

    /// Runs every service until `shutdown`; if one fails, the others are stopped too.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stop_all = |r: anyhow::Result<()>| {
            if r.is_err() {
                shutdown.cancel();
            }
            r
        };
        let (a, b, c, d) = tokio::join!(
            async {
                stop_all(
                    self.ingest
                        .serve(shutdown.clone())
                        .await
                        .map_err(Into::into),
                )
            },
            async {
                stop_all(
                    self.unpack
                        .serve(shutdown.clone())
                        .await
                        .map_err(Into::into),
                )
            },
            async {
                stop_all(
                    self.publish
                        .serve(shutdown.clone())
                        .await
                        .map_err(Into::into),
                )
            },
            async {
                stop_all(
                    self.notify
                        .serve(shutdown.clone())
                        .await
                        .map_err(Into::into),
                )
            },
        );
        a.and(b).and(c).and(d)
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can listen for SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
