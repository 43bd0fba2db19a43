//! Blobs: skip what the repository has, mount what another repository of the registry
//! has, else upload from the bundle.
//!
//! Blobs up to the chunk threshold go up in one `PUT`. Larger ones go up in chunks
//! (`POST`, `PATCH`..., `PUT ?digest=`); the session's location is kept in the KV
//! bucket after every chunk, so after a broken connection, a registry restart or a
//! crash of this service the upload asks the registry where it got to (`GET` on the
//! location) and goes on from there. The registry checks every blob's digest as it
//! commits the upload (the `?digest=` of the last request), so a blob whose bytes do not
//! match is never committed: `DIGEST_INVALID` is a corrupt bundle. (Blobs up to 256 KiB
//! are read whole and checked here first; reading a blob that ends early fails it here.)
//! So publishing hashes nothing that the registry does not hash anyway.

use std::{io::Read, sync::Arc};

use bytes::Bytes;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{BlobSource, Descriptor, Digest};

use super::{Call, Moved, Registry, RegistryError, error::BodyError, lease::Lease, no_body};
use crate::progress::Progress;

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The repository had it already.
    Skipped,
    /// Mounted from another repository of the same registry (no bytes sent).
    Mounted,
    /// Uploaded from the bundle; the bytes sent (more than its size when a transfer
    /// had to start again).
    Pushed(u64),
}

/// Bytes per read from the bundle, and per item of a request body.
const READ_CHUNK: usize = 1 << 20;
/// Blobs up to this size (configs, small layers: most blobs of an operator catalog) are
/// read whole, checked, and sent from memory: no reader thread, no upload permit (they
/// move few bytes; the permits bound bytes in flight), no upload lease (sending one
/// twice costs less than the lease's round trips).
const SMALL_BLOB: u64 = 256 << 10;
/// Sessions started again from zero (the registry lost one) before giving up.
const MAX_RESTARTS: u32 = 3;
/// Times a blob waits for another replica's upload lease before uploading regardless.
const LEASE_ROUNDS: u32 = 3;

#[derive(Serialize, Deserialize)]
struct Session {
    repo: String,
    location: String,
}

