//! `shipperd status [ID]`, `shipperd retry ID`, `shipperd delete ID`: the ingest API for
//! people (a short table, a bundle's phase, counts, error and failed images) and for
//! scripts (`--json`: the API's own JSON). Same API and authentication as every client:
//! a bearer token from `--token-file`, the server's CA from `--ca-file`.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

/// Where the API is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The ingest API.
    #[arg(long, env = "SHIPPERD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A file holding the bearer token to send (e.g. `oc whoami -t > token`).
    #[arg(long, env = "SHIPPERD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to.
    #[arg(long, env = "SHIPPERD_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long)]
    pub json: bool,
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
