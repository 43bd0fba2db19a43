//! Fetching a bundle from an http(s) URL into the store: what a `Bundle` resource's
//! `url` source asks for. The body goes through the same writer as an upload (hashed on
//! its own thread, flushed as it arrives); a broken or stalled connection is resumed
//! with `Range` from the bytes already written (a server that answers the range with
//! the whole file starts the fetch over); the bytes must hash to the sha256 the source
//! names before the bundle is recorded, else nothing is kept.

use std::time::Duration;

use futures::StreamExt as _;
use shipperd_model::{BundleId, TargetName, redact_url as redact};

use crate::{
    Error, Result,
    disk::DiskWriter,
    space::Claim,
    store::{Accepted, Origin, Store, TempFile, hash_id},
};

/// Waits for the exclusive lock on `path` (created if need be); held while the file
/// lives.
async fn lock_exclusive(path: &std::path::Path) -> Result<std::fs::File> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(f)
    })
    .await
    .map_err(|e| Error::io(path, std::io::Error::other(e)))?
    .map_err(|e| Error::io(path, e))
}

/// Where a bundle is fetched from.
#[derive(Debug, Clone)]
pub struct FetchSource {
    /// An http or https URL.
    pub url: String,
    /// What the bytes must hash to (the bundle's id).
    pub sha256: BundleId,
    /// PEM certificates to trust beside the system's, for https.
    pub ca_pem: Option<Vec<u8>>,
    /// The namespace of the `Bundle` fetching it (see `BundleSummary::owner`).
    pub owner: Option<String>,
}

/// How hard to try.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Requests made at most (the first and its resumptions).
    pub attempts: u32,
    /// A connection that moves no byte for this long is abandoned (and resumed).
    pub stall_timeout: Duration,
    /// Waited before the first resumption; doubles, up to 30 s.
    pub retry_base: Duration,
    /// Where a URL may lead: public addresses, and the networks the admin allows (a
    /// `Bundle`'s URL is a tenant's; see `registry_targets::egress`).
    pub egress: shipperd_registry_targets::Egress,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            attempts: 8,
            stall_timeout: Duration::from_secs(30),
            retry_base: Duration::from_millis(500),
            egress: Default::default(),
        }
    }
}

/// Why one request ended before the whole body arrived.
enum Broken {
    /// Try again from where it stopped.
    Resume(String),
    /// Trying again will not help.
    Fail(Error),
}

impl Store {
    /// Fetches `source` into the store as bundle `name` and records it (or finds it
    /// known already, by its sha256, without fetching).
    pub async fn fetch(
        &self,
        name: &str,
        source: &FetchSource,
        target: Option<&TargetName>,
        settings: &FetchSettings,
    ) -> Result<Accepted> {
        crate::store::validate_name(name)?;
        if let Some(a) = self.fetched(&source.sha256).await? {
            return Ok(a);
        }
        settings
            .egress
            .check_url(&source.url)
            .map_err(|why| Error::BadRequest(format!("{}: {why}", redact(&source.url))))?;
        let client = client(source, &settings.egress)?;
        // One replica at a time fetches a bundle: the others wait here, then find it
        // stored (or resume what was left).
        let dir = self.data().fetches();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join(format!("{}.lock", source.sha256));
        let lock = lock_exclusive(&lock_path).await?;
        if let Some(a) = self.fetched(&source.sha256).await? {
            return Ok(a);
        }
        // What an earlier fetch (of this process, or of a replica that stopped: a
        // leader change) left is kept on the shared volume and resumed from its end.
        let part = dir.join(format!("{}.part", source.sha256));
        let tmp = TempFile::kept(part.clone());
        let (out, written) = if tokio::fs::try_exists(&part).await.unwrap_or(false) {
            DiskWriter::append(&part)
                .await
                .map_err(|e| Error::io(&part, e))?
        } else {
            let out = DiskWriter::create(&part)
                .await
                .map_err(|e| Error::io(&part, e))?;
            (out, 0)
        };
        if written > 0 {
            tracing::info!(url = %redact(&source.url), written, "resuming a fetch left unfinished");
        }
        // Room on the data volume, as for an upload (the length is learnt on the way).
        let mut claim = self.space.claim(None).await?;
        claim.wrote(written)?;
        let done = self
            .fetch_into(
                name,
                source,
                target,
                settings,
                &client,
                (tmp, out, written, claim),
            )
            .await;
        if done.is_ok() {
            // Stored: nobody waits for this lock but to find the bundle known.
            let _ = tokio::fs::remove_file(&lock_path).await;
        }
        drop(lock);
        done
    }

    /// The bundle, when it is stored already (and usable).
    async fn fetched(&self, id: &BundleId) -> Result<Option<Accepted>> {
        Ok(self
            .known(id)
            .await?
            .filter(|s| s.expired_at.is_none() && !s.deleting)
            .map(|summary| Accepted {
                summary,
                created: false,
            }))
    }