impl Registry {
    /// Makes sure `repo` has blob `desc`, moving as few bytes as possible.
    pub async fn push_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
        absent: bool,
        bundle: Arc<dyn BlobSource>,
        progress: &Progress,
    ) -> Result<BlobOutcome, RegistryError> {
        let lock = self
            .inflight
            .lock()
            .expect("inflight map is never poisoned")
            .entry(desc.digest.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let out = if self.is_linked(repo, &desc.digest) {
            progress.add(desc.size);
            Ok(BlobOutcome::Skipped)
        } else {
            let out = self
                .push_blob_locked(repo, desc, absent, bundle, progress)
                .await;
            if out.is_ok() {
                self.mark_linked(repo, &desc.digest);
            }
            out
        };
        drop(guard);
        let mut map = self
            .inflight
            .lock()
            .expect("inflight map is never poisoned");
        // The map and `lock` hold the only references: nobody else waits on it.
        if Arc::strong_count(&lock) == 2 {
            map.remove(&desc.digest);
        }
        out
    }

    async fn push_blob_locked(
        &self,
        repo: &str,
        desc: &Descriptor,
        absent: bool,
        bundle: Arc<dyn BlobSource>,
        progress: &Progress,
    ) -> Result<BlobOutcome, RegistryError> {
        let key = self.blob_key(&desc.digest);
        // Another replica's upload may end (or fail) while we wait for its lease: then
        // look again. The last round uploads without a lease.
        for round in 0..=LEASE_ROUNDS {
            // Known in another repository: one request, the mount (which also succeeds
            // when this repository has the blob already). Else: does it have it?
            let mut location = None;
            let from = match &self.blobs {
                Some(kv) => match kv.get(&key).await {
                    Ok(Some(from)) => Some(String::from_utf8_lossy(&from).to_string()),
                    _ => None,
                },
                None => None,
            };
            if let Some(from) = from.filter(|f| f != repo) {
                match self.mount(repo, &from, &desc.digest).await? {
                    Mount::Mounted => {
                        progress.add(desc.size);
                        return Ok(BlobOutcome::Mounted);
                    }
                    // The source lost it: upload into the session the registry opened.
                    Mount::Session(loc) => location = Some(loc),
                    Mount::Denied => {}
                }
            }
            if (location.is_none() || absent) && self.blob_exists(repo, &desc.digest).await? {
                progress.add(desc.size);
                return Ok(BlobOutcome::Skipped);
            }
            if absent {
                return Err(RegistryError::Missing(format!(
                    "blob {} is not in the bundle, and {}/{repo} does not have it (nor does \
                     any repository ShipperD pushed it to)",
                    desc.digest,
                    self.host()
                )));
            }
            let lease = match round {
                _ if desc.size <= SMALL_BLOB => Lease::Unavailable,
                LEASE_ROUNDS => Lease::Unavailable,
                _ => self.lease(&desc.digest).await,
            };
            let held = match lease {
                Lease::Released => continue,
                Lease::Held(h) => Some(h),
                Lease::Unavailable => None,
            };
            let sent = self
                .upload(repo, desc, bundle.clone(), progress, location)
                .await
                .map_err(|e| e.for_blob(&desc.digest));
            if sent.is_ok() {
                self.remember(&key, repo).await;
            }
            if let Some(h) = held {
                h.release().await;
            }
            return sent.map(BlobOutcome::Pushed);
        }
        unreachable!("the last round always returns")
    }

    /// Uploads the blob (into the mount's session when it gave one); the bytes sent.
    async fn upload(
        &self,
        repo: &str,
        desc: &Descriptor,
        bundle: Arc<dyn BlobSource>,
        progress: &Progress,
        location: Option<String>,
    ) -> Result<u64, RegistryError> {
        if desc.size <= SMALL_BLOB {
            let upload = Upload {
                reg: self,
                repo,
                desc,
                progress,
                source: Source::memory(bundle, desc.clone()).await?,
            };
            return upload.monolithic(location).await;
        }
        let _permit = self
            .uploads
            .clone()
            .acquire_owned()
            .await
            .expect("the upload semaphore is never closed");
        // The reader (a blocking thread) starts only once the upload may move bytes.
        let upload = Upload {
            reg: self,
            repo,
            desc,
            progress,
            source: Source::new(bundle, desc.clone()),
        };
        if desc.size > self.transfer().chunk_threshold {
            upload.chunked(location).await
        } else {
            upload.monolithic(location).await
        }
    }

    pub async fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool, RegistryError> {
        let call = Call {
            method: Method::HEAD,
            url: format!("/v2/{repo}/blobs/{digest}"),
            repo,
            from: None,
            build: &no_body,
            ok: &[200, 404],
            once: false,
        };
        Ok(self.send(&call).await?.status() == 200)
    }

    async fn mount(&self, repo: &str, from: &str, digest: &Digest) -> Result<Mount, RegistryError> {
        let call = Call {
            method: Method::POST,
            url: format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            repo,
            from: Some(from),
            build: &|b| b.header(reqwest::header::CONTENT_LENGTH, "0"),
            ok: &[201, 202],
            once: false,
        };
        let resp = match self.send(&call).await {
            Ok(r) => r,
            // We may not read `from` (or the token service will not say so): upload.
            Err(
                e @ (RegistryError::Status {
                    status: 401 | 403, ..
                }
                | RegistryError::AuthDenied { .. }
                | RegistryError::AuthUnavailable { .. }),
            ) => {
                tracing::debug!(repo, from, error = %e, "mount not allowed; uploading");
                return Ok(Mount::Denied);
            }
            Err(e) => return Err(e),
        };
        if resp.status() == 201 {
            return Ok(Mount::Mounted);
        }
        Ok(Mount::Session(location(&resp)?))
    }

    async fn remember(&self, key: &str, repo: &str) {
        let Some(kv) = &self.blobs else { return };
        if let Err(error) = kv.put(key, Bytes::from(repo.to_string())).await {
            tracing::debug!(%error, "cannot record blob location; later pushes will upload it");
        }
    }

    async fn start_upload(&self, repo: &str) -> Result<String, RegistryError> {
        let call = Call {
            method: Method::POST,
            url: format!("/v2/{repo}/blobs/uploads/"),
            repo,
            from: None,
            build: &|b| b.header(reqwest::header::CONTENT_LENGTH, "0"),
            ok: &[202],
            once: false,
        };
        location(&self.send(&call).await?)
    }

    /// Where the registry got to in an upload session: `(next offset, newest location)`,
    /// or `None` when it no longer knows the session.
    async fn upload_status(
        &self,
        repo: &str,
        loc: &str,
    ) -> Result<Option<(u64, String)>, RegistryError> {
        let call = Call {
            method: Method::GET,
            url: loc.to_string(),
            repo,
            from: None,
            build: &no_body,
            ok: &[204, 404, 400],
            once: false,
        };
        let resp = self.send(&call).await?;
        if resp.status() != 204 {
            return Ok(None);
        }
        let next = match resp
            .headers()
            .get(reqwest::header::RANGE)
            .and_then(|v| v.to_str().ok())
        {
            // "0-0" is what distribution says for an empty session.
            Some(r) => match r.trim_start_matches("bytes=").split_once('-') {
                Some((_, end)) => end
                    .parse::<u64>()
                    .map(|e| e + 1)
                    .map_err(|_| RegistryError::Protocol(format!("Range {r:?}")))?,
                None => return Err(RegistryError::Protocol(format!("Range {r:?}"))),
            },
            None => 0,
        };
        let newest = location(&resp).unwrap_or_else(|_| loc.to_string());
        Ok(Some((next, newest)))
    }

    fn session_key(&self, repo: &str, digest: &Digest) -> String {
        let r = hex::encode(&Sha256::digest(repo.as_bytes())[..6]);
        format!("up.{}.{r}", self.blob_key(digest))
    }

    async fn save_session(&self, repo: &str, digest: &Digest, loc: &str) {
        let s = Session {
            repo: repo.to_string(),
            location: loc.to_string(),
        };
        let v = serde_json::to_vec(&s).expect("a session serialises");
        let Some(kv) = &self.blobs else { return };
        if let Err(error) = kv.put(self.session_key(repo, digest), v.into()).await {
            tracing::debug!(%error, "cannot record the upload session; a crash would restart it");
        }
    }

    async fn saved_session(&self, repo: &str, digest: &Digest) -> Option<String> {
        let v = self
            .blobs
            .as_ref()?
            .get(self.session_key(repo, digest))
            .await
            .ok()??;
        let s: Session = serde_json::from_slice(&v).ok()?;
        (s.repo == repo).then_some(s.location)
    }

    async fn forget_session(&self, repo: &str, digest: &Digest) {
        if let Some(kv) = &self.blobs {
            let _ = kv.purge(self.session_key(repo, digest)).await;
        }
    }
}

