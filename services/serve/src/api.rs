//! The pull half of the OCI distribution API over the index. Paths are parsed by hand:
//! a repository name has any number of `/`-separated components.

use std::{io::Read, ops::Bound, path::PathBuf, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{Digest, ManifestDoc};

use crate::{
    Index, Shared,
    auth::{Auth, TOKEN_PATH, Verdict},
    current,
};

#[derive(Clone)]
struct Served {
    index: Shared,
    auth: Option<Arc<Auth>>,
    /// Served over TLS (the scheme of the token realm).
    tls: bool,
}

pub(crate) fn router(
    index: Shared,
    token_file: Option<PathBuf>,
    htpasswd: Option<PathBuf>,
    advertise: Option<String>,
    tls: bool,
) -> Router {
    Router::new().fallback(handle).with_state(Served {
        index,
        auth: Auth::new(token_file, htpasswd, advertise).map(Arc::new),
        tls,
    })
}

/// `429 TOOMANYREQUESTS` with `Retry-After`: a login not looked at.
fn busy(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        format!("too many logins from this address, or waiting; try again in {secs}s"),
    );
    r.headers_mut().insert(header::RETRY_AFTER, secs.into());
    r
}

/// Tags or repositories in one page unless `n` says otherwise, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;
/// Bytes read from a bundle at a time while a blob is sent.
const CHUNK: usize = 256 << 10;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"errors": [{"code": code, "message": message.into()}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn with_api_version(mut r: Response) -> Response {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

async fn handle(State(s): State<Served>, req: Request) -> Response {
    with_api_version(route(&s, req).await)
}

async fn route(s: &Served, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let from = req
        .extensions()
        .get::<shipperd_listener::Client>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0);
    if path == TOKEN_PATH
        && let Some(auth) = &s.auth
    {
        return match auth.token(req.headers(), from).await {
            Ok(doc) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                doc.to_string(),
            )
                .into_response(),
            Err(Verdict::Busy(wait)) => busy(wait),
            Err(_) => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "log in with a user of the server's htpasswd file, or a token of its token file as the password",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="shipperd""#),
                );
                r
            }
        };
    }
    if path != "/v2" && !path.starts_with("/v2/") {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path");
    }
    let verdict = match &s.auth {
        Some(auth) => auth.admits(req.headers(), from).await,
        None => Verdict::Admitted,
    };
    if let Verdict::Busy(wait) = verdict {
        return busy(wait);
    }
    if let Some(auth) = &s.auth
        && verdict != Verdict::Admitted
    {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "log in with a user of the server's htpasswd file, or a token of its token file as the password",
        );
        let authority = req.uri().authority().map(|a| a.as_str());
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            auth.challenge(req.headers(), authority, s.tls),
        );
        return r;
    }
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry serves bundles read-only: pushes and deletes are refused",
        );
    }
    let query = req.uri().query().unwrap_or_default().to_string();
    // One index for the whole request, whatever the watcher swaps meanwhile.
    let index = current(&s.index);
    let rest = path.trim_start_matches("/v2").trim_start_matches('/');
    if rest.is_empty() {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{}",
        )
            .into_response();
    }
    if rest == "_catalog" {
        let repos = &index.repos;
        return page("/v2/_catalog", "repositories", &query, None, |last| {
            repos.range::<str, _>((after(last), Bound::Unbounded))
        });
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        let Some(tags) = index.tags.get(name) else {
            return name_unknown(name);
        };
        return page(
            &format!("/v2/{name}/tags/list"),
            "tags",
            &query,
            Some(name),
            |last| {
                tags.range::<str, _>((after(last), Bound::Unbounded))
                    .map(|(t, _)| t)
            },
        );
    }
    for (sep, what) in [
        ("/manifests/", What::Manifest),
        ("/blobs/", What::Blob),
        ("/referrers/", What::Referrers),
    ] {
        if let Some(at) = rest.rfind(sep) {
            let (name, reference) = (&rest[..at], &rest[at + sep.len()..]);
            if !index.repos.contains(name) {
                return name_unknown(name);
            }
            return match what {
                What::Manifest => manifest(&index, name, reference, head),
                What::Blob => blob(&index, reference, req.headers(), head).await,
                What::Referrers => referrers(&index, reference, &query),
            };
        }
    }
    error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path")
}

enum What {
    Manifest,
    Blob,
    Referrers,
}

fn name_unknown(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        format!("no repository {name:?} in the bundles served"),
    )
}

/// Where a page starts: after `last`, or at the beginning.
fn after(last: Option<&str>) -> Bound<&str> {
    last.map_or(Bound::Unbounded, Bound::Excluded)
}

