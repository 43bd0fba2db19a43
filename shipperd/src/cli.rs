//! Command-line settings. Every flag has an environment twin (`SHIPPERD_*`); all are
//! parsed and checked once, before any port is bound.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use shipperd_bundle::Limits;
use shipperd_listener::Bounds;
use shipperd_model::Secret;
use shipperd_registry_targets::Targets;
use shipperd_store::Limits as StoreLimits;

use crate::AllConfig;

#[derive(Debug, Parser)]
#[command(
    name = "shipperd",
    version,
    about = "Carries bundles of container images into a disconnected registry"
)]
pub struct Cli {
    /// Log lines as text, or one JSON object per line (for log collectors).
    #[arg(long, env = "SHIPPERD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Serve `/metrics` (and `/healthz`) of this process on this address, plain HTTP
    /// without a token: for unpack, publish, notify and the operator run on their own
    /// (ingest serves `/metrics` on its ports already).
    #[arg(long, env = "SHIPPERD_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for shipperd_telemetry::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => shipperd_telemetry::LogFormat::Text,
            LogFormat::Json => shipperd_telemetry::LogFormat::Json,
        }
    }
}

/// What `shipperd` is asked to do: run a service until a signal (a daemon), talk to a
/// running one (a client command), or make something and exit (a tool).
// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Daemon(Daemon),
    #[command(flatten)]
    Client(crate::client::ClientCommand),
    #[command(flatten)]
    Tool(crate::tools::Tool),
}

