//! What `shipperd` does with its parsed command line: every setting read and checked,
//! then telemetry, then the chosen service(s) until a signal.

use crate::{
    App,
    cli::{Cli, Command, all_config},
    shutdown_on_signal,
};

enum Config {
    Unpack(shipperd_unpack::Config),
    Publish(shipperd_publish::Config),
    All(Box<crate::AllConfig>),
}

/// Runs what `cli` asks for until it ends or a signal stops it.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Crd = cli.command {
        print!("{}", shipperd_operator::crds_yaml());
        return Ok(());
    }
    if let Command::NatsCredentials {
        secret,
        out_dir,
        namespace,
        service,
        hosts,
    } = &cli.command
    {
        let mut names = crate::natscreds::hosts(service, namespace);
        names.extend(hosts.iter().cloned());
        let made = match (secret, out_dir) {
            (_, Some(dir)) => crate::natscreds::write_files(dir, &names)?,
            (Some(name), None) => {
                rustls::crypto::ring::default_provider()
                    .install_default()
                    .map_err(|_| anyhow::anyhow!("a TLS crypto provider was installed already"))?;
                let client = kube::Client::try_default().await?;
                crate::natscreds::ensure_secret(client, namespace, name, &names).await?
            }
            (None, None) => anyhow::bail!("give --secret or --out-dir"),
        };
        let what = secret.clone().map_or_else(
            || {
                out_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            },
            |s| format!("Secret {namespace}/{s}"),
        );
        println!(
            "{what}: {}",
            if made {
                "created"
            } else {
                "exists already; left as it is"
            }
        );
        return Ok(());
    }
    match &cli.command {
        Command::Push(args) => return crate::client::push(args).await,
        Command::Status { client, id } => {
            return crate::client::status(client, id.as_deref()).await;
        }
        Command::Retry { client, id } => return crate::client::retry(client, id).await,
        Command::Events(args) => return crate::watch::events(args).await,
        Command::Serve(args) => {
            let _telemetry =
                shipperd_telemetry::init_with("shipperd-serve", cli.log_format.into())?;
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
            return Ok(serve.serve(shutdown_on_signal()).await?);
        }
        Command::Delete { client, id, force } => {
            return crate::client::delete(client, id, *force).await;
        }
        _ => {}
    }
    // Every setting is read and checked before anything starts.
    let config = match &cli.command {
        Command::Unpack { common, registry } => Some(Config::Unpack(registry.unpack(common)?)),
        Command::Publish { common, registry } => Some(Config::Publish(registry.publish(common)?)),
        Command::All {
            common,
            ingest,
            registry,
            notify,
        } => Some(Config::All(Box::new(all_config(
            common, ingest, registry, notify,
        )?))),
        _ => None,
    };
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was installed already"))?;
    let service = match &cli.command {
        Command::Ingest { .. } => "shipperd-ingest",
        Command::Unpack { .. } => "shipperd-unpack",
        Command::Publish { .. } => "shipperd-publish",
        Command::Notify { .. } => "shipperd-notify",
        Command::All { .. } => "shipperd",
        Command::Operator { .. } => "shipperd-operator",
        Command::Crd
        | Command::NatsCredentials { .. }
        | Command::Push(_)
        | Command::Status { .. }
        | Command::Events(_)
        | Command::Serve(_)
        | Command::Retry { .. }
        | Command::Delete { .. } => unreachable!("done above"),
    };
    let _telemetry = shipperd_telemetry::init_with(service, cli.log_format.into())?;
    let kube_auth = match &cli.command {
        Command::Ingest { ingest, .. } | Command::All { ingest, .. } => ingest.kube_auth().await?,
        _ => None,
    };
    let shutdown = shutdown_on_signal();
    if let Some(addr) = cli.metrics_listen {
        serve_metrics(addr, shutdown.clone()).await?;
    }
    match cli.command {
        Command::Ingest { common, ingest } => {
            let mut config = ingest.config(&common);
            config.kube_auth = kube_auth;
            shipperd_ingest::run(config, shutdown).await?
        }
        Command::Unpack { .. } | Command::Publish { .. } | Command::All { .. } => match config {
            Some(Config::Unpack(c)) => shipperd_unpack::run(c, shutdown).await?,
            Some(Config::Publish(c)) => shipperd_publish::run(c, shutdown).await?,
            Some(Config::All(mut c)) => {
                c.ingest.kube_auth = kube_auth;
                App::start(*c).await?.serve(shutdown).await?
            }
            None => unreachable!("parsed above"),
        },
        Command::Notify { common, notify } => {
            shipperd_notify::run(notify.config(&common), shutdown).await?
        }
        Command::Operator { common, operator } => {
            shipperd_operator::controller::run(operator.config(&common), shutdown).await?
        }
        Command::Crd
        | Command::NatsCredentials { .. }
        | Command::Push(_)
        | Command::Status { .. }
        | Command::Events(_)
        | Command::Serve(_)
        | Command::Retry { .. }
        | Command::Delete { .. } => unreachable!("done above"),
    }
    Ok(())
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