/// A page of the names `from(last)` lists in order after `?last=`, `?n=` of them, with
/// a `Link` to the next when there are more (read from the sorted index, never all of
/// them).
fn page<'a, I: Iterator<Item = &'a String>>(
    base: &str,
    key: &str,
    query: &str,
    name: Option<&str>,
    from: impl FnOnce(Option<&str>) -> I,
) -> Response {
    let mut n = PAGE;
    let mut last: Option<String> = None;
    for (k, v) in form_urlencoded(query) {
        match k.as_str() {
            "n" => n = v.parse().unwrap_or(PAGE).clamp(1, MAX_PAGE),
            "last" => last = Some(v),
            _ => {}
        }
    }
    let mut chosen: Vec<&String> = from(last.as_deref()).take(n + 1).collect();
    let more = chosen.len() > n;
    chosen.truncate(n);
    let mut doc = json!({ key: chosen });
    if let Some(name) = name {
        doc["name"] = name.into();
    }
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response();
    if more
        && let Some(l) = chosen.last()
        && let Ok(v) =
            HeaderValue::from_str(&format!("<{base}?n={n}&last={}>; rel=\"next\"", percent(l)))
    {
        r.headers_mut().insert(header::LINK, v);
    }
    r
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `a=b&c=d`, percent-decoded.
fn form_urlencoded(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(v) => {
                            out.push(v);
                            i += 3;
                            continue;
                        }
                        None => out.push(b'%'),
                    }
                }
                b'+' => out.push(b' '),
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn manifest(index: &Index, name: &str, reference: &str, head: bool) -> Response {
    let (digest, declared) = match Digest::parse(reference) {
        Ok(d) => (d, String::new()),
        Err(_) => match index.tags.get(name).and_then(|t| t.get(reference)) {
            Some(t) => (t.desc.digest.clone(), t.desc.media_type.clone()),
            // The referrers tag fallback (OCI 1.1): `sha256-<hex>` names the index of the
            // referrers of manifest `sha256:<hex>`, unless the bundle tags it itself.
            None if let Some(d) =
                fallback_subject(reference).and_then(|subject| index.fallback.get(&subject)) =>
            {
                (d.clone(), OCI_INDEX.to_string())
            }
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    format!("no tag {reference:?} in {name}"),
                );
            }
        },
    };
    let Some(bytes) = index.manifest(&digest) else {
        return error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("no manifest {digest} in the bundles served"),
        );
    };
    let media_type = ManifestDoc::parse("manifest", &bytes)
        .map(|d| d.media_type(&declared))
        .unwrap_or(declared);
    let len = bytes.len();
    let headers = [
        (header::CONTENT_TYPE, media_type),
        (header::CONTENT_LENGTH, len.to_string()),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest.to_string(),
        ),
    ];
    if head {
        return (StatusCode::OK, headers).into_response();
    }
    (StatusCode::OK, headers, bytes).into_response()
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The subject a referrers fallback tag (`sha256-<64 hex>`) names.
fn fallback_subject(tag: &str) -> Option<Digest> {
    Digest::from_hex(tag.strip_prefix("sha256-")?).ok()
}

fn referrers(index: &Index, reference: &str, query: &str) -> Response {
    let Ok(digest) = Digest::parse(reference) else {
        return error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("{reference:?} is not a digest"),
        );
    };
    let mut list = index.referrers.get(&digest).cloned().unwrap_or_default();
    let wanted: Vec<String> = form_urlencoded(query)
        .into_iter()
        .filter(|(k, _)| k == "artifactType")
        .map(|(_, v)| v)
        .collect();
    if !wanted.is_empty() {
        list.retain(|d| d.artifact_type.as_ref().is_some_and(|t| wanted.contains(t)));
    }
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, OCI_INDEX)],
        crate::referrers_index(&list),
    )
        .into_response();
    if !wanted.is_empty() {
        r.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    r
}

/// `Range: bytes=a-b` (one range) over `len` bytes: the first byte and the count.
fn range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return Some(Err(()));
    }
    let (a, b) = spec.split_once('-')?;
    let parsed = match (a.trim(), b.trim()) {
        ("", suffix) => suffix
            .parse::<u64>()
            .ok()
            // Nothing to take the last bytes of in an empty blob (RFC 9110 14.1.2).
            .filter(|n| *n > 0 && len > 0)
            .map(|n| (len.saturating_sub(n), n.min(len))),
        (start, "") => start
            .parse::<u64>()
            .ok()
            .filter(|s| *s < len)
            .map(|s| (s, len - s)),
        (start, end) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e && s < len => Some((s, e.min(len - 1) - s + 1)),
            _ => None,
        },
    };
    Some(parsed.ok_or(()))
}

