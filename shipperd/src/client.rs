//! `shipperd status [ID]`, `shipperd retry ID`, `shipperd check ID`, `shipperd delete ID`:
//! the ingest API for people (a short table, a bundle's phase, counts, error and failed
//! images) and for scripts (`--json`: the API's own JSON). Same API and authentication
//! as every client: a bearer token from `--token-file`, the server's CA from `--ca-file`.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

pub use crate::server::ClientArgs;

/// The commands that talk to a running ShipperD through its API.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Upload a bundle in parts (a broken connection costs one part), with progress, and
    /// follow it to its end: exits non-zero when it fails, with the reason.
    Push(PushArgs),
    /// Show bundles (a table), or one bundle: phase, image counts, error, failed images.
    Status {
        #[command(flatten)]
        client: crate::server::ClientArgs,
        /// A bundle id (its first characters are not enough: the full id).
        id: Option<String>,
    },
    /// The bundles' status (or one bundle's), from the gRPC Watch API; with `--follow`
    /// every change as it happens.
    Events(crate::watch::EventsArgs),
    /// Publish again what failed in a Failed bundle.
    Retry {
        #[command(flatten)]
        client: crate::server::ClientArgs,
        id: String,
    },
    /// Check that what a Published bundle put in its registry is still there: each tag at
    /// the digest the bundle published, each manifest in its repository. Exits non-zero
    /// when something drifted, naming the first images.
    Check {
        #[command(flatten)]
        client: crate::server::ClientArgs,
        id: String,
    },
    /// Save what ShipperD published to a target (its repositories, tags, manifests and
    /// blobs), for `shipperd create --have` on the connected side.
    Inventory {
        #[command(flatten)]
        client: crate::server::ClientArgs,
        /// The target (default: the default target).
        #[arg(long)]
        target: Option<String>,
        /// Where to write it.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Check every manifest and blob against the registry (else a sample, and all
        /// when the sample finds one missing).
        #[arg(long)]
        check_all: bool,
    },
    /// Delete a bundle's stored files and state (not the images in the registry).
    Delete {
        #[command(flatten)]
        client: crate::server::ClientArgs,
        id: String,
        /// Also a bundle still being unpacked or published (it stops).
        #[arg(long)]
        force: bool,
    },
}

impl ClientCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            ClientCommand::Push(args) => push(&args).await,
            ClientCommand::Status { client, id } => status(&client, id.as_deref()).await,
            ClientCommand::Events(args) => crate::watch::events(&args).await,
            ClientCommand::Retry { client, id } => retry(&client, &id).await,
            ClientCommand::Check { client, id } => check(&client, &id).await,
            ClientCommand::Delete { client, id, force } => delete(&client, &id, force).await,
            ClientCommand::Inventory {
                client,
                target,
                output,
                check_all,
            } => inventory(&client, target.as_deref(), &output, check_all).await,
        }
    }
}

/// A client of one ingest API.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    pub json: bool,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        if let Some(ca) = &args.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem)?);
        }
        let token = match &args.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Client {
            http: b.build()?,
            base: args.server.trim_end_matches('/').to_string(),
            token,
            json: args.json,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let why = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| status.to_string());
        match status.as_u16() {
            401 => bail!("{why} (the server wants a token: --token-file)"),
            403 => bail!("{why} (the token's user may not do this)"),
            _ => bail!("{why}"),
        }
    }

    /// `GET /v1/bundles/{id}`.
    pub async fn bundle(&self, id: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, &format!("/v1/bundles/{id}"))
            .await
    }

    /// `GET /v1/bundles/{id}/images?phase=Failed`: the first `limit` failed images.
    pub async fn failed_images(&self, id: &str, limit: u32) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/bundles/{id}/images?phase=Failed&limit={limit}"),
        )
        .await
    }
}

