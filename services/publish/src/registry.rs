//! The target registry, through oci-client: blobs (skip what the repository has, mount
//! what another repository of this registry has, else stream from the bundle) and
//! manifests (exact bytes, so digests never change).

use std::{collections::HashMap, sync::Arc};

use async_nats::jetstream::kv;
use bytes::Bytes;
use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    secrets::RegistryAuth,
};
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{BlobSource, CatalogBlobs, Descriptor, RegistryUrl};

use crate::{Error, Result};

const OCI_INDEX: &str = shipperd_bundle::layout::OCI_INDEX;

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The repository had it already.
    Skipped,
    /// Mounted from another repository of the same registry (no bytes sent).
    Mounted,
    /// Streamed from the bundle.
    Pushed,
}

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    url: RegistryUrl,
    /// digest → a repository of this registry known to hold it.
    blobs: kv::Store,
    /// Prefix of this registry's keys in `blobs` (KV keys cannot hold `:`).
    key_prefix: String,
    /// One lock per blob digest being pushed by this process: images sharing a layer
    /// wait for the first push, then mount instead of uploading it again.
    inflight: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Bytes per chunk read from the bundle and handed to the HTTP body.
const CHUNK: usize = 1 << 20;

impl Registry {
    pub fn new(
        url: RegistryUrl,
        username: Option<String>,
        password: Option<String>,
        blobs: kv::Store,
    ) -> Self {
        let client = Client::new(ClientConfig {
            protocol: if url.https {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            // One streamed PUT per blob: bounded memory, no per-chunk round trips.
            use_monolithic_push: true,
            ..Default::default()
        });
        let auth = match (username, password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u, p),
            _ => RegistryAuth::Anonymous,
        };
        let key_prefix = hex::encode(&Sha256::digest(url.host.as_bytes())[..6]);
        Registry {
            client,
            auth,
            url,
            blobs,
            key_prefix,
            inflight: Default::default(),
        }
    }

    pub fn host(&self) -> &str {
        &self.url.host
    }

    fn by_digest(&self, repo: &str, digest: &str) -> Reference {
        Reference::with_digest(self.url.host.clone(), repo.to_string(), digest.to_string())
    }

    fn blob_key(&self, digest: &str) -> String {
        format!(
            "{}.{}",
            self.key_prefix,
            digest.trim_start_matches("sha256:")
        )
    }

    /// Authenticates for pushing to `repo` (a token scoped to it, where the registry
    /// uses tokens).
    pub async fn login(&self, repo: &str) -> Result<()> {
        let r = Reference::with_tag(self.url.host.clone(), repo.to_string(), "latest".into());
        self.client
            .auth(&r, &self.auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| Error::registry(format!("authenticate for {repo}"), e))?;
        Ok(())
    }