enum Mount {
    Mounted,
    /// The registry opened an upload session instead (the source lost the blob).
    Session(String),
    Denied,
}

fn location(resp: &reqwest::Response) -> Result<String, RegistryError> {
    resp.headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| RegistryError::Protocol(format!("{} without a Location", resp.status())))
}

fn with_query(loc: &str, q: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{q}")
}

/// One blob going up.
struct Upload<'a> {
    reg: &'a Registry,
    repo: &'a str,
    desc: &'a Descriptor,
    progress: &'a Progress,
    source: Source,
}

impl Upload<'_> {
    fn what(&self) -> String {
        format!("blob {} to {}", self.desc.digest, self.repo)
    }

    /// One `PUT ?digest=` with the whole blob; on a retryable failure, again from a new
    /// session. Returns the bytes sent.
    async fn monolithic(&self, mut location: Option<String>) -> Result<u64, RegistryError> {
        let t = self.reg.transfer();
        let size = self.desc.size;
        let mut sent = 0;
        let mut attempt = 0;
        loop {
            let loc = match location.take() {
                Some(l) => l,
                None => self.reg.start_upload(self.repo).await?,
            };
            let result = self
                .send_range(
                    Method::PUT,
                    &with_query(&loc, &format!("digest={}", self.desc.digest)),
                    0,
                    size,
                    false,
                    &[201],
                )
                .await;
            match result {
                Ok((_, n)) => return Ok(sent + n),
                Err((e, n)) => {
                    sent += n;
                    self.progress.sub(n);
                    if !e.is_retryable() || attempt + 1 >= t.retries {
                        return Err(e);
                    }
                    let retry = self.reg.backoff(attempt, e.retry_after());
                    tracing::warn!(error = %e, delay = ?retry.delay(), what = %self.what(), "upload failed; trying again");
                    retry.wait().await;
                    attempt += 1;
                }
            }
        }
    }

    /// Chunks of `chunk_size`, each `PATCH`ed; after a failure the registry is asked
    /// where it got to and the upload goes on from there. Returns the bytes sent.
    async fn chunked(&self, mounted_session: Option<String>) -> Result<u64, RegistryError> {
        let t = self.reg.transfer();
        let size = self.desc.size;
        let digest = &self.desc.digest;
        let mut loc = None;
        let mut offset = 0;
        if let Some(saved) = self.reg.saved_session(self.repo, digest).await
            && let Some((next, newest)) = self.reg.upload_status(self.repo, &saved).await?
            && next <= size
        {
            tracing::info!(offset = next, what = %self.what(), "resuming an upload a previous attempt began");
            offset = next;
            loc = Some(newest);
        }
        let mut loc = match (loc, mounted_session) {
            (Some(l), _) | (None, Some(l)) => l,
            (None, None) => self.reg.start_upload(self.repo).await?,
        };
        self.reg.save_session(self.repo, digest, &loc).await;
        self.progress.add(offset);
        let mut sent = 0;
        let mut failures = 0;
        let mut restarts = 0;
        while offset < size {
            let n = t.chunk_size.min(size - offset);
            match self
                .send_range(Method::PATCH, &loc, offset, n, true, &[202])
                .await
            {
                Ok((resp, k)) => {
                    sent += k;
                    failures = 0;
                    loc = location(&resp)?;
                    offset += n;
                    self.reg.save_session(self.repo, digest, &loc).await;
                }
                Err((e, k)) => {
                    sent += k;
                    self.progress.sub(k);
                    failures += 1;
                    if !e.is_retryable() || failures >= t.retries {
                        return Err(e);
                    }
                    let retry = self.reg.backoff(failures - 1, e.retry_after());
                    tracing::warn!(error = %e, offset, delay = ?retry.delay(), what = %self.what(), "chunk failed; asking the registry where it got to");
                    retry.wait().await;
                    match self.reg.upload_status(self.repo, &loc).await? {
                        Some((next, newest)) if next <= size => {
                            tracing::info!(from = next, what = %self.what(), "resuming at the registry's offset");
                            if next >= offset {
                                self.progress.add(next - offset);
                            } else {
                                self.progress.sub(offset - next);
                            }
                            offset = next;
                            loc = newest;
                        }
                        _ => {
                            restarts += 1;
                            if restarts > MAX_RESTARTS {
                                return Err(e);
                            }
                            tracing::warn!(what = %self.what(), "the registry lost the upload session; starting again from zero");
                            self.progress.sub(offset);
                            offset = 0;
                            loc = self.reg.start_upload(self.repo).await?;
                        }
                    }
                    self.reg.save_session(self.repo, digest, &loc).await;
                }
            }
        }
        // Every byte is up; the registry checks the digest as it commits.
        let call = Call {
            method: Method::PUT,
            url: with_query(&loc, &format!("digest={digest}")),
            repo: self.repo,
            from: None,
            build: &|b| b.header(reqwest::header::CONTENT_LENGTH, "0"),
            ok: &[201],
            once: false,
        };
        match self.reg.send(&call).await {
            Ok(_) => {}
            // A PUT whose answer was lost may have committed the blob.
            Err(e)
                if self
                    .reg
                    .blob_exists(self.repo, digest)
                    .await
                    .unwrap_or(false) =>
            {
                tracing::debug!(error = %e, "the commit's answer was lost, but the blob is there");
            }
            Err(e) => return Err(e),
        }
        self.reg.forget_session(self.repo, digest).await;
        Ok(sent)
    }

    /// Sends bytes `[offset, offset + len)` of the blob as one request body. On failure,
    /// also says how many bytes went out.
    async fn send_range(
        &self,
        method: Method,
        url: &str,
        offset: u64,
        len: u64,
        content_range: bool,
        ok: &[u16],
    ) -> Result<(reqwest::Response, u64), (RegistryError, u64)> {
        let moved = Moved::default();
        let body = self
            .source
            .read(offset, len, moved.clone(), self.progress.clone())
            .await
            .map_err(|e| (e, 0))?;
        let body = std::sync::Mutex::new(Some(body));
        let build = move |b: reqwest::RequestBuilder| {
            let mut b = b
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, len.to_string());
            if content_range && len > 0 {
                b = b.header(
                    reqwest::header::CONTENT_RANGE,
                    format!("{offset}-{}", offset + len - 1),
                );
            }
            match body.lock().expect("not poisoned").take() {
                Some(body) => b.body(body),
                None => b,
            }
        };
        let call = Call {
            method,
            url: url.to_string(),
            repo: self.repo,
            from: None,
            build: &build,
            ok,
            once: true,
        };
        let result = self.reg.send_once(&call, &moved).await;
        let n = moved.total();
        result.map(|r| (r, n)).map_err(|e| (e, n))
    }
}