/// The services, each run until a signal.
// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Daemon {
    /// Take bundles in (HTTP API and drop directory).
    Ingest {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        ingest: IngestArgs,
    },
    /// Open received bundles, check them, list their images.
    Unpack {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Push images into the target registry.
    Publish {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Deliver events to webhooks.
    Notify {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Every service in one process.
    All {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Reconcile `Bundle` resources (a preview: url sources fetched, status, Events,
    /// clean-up on delete); needs a Kubernetes API (in-cluster or a kubeconfig).
    Operator {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Serve bundles as a read-only registry, read where they lie (Day 0: before there is
    /// a cluster to push into). `podman`, `skopeo` and an installer pull from it.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Watch `Bundle`s in this namespace only (default: every namespace).
    #[arg(long = "watch-namespace", env = "SHIPPERD_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Largest bundle fetched, in bytes.
    #[arg(long, env = "SHIPPERD_MAX_BUNDLE_BYTES", default_value_t = 1 << 40)]
    pub max_bundle_bytes: u64,
    /// Act only while holding the Lease `shipperd-operator` (several replicas, one
    /// acting). `false` for a single replica without the right to Leases.
    #[arg(long, env = "SHIPPERD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// The Lease's namespace (default: the pod's, `POD_NAMESPACE`, else the watched
    /// namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease (default: the pod's, `POD_NAME`, else the host's).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where `Bundle` objects are created for bundles uploaded or dropped (default: the
    /// watched namespace, else the Lease's).
    #[arg(long, env = "SHIPPERD_UPLOAD_NAMESPACE")]
    pub upload_namespace: Option<String>,
    /// Where `RegistryTarget`s are written as a targets file (give it to unpack and
    /// publish as `--targets`; they follow it). Default: `<data-dir>/config/targets.toml`.
    #[arg(long, env = "SHIPPERD_TARGETS_OUTPUT")]
    pub targets_output: Option<PathBuf>,
    /// Where `WebhookTarget`s are written as a webhooks file (notify's
    /// `--webhooks-file`). Default: `<data-dir>/config/webhooks.toml`.
    #[arg(long, env = "SHIPPERD_WEBHOOKS_OUTPUT")]
    pub webhooks_output: Option<PathBuf>,
    /// Create the OpenShift projects a bundle's images land in when they are missing
    /// (needs the right to create ProjectRequests); else a Warning Event names them.
    #[arg(long, env = "SHIPPERD_CREATE_PROJECTS")]
    pub create_projects: bool,
    /// Where `Bundle`s with a `path` source take files from; nothing outside it (no
    /// `..`, no symbolic link) is read. Default: `<data-dir>/import`.
    #[arg(long, env = "SHIPPERD_IMPORT_DIR")]
    pub import_dir: Option<PathBuf>,
    /// A registry host (`host[:port]`) besides OpenShift's internal registry that
    /// targets may send ShipperD's service-account token to (repeat for several).
    #[arg(
        long = "service-account-token-host",
        env = "SHIPPERD_SERVICE_ACCOUNT_TOKEN_HOSTS",
        value_delimiter = ','
    )]
    pub service_account_token_hosts: Vec<String>,
    /// Networks (CIDRs, comma-separated) a `Bundle`'s `url` may reach besides public
    /// addresses: loopback, private and link-local addresses are refused otherwise
    /// (a tenant's URL must not reach the cluster's insides or the cloud's metadata).
    #[arg(long, env = "SHIPPERD_ALLOW_PRIVATE_DESTINATIONS", value_delimiter = ',', value_parser = parse_net)]
    pub allow_private_destinations: Vec<ipnet::IpNet>,
}

impl OperatorArgs {
    pub fn config(&self, c: &Common) -> shipperd_operator::run::Config {
        let leader = self.leader_election.then(|| {
            let ns = self
                .lease_namespace
                .clone()
                .or_else(|| self.namespace.clone())
                .unwrap_or_else(|| "default".into());
            let me = self.identity.clone().unwrap_or_else(|| {
                let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "shipperd".into());
                format!("{host}-{}", std::process::id())
            });
            (
                ns,
                shipperd_operator::leader::Settings::new("shipperd-operator", me),
            )
        });
        shipperd_operator::run::Config {
            nats: c.nats(),
            data_dir: shipperd_model::DataDir::new(c.data_dir.clone()),
            namespace: self.namespace.clone(),
            max_bundle_bytes: self.max_bundle_bytes,
            fetch: shipperd_store::FetchSettings {
                egress: shipperd_registry_targets::Egress {
                    allow: self.allow_private_destinations.clone(),
                },
                ..Default::default()
            },
            targets_output: {
                let mut o = shipperd_operator::targets::Output::under(&c.data_dir);
                if let Some(f) = &self.targets_output {
                    o.file = f.clone();
                }
                o
            },
            create_projects: self.create_projects,
            import_dir: self.import_dir.clone(),
            own_namespace: self
                .lease_namespace
                .clone()
                .or_else(|| self.namespace.clone())
                .unwrap_or_else(|| "default".into()),
            service_account_token_hosts: self.service_account_token_hosts.clone(),
            webhooks_output: self
                .webhooks_output
                .clone()
                .unwrap_or_else(|| c.data_dir.join("config/webhooks.toml")),
            upload_namespace: self
                .upload_namespace
                .clone()
                .or_else(|| self.namespace.clone())
                .or_else(|| leader.as_ref().map(|(ns, _)| ns.clone()))
                .or_else(|| Some("default".into())),
            leader,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// NATS server(s) with JetStream, comma-separated (`nats://` or `tls://`); the client
    /// fails over between them. A password in a URL is masked wherever it is shown.
    #[arg(
        long = "nats-url",
        env = "SHIPPERD_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub nats_urls: Vec<String>,
    /// A NATS credentials file (user JWT and seed, as `nsc` writes it).
    #[arg(long, env = "SHIPPERD_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// A file holding a NATS user NKey seed (`SU...`).
    #[arg(long, env = "SHIPPERD_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// A NATS user name; its password is read from --nats-password-file.
    #[arg(long, env = "SHIPPERD_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "SHIPPERD_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// A file holding a NATS authentication token.
    #[arg(long, env = "SHIPPERD_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// CA certificates (PEM) NATS's certificate must chain to (implies TLS).
    #[arg(long, env = "SHIPPERD_NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for a NATS that verifies clients.
    #[arg(long, env = "SHIPPERD_NATS_TLS_CERT_FILE")]
    pub nats_tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "SHIPPERD_NATS_TLS_KEY_FILE")]
    pub nats_tls_key_file: Option<PathBuf>,
    /// Replicas of ShipperD's streams and KV buckets: 1, or 3 on a NATS cluster of three
    /// or more (an existing stream is moved to it where the server can).
    #[arg(long, env = "SHIPPERD_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
    /// The bundle store, shared by every service.
    #[arg(long, env = "SHIPPERD_DATA_DIR", default_value = "/var/lib/shipperd")]
    pub data_dir: PathBuf,
    /// Free bytes kept on the data volume: an upload that would leave less is refused
    /// with 507 (before it starts when it declares its length, else when it gets there),
    /// and expanding a compressed bundle that would leave less fails that bundle.
    #[arg(long, env = "SHIPPERD_MIN_FREE_BYTES", default_value_t = StoreLimits::default().min_free_bytes)]
    pub min_free_bytes: u64,
}

impl Common {
    /// Where NATS is and how to log in, as the flags say.
    pub fn nats(&self) -> shipperd_bus::NatsConfig {
        shipperd_bus::NatsConfig {
            servers: self
                .nats_urls
                .iter()
                .map(|u| u.trim().to_string())
                .collect(),
            creds_file: self.nats_creds_file.clone(),
            nkey_file: self.nats_nkey_file.clone(),
            user: self.nats_user.clone().filter(|u| !u.is_empty()),
            password_file: self.nats_password_file.clone(),
            token_file: self.nats_token_file.clone(),
            tls_ca_file: self.nats_tls_ca_file.clone(),
            tls_cert_file: self.nats_tls_cert_file.clone(),
            tls_key_file: self.nats_tls_key_file.clone(),
            replicas: self.nats_replicas,
        }
    }
}

/// How API requests are authenticated beyond the token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Only the token file (or nothing: an open API).
    None,
    /// Kubernetes TokenReview and SubjectAccessReview.
    Kubernetes,
}

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Address of the ingest HTTP API. Default: `0.0.0.0:8080` in a Kubernetes pod
    /// (`KUBERNETES_SERVICE_HOST` set), else loopback `127.0.0.1:8080`.
    #[arg(long, env = "SHIPPERD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A second address that answers only /healthz, /readyz and /metrics (plain HTTP,
    /// no token), so probes are answered whatever the API's clients hold; point the
    /// kubelet's probes at it.
    #[arg(long, env = "SHIPPERD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Directory watched for bundles copied in (oc rsync, kubectl cp).
    #[arg(long, env = "SHIPPERD_DROP_DIR")]
    pub drop_dir: Option<PathBuf>,
    /// A dropped file that was not renamed in and has no matching `<name>.sha256` is
    /// taken once it has been unchanged, and open for writing by no process, this long.
    #[arg(long, env = "SHIPPERD_DROP_QUIET", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drop_quiet: Duration,
    /// Largest bundle accepted, in bytes.
    #[arg(long, env = "SHIPPERD_MAX_BUNDLE_BYTES", default_value_t = 1 << 40)]
    pub max_bundle_bytes: u64,
    /// Bearer tokens, one per line, that every `/v1` request must present (read again
    /// when the file changes). Without it the API is open.
    #[arg(long, env = "SHIPPERD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// `kubernetes`: a bearer token not in --auth-token-file is checked with a
    /// TokenReview, and its user must be allowed (SubjectAccessReview) to create bundles
    /// (get them to read, delete them to delete) in --auth-namespace; so
    /// `curl -H "Authorization: Bearer $(oc whoami -t)"` works.
    #[arg(long, env = "SHIPPERD_AUTH", value_enum, default_value_t = AuthMode::None)]
    pub auth: AuthMode,
    /// The namespace whose `bundles` rights --auth kubernetes checks. Default: the
    /// pod's own (POD_NAMESPACE, or the service account's namespace).
    #[arg(long, env = "SHIPPERD_AUTH_NAMESPACE")]
    pub auth_namespace: Option<String>,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDRs, comma-separated;
    /// e.g. the OpenShift routers' pod network): a request from one is counted, for bad
    /// tokens, against the last address before it, so one client cannot lock out the
    /// others behind the same router.
    #[arg(long, env = "SHIPPERD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve the API over TLS with this certificate chain (PEM); it and the key are read
    /// again when they change (cert-manager, OpenShift service CA).
    #[arg(long, env = "SHIPPERD_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "SHIPPERD_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM): mutual TLS.
    #[arg(long, env = "SHIPPERD_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Time a client has for the TLS handshake and each request's headers; a kept-alive
    /// connection idle this long is closed.
    #[arg(long, env = "SHIPPERD_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Least bytes per second an upload body must bring, averaged over --body-window
    /// (and at least one byte in every window); a slower upload is cut (408), nothing kept.
    #[arg(long, env = "SHIPPERD_MIN_BODY_RATE", default_value_t = Bounds::default().min_body_rate)]
    pub min_body_rate: u64,
    /// The window --min-body-rate is measured over.
    #[arg(long, env = "SHIPPERD_BODY_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_window: Duration,
    /// Connections open at once; more are closed as they arrive.
    #[arg(long, env = "SHIPPERD_MAX_CONNECTIONS", default_value_t = Bounds::default().max_connections)]
    pub max_connections: usize,
    /// Connections open at once from one client address; more from it are closed as
    /// they arrive.
    #[arg(long, env = "SHIPPERD_MAX_CONNECTIONS_PER_CLIENT", default_value_t = Bounds::default().max_connections_per_client)]
    pub max_connections_per_client: usize,
    /// Uploads (bundles and parts) received at once; more are answered 503 with Retry-After.
    #[arg(long, env = "SHIPPERD_MAX_UPLOADS", default_value_t = StoreLimits::default().max_uploads)]
    pub max_uploads: usize,
    /// Bytes stored bundles, parts and uploads in progress may take together (0: no
    /// limit beyond --min-free-bytes).
    #[arg(long, env = "SHIPPERD_MAX_STORED_BYTES", default_value_t = 0)]
    pub max_stored_bytes: u64,
    /// Stored files of a Published or Failed bundle are removed this long after it
    /// ended (its status stays; a failed bundle can be retried until then).
    #[arg(long, env = "SHIPPERD_KEEP_FINISHED", default_value = "24h", value_parser = humantime::parse_duration)]
    pub keep_finished: Duration,
    /// The status of a Published or Failed bundle (summary and image states) is removed
    /// this long after it ended, so sweeps and listings stay bounded.
    #[arg(long, env = "SHIPPERD_KEEP_STATUS", default_value = "30d", value_parser = humantime::parse_duration)]
    pub keep_status: Duration,
    /// A multi-part upload not completed is removed this long after its last part.
    #[arg(long, env = "SHIPPERD_KEEP_UPLOADS", default_value = "24h", value_parser = humantime::parse_duration)]
    pub keep_uploads: Duration,
    /// A bundle that has not moved for this long is re-driven (announced again, or its
    /// unfinished images sent to publish again).
    #[arg(long, env = "SHIPPERD_STALE_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// Time between two sweeps of the janitor (expiry, re-driving, recovery).
    #[arg(long, env = "SHIPPERD_SWEEP_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub sweep_every: Duration,
    /// Times a stalled bundle is re-driven before it fails, saying so.
    #[arg(long, env = "SHIPPERD_MAX_REDRIVES", default_value_t = 5)]
    pub max_redrives: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Target registry, e.g. http://127.0.0.1:5000 (the scheme decides TLS): the one
    /// target, named `default`. Give this or --targets.
    #[arg(long, env = "SHIPPERD_REGISTRY", required_unless_present = "targets")]
    pub registry: Option<String>,
    /// Plain HTTP to a registry that is not on loopback, or TLS without verifying it.
    #[arg(long, env = "SHIPPERD_REGISTRY_INSECURE")]
    pub registry_insecure: bool,
    /// A targets file (TOML): several named registries with credentials, CA, path
    /// mapping and transfer settings (see docs/targets.example.toml).
    #[arg(long, env = "SHIPPERD_TARGETS", conflicts_with_all = ["registry", "registry_prefix", "registry_username", "registry_password"])]
    pub targets: Option<PathBuf>,
    /// Path prepended to every repository in the target registry.
    #[arg(long, env = "SHIPPERD_REGISTRY_PREFIX")]
    pub registry_prefix: Option<String>,
    /// Registry user name (basic auth).
    #[arg(long, env = "SHIPPERD_REGISTRY_USERNAME")]
    pub registry_username: Option<String>,
    /// Registry password (basic auth).
    #[arg(long, env = "SHIPPERD_REGISTRY_PASSWORD", hide_env_values = true)]
    pub registry_password: Option<Secret>,
    /// Images pushed at once by this process.
    #[arg(long, env = "SHIPPERD_PUBLISH_CONCURRENCY", default_value_t = 32)]
    pub publish_concurrency: usize,
    /// Attempts at one image (or bundle, for unpack; or commit) before it fails: each
    /// attempt that ended with an error that may heal (429, 5xx, a broken connection)
    /// counts, and so does each whose worker stopped (killed, out of memory).
    #[arg(long, env = "SHIPPERD_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// How long a job's message may go without a sign of life before JetStream hands
    /// it to another worker (a worker in progress says so every quarter of it).
    #[arg(long, env = "SHIPPERD_ACK_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// Tags a bundle's commit sets at once.
    #[arg(long, env = "SHIPPERD_TAG_CONCURRENCY", default_value_t = 64)]
    pub tag_concurrency: usize,
    /// Gzip-compress the layers of legacy `docker save` archives as they are unpacked
    /// (kept in the blob store until the bundle ends). Off: they are published as they
    /// are, uncompressed, so each layer's digest is its diff ID; the image ID (its
    /// config) stays the same either way.
    #[arg(long, env = "SHIPPERD_COMPRESS_LAYERS")]
    pub compress_layers: bool,
    /// The site's signature policy, a `containers-policy.json` (as skopeo, podman and
    /// CRI-O read it): before anything of a bundle is published, every image (by its
    /// source reference) must satisfy it, and its target's `policy`, with the
    /// signatures the bundle carries; otherwise the bundle fails and nothing is
    /// tagged. Read again for each bundle; checked at start.
    #[arg(long, env = "SHIPPERD_POLICY", value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// An address (`10.0.0.1`: that one) or a network (`10.128.0.0/14`).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a CIDR network"))
}

/// Bounds on one bundle; a bundle over any of them fails with the limit's name.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Entries (files, directories, links) in one bundle.
    #[arg(long, env = "SHIPPERD_MAX_ENTRIES", default_value_t = Limits::default().max_entries)]
    pub max_entries: u64,
    /// A bundle may expand to this many times its stored bytes (or the floor): the
    /// blobs its manifests declare (a squashfs' sparse or highly compressed files count
    /// at their full size) and what a compressed tar expands to.
    #[arg(long, alias = "max-expansion-ratio", env = "SHIPPERD_MAX_EXPANSION", default_value_t = Limits::default().max_expansion_ratio)]
    pub max_expansion: u64,
    /// Bytes any compressed bundle may expand to, whatever the ratio.
    #[arg(long, env = "SHIPPERD_EXPANSION_FLOOR", default_value_t = Limits::default().expansion_floor)]
    pub expansion_floor: u64,
    /// Largest manifest or image index, in bytes.
    #[arg(long, env = "SHIPPERD_MAX_MANIFEST_BYTES", default_value_t = Limits::default().max_manifest_bytes)]
    pub max_manifest_bytes: u64,
    /// Images one bundle may hold.
    #[arg(long, env = "SHIPPERD_MAX_IMAGES", default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// Bytes of tar headers before one member, GNU long names and PAX records included
    /// (they are read into memory).
    #[arg(long, env = "SHIPPERD_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_entries: self.max_entries,
            max_expansion_ratio: self.max_expansion,
            expansion_floor: self.expansion_floor,
            max_manifest_bytes: self.max_manifest_bytes,
            max_images: self.max_images,
            max_header_bytes: self.max_header_bytes,
            ..Limits::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct NotifyArgs {
    /// Webhook URLs (repeat the flag, or comma-separate in the env var).
    #[arg(long = "webhook", env = "SHIPPERD_WEBHOOKS", value_delimiter = ',')]
    pub webhooks: Vec<String>,
    /// Signing secret, `whsec_<base64>` (Standard Webhooks) or raw.
    #[arg(long, env = "SHIPPERD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
    /// Seconds allowed for one webhook delivery attempt.
    #[arg(long, env = "SHIPPERD_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub webhook_timeout_secs: u64,
    /// A webhooks file (TOML: `[[webhook]]` with `url`, `secret_file`, `types`),
    /// followed while running; the operator writes it from WebhookTarget resources
    /// (`<data-dir>/config/webhooks.toml`).
    #[arg(long, env = "SHIPPERD_WEBHOOKS_FILE")]
    pub webhooks_file: Option<PathBuf>,
    /// Networks (CIDRs, comma-separated) a namespace's webhook (a `WebhookTarget`) may
    /// reach besides public addresses: loopback, private and link-local addresses are
    /// refused otherwise. `--webhook` URLs (the admin's) may go anywhere.
    #[arg(long = "allow-private-webhooks", env = "SHIPPERD_ALLOW_PRIVATE_WEBHOOKS", value_delimiter = ',', value_parser = parse_net)]
    pub allow_private_webhooks: Vec<ipnet::IpNet>,
}

/// The service account's namespace file, in a pod.
const SA_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl IngestArgs {
    /// The Kubernetes client and namespace of `--auth kubernetes` (`None` otherwise).
    pub async fn kube_auth(&self) -> anyhow::Result<Option<shipperd_ingest::KubeAuth>> {
        if self.auth != AuthMode::Kubernetes {
            return Ok(None);
        }
        let client = kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!("--auth kubernetes: cannot reach the Kubernetes API: {e}")
        })?;
        let namespace = self
            .auth_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| {
                std::fs::read_to_string(SA_NAMESPACE)
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        tracing::info!(namespace, "API tokens are reviewed by the Kubernetes API");
        Ok(Some(shipperd_ingest::KubeAuth { client, namespace }))
    }

    pub fn config(&self, c: &Common) -> shipperd_ingest::Config {
        let listen = self.listen.unwrap_or_else(|| {
            let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let ip = if in_cluster {
                [0, 0, 0, 0]
            } else {
                [127, 0, 0, 1]
            };
            SocketAddr::from((ip, 8080))
        });
        let mut cfg = shipperd_ingest::Config::new("", &c.data_dir, listen);
        cfg.nats = c.nats();
        cfg.health_listen = self.health_listen;
        cfg.drop_dir = self.drop_dir.clone();
        cfg.drop_quiet = self.drop_quiet;
        cfg.max_bundle_bytes = self.max_bundle_bytes;
        cfg.auth_token_file = self.auth_token_file.clone();
        cfg.trusted_proxies = self.trusted_proxies.clone();
        cfg.tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(shipperd_listener::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            }),
            _ => None,
        };
        cfg.bounds = Bounds {
            header_timeout: self.header_timeout,
            min_body_rate: self.min_body_rate,
            body_window: self.body_window,
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
        };
        cfg.limits = StoreLimits {
            max_uploads: self.max_uploads,
            min_free_bytes: c.min_free_bytes,
            max_stored_bytes: self.max_stored_bytes,
        };
        cfg.janitor.keep_finished = self.keep_finished;
        cfg.janitor.keep_uploads = self.keep_uploads;
        cfg.janitor.keep_status = self.keep_status;
        cfg.janitor.stale_after = self.stale_after;
        cfg.janitor.every = self.sweep_every;
        cfg.janitor.max_redrives = self.max_redrives;
        cfg
    }
}