/// `s` as one URL path segment or query value (a bundle name with a space, `#` or
/// `&` stays what it is).
fn enc(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// One line for a bundle: id, name, phase, images done of total, bytes.
pub fn line(b: &Value) -> String {
    let c = &b["counts"];
    format!(
        "{:<12}  {:<32}  {:<10}  {:>6}/{:<6} {:>5}  {}",
        short(b["id"].as_str().unwrap_or_default()),
        b["name"].as_str().unwrap_or_default(),
        b["phase"].as_str().unwrap_or_default(),
        c["published"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0),
        c["total"].as_u64().unwrap_or(0),
        percent(b),
        b["error"].as_str().unwrap_or_default(),
    )
}

fn percent(b: &Value) -> String {
    let done = b["bytes_done"].as_u64().unwrap_or(0);
    match b["bytes_total"].as_u64().unwrap_or(0) {
        0 => "-".into(),
        total => format!("{}%", done * 100 / total),
    }
}

/// `shipperd status [ID]`.
pub async fn status(args: &ClientArgs, id: Option<&str>) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let mut out = std::io::stdout().lock();
    match id {
        None => {
            let v = c.call(reqwest::Method::GET, "/v1/bundles").await?;
            if c.json {
                writeln!(out, "{v}")?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<12}  {:<32}  {:<10}  {:>13} {:>5}  ERROR",
                "ID", "NAME", "PHASE", "IMAGES", "BYTES"
            )?;
            for b in v["bundles"].as_array().into_iter().flatten() {
                writeln!(out, "{}", line(b))?;
            }
        }
        Some(id) => {
            let b = c.bundle(id).await?;
            if c.json {
                writeln!(out, "{b}")?;
                return Ok(());
            }
            let cnt = &b["counts"];
            writeln!(out, "bundle   {}", b["id"].as_str().unwrap_or_default())?;
            writeln!(out, "name     {}", b["name"].as_str().unwrap_or_default())?;
            writeln!(out, "phase    {}", b["phase"].as_str().unwrap_or_default())?;
            writeln!(
                out,
                "images   {} total, {} published ({} already there), {} failed, {} pending",
                cnt["total"], cnt["published"], cnt["skipped"], cnt["failed"], cnt["pending"]
            )?;
            writeln!(out, "bytes    {}", percent(&b))?;
            if let Some(t) = b["target"].as_str() {
                writeln!(out, "target   {t}")?;
            }
            if let Some(v) = b["verification"].as_object() {
                let keys: Vec<&str> = v["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .collect();
                writeln!(
                    out,
                    "signed   {} images accepted by a signature, {} without one{}",
                    v["signed"],
                    v["unsigned"],
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" (keys {})", keys.join(", "))
                    }
                )?;
            }
            if let Some(e) = b["error"].as_str() {
                writeln!(out, "error    {e}")?;
            }
            if cnt["failed"].as_u64().unwrap_or(0) > 0 {
                let f = c.failed_images(id, 20).await?;
                writeln!(
                    out,
                    "failed images (first {}):",
                    f["images"].as_array().map_or(0, Vec::len)
                )?;
                for img in f["images"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "  {}  {}",
                        img["source"].as_str().unwrap_or_default(),
                        img["error"].as_str().unwrap_or_default()
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// `shipperd retry ID`.
pub async fn retry(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let v = c
        .call(reqwest::Method::POST, &format!("/v1/bundles/{id}/retry"))
        .await?;
    if c.json {
        println!("{v}");
    } else {
        println!(
            "{}: {} again (generation {}, {} images to publish)",
            short(v["id"].as_str().unwrap_or(id)),
            v["status"].as_str().unwrap_or_default(),
            v["generation"],
            v["images"]
        );
    }
    Ok(())
}

/// `shipperd check ID`: `POST /v1/bundles/{id}/check`; an error when it drifted.
pub async fn check(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let v = c
        .call(reqwest::Method::POST, &format!("/v1/bundles/{id}/check"))
        .await?;
    let in_sync = v["in_sync"].as_bool().unwrap_or(false);
    if c.json {
        println!("{v}");
    } else {
        println!(
            "{}: {} images checked: {} tags moved, {} tags missing, {} manifests missing",
            short(v["id"].as_str().unwrap_or(id)),
            v["checked"],
            v["moved_tags"],
            v["missing_tags"],
            v["missing_manifests"]
        );
        for d in v["first"].as_array().into_iter().flatten() {
            println!(
                "  #{} {} ({}): {}",
                d["index"],
                d["target"].as_str().unwrap_or_default(),
                d["digest"].as_str().unwrap_or_default(),
                d["found"].as_str().unwrap_or_default()
            );
        }
    }
    if !in_sync {
        bail!("bundle {id} drifted from what it published");
    }
    Ok(())
}

/// `shipperd inventory -o FILE`: `GET /v1/inventory`, checked and written whole.
pub async fn inventory(
    args: &ClientArgs,
    target: Option<&str>,
    output: &std::path::Path,
    check_all: bool,
) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let mut q: Vec<String> = target
        .map(|t| format!("target={}", enc(t)))
        .into_iter()
        .collect();
    if check_all {
        q.push("check=all".into());
    }
    let q = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    let v = c
        .call(reqwest::Method::GET, &format!("/v1/inventory{q}"))
        .await?;
    let bytes = serde_json::to_vec(&v)?;
    let inv = shipperd_model::Inventory::from_json(&bytes)
        .map_err(|e| anyhow::anyhow!("the server's answer: {e}"))?;
    let tmp = output.with_extension("partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    let tags: usize = inv.repositories.values().map(|r| r.tags.len()).sum();
    if c.json {
        println!(
            "{}",
            serde_json::json!({"output": output, "registry": inv.registry,
            "repositories": inv.repositories.len(), "tags": tags, "blobs": inv.blobs.len(),
            "checked": inv.checked})
        );
    } else {
        println!(
            "{}: {} at {}: {} repositories, {tags} tags, {} blobs; {}",
            output.display(),
            inv.target.as_deref().unwrap_or("the default target"),
            if inv.registry.is_empty() {
                "(nothing published yet)"
            } else {
                &inv.registry
            },
            inv.repositories.len(),
            inv.blobs.len(),
            match &inv.checked {
                None => "not checked against the registry".to_string(),
                Some(c) => format!(
                    "checked {} manifests and {} blobs ({}), {} missing (left out)",
                    c.manifests,
                    c.blobs,
                    if c.all { "all" } else { "a sample" },
                    c.missing
                ),
            }
        );
    }
    Ok(())
}

/// `shipperd delete ID`.
pub async fn delete(args: &ClientArgs, id: &str, force: bool) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let q = if force { "?force=true" } else { "" };
    let v = c
        .call(reqwest::Method::DELETE, &format!("/v1/bundles/{id}{q}"))
        .await?;
    if c.json {
        println!("{v}");
    } else {
        println!("{}: deleted", short(v["id"].as_str().unwrap_or(id)));
    }
    Ok(())
}

/// `shipperd push` settings.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The bundle: one file, or several read as one in the order given (oc-mirror's
    /// `mirror_000001.tar mirror_000002.tar ...`, or `split` pieces).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The bundle's name (default: the first file's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Registry target (`<name>` of the cluster, or `<namespace>/<name>`).
    #[arg(long)]
    pub target: Option<String>,
    /// Bytes per part: a broken connection costs at most one part, sent again.
    #[arg(long, default_value_t = 64 << 20)]
    pub part_size: u64,
    /// Tries of one part before giving up.
    #[arg(long, default_value_t = 8)]
    pub part_attempts: u32,
    /// Return once uploaded, without following the bundle to its end.
    #[arg(long)]
    pub no_follow: bool,
    /// Longest time to follow the bundle.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub follow_timeout: Duration,
}

/// The files as one byte stream: (path, length) in order.
struct Concat {
    files: Vec<(PathBuf, u64)>,
    len: u64,
}

impl Concat {
    fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        let mut len = 0;
        for p in paths {
            let m = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
            if !m.is_file() {
                bail!("{} is not a file", p.display());
            }
            files.push((p.clone(), m.len()));
            len += m.len();
        }
        Ok(Concat { files, len })
    }

    /// Bytes `[start, start + n)` of the whole.
    fn read(&self, start: u64, n: u64) -> anyhow::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::with_capacity(n as usize);
        let mut offset = 0;
        for (path, len) in &self.files {
            let (lo, hi) = (offset, offset + len);
            offset = hi;
            let from = start.max(lo);
            let to = (start + n).min(hi);
            if from >= to {
                continue;
            }
            let f = std::fs::File::open(path)?;
            let mut buf = vec![0u8; (to - from) as usize];
            f.read_exact_at(&mut buf, from - lo)
                .with_context(|| format!("reading {}", path.display()))?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }
}