/// Where an upload's bytes come from: a blocking thread reading the blob from the
/// bundle in order (reading from an offset skips the bytes before it), or, for a small
/// blob, its bytes read whole and checked beforehand.
enum Source {
    Stream(tokio::sync::mpsc::Sender<Cmd>),
    Memory(Bytes),
}

enum Cmd {
    Read {
        offset: u64,
        len: u64,
        out: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    },
}

impl Source {
    fn new(bundle: Arc<dyn BlobSource>, desc: Descriptor) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::task::spawn_blocking(move || reader_loop(bundle, desc, rx));
        Source::Stream(tx)
    }

    /// A small blob, read and checked now.
    async fn memory(bundle: Arc<dyn BlobSource>, desc: Descriptor) -> Result<Self, RegistryError> {
        let bytes = tokio::task::spawn_blocking(move || read_whole(bundle.as_ref(), &desc))
            .await
            .map_err(|e| RegistryError::Internal(format!("reading a blob: {e}")))??;
        Ok(Source::Memory(bytes))
    }

    /// A request body of bytes `[offset, offset + len)`.
    async fn read(
        &self,
        offset: u64,
        len: u64,
        moved: Moved,
        progress: Progress,
    ) -> Result<reqwest::Body, RegistryError> {
        use futures::StreamExt as _;
        let stream: futures::stream::BoxStream<'static, std::io::Result<Bytes>> = match self {
            Source::Memory(bytes) => {
                let part = bytes.slice(offset as usize..(offset + len) as usize);
                futures::stream::once(async move { Ok(part) }).boxed()
            }
            Source::Stream(tx) => {
                let (out, rx) = tokio::sync::mpsc::channel(4);
                tx.send(Cmd::Read { offset, len, out })
                    .await
                    .map_err(|_| RegistryError::Internal("the blob reader stopped".into()))?;
                futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                })
                .boxed()
            }
        };
        let stream = futures::StreamExt::inspect(stream, move |item| {
            if let Ok(b) = item {
                moved.add(b.len() as u64);
                progress.add(b.len() as u64);
            }
        });
        Ok(reqwest::Body::wrap_stream(stream))
    }
}