impl RegistryArgs {
    /// The targets: from the file, or the one the `--registry` flags describe.
    pub fn targets(&self) -> anyhow::Result<Targets> {
        Ok(match (&self.targets, &self.registry) {
            // The operator writes the file; a pod that starts first waits for it
            // (followed, applied when it appears) instead of failing.
            (Some(file), _) if !file.exists() => {
                tracing::warn!(file = %file.display(), "no targets file yet; no target until it is written");
                Targets::from_list(Vec::new(), Some(""))?
            }
            (Some(file), _) => Targets::load(file)?,
            (None, Some(url)) => Targets::single(
                url,
                self.registry_prefix.as_deref().unwrap_or(""),
                self.registry_username.clone(),
                self.registry_password.clone(),
                self.registry_insecure,
            )?,
            (None, None) => anyhow::bail!("give --registry or --targets"),
        })
    }

    /// What unpack and publish share: NATS, the targets file followed, attempts and the
    /// ack wait.
    fn service(&self, c: &Common, service: &mut shipperd_pipeline::ServiceConfig) {
        service.nats = c.nats();
        service.targets_file = self.targets.clone();
        service.stage.max_attempts = self.max_attempts;
        service.stage.ack_wait = self.ack_wait;
    }

    pub fn unpack(&self, c: &Common) -> anyhow::Result<shipperd_unpack::Config> {
        let mut cfg = shipperd_unpack::Config::new("", &c.data_dir, self.targets()?);
        self.service(c, &mut cfg.service);
        cfg.limits = self.limits.limits();
        cfg.limits.min_free_bytes = c.min_free_bytes;
        cfg.compress_layers = self.compress_layers;
        if let Some(p) = &self.policy {
            // A policy that cannot be used is said at start, not at the first bundle.
            shipperd_trust::Policies::load(std::slice::from_ref(p))
                .map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
            cfg.policy = Some(std::path::absolute(p)?);
        }
        Ok(cfg)
    }