/// Progress as a bar on a terminal, plain lines otherwise.
struct Progress {
    tty: bool,
    started: std::time::Instant,
    total: u64,
}

impl Progress {
    fn show(&self, done: u64, what: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done) as f64 / rate) as u64
        } else {
            0
        };
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        let mib = |b: f64| b / (1 << 20) as f64;
        if self.tty {
            let width = 30;
            let fill = (pct as usize * width / 100).min(width);
            eprint!(
                "\r[{}{}] {pct:>3}% {:.1}/{:.1} MiB {:.1} MiB/s ETA {eta}s {what:<20}",
                "#".repeat(fill),
                " ".repeat(width - fill),
                mib(done as f64),
                mib(self.total as f64),
                mib(rate)
            );
        } else {
            eprintln!(
                "{what}: {done} of {} bytes ({pct}%), {:.1} MiB/s, ETA {eta}s",
                self.total,
                mib(rate)
            );
        }
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Client {
    /// `PUT /v1/uploads/{name}/parts/{n}`, tried again after a failure that may pass (a
    /// broken connection, 5xx, 429); the upload id after the first part.
    async fn put_part(
        &self,
        name: &str,
        n: u32,
        upload_id: Option<&str>,
        body: Vec<u8>,
        attempts: u32,
    ) -> anyhow::Result<String> {
        use sha2::Digest as _;
        let sha = hex::encode(sha2::Sha256::digest(&body));
        let body = bytes::Bytes::from(body);
        let mut url = format!(
            "{}/v1/uploads/{}/parts/{n}?sha256={sha}",
            self.base,
            enc(name)
        );
        if let Some(id) = upload_id {
            url.push_str(&format!("&upload_id={}", enc(id)));
        }
        let v = send_with_retries(&format!("part {n}"), attempts, || {
            let mut req = self.http.put(&url).body(body.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let sent = req.send();
            async move { Ok(sent.await) }
        })
        .await?;
        Ok(v["upload_id"].as_str().unwrap_or_default().to_string())
    }
}

/// The waits between attempts of an upload: 1 s doubling to 16 s, jittered.
const UPLOAD_RETRY: shipperd_model::Backoff =
    shipperd_model::Backoff::new(Duration::from_secs(1), Duration::from_secs(16));

/// Sends `what` (a part, the bundle) with `send` until it is taken: a failure that may
/// pass (a broken connection, 5xx, 429) is sent again after [`UPLOAD_RETRY`], up to
/// `attempts` in all; the answer's JSON.
async fn send_with_retries<F, Fut>(what: &str, attempts: u32, mut send: F) -> anyhow::Result<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<reqwest::Result<reqwest::Response>>>,
{
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        match send().await? {
            Ok(resp) if resp.status().is_success() => return Ok(resp.json().await?),
            Ok(resp) => {
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                last = format!("{status}: {}", v["error"].as_str().unwrap_or_default());
                if !(status.is_server_error() || status.as_u16() == 429) {
                    bail!("{what} refused: {last}");
                }
            }
            Err(e) => last = format!("{}", e.without_url()),
        }
        if attempt < attempts {
            let retry = UPLOAD_RETRY.retry(attempt);
            eprintln!(
                "{what}: {last}; sending it again (attempt {}) in {:.1} s",
                attempt + 1,
                retry.delay().as_secs_f64()
            );
            retry.wait().await;
        }
    }
    bail!("{what} failed after {attempts} attempts: {last}")
}