fn reader_loop(
    bundle: Arc<dyn BlobSource>,
    desc: Descriptor,
    mut rx: tokio::sync::mpsc::Receiver<Cmd>,
) {
    let digest = desc.digest.clone();
    let open = || -> Result<Box<dyn Read + '_>, BodyError> {
        match bundle.blob(&digest) {
            Ok(Some((r, _))) => Ok(r),
            Ok(None) => Err(BodyError::Unreadable(format!(
                "{digest} is not in the image's plan"
            ))),
            Err(e) => Err(BodyError::Unreadable(format!("blob {digest}: {e}"))),
        }
    };
    let mut reader: Option<Box<dyn Read + '_>> = None;
    let mut pos = 0u64;
    // Reads exactly `want` bytes (a blob that ends early is corrupt).
    let read = |reader: &mut Box<dyn Read + '_>, want: usize| -> Result<Bytes, BodyError> {
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(BodyError::Changed(format!(
                        "blob {digest} is corrupt in the bundle: it ends before its {} bytes",
                        desc.size
                    )));
                }
                Ok(n) => filled += n,
                Err(e) => {
                    return Err(BodyError::Unreadable(format!("blob {digest}: {e}")));
                }
            }
        }
        Ok(Bytes::from(buf))
    };
    while let Some(Cmd::Read { offset, len, out }) = rx.blocking_recv() {
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), BodyError> {
                if reader.is_none() || offset < pos {
                    reader = Some(open()?);
                    pos = 0;
                }
                let r = reader.as_mut().expect("opened above");
                // Resuming: skip what the registry has (readers do not seek).
                let mut skip = offset - pos;
                while skip > 0 {
                    let n = std::io::copy(&mut r.by_ref().take(skip), &mut std::io::sink())
                        .map_err(|e| BodyError::Unreadable(format!("blob {digest}: {e}")))?;
                    if n == 0 {
                        return Err(BodyError::Changed(format!(
                            "blob {digest} is corrupt in the bundle: it ends before its {} bytes",
                            desc.size
                        )));
                    }
                    skip -= n;
                }
                pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = (end - pos).min(READ_CHUNK as u64) as usize;
                    let bytes = read(r, n)?;
                    pos += n as u64;
                    if out.blocking_send(Ok(bytes)).is_err() {
                        return Ok(()); // the request was abandoned
                    }
                }
                Ok(())
            }))
            .unwrap_or_else(|p| {
                Err(BodyError::Panicked(format!(
                    "the blob reader panicked: {}",
                    shipperd_model::panic_message(&*p)
                )))
            });
        if let Err(e) = result {
            // The body ends in an error: the request is abandoned, not completed.
            reader = None;
            let _ = out.blocking_send(Err(e.into_io()));
        }
    }
}

/// A small blob's bytes, checked against its size and digest.
fn read_whole(bundle: &dyn BlobSource, desc: &Descriptor) -> Result<Bytes, RegistryError> {
    let (mut reader, len) = match bundle.blob(&desc.digest) {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(RegistryError::Read(format!(
                "{} is not in the image's plan",
                desc.digest
            )));
        }
        Err(e) => return Err(RegistryError::Read(format!("blob {}: {e}", desc.digest))),
    };
    let mut buf = Vec::with_capacity(len.min(SMALL_BLOB) as usize);
    (&mut reader)
        .take(SMALL_BLOB + 1)
        .read_to_end(&mut buf)
        .map_err(|e| RegistryError::Read(format!("blob {}: {e}", desc.digest)))?;
    let actual = Digest::of(&buf);
    if buf.len() as u64 != desc.size || actual != desc.digest {
        return Err(RegistryError::Changed(format!(
            "blob {} is corrupt in the bundle: {} bytes hashing to {actual}",
            desc.digest,
            buf.len()
        )));
    }
    Ok(Bytes::from(buf))
}