    pub fn publish(&self, c: &Common) -> anyhow::Result<shipperd_publish::Config> {
        let mut cfg = shipperd_publish::Config::new("", &c.data_dir, self.targets()?);
        self.service(c, &mut cfg.service);
        cfg.service.stage.concurrency = self.publish_concurrency;
        cfg.tag_concurrency = self.tag_concurrency;
        Ok(cfg)
    }
}

impl NotifyArgs {
    pub fn config(&self, c: &Common) -> shipperd_notify::Config {
        let webhooks = self
            .webhooks
            .iter()
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect();
        let mut cfg = shipperd_notify::Config::new("", webhooks);
        cfg.nats = c.nats();
        cfg.secret = self.webhook_secret.clone().filter(|s| !s.is_empty());
        cfg.timeout = Duration::from_secs(self.webhook_timeout_secs.max(1));
        cfg.webhooks_file = self.webhooks_file.clone();
        cfg.egress = shipperd_registry_targets::Egress {
            allow: self.allow_private_webhooks.clone(),
        };
        cfg
    }
}

pub fn all_config(
    c: &Common,
    i: &IngestArgs,
    r: &RegistryArgs,
    n: &NotifyArgs,
) -> anyhow::Result<AllConfig> {
    let mut ingest = i.config(c);
    // Work is alive while its heartbeat (every quarter of the ack wait) is fresh.
    ingest.janitor.alive_window = r.ack_wait / 2;
    // The inventory is checked against the registry ingest then knows.
    ingest.targets = Some(shipperd_registry_targets::LiveTargets::new(
        r.targets()?,
        r.targets.clone(),
    ));
    Ok(AllConfig {
        ingest,
        unpack: r.unpack(c)?,
        publish: r.publish(c)?,
        notify: n.config(c),
    })
}

