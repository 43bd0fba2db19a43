//! The `shipperd` binary's wiring: command-line settings (flags with env twins) and
//! running every service in one process (`shipperd all`, the local and edge default).

pub mod cli;
pub mod client;
pub mod create;
pub mod natscreds;
mod run;
pub mod server;
pub mod tools;
pub mod verify;
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

/// How long a process may take to stop after SIGTERM or SIGINT before it exits
/// anyway: longer than every drain it runs (jobs in hand 30 s and 3 s to let go, open
/// connections 10 s, the operator's controllers 5 s and its Lease 3 s), shorter than
/// the 60 s the manifests give a pod. The drains end sooner when there is nothing to
/// wait for: with NATS gone a job can neither record nor acknowledge what it did, so
/// it is let go at once (it is delivered again).
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(45);

/// A token cancelled on SIGTERM or SIGINT. Once it is, the process ends within
/// [`STOP_GRACE`] whatever is still running (a client waiting on NATS or the API server
/// that does not answer), and at once on a second signal.
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
        // A thread, not a task: it runs however busy (or stuck) the runtime is.
        std::thread::spawn(|| {
            #[allow(clippy::disallowed_methods, reason = "a deadline on its own thread")]
            std::thread::sleep(STOP_GRACE);
            tracing::error!(
                grace = ?STOP_GRACE,
                "still stopping after the grace period; exiting now"
            );
            std::process::exit(1);
        });
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("a second signal: exiting now");
        std::process::exit(1);
    });
    token
}

/// Runs `cli` on a runtime of its own, as both binaries' `main` does. When it ends,
/// blocking work still running (a read of a bundle, a write to disk) is not waited for:
/// the process exits.
pub fn main(cli: cli::Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
