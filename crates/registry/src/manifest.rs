//! Manifests (exact bytes, so digests never change), the Day-2 check of a tag, and the
//! referrers fallback tag.

use bytes::Bytes;
use reqwest::Method;
use shipperd_bundle::{Descriptor, Digest};

use super::{Call, Registry, RegistryError, accept_manifests};

const OCI_INDEX: &str = shipperd_bundle::layout::OCI_INDEX;

/// Every manifest type we publish, for `Accept`.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// A `method` on `repo`'s manifest `reference` that takes 404 as an answer (no such
/// manifest).
pub(crate) fn lookup<'a>(method: Method, repo: &'a str, reference: &str) -> Call<'a> {
    Call {
        method,
        url: format!("/v2/{repo}/manifests/{reference}"),
        repo,
        from: None,
        build: &accept_manifests,
        ok: &[200, 404],
        once: false,
    }
}

impl Registry {
    /// The digest `repo:tag` points at now, or `None` when there is no such tag. One
    /// request (a `HEAD`), unless the registry leaves out `Docker-Content-Digest`.
    pub async fn tag_digest(&self, repo: &str, tag: &str) -> Result<Option<Digest>, RegistryError> {
        let head = lookup(Method::HEAD, repo, tag);
        let resp = self.send(&head).await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok())
        {
            return Ok(Some(d));
        }
        let get = Call {
            method: Method::GET,
            ..head
        };
        let body = self
            .send(&get)
            .await?
            .bytes()
            .await
            .map_err(RegistryError::transport)?;
        Ok(Some(Digest::of(&body)))
    }

    /// The manifest `repo@digest` with its media type, or `None` when the repository
    /// does not have it (a differential bundle's manifest the registry should have).
    /// Its bytes are checked against the digest.
    pub async fn fetch_manifest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<(Bytes, String)>, RegistryError> {
        Ok(self
            .manifest(repo, digest.as_str())
            .await?
            .map(|m| (m.bytes, m.media_type)))
    }

    /// Does `repo` have the manifest `digest`? One `HEAD`.
    pub async fn manifest_exists(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let head = lookup(Method::HEAD, repo, digest.as_str());
        Ok(self.send(&head).await?.status() == 200)
    }

    /// Puts a manifest under `reference` (a digest or a tag), bytes unchanged.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let body = Bytes::copy_from_slice(bytes);
        let media_type = media_type.to_string();
        let build = move |b: reqwest::RequestBuilder| {
            b.header(reqwest::header::CONTENT_TYPE, media_type.as_str())
                .body(body.clone())
        };
        let call = Call {
            method: Method::PUT,
            url: format!("/v2/{repo}/manifests/{reference}"),
            repo,
            from: None,
            build: &build,
            ok: &[201],
            once: false,
        };
        self.send(&call).await?;
        Ok(())
    }

    /// A JSON document at `url` (an image index: the referrers API's answer, or the
    /// fallback tag), `None` on 404 or when it is not JSON.
    async fn get_json(
        &self,
        repo: &str,
        url: String,
    ) -> Result<Option<serde_json::Value>, RegistryError> {
        let accept_index =
            |b: reqwest::RequestBuilder| b.header(reqwest::header::ACCEPT, OCI_INDEX);
        Ok(self
            .page(repo, url, &accept_index)
            .await?
            .and_then(|(body, _)| serde_json::from_slice(&body).ok()))
    }

    /// Lists `referrers` of `subject` in `repo`: nothing to do where the registry's
    /// referrers API lists them already; elsewhere the fallback tag `sha256-<hex>`
    /// holds an image index of them, merged with what it held before.
    pub async fn update_referrers_tag(
        &self,
        repo: &str,
        subject: &Digest,
        referrers: &[Descriptor],
    ) -> Result<(), RegistryError> {
        let listed = |v: &serde_json::Value| -> Vec<serde_json::Value> {
            v.get("manifests")
                .and_then(|m| m.as_array())
                .cloned()
                .unwrap_or_default()
        };
        let has = |ms: &[serde_json::Value], d: &Digest| {
            ms.iter()
                .any(|m| m.get("digest").and_then(|x| x.as_str()) == Some(d.as_str()))
        };
        // A registry with the referrers API lists them by now (it indexes `subject` as
        // manifests arrive); one without answers 404.
        if let Ok(Some(v)) = self
            .get_json(repo, format!("/v2/{repo}/referrers/{subject}"))
            .await
            && referrers.iter().all(|r| has(&listed(&v), &r.digest))
        {
            return Ok(());
        }
        let tag = subject.referrers_tag();
        let mut manifests = self
            .get_json(repo, format!("/v2/{repo}/manifests/{tag}"))
            .await?
            .map(|v| listed(&v))
            .unwrap_or_default();
        let before = manifests.len();
        for r in referrers {
            if !has(&manifests, &r.digest) {
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
        self.push_manifest(repo, &tag, &body, OCI_INDEX).await
    }
}