/// `shipperd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The bundles: each a file, or a directory holding the parts of one bundle in name
    /// order (oc-mirror's mirror_00000N.tar); a later one wins a tag two name.
    #[arg(required_unless_present = "watch_dir")]
    pub bundles: Vec<PathBuf>,
    /// Address of the registry.
    #[arg(long, env = "SHIPPERD_SERVE_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// Put before every repository: `mirror` serves `quay.io/org/app` at `mirror/org/app`.
    #[arg(long, env = "SHIPPERD_SERVE_PREFIX", default_value = "")]
    pub prefix: String,
    /// Keep the source registry's host as the first path component
    /// (`quay.io/org/app` at `quay.io/org/app`), as a target with `keep_host` does.
    #[arg(long, env = "SHIPPERD_SERVE_KEEP_HOST")]
    pub keep_host: bool,
    /// At most this many path components per repository (Quay and OpenShift: 2): the
    /// rest are joined with `-`, as a target with `max_depth` does.
    #[arg(long, env = "SHIPPERD_SERVE_MAX_DEPTH")]
    pub max_depth: Option<usize>,
    /// Where compressed bundles are expanded (default: a temporary directory, removed
    /// at exit).
    #[arg(long, env = "SHIPPERD_SERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Serve over TLS with this certificate chain (PEM).
    #[arg(long, env = "SHIPPERD_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "SHIPPERD_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Tokens (one a line) a client may log in with, as the password of `podman login`
    /// (any user name) or as a bearer token. Without it and --htpasswd the registry is
    /// open.
    #[arg(long, env = "SHIPPERD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Users who may log in with their passwords: `user:<bcrypt hash>` lines, as
    /// `htpasswd -Bbn user password` writes them (docker-registry's format); read again
    /// when it changes.
    #[arg(long, env = "SHIPPERD_SERVE_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,
    /// The site's signature policy (a `containers-policy.json`): only images it
    /// accepts, with the signatures their bundle carries, are served (the same rule as
    /// `shipperd all --policy`); the log names each image left out and why.
    #[arg(long, env = "SHIPPERD_SERVE_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Serve the bundle files of this directory too (after the ones named, oldest
    /// first), looking again every --watch-every: one copied in is served once complete.
    #[arg(long, env = "SHIPPERD_SERVE_WATCH_DIR")]
    pub watch_dir: Option<PathBuf>,
    #[arg(long, env = "SHIPPERD_SERVE_WATCH_EVERY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub watch_every: Duration,
    /// TLS with a CA of its own: made in this directory on first start (`ca.crt`,
    /// `tls.crt`, `tls.key`) for the --tls-host names, kept on later ones. Give
    /// `ca.crt` to clients (and to install-config's additionalTrustBundle).
    #[arg(
        long,
        env = "SHIPPERD_SERVE_TLS_GENERATE",
        conflicts_with = "tls_cert_file"
    )]
    pub tls_generate: Option<PathBuf>,
    /// A name (or IP address) for the generated certificate (repeat). Default: this
    /// host's name, localhost and 127.0.0.1.
    #[arg(long = "tls-host", requires = "tls_generate")]
    pub tls_hosts: Vec<String>,
    /// Print the `imageDigestSources` (and, with TLS, the `additionalTrustBundle`) an
    /// OpenShift install-config.yaml needs to install from what is served, and exit.
    #[arg(long)]
    pub print_install_config: bool,
    /// The address clients reach the registry at (`https://bastion.example:5000`, or
    /// `host:port`): the realm of the login challenge (default: the host each client
    /// asked for) and --print-install-config's mirror (default: the first --tls-host,
    /// else --listen).
    #[arg(long, env = "SHIPPERD_SERVE_ADVERTISE")]
    pub advertise: Option<String>,
}