/// A squashfs image (it cannot be stored in parts: it is read by offsets from its end).
fn is_squashfs(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"hsqs"
}

impl Client {
    /// One `PUT /v1/bundles/{name}?sha256=` streamed from `path`, sent again whole after
    /// a failure that may pass.
    async fn put_whole(
        &self,
        name: &str,
        path: &std::path::Path,
        progress: &Progress,
        attempts: u32,
        target: Option<&str>,
    ) -> anyhow::Result<Value> {
        use futures::StreamExt as _;
        use sha2::Digest as _;
        let sha = {
            let mut h = sha2::Sha256::new();
            let mut f = std::fs::File::open(path)?;
            std::io::copy(&mut f, &mut h)?;
            hex::encode(h.finalize())
        };
        let mut url = format!("{}/v1/bundles/{}?sha256={sha}", self.base, enc(name));
        if let Some(t) = target {
            url.push_str(&format!("&target={}", enc(t)));
        }
        // A bar every second on a terminal; a line every 5 s otherwise.
        let every = Duration::from_secs(if progress.tty { 1 } else { 5 });
        let v = send_with_retries("upload", attempts, || async {
            let file = tokio::fs::File::open(path).await?;
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counter = sent.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect(move |chunk| {
                    if let Ok(b) = chunk {
                        counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            let mut req = self
                .http
                .put(&url)
                .timeout(Duration::from_secs(24 * 3600))
                .header("content-length", progress.total)
                .body(reqwest::Body::wrap_stream(stream));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let ticker = async {
                loop {
                    shipperd_model::pause(every).await;
                    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
                    progress.show(n, "uploading");
                }
            };
            anyhow::Ok(tokio::select! {
                r = req.send() => r,
                never = ticker => never,
            })
        })
        .await?;
        progress.show(progress.total, "uploaded");
        Ok(v)
    }
}

/// `shipperd push FILE...`: uploads in parts (each sent again on a broken connection;
/// a squashfs image, which cannot be split, in one request sent again whole), then
/// follows the bundle to its end; an error when it ends `Failed`.
pub async fn push(args: &PushArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.client)?;
    let all = Concat::open(&args.files)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args.files[0]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the file has no name: give --name")?,
    };
    if args.files.iter().any(|f| is_squashfs(f)) {
        if args.files.len() > 1 {
            bail!("a squashfs image is one file: push it alone");
        }
        let progress = Progress {
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            started: std::time::Instant::now(),
            total: all.len,
        };
        let done = c
            .put_whole(
                &name,
                &args.files[0],
                &progress,
                args.part_attempts,
                args.target.as_deref(),
            )
            .await?;
        progress.end();
        return received(&c, &name, done, args).await;
    }
    let size = args.part_size.max(1 << 20);
    let parts = all.len.div_ceil(size).max(1);
    if parts > 100_000 {
        bail!("{parts} parts: give a larger --part-size");
    }
    let progress = Progress {
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        started: std::time::Instant::now(),
        total: all.len,
    };
    let mut upload_id: Option<String> = None;
    for i in 0..parts {
        let start = i * size;
        let body = all.read(start, size.min(all.len - start))?;
        let n = (i + 1) as u32;
        let id = c
            .put_part(&name, n, upload_id.as_deref(), body, args.part_attempts)
            .await?;
        upload_id.get_or_insert(id);
        progress.show((start + size).min(all.len), &format!("part {n}/{parts}"));
    }
    progress.end();
    let mut q = format!(
        "parts={parts}&upload_id={}",
        enc(&upload_id.unwrap_or_default())
    );
    if let Some(t) = &args.target {
        q.push_str(&format!("&target={}", enc(t)));
    }
    let done = c
        .call(
            reqwest::Method::POST,
            &format!("/v1/uploads/{}/complete?{q}", enc(&name)),
        )
        .await?;
    received(&c, &name, done, args).await
}

async fn received(c: &Client, name: &str, done: Value, args: &PushArgs) -> anyhow::Result<()> {
    let id = done["id"].as_str().unwrap_or_default().to_string();
    if c.json {
        println!("{done}");
    } else {
        println!("{name}: received as {id}");
    }
    if args.no_follow {
        return Ok(());
    }
    match crate::watch::follow(&args.client, &id, args.follow_timeout).await {
        Err(crate::watch::Follow::Unreachable(why)) => {
            eprintln!("following {id} by polling: the watch API cannot be reached ({why})");
            poll_follow(c, &id, args.follow_timeout).await
        }
        Err(crate::watch::Follow::Ended(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}

/// Prints the bundle's progress until it is `Published` (Ok) or `Failed` (an error),
/// asking the JSON API every second: for a server whose gRPC API cannot be reached (a
/// proxy or route that does not carry HTTP/2).
pub(crate) async fn poll_follow(c: &Client, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let b = c.bundle(&format!("{id}?limit=0")).await?;
        let now = line(&b);
        if now != last {
            if c.json {
                println!("{b}");
            } else {
                println!("{now}");
            }
            last = now;
        }
        match b["phase"].as_str() {
            Some("Published") => return Ok(()),
            Some("Failed") => bail!(
                "bundle {id} failed: {}",
                b["error"].as_str().unwrap_or("no reason given")
            ),
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            bail!("bundle {id} did not end within {timeout:?}; `shipperd status {id}` follows it");
        }
        shipperd_model::pause(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_and_targets_stay_one_segment_or_value() {
        assert_eq!(super::enc("mirror_000001.tar"), "mirror_000001.tar");
        assert_eq!(super::enc("my bundle#1.tar"), "my%20bundle%231.tar");
        assert_eq!(super::enc("team-a/harbor&x=1"), "team-a%2Fharbor%26x%3D1");
    }
}