    /// Removes what an unfinished fetch of `id` left (its `Bundle` was deleted), unless
    /// a fetch of it is running.
    pub async fn forget_fetch(&self, id: &BundleId) {
        let dir = self.data().fetches();
        let lock_path = dir.join(format!("{id}.lock"));
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(&lock_path) else {
            return;
        };
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
            let _ = tokio::fs::remove_file(dir.join(format!("{id}.part"))).await;
            let _ = tokio::fs::remove_file(&lock_path).await;
        }
    }

    /// The attempts of one fetch, appending to `out`.
    async fn fetch_into(
        &self,
        name: &str,
        source: &FetchSource,
        target: Option<&TargetName>,
        settings: &FetchSettings,
        client: &reqwest::Client,
        (mut tmp, mut out, mut written, mut claim): (TempFile, DiskWriter, u64, Claim),
    ) -> Result<Accepted> {
        let mut last = String::new();
        for attempt in 0..settings.attempts.max(1) {
            if attempt > 0 {
                let retry =
                    shipperd_model::Backoff::new(settings.retry_base, RETRY_MAX).retry(attempt);
                tracing::warn!(url = %redact(&source.url), written, error = %last, delay = ?retry.delay(), "fetch broken; resuming");
                retry.wait().await;
            }
            match self
                .fetch_once(client, source, settings, &mut out, &mut written, &mut claim)
                .await
            {
                Ok(()) => {
                    let hasher = out.finish().await.map_err(|e| Error::io(&tmp.path, e))?;
                    let id = hash_id(hasher);
                    if id != source.sha256 {
                        // Whole, and wrong: nothing of it is worth resuming.
                        tmp.discard();
                        return Err(Error::ChecksumMismatch {
                            expected: source.sha256.to_string(),
                            actual: id.to_string(),
                        });
                    }
                    if written == 0 {
                        return Err(Error::Empty);
                    }
                    let origin = Origin {
                        target: target.cloned(),
                        owner: source.owner.clone(),
                        uploader: None,
                    };
                    // Moved into place now (or, were the bundle stored meanwhile, gone).
                    tmp.discard();
                    return self.commit(name, tmp, id, written, &origin).await;
                }
                Err(Broken::Fail(e)) => {
                    // What arrived stays on the volume, to be resumed.
                    let _ = out.finish().await;
                    return Err(e);
                }
                Err(Broken::Resume(why)) if why == RESTART => {
                    // The server sent the whole file again: start over.
                    out = DiskWriter::create(&tmp.path)
                        .await
                        .map_err(|e| Error::io(&tmp.path, e))?;
                    written = 0;
                    claim.wrote(0)?;
                    last = "the server does not resume (no range support)".into();
                }
                Err(Broken::Resume(why)) => last = why,
            }
        }
        // What arrived stays on the volume: the next fetch of it (here, or by another
        // replica) resumes from its end.
        let _ = out.finish().await;
        Err(Error::Incomplete {
            received: written,
            reason: format!(
                "fetching {} failed {} times, the last: {last}",
                redact(&source.url),
                settings.attempts
            ),
        })
    }

    /// One request, from byte `written` on; appends what arrives.
    async fn fetch_once(
        &self,
        client: &reqwest::Client,
        source: &FetchSource,
        settings: &FetchSettings,
        out: &mut DiskWriter,
        written: &mut u64,
        claim: &mut Claim,
    ) -> Result<(), Broken> {
        let mut req = client.get(&source.url);
        if *written > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={written}-"));
        }
        let resp = match tokio::time::timeout(settings.stall_timeout, req.send()).await {
            Err(_) => return Err(Broken::Resume("no answer".into())),
            Ok(Err(e)) => return Err(Broken::Resume(error_chain(&e.without_url()))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        match status {
            200 if *written > 0 => return Err(Broken::Resume(RESTART.into())),
            200 => {}
            206 => {
                let from = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if from != Some(*written) {
                    return Err(Broken::Resume(RESTART.into()));
                }
            }
            408 | 425 | 429 | 500..=599 => {
                return Err(Broken::Resume(format!("the server answered {status}")));
            }
            _ => {
                return Err(Broken::Fail(Error::BadRequest(format!(
                    "fetching {}: the server answered {status}",
                    redact(&source.url)
                ))));
            }
        }
        let mut body = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(settings.stall_timeout, body.next()).await {
                Err(_) => return Err(Broken::Resume("the transfer stalled".into())),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(Broken::Resume(error_chain(&e.without_url()))),
                Ok(Some(Ok(c))) => c,
            };
            *written += chunk.len() as u64;
            if *written > self.max_bytes() {
                return Err(Broken::Fail(Error::TooLarge {
                    limit: self.max_bytes(),
                }));
            }
            claim.wrote(*written).map_err(Broken::Fail)?;
            out.write(chunk).await.map_err(|e| {
                Broken::Fail(Error::Incomplete {
                    received: *written,
                    reason: format!("writing it failed: {e}"),
                })
            })?;
        }
    }
}

const RESTART: &str = "restart";

/// The longest wait between two attempts of a fetch (before jitter).
const RETRY_MAX: Duration = Duration::from_secs(30);

fn client(
    source: &FetchSource,
    egress: &shipperd_registry_targets::Egress,
) -> Result<reqwest::Client> {
    // ring is our one TLS provider; a no-op when the binary installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        // Names resolve only to the addresses allowed.
        .dns_resolver(egress.resolver())
        .no_proxy()
        // A redirect to elsewhere would fetch from a place the resource does not name.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = &source.ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::BadRequest(format!("the fetch's CA bundle: {e}")))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
        .map_err(|e| Error::BadRequest(format!("cannot build an HTTP client: {e}")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