async fn blob(index: &Index, reference: &str, headers: &HeaderMap, head: bool) -> Response {
    let Ok(digest) = Digest::parse(reference) else {
        return error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("{reference:?} is not a digest"),
        );
    };
    // The copies not known to be wrong, newest bundle first; where another could stand
    // in, or a range is asked for, the first that hashes to its digest (read whole
    // once); else the one copy, checked as it streams out (see `verify`).
    let copies = crate::verify::candidates(index, &digest);
    let unknown = |c: &crate::verify::Copy| c.0.checked.get(&digest).is_none();
    let ranged = headers.contains_key(header::RANGE);
    let chosen = match copies.first() {
        Some(c) if head || !unknown(c) || (copies.len() == 1 && !ranged) => Some(c.clone()),
        Some(_) => {
            let d = digest.clone();
            tokio::task::spawn_blocking(move || crate::verify::first_good(copies, &d))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let Some((bundle, path)) = chosen else {
        return error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("no blob {digest} in the bundles served"),
        );
    };
    let check = (!head && bundle.checked.get(&digest).is_none()).then(|| digest.clone());
    let len = {
        let (bundle, path) = (bundle.clone(), path.clone());
        match tokio::task::spawn_blocking(move || bundle.fs.locate(&path).map(|l| l.1)).await {
            Ok(Ok(len)) => len,
            _ => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    format!("blob {digest} cannot be read from its bundle"),
                );
            }
        }
    };
    let (status, start, count) = match range(headers, len) {
        None => (StatusCode::OK, 0, len),
        Some(Ok((s, n))) => (StatusCode::PARTIAL_CONTENT, s, n),
        Some(Err(())) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "one range within the blob, e.g. bytes=0-1023",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let mut r = if head {
        StatusCode::OK.into_response()
    } else {
        // Checked as it streams only when the whole of an unchecked copy goes out.
        let check = check.filter(|_| start == 0 && count == len);
        Body::from_stream(read_blob(bundle, path, start, count, check)).into_response()
    };
    *r.status_mut() = if head { StatusCode::OK } else { status };
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, count.into());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert("docker-content-digest", v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && !head
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// `count` bytes of a blob from `start`, read on a blocking thread a chunk at a time
/// (at most a few chunks in memory per client). With `check`, the whole blob's bytes
/// are hashed on the way and its last chunk is sent only once they hash to that digest
/// (else the stream ends with an error, and the bundle's copy is noted as wrong).
fn read_blob(
    bundle: Arc<crate::Loaded>,
    path: String,
    start: u64,
    count: u64,
    check: Option<Digest>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let fs = &bundle.fs;
        // From `start`: straight there where the container can seek (a tar read in
        // place, an expanded blob), else read past.
        let mut reader = match fs.open_from(&path, start) {
            Ok((r, _)) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut left = count;
        let mut hasher = check.as_ref().map(|_| Sha256::new());
        // One allocation, reused: `reserve` takes the whole of it back once the chunks
        // cut from it have been written to the client and dropped.
        let mut pool = bytes::BytesMut::with_capacity(CHUNK * 4);
        while left > 0 {
            let want = CHUNK.min(left as usize);
            pool.reserve(want);
            pool.resize(want, 0);
            match reader.read(&mut pool[..want]) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the blob ended early",
                    )));
                    return;
                }
                Ok(n) => {
                    pool.truncate(n);
                    left -= n as u64;
                    if let Some(h) = &mut hasher {
                        h.update(&pool[..]);
                    }
                    if left == 0
                        && let (Some(h), Some(d)) = (hasher.take(), &check)
                    {
                        let good = hex::encode(h.finalize()) == d.hex();
                        crate::verify::noted(&bundle, &path, d, good);
                        if !good {
                            let _ = tx.blocking_send(Err(std::io::Error::other(format!(
                                "blob {d}: the bundle's bytes do not hash to it"
                            ))));
                            return;
                        }
                    }
                    if tx.blocking_send(Ok(pool.split().freeze())).is_err() {
                        return; // the client went
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_within_the_blob_only() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, v.parse().unwrap());
            m
        };
        assert_eq!(range(&HeaderMap::new(), 10), None);
        assert_eq!(range(&h("bytes=0-3"), 10), Some(Ok((0, 4))));
        assert_eq!(range(&h("bytes=4-"), 10), Some(Ok((4, 6))));
        assert_eq!(range(&h("bytes=-3"), 10), Some(Ok((7, 3))));
        assert_eq!(range(&h("bytes=5-100"), 10), Some(Ok((5, 5))));
        assert_eq!(range(&h("bytes=10-"), 10), Some(Err(())));
        assert_eq!(range(&h("bytes=3-1"), 10), Some(Err(())));
        assert_eq!(range(&h("bytes=0-1,4-5"), 10), Some(Err(())));
        // An empty blob has no range to give, not even its last bytes.
        assert_eq!(range(&h("bytes=-5"), 0), Some(Err(())));
        assert_eq!(range(&h("bytes=0-"), 0), Some(Err(())));
        assert_eq!(range(&h("bytes=0-0"), 0), Some(Err(())));
    }

    #[test]
    fn queries_decode() {
        assert_eq!(
            form_urlencoded("n=2&last=a%2Fb"),
            vec![("n".into(), "2".into()), ("last".into(), "a/b".into())]
        );
        // Not hex, or a character of several bytes after the %: kept as it is.
        assert_eq!(form_urlencoded("last=%zz%é")[0].1, "%zz%é");
    }
}
