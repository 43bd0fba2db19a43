//! The gRPC API's client: `shipperd events [--follow] [ID]`, and how `shipperd push`
//! follows its bundle: a `shipperd.v1.Bundles/Watch` stream (no polling), watched again
//! when it breaks (a bounded number of times in a row).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use shipperd_proto::v1::{
    self as pb, BundlePhase, WatchRequest, WatchResponse, bundles_client::BundlesClient,
};
use tonic::{
    Code,
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::server::ClientArgs;

/// Watches opened again in a row after breaking before a watcher gives up.
const REWATCHES: u32 = 10;
/// The waits before watching again: 250 ms doubling to 4 s, jittered.
const REWATCH: shipperd_model::Backoff =
    shipperd_model::Backoff::new(Duration::from_millis(250), Duration::from_secs(4));

/// `shipperd events`.
#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Keep printing changes as they happen (otherwise: print the bundles' status now
    /// and exit).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One bundle's id (default: every bundle).
    pub id: Option<String>,
}

type Api = BundlesClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of the gRPC API at `--server` (the HTTP API's own address).
pub async fn connect(args: &ClientArgs) -> anyhow::Result<Api> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ep = Endpoint::from_shared(args.server.trim_end_matches('/').to_string())
        .with_context(|| format!("--server {:?} is not a URL", args.server))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    if args.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &args.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls)?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach {}", args.server))?;
    let token = match &args.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("the token is not fit for a header")?,
            )
        }
        None => None,
    };
    Ok(BundlesClient::with_interceptor(channel, Bearer(token)))
}

/// A refusal a person can act on.
fn explain(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        Code::Unauthenticated => {
            anyhow::anyhow!("{} (the server wants a token: --token-file)", s.message())
        }
        Code::PermissionDenied => {
            anyhow::anyhow!("{} (the token's user may not do this)", s.message())
        }
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

/// Could watching again help?
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::ResourceExhausted
    )
}

pub fn phase_name(p: i32) -> &'static str {
    match BundlePhase::try_from(p).unwrap_or_default() {
        BundlePhase::Unspecified => "Unknown",
        BundlePhase::Received => "Received",
        BundlePhase::Unpacking => "Unpacking",
        BundlePhase::Publishing => "Publishing",
        BundlePhase::Tagging => "Tagging",
        BundlePhase::Published => "Published",
        BundlePhase::Failed => "Failed",
    }
}

/// One line for a bundle: id, name, phase, images done of total, bytes, error.
pub fn line(b: &pb::Bundle) -> String {
    let c = b.images.unwrap_or_default();
    let bytes = match b.bytes_total {
        0 => "-".to_string(),
        t => format!("{}%", b.bytes_done * 100 / t),
    };
    format!(
        "{:<12}  {:<32}  {:<10}  {:>6}/{:<6} {:>5}  {}",
        &b.id[..b.id.len().min(12)],
        b.name,
        phase_name(b.phase),
        c.published + c.failed,
        c.total,
        bytes,
        b.error
    )
}

/// How following a bundle did not work out.
#[derive(Debug)]
pub enum Follow {
    /// The watch API could not be reached at all (e.g. a proxy or route that carries
    /// only HTTP/1.1): following by polling may work.
    Unreachable(String),
    /// It failed, was deleted or did not end in time.
    Ended(anyhow::Error),
}

/// A bundle as JSON, its phase by name (`Published`, not 5).
fn named(mut b: serde_json::Value) -> serde_json::Value {
    if let Some(p) = b["phase"].as_i64() {
        b["phase"] = phase_name(p as i32).into();
    }
    b
}

/// A watch message as JSON (camelCase, as protobuf's JSON mapping names fields).
fn to_json(m: &WatchResponse) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(m)?;
    if let Some(b) = v.get_mut("bundle")
        && !b.is_null()
    {
        *b = named(b.take());
    }
    Ok(v)
}

