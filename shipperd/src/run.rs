//! What `shipperd` does with its parsed command line: a tool or a client command runs
//! and exits; a daemon has every setting read and checked, then telemetry, then its
//! service(s) until a signal.

use crate::{
    App,
    cli::{Cli, Command, Daemon, LogFormat, ServeArgs, all_config},
    shutdown_on_signal,
};

/// Runs what `cli` asks for until it ends or a signal stops it.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Tool(tool) => tool.run().await,
        Command::Client(command) => command.run().await,
        Command::Daemon(Daemon::Serve(args)) => serve(args, cli.log_format).await,
        Command::Daemon(daemon) => run_daemon(daemon, cli.log_format, cli.metrics_listen).await,
    }
}

/// A daemon's settings, read and checked.
enum Planned {
    Ingest(shipperd_ingest::Config, Box<crate::cli::IngestArgs>),
    Unpack(shipperd_unpack::Config),
    Publish(shipperd_publish::Config),
    Notify(shipperd_notify::Config),
    All(Box<crate::AllConfig>, Box<crate::cli::IngestArgs>),
    Operator(shipperd_operator::run::Config),
}

impl Planned {
    /// Every setting of `daemon` read and checked, before anything starts.
    fn of(daemon: Daemon) -> anyhow::Result<(&'static str, Self)> {
        Ok(match daemon {
            Daemon::Ingest { common, ingest } => (
                "shipperd-ingest",
                Planned::Ingest(ingest.config(&common), Box::new(ingest)),
            ),
            Daemon::Unpack { common, registry } => (
                "shipperd-unpack",
                Planned::Unpack(registry.unpack(&common)?),
            ),
            Daemon::Publish { common, registry } => (
                "shipperd-publish",
                Planned::Publish(registry.publish(&common)?),
            ),
            Daemon::Notify { common, notify } => {
                ("shipperd-notify", Planned::Notify(notify.config(&common)))
            }
            Daemon::All {
                common,
                ingest,
                registry,
                notify,
            } => (
                "shipperd",
                Planned::All(
                    Box::new(all_config(&common, &ingest, &registry, &notify)?),
                    Box::new(ingest),
                ),
            ),
            Daemon::Operator { common, operator } => (
                "shipperd-operator",
                Planned::Operator(operator.config(&common)),
            ),
            Daemon::Serve(_) => anyhow::bail!("shipperd serve runs on its own"),
        })
    }
}

async fn run_daemon(
    daemon: Daemon,
    log_format: LogFormat,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let (service, planned) = Planned::of(daemon)?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was installed already"))?;
    let _telemetry = shipperd_telemetry::init_with(service, log_format.into())?;
    // Asked of the API server before anything listens: a wrong setting stops the start.
    let kube_auth = match &planned {
        Planned::Ingest(_, ingest) | Planned::All(_, ingest) => ingest.kube_auth().await?,
        _ => None,
    };
    let shutdown = shutdown_on_signal();
    if let Some(addr) = metrics_listen {
        serve_metrics(addr, shutdown.clone()).await?;
    }
    match planned {
        Planned::Ingest(mut config, _) => {
            config.kube_auth = kube_auth;
            shipperd_ingest::run(config, shutdown).await?
        }
        Planned::Unpack(c) => shipperd_unpack::run(c, shutdown).await?,
        Planned::Publish(c) => shipperd_publish::run(c, shutdown).await?,
        Planned::Notify(c) => shipperd_notify::run(c, shutdown).await?,
        Planned::All(mut c, _) => {
            c.ingest.kube_auth = kube_auth;
            App::start(*c).await?.serve(shutdown).await?
        }
        Planned::Operator(c) => shipperd_operator::run::run(c, shutdown).await?,
    }
    Ok(())
}

/// `shipperd serve`: bundles as a read-only registry, until a signal.
async fn serve(args: ServeArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let _telemetry = shipperd_telemetry::init_with("shipperd-serve", log_format.into())?;
    if let Some(dir) = &args.tls_generate
        && crate::natscreds::ensure_tls(dir, &args.tls_hosts(), "ShipperD serve CA")?
    {
        eprintln!(
            "made a CA and a certificate for {} in {} (give clients {})",
            args.tls_hosts().join(", "),
            dir.display(),
            dir.join(crate::natscreds::CA).display()
        );
    }
    let serve = shipperd_serve::Serve::start(args.config()).await?;
    if args.print_install_config {
        let ca = match &args.tls_generate {
            Some(dir) => Some(std::fs::read_to_string(dir.join(crate::natscreds::CA))?),
            None => None,
        };
        print!(
            "{}",
            serve.install_config(&args.advertised(), ca.as_deref())
        );
        return Ok(());
    }
    eprintln!(
        "serving {} image tags on {}",
        serve.refs().len(),
        serve.local_addr()
    );
    Ok(serve.serve(shutdown_on_signal()).await?)
}

/// `--metrics-listen`: `/metrics` and `/healthz` of this process, until `shutdown`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use axum::{http::header, routing::get};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-listen): {e}"))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        shipperd_telemetry::metrics::CONTENT_TYPE,
                    )],
                    shipperd_telemetry::metrics::render(),
                )
            }),
        );
    tracing::info!(%addr, "metrics listening");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics listener failed");
        }
    });
    Ok(())
}