    /// Makes sure `repo` has blob `desc`, moving as few bytes as possible.
    pub async fn push_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
        bundle: Arc<CatalogBlobs>,
    ) -> Result<BlobOutcome> {
        let lock = self
            .inflight
            .lock()
            .expect("inflight map is never poisoned")
            .entry(desc.digest.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let out = self.push_blob_locked(repo, desc, bundle).await;
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
        bundle: Arc<CatalogBlobs>,
    ) -> Result<BlobOutcome> {
        let r = self.by_digest(repo, &desc.digest);
        let what = || format!("blob {} to {repo}", desc.digest);
        if self
            .client
            .blob_exists(&r, &desc.digest)
            .await
            .map_err(|e| Error::registry(what(), e))?
        {
            return Ok(BlobOutcome::Skipped);
        }
        let key = self.blob_key(&desc.digest);
        if let Ok(Some(from)) = self.blobs.get(&key).await {
            let from = String::from_utf8_lossy(&from).to_string();
            if from != repo {
                let source = self.by_digest(&from, &desc.digest);
                // A registry that lost the blob answers 202 (an upload session), which
                // oci-client reports as an error: then upload normally.
                if self
                    .client
                    .mount_blob(&r, &source, &desc.digest)
                    .await
                    .is_ok()
                {
                    self.remember(&key, repo).await;
                    return Ok(BlobOutcome::Mounted);
                }
            }
        }
        let stream = blob_stream(bundle, desc.clone());
        self.client
            .push_blob_stream(&r, stream, &desc.digest, Some(desc.size))
            .await
            .map_err(|e| Error::registry(what(), e))?;
        self.remember(&key, repo).await;
        Ok(BlobOutcome::Pushed)
    }

    async fn remember(&self, key: &str, repo: &str) {
        if let Err(error) = self.blobs.put(key, Bytes::from(repo.to_string())).await {
            tracing::debug!(%error, "cannot record blob location; later pushes will upload it");
        }
    }

    /// Puts a manifest under `reference` (a digest or a tag), bytes unchanged.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<()> {
        let what = || format!("manifest {reference} to {repo}");
        let ct = media_type.parse().map_err(|_| {
            Error::Bundle(shipperd_bundle::Error::Layout(format!(
                "bad media type {media_type:?}"
            )))
        })?;
        self.client
            .push_manifest_raw(&reference, Bytes::copy_from_slice(bytes), ct)
            .await
            .map_err(|e| Error::registry(what(), e))?;
        Ok(())
    }

    /// Lists `referrers` of `subject` in `repo`: nothing to do where the registry's
    /// referrers API lists them already; elsewhere the fallback tag
    /// `sha256-<hex>` holds an image index of them, merged with what it held before.
    pub async fn update_referrers_tag(
        &self,
        repo: &str,
        subject: &str,
        referrers: &[Descriptor],
    ) -> Result<()> {
        // A registry with the referrers API lists them by now (it indexes `subject` as
        // manifests arrive); one without answers 404, or an empty list.
        let subject_ref = self.by_digest(repo, subject);
        if let Ok(listed) = self.client.pull_referrers(&subject_ref, None).await
            && referrers
                .iter()
                .all(|r| listed.manifests.iter().any(|m| m.digest == r.digest))
        {
            return Ok(());
        }
        let tag = subject.replace(':', "-");
        let tag_ref = Reference::with_tag(self.url.host.clone(), repo.to_string(), tag.clone());
        let mut manifests: Vec<serde_json::Value> = match self
            .client
            .pull_manifest_raw(&tag_ref, &self.auth, &[OCI_INDEX])
            .await
        {
            Ok((bytes, _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let before = manifests.len();
        for r in referrers {
            if !manifests
                .iter()
                .any(|m| m.get("digest").and_then(|d| d.as_str()) == Some(r.digest.as_str()))
            {
                manifests.push(serde_json::to_value(r).expect("a descriptor serialises"));
            }
        }
        if manifests.len() == before && before > 0 {
            return Ok(());
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let body = serde_json::to_vec(&index).expect("an index serialises");
        self.push_manifest(repo, tag_ref, &body, OCI_INDEX).await
    }

    pub fn reference(&self, repo: &str, tag: Option<&str>, digest: &str) -> Reference {
        match tag {
            Some(t) => Reference::with_tag(self.url.host.clone(), repo.to_string(), t.to_string()),
            None => self.by_digest(repo, digest),
        }
    }
}

/// Streams one blob out of the bundle in 1 MiB chunks from a blocking thread, checking
/// size and digest on the way: on a mismatch the stream ends in an error, so the upload
/// is abandoned instead of completed.
fn blob_stream(
    bundle: Arc<CatalogBlobs>,
    desc: Descriptor,
) -> impl futures::Stream<Item = oci_client::errors::Result<Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<oci_client::errors::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let fail = |m: String| Err(OciDistributionError::GenericError(Some(m)));
        let digest = match desc.digest() {
            Ok(d) => d,
            Err(e) => return drop(tx.blocking_send(fail(e.to_string()))),
        };
        let path = digest.to_string();
        let (mut reader, _) = match bundle.blob(&digest) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return drop(tx.blocking_send(fail(format!(
                    "blob {digest} is not in the bundle's catalog"
                ))));
            }
            Err(e) => return drop(tx.blocking_send(fail(e.to_string()))),
        };
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return drop(tx.blocking_send(fail(format!("reading {path}: {e}")))),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            hasher.update(&buf);
            total += filled as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return; // the upload was abandoned
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if total != desc.size || actual != desc.digest {
            let _ = tx.blocking_send(fail(format!(
                "blob {} changed in the bundle: {total} bytes hashing to {actual}",
                desc.digest
            )));
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

use std::io::Read as _;
