//! The pull side: manifests by tag or digest (with the media types accepted), blobs by
//! digest into a file (resumed with `Range` where a connection broke, checked against
//! their digest), and a repository's tags and an image's referrers, followed page by
//! page. Every answer is bounded: a manifest's size, a blob's (by its descriptor), and
//! the number of pages.

use std::path::Path;

use bytes::Bytes;
use reqwest::{Method, Response};
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{Descriptor, Digest};
use tokio::io::AsyncWriteExt as _;

use super::{Call, Registry, RegistryError, no_body};

/// The largest manifest read (the distribution spec's own suggestion).
pub const MAX_MANIFEST: usize = 4 << 20;
/// The most pages of tags or referrers followed.
pub const MAX_PAGES: usize = 10_000;
/// Tags asked for per page.
const PAGE: usize = 1000;

/// A manifest as the registry holds it: its exact bytes, their digest and media type.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

impl Registry {
    /// The manifest `repo:reference` (a tag or a digest), or `None` when there is none.
    /// A digest reference is checked against the bytes; a tag's digest is the bytes'
    /// own (a `Docker-Content-Digest` that disagrees is refused).
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Pulled>, RegistryError> {
        let resp = self
            .send(&super::manifest::lookup(Method::GET, repo, reference))
            .await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        let media_type = header(&resp, reqwest::header::CONTENT_TYPE.as_str()).unwrap_or_default();
        let said = header(&resp, "docker-content-digest");
        let bytes = bounded_body(resp, MAX_MANIFEST, || {
            format!("the manifest {repo}:{reference}")
        })
        .await?;
        let digest = Digest::of(&bytes);
        let expected = Digest::parse(reference)
            .ok()
            .or_else(|| said.as_deref().and_then(|d| Digest::parse(d).ok()));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(RegistryError::Protocol(format!(
                "{repo}:{reference} came back hashing to {digest}, not {expected}"
            )));
        }
        let media_type = if media_type.is_empty() {
            // Some registries leave it out: the manifest says it itself.
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                .unwrap_or_default()
        } else {
            media_type
        };
        Ok(Some(Pulled {
            bytes,
            media_type,
            digest,
        }))
    }

    /// A small blob of `repo` (a signature's payload, a config) in memory: at most
    /// `max` bytes, checked against its digest; `None` when the registry has none.
    pub async fn blob_small(
        &self,
        repo: &str,
        digest: &Digest,
        max: usize,
    ) -> Result<Option<Bytes>, RegistryError> {
        let build = |b: reqwest::RequestBuilder| b;
        let call = Call {
            method: Method::GET,
            url: format!("/v2/{repo}/blobs/{digest}"),
            repo,
            from: None,
            build: &build,
            ok: &[200, 404],
            once: false,
        };
        let resp = self.send(&call).await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        let bytes = bounded_body(resp, max, || format!("blob {digest} of {repo}")).await?;
        if Digest::of(&bytes) != *digest {
            return Err(RegistryError::Protocol(format!(
                "blob {digest} of {repo} came back hashing to {}",
                Digest::of(&bytes)
            )));
        }
        Ok(Some(bytes))
    }

    /// Writes blob `desc` of `repo` to `path`. A file already there is taken as the
    /// blob's first bytes (a download cut off before) and the rest asked for with
    /// `Range`; a broken connection resumes the same way, up to the target's retries.
    /// The whole is checked against the digest: a file that does not match is removed.
    pub async fn blob_to_file(
        &self,
        repo: &str,
        desc: &Descriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let io = |e: std::io::Error| RegistryError::Read(format!("{}: {e}", path.display()));
        let mut have = tokio::fs::metadata(path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > desc.size {
            have = 0;
        }
        let mut hasher = Sha256::new();
        if have > 0 {
            // Hash what is there, in pieces.
            let mut f = tokio::fs::File::open(path).await.map_err(io)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            use tokio::io::AsyncReadExt as _;
            while left > 0 {
                let n = f.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                let n = n.min(left as usize);
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .await
            .map_err(io)?;
        file.set_len(have).await.map_err(io)?;
        let mut file = tokio::io::BufWriter::new(file);
        use tokio::io::AsyncSeekExt as _;
        file.seek(std::io::SeekFrom::Start(have))
            .await
            .map_err(io)?;

        let retries = self.transfer().retries;
        let mut attempt = 0;
        while have < desc.size {
            match self
                .blob_range(repo, desc, have, &mut file, &mut hasher)
                .await
            {
                Ok(got) => have = got,
                Err(Fetch::Failed(e, got)) => {
                    let moved = got > have;
                    have = got;
                    if !e.is_retryable() || attempt >= retries {
                        file.flush().await.map_err(io)?;
                        return Err(e);
                    }
                    // A connection that moved bytes starts the count again.
                    attempt = if moved { 0 } else { attempt + 1 };
                    tracing::debug!(error = %e, have, "blob download broke; resuming");
                    self.backoff(attempt, e.retry_after()).wait().await;
                }
            }
        }
        file.flush().await.map_err(io)?;
        let actual = hex::encode(hasher.finalize());
        if actual != desc.digest.hex() {
            drop(file);
            let _ = tokio::fs::remove_file(path).await;
            return Err(RegistryError::Changed(format!(
                "blob {repo}@{} came back hashing to sha256:{actual}; removed",
                desc.digest
            )));
        }
        Ok(())
    }

    /// One request for `desc`'s bytes from `from` on, appended to `file`. Returns how
    /// many bytes the file holds after it.
    async fn blob_range(
        &self,
        repo: &str,
        desc: &Descriptor,
        from: u64,
        file: &mut tokio::io::BufWriter<tokio::fs::File>,
        hasher: &mut Sha256,
    ) -> Result<u64, Fetch> {
        let range = format!("bytes={from}-");
        let build = |b: reqwest::RequestBuilder| {
            if from > 0 {
                b.header(reqwest::header::RANGE, range.as_str())
            } else {
                b
            }
        };
        let call = Call {
            method: Method::GET,
            url: format!("/v2/{repo}/blobs/{}", desc.digest),
            repo,
            from: None,
            build: &build,
            ok: &[200, 206],
            once: false,
        };
        let mut resp = self.send(&call).await.map_err(|e| Fetch::Failed(e, from))?;
        let mut have = from;
        if from > 0 && resp.status() == 200 {
            // No ranges here: take it whole.
            use tokio::io::AsyncSeekExt as _;
            let io = |e: std::io::Error| Fetch::Failed(RegistryError::Read(e.to_string()), 0);
            file.flush().await.map_err(io)?;
            file.get_mut().set_len(0).await.map_err(io)?;
            file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
            *hasher = Sha256::new();
            have = 0;
        }
        let stall = self.transfer().stall_timeout;
        loop {
            let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => return Err(Fetch::Failed(RegistryError::Stalled(stall), have)),
                Ok(Err(e)) => return Err(Fetch::Failed(RegistryError::transport(e), have)),
                Ok(Ok(None)) => return Ok(have),
                Ok(Ok(Some(c))) => c,
            };
            if have + chunk.len() as u64 > desc.size {
                return Err(Fetch::Failed(
                    RegistryError::Protocol(format!(
                        "blob {repo}@{} is longer than its {} bytes",
                        desc.digest, desc.size
                    )),
                    have,
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| Fetch::Failed(RegistryError::Read(e.to_string()), have))?;
            have += chunk.len() as u64;
        }
    }

    /// Every tag of `repo`, in the registry's order, following `Link` pages (at most
    /// [`MAX_PAGES`]). An unknown repository has none.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, RegistryError> {
        self.tags_paged(repo, PAGE).await
    }

    /// [`Registry::tags`], asking for `per_page` tags a page.
    pub async fn tags_paged(
        &self,
        repo: &str,
        per_page: usize,
    ) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let mut out = Vec::new();
        let mut next = Some(format!("/v2/{repo}/tags/list?n={per_page}"));
        for _ in 0..MAX_PAGES {
            let Some(url) = next.take() else {
                return Ok(out);
            };
            let Some((body, link)) = self.page(repo, url, &no_body).await? else {
                return Ok(out);
            };
            let page: Page = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::Protocol(format!("the tags of {repo}: {e}")))?;
            out.extend(page.tags.unwrap_or_default());
            next = link;
        }
        Err(too_many_pages(repo, "tags"))
    }

    /// The referrers of `repo@subject` (of `artifact_type` only, when given): from the
    /// referrers API, following `Link` pages, or where the registry has none, from the
    /// fallback tag `sha256-<hex>`.
    pub async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let accept_index = |b: reqwest::RequestBuilder| {
            b.header(reqwest::header::ACCEPT, shipperd_bundle::layout::OCI_INDEX)
        };
        let wanted =
            |d: &Descriptor| artifact_type.is_none() || d.artifact_type.as_deref() == artifact_type;
        let mut out = Vec::new();
        let mut next = Some(match artifact_type {
            Some(t) => format!("/v2/{repo}/referrers/{subject}?artifactType={}", encode(t)),
            None => format!("/v2/{repo}/referrers/{subject}"),
        });
        for page_no in 0..MAX_PAGES {
            let Some(url) = next.take() else {
                return Ok(out);
            };
            let Some((body, link)) = self.page(repo, url, &accept_index).await? else {
                if page_no > 0 {
                    return Ok(out);
                }
                // No referrers API: the fallback tag, if any.
                let tag = subject.referrers_tag();
                return Ok(match self.manifest(repo, &tag).await? {
                    Some(m) => serde_json::from_slice::<Index>(&m.bytes)
                        .map_err(|e| RegistryError::Protocol(format!("{repo}:{tag}: {e}")))?
                        .manifests
                        .into_iter()
                        .filter(wanted)
                        .collect(),
                    None => Vec::new(),
                });
            };
            let index: Index = serde_json::from_slice(&body).map_err(|e| {
                RegistryError::Protocol(format!("the referrers of {repo}@{subject}: {e}"))
            })?;
            // A registry that ignores the filter says so by leaving out the annotation
            // the spec asks for; filter here either way.
            out.extend(index.manifests.into_iter().filter(wanted));
            next = link;
        }
        Err(too_many_pages(repo, "referrers"))
    }

    /// One page: its body (bounded) and the next page's path from `Link`, or `None`
    /// on 404.
    pub(crate) async fn page(
        &self,
        repo: &str,
        url: String,
        build: &(dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<Option<(Bytes, Option<String>)>, RegistryError> {
        let call = Call {
            method: Method::GET,
            url,
            repo,
            from: None,
            build,
            ok: &[200, 404],
            once: false,
        };
        let resp = self.send(&call).await?;
        if resp.status() == 404 {
            return Ok(None);
        }
        let link = header(&resp, "link").and_then(|l| next_link(&l));
        let body = bounded_body(resp, MAX_MANIFEST, || format!("a listing of {repo}")).await?;
        Ok(Some((body, link)))
    }
}

/// A blob request that failed with the file holding this many bytes.
enum Fetch {
    Failed(RegistryError, u64),
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The body of `resp`, refused when over `max` bytes.
async fn bounded_body(
    mut resp: Response,
    max: usize,
    what: impl Fn() -> String,
) -> Result<Bytes, RegistryError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(RegistryError::Protocol(format!(
            "{} is over {max} bytes",
            what()
        )));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(RegistryError::transport)? {
        if body.len() + chunk.len() > max {
            return Err(RegistryError::Protocol(format!(
                "{} is over {max} bytes",
                what()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The target of `rel="next"` in a `Link` header (RFC 8288), as a path or URL.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

fn too_many_pages(repo: &str, what: &str) -> RegistryError {
    RegistryError::Protocol(format!(
        "the {what} of {repo} go on for more than {MAX_PAGES} pages"
    ))
}

/// Percent-encodes a query value (media types hold `+` and `/`).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_are_found_in_link_headers() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?last=x&n=2>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=x&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r/prev>; rel="prev", <https://r/v2/b?n=1>; rel=next"#).as_deref(),
            Some("https://r/v2/b?n=1")
        );
        assert_eq!(next_link(r#"</v2/a>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode("application/vnd.dev.sigstore.bundle.v0.3+json"),
            "application%2Fvnd.dev.sigstore.bundle.v0.3%2Bjson"
        );
    }
}