/// Every message of a watch of `id` (every bundle when `None`), handed to `each` until
/// it says stop (`Ok(false)`) or fails; a broken watch is opened again. A watch that
/// never opened fails at once with [`Follow::Unreachable`].
async fn watch(
    api: &mut Api,
    id: Option<&str>,
    mut each: impl FnMut(WatchResponse) -> anyhow::Result<bool>,
) -> Result<(), Follow> {
    let mut broken = 0;
    let mut opened = false;
    loop {
        let req = WatchRequest {
            id: id.unwrap_or_default().to_string(),
        };
        let status = match api.watch(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            broken = 0;
                            opened = true;
                            if !each(m).map_err(Follow::Ended)? {
                                return Ok(());
                            }
                        }
                        Ok(None) => break tonic::Status::unavailable("the watch ended"),
                        Err(s) => break s,
                    }
                }
            }
            Err(s) => s,
        };
        broken += 1;
        if !opened
            && !matches!(
                status.code(),
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::NotFound
                    | Code::InvalidArgument
                    | Code::ResourceExhausted
            )
        {
            return Err(Follow::Unreachable(status.message().to_string()));
        }
        if !transient(&status) || broken > REWATCHES {
            return Err(Follow::Ended(explain(status)));
        }
        tracing::debug!(%status, "the watch broke; watching again");
        REWATCH.retry(broken).wait().await;
    }
}

/// `shipperd events [--follow] [ID]`: each bundle's status as a line (`--json`: the
/// watch's messages, one JSON object a line), then with `--follow` every change.
pub async fn events(args: &EventsArgs) -> anyhow::Result<()> {
    let mut api = connect(&args.client).await?;
    let json = args.client.json;
    let watched = watch(&mut api, args.id.as_deref(), |m| {
        if m.synced {
            return Ok(args.follow);
        }
        if json {
            println!("{}", to_json(&m)?);
        } else if let Some(b) = &m.bundle {
            if m.deleted {
                println!("{:<12}  deleted", &b.id[..b.id.len().min(12)]);
            } else {
                println!("{}", line(b));
            }
        }
        Ok(true)
    })
    .await;
    match watched {
        Ok(()) => Ok(()),
        Err(Follow::Ended(e)) => Err(e),
        Err(Follow::Unreachable(why)) => bail!(
            "the watch API at {} cannot be reached: {why} (it needs HTTP/2 all the way to the server; \
             `shipperd status` uses HTTP/1.1)",
            args.client.server
        ),
    }
}

/// Prints the bundle's progress until it is `Published` (Ok) or `Failed` (an error),
/// within `timeout`.
pub async fn follow(args: &ClientArgs, id: &str, timeout: Duration) -> Result<(), Follow> {
    let mut api = connect(args)
        .await
        .map_err(|e| Follow::Unreachable(format!("{e:#}")))?;
    let mut last = String::new();
    let mut end: Option<anyhow::Result<()>> = None;
    let watched = tokio::time::timeout(
        timeout,
        watch(&mut api, Some(id), |m| {
            if m.deleted {
                end = Some(Err(anyhow::anyhow!("bundle {id} was deleted")));
                return Ok(false);
            }
            let Some(b) = m.bundle else {
                return Ok(true);
            };
            let now = line(&b);
            if now != last {
                if args.json {
                    println!("{}", named(serde_json::to_value(&b)?));
                } else {
                    println!("{now}");
                }
                last = now;
            }
            match BundlePhase::try_from(b.phase) {
                Ok(BundlePhase::Published) => end = Some(Ok(())),
                Ok(BundlePhase::Failed) => {
                    let why = if b.error.is_empty() {
                        "no reason given"
                    } else {
                        &b.error
                    };
                    end = Some(Err(anyhow::anyhow!("bundle {id} failed: {why}")));
                }
                _ => return Ok(true),
            }
            Ok(false)
        }),
    )
    .await;
    match watched {
        Ok(Ok(())) => end
            .unwrap_or_else(|| bail!("the watch of bundle {id} ended"))
            .map_err(Follow::Ended),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Follow::Ended(anyhow::anyhow!(
            "bundle {id} did not end within {timeout:?}; `shipperd events --follow {id}` follows it"
        ))),
    }
}