impl ServeArgs {
    /// The names of a generated certificate.
    pub fn tls_hosts(&self) -> Vec<String> {
        if !self.tls_hosts.is_empty() {
            return self.tls_hosts.clone();
        }
        let mut h = Vec::new();
        if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let name = name.trim();
            if !name.is_empty() {
                h.push(name.to_string());
            }
        }
        h.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
        h
    }

    /// Where clients reach the registry.
    pub fn advertised(&self) -> String {
        self.advertise
            .as_deref()
            .map(|a| {
                let host = a.split_once("://").map_or(a, |(_, h)| h);
                host.trim_end_matches('/').to_string()
            })
            .unwrap_or_else(|| match &self.tls_generate {
                Some(_) if !self.tls_hosts.is_empty() => {
                    format!("{}:{}", self.tls_hosts[0], self.listen.port())
                }
                _ => self.listen.to_string(),
            })
    }

    pub fn config(&self) -> shipperd_serve::Config {
        shipperd_serve::Config {
            bundles: self.bundles.clone(),
            listen: self.listen,
            mapping: shipperd_serve::Mapping {
                keep_host: self.keep_host,
                prefix: self.prefix.clone(),
                max_depth: self.max_depth,
                renames: Vec::new(),
                upload_namespace: None,
            },
            cache_dir: self.cache_dir.clone(),
            watch_dir: self.watch_dir.clone(),
            watch_every: self.watch_every,
            tls: match &self.tls_generate {
                Some(dir) => Some(shipperd_serve::TlsFiles {
                    cert: dir.join(crate::natscreds::CERT),
                    key: dir.join(crate::natscreds::KEY),
                    client_ca: None,
                }),
                None => self
                    .tls_cert_file
                    .clone()
                    .zip(self.tls_key_file.clone())
                    .map(|(cert, key)| shipperd_serve::TlsFiles {
                        cert,
                        key,
                        client_ca: None,
                    }),
            },
            auth_token_file: self.auth_token_file.clone(),
            advertise: self.advertise.clone(),
            htpasswd: self.htpasswd.clone(),
            policy: self.policy.clone(),
            limits: Limits::default(),
            bounds: Bounds::default(),
        }
    }
}
