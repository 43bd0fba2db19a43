//! Bearer tokens on every `/v1` route (health, readiness and metrics stay open): the
//! tokens are the lines of `--auth-token-file` (`token` or, as Kubernetes' static token
//! file, `token,user[,...]`), read again when the file changes;
//! compared in constant time (as SHA-256 digests, so their lengths leak nothing either);
//! never logged. With `--auth kubernetes` a token not in the file is reviewed by the
//! Kubernetes API instead (see `review`). A request without a valid token is answered
//! 401 with `WWW-Authenticate`, one whose user lacks the right 403, both before its body
//! is read, so nothing of it is stored.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest as _, Sha256};

use crate::review::{self, Review, Verdict};

/// A file's modification time and length: changes when it is rewritten.
pub(crate) type Stamp = Option<(SystemTime, u64)>;

/// The stamp of `path` now (`None` when it cannot be read).
pub(crate) fn stamp(path: &std::path::Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// The tokens of a token file, followed.
pub struct Tokens {
    path: PathBuf,
    /// The file's stamp when read, and its tokens' digests with their users.
    cached: Mutex<(Stamp, Vec<TokenLine>)>,
}

/// A token's SHA-256 and its user.
type TokenLine = ([u8; 32], String);

/// Who a request comes from, once its token is accepted: the token file's user (or
/// `token-<8 hex of its SHA-256>` for a line without one), the Kubernetes user, or
/// [`shipperd_model::ANONYMOUS`] when the API asks for no token. Handlers find it in the
/// request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// A line of a token file: the token's digest and its user.
fn token_line(line: &str) -> Option<TokenLine> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split(',').map(str::trim);
    let token = fields.next().filter(|t| !t.is_empty())?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let user = match fields.next().map(|u| u.trim_matches('"')) {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => format!("token-{}", hex::encode(&digest[..4])),
    };
    Some((digest, user))
}

impl Tokens {
    pub fn new(path: PathBuf) -> Self {
        Tokens {
            path,
            cached: Mutex::new((None, Vec::new())),
        }
    }

    /// The digests of the tokens now, with their users (the file read again when it
    /// changed; a file that cannot be read admits no one).
    fn current(&self) -> Vec<TokenLine> {
        let stamp = stamp(&self.path);
        let mut cached = self.cached.lock().expect("not poisoned");
        if stamp.is_none() || cached.0 != stamp {
            let tokens = std::fs::read_to_string(&self.path)
                .map(|text| text.lines().filter_map(token_line).collect())
                .unwrap_or_else(|error| {
                    tracing::error!(%error, file = %self.path.display(), "cannot read the auth token file; refusing every request");
                    Vec::new()
                });
            *cached = (stamp, tokens);
        }
        cached.1.clone()
    }

    /// The user of the token whose digest is `d`, if it is one of the tokens.
    pub fn admits(&self, d: &[u8; 32]) -> Option<String> {
        // Every token compared, each in constant time.
        self.current().into_iter().fold(None, |found, (t, user)| {
            if shipperd_model::same_secret(&t, d) && found.is_none() {
                Some(user)
            } else {
                found
            }
        })
    }
}

/// Who may use the API: the token file's tokens, and with `--auth kubernetes` whoever
/// the Kubernetes API says may. A client address that keeps presenting bad tokens is
/// refused for a while before its tokens are looked at (no review reaches the API
/// server for it).
pub struct Gate {
    pub tokens: Option<Tokens>,
    pub review: Option<Review>,
    pub failures: Failures,
    /// Whose `X-Forwarded-For` says where a request came from (see [`client_of`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The path prefix of gRPC methods: guarded too, and refused as gRPC clients read
    /// a refusal.
    pub grpc_prefix: &'static str,
}

/// Failed authentications per client address: at most [`MAX_FAILURES`] in a
/// [`FAILURE_WINDOW`]; then `429` until the window ends. Bounded: the least recently
/// failing addresses are forgotten first.
pub struct Failures(Mutex<lru::LruCache<IpAddr, (Instant, u32)>>);

/// Bad tokens one address may present per window.
pub const MAX_FAILURES: u32 = 20;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered.
const FAILING_ADDRESSES: usize = 4096;

impl Default for Failures {
    fn default() -> Self {
        Failures(Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(FAILING_ADDRESSES).expect("not zero"),
        )))
    }
}

impl Failures {
    /// How long `ip` must wait, if it failed too often.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (since, n) = *seen.peek(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (n >= MAX_FAILURES).then_some(left)
    }

    /// Counts a failure of `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&ip) {
            Some((since, n)) if since.elapsed() < FAILURE_WINDOW => *n += 1,
            _ => {
                seen.put(ip, (Instant::now(), 1));
            }
        }
    }
}

fn refuse(status: StatusCode, error: String) -> Response {
    let body = axum::Json(serde_json::json!({ "error": error }));
    if status == StatusCode::UNAUTHORIZED {
        return (
            status,
            [(header::WWW_AUTHENTICATE, r#"Bearer realm="shipperd""#)],
            body,
        )
            .into_response();
    }
    (status, body).into_response()
}

/// The address a request came from: its peer's, or, when the peer is a trusted proxy,
/// the last address of `X-Forwarded-For` that is not one (what that proxy saw; entries
/// before it are the client's to write). Behind an OpenShift router every request's
/// peer is the router: without this, one client's bad tokens would lock out everyone.
fn client_of(req: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = req
        .extensions()
        .get::<crate::Client>()
        .map(|c| c.0)
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let proxy = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !proxy(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| forwarded_ip(a.trim()))
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !proxy(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

/// An address of `X-Forwarded-For`: `1.2.3.4`, `1.2.3.4:5678`, `::1` or `[::1]:5678`.
fn forwarded_ip(a: &str) -> Option<IpAddr> {
    a.parse()
        .ok()
        .or_else(|| a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// Is `host` (a `Host` header: `name[:port]`, `[v6]:port`) this machine's loopback?
fn loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An open API on loopback answers only requests for a loopback name: a browser tricked
/// by DNS rebinding sends the attacker's name as `Host`, and is refused (`421`).
pub async fn loopback_host(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if !loopback_name(h) => refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this API is open on loopback only, for 127.0.0.1 and localhost, not {h:?} \
                 (give it --auth-token-file to serve other names)"
            ),
        ),
        _ => next.run(req).await,
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, as
/// RFC 7235 allows).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The same refusal as a gRPC client reads it: HTTP 200 with `grpc-status` and
/// `grpc-message` (UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE), and no body.
fn refuse_grpc(status: StatusCode, error: &str, retry_after: Option<u64>) -> Response {
    let code = match status {
        StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
        StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        _ => tonic::Code::Unavailable,
    };
    let mut s = tonic::Status::new(code, error);
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        s.metadata_mut().insert("retry-after", v);
    }
    s.into_http::<axum::body::Body>().into_response()
}

/// Refuses a `/v1` (or gRPC) request without a valid bearer token, or whose user may
/// not do it.
pub async fn require(State(gate): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let grpc = !gate.grpc_prefix.is_empty() && path.starts_with(gate.grpc_prefix);
    if !grpc && !path.starts_with("/v1/") && path != "/v1" {
        return next.run(req).await;
    }
    let client = client_of(&req, &gate.trusted_proxies);
    let refuse = |status: StatusCode, error: String| {
        if grpc {
            let retry = (status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| gate.failures.blocked(client))
                .flatten()
                .map(|w| w.as_secs().max(1));
            refuse_grpc(status, &error, retry)
        } else {
            refuse(status, error)
        }
    };
    let unauthorized = |why: &str| {
        gate.failures.failed(client);
        refuse(StatusCode::UNAUTHORIZED, why.to_string())
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_owned);
    let digest: Option<[u8; 32]> = presented
        .as_deref()
        .map(|t| Sha256::digest(t.as_bytes()).into());
    if let Some(d) = &digest
        && let Some(user) = gate.tokens.as_ref().and_then(|t| t.admits(d))
    {
        req.extensions_mut().insert(Caller(user));
        return next.run(req).await;
    }
    let verb = match *req.method() {
        // Every gRPC method reads.
        _ if grpc => "get",
        Method::GET | Method::HEAD => "get",
        Method::DELETE => "delete",
        _ => "create",
    };
    // Past the token file: an address that failed too often is not looked at further,
    // but for a token the Kubernetes API approved a moment ago (a valid identity is not
    // locked out by others' bad tokens from the same address).
    if let Some(wait) = gate.failures.blocked(client) {
        if let (Some(review), Some(d)) = (&gate.review, digest)
            && let Some(user) = review.approved(d, verb)
        {
            req.extensions_mut().insert(Caller(user));
            return next.run(req).await;
        }
        let secs = wait.as_secs().max(1);
        let mut resp = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many requests with bad tokens from this address; try again in {secs}s"),
        );
        resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        return resp;
    }
    let (Some(token), Some(digest)) = (presented, digest) else {
        return unauthorized("a bearer token is required (Authorization: Bearer <token>)");
    };
    let Some(review) = &gate.review else {
        return unauthorized("the bearer token is not valid");
    };
    match review.check(&token, digest, verb).await {
        Verdict::Allowed { user } => {
            req.extensions_mut().insert(Caller(user));
            next.run(req).await
        }
        Verdict::Unauthenticated => {
            unauthorized("the bearer token is not valid (the Kubernetes API does not know it)")
        }
        Verdict::Forbidden { user } => refuse(
            StatusCode::FORBIDDEN,
            format!(
                "user {user:?} may not {verb} {}.{} in namespace {:?}",
                review::RESOURCE,
                review::GROUP,
                review.namespace()
            ),
        ),
        Verdict::Unavailable(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for (header, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER   abc ", Some("abc")),
            ("Bearer", None),
            ("Bearer  ", None),
            ("Basic abc", None),
            ("Bearerabc", None),
        ] {
            assert_eq!(bearer(header), want, "{header:?}");
        }
    }

    #[test]
    fn behind_a_trusted_proxy_the_client_is_the_last_address_before_it() {
        let req = |peer: &str, xff: &[&str]| {
            let mut b = axum::http::Request::builder();
            for v in xff {
                b = b.header("x-forwarded-for", *v);
            }
            let mut r = b.body(axum::body::Body::empty()).unwrap();
            r.extensions_mut()
                .insert(crate::Client(peer.parse().unwrap()));
            r
        };
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.128.0.0/14".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Not a proxy: its own address, whatever it forwards.
        assert_eq!(
            client_of(&req("192.0.2.1", &["198.51.100.7"]), &trusted),
            ip("192.0.2.1")
        );
        // The router: the address it saw (what the client wrote before it is ignored).
        assert_eq!(
            client_of(&req("10.128.2.5", &["6.6.6.6, 198.51.100.7"]), &trusted),
            ip("198.51.100.7")
        );
        // Two proxies, two headers, a port.
        assert_eq!(
            client_of(
                &req("127.0.0.1", &["203.0.113.9:5555", "10.129.0.4"]),
                &trusted
            ),
            ip("203.0.113.9")
        );
        // Nothing forwarded, or nothing readable: the peer.
        assert_eq!(
            client_of(&req("10.128.2.5", &[]), &trusted),
            ip("10.128.2.5")
        );
        assert_eq!(
            client_of(&req("10.128.2.5", &["unknown"]), &trusted),
            ip("10.128.2.5")
        );
        // Nothing trusted: the peer.
        assert_eq!(
            client_of(&req("10.128.2.5", &["198.51.100.7"]), &[]),
            ip("10.128.2.5")
        );
    }

    #[test]
    fn loopback_names_only() {
        for h in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "127.1.2.3",
        ] {
            assert!(loopback_name(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "[::2]:1",
            "localhost.evil",
        ] {
            assert!(!loopback_name(h), "{h}");
        }
    }

    #[test]
    fn token_lines_name_their_users() {
        let user = |l: &str| token_line(l).map(|(_, u)| u);
        assert_eq!(user("abc,alice"), Some("alice".into()));
        assert_eq!(
            user(" abc , alice , uid-1, \"g1,g2\""),
            Some("alice".into())
        );
        assert_eq!(user("abc,\"bob\""), Some("bob".into()));
        // No user: named by its digest, the same for the same token.
        let anon = user("abc").unwrap();
        assert!(anon.starts_with("token-") && anon.len() == 14, "{anon}");
        assert_eq!(user("abc,"), Some(anon));
        assert_ne!(user("abd"), user("abc"));
        assert_eq!(user("# a comment"), None);
        assert_eq!(user("   "), None);
        // The token is what comes before the first comma.
        let (d, _) = token_line("abc,alice").unwrap();
        assert_eq!(d, <[u8; 32]>::from(Sha256::digest(b"abc")));
    }

    #[test]
    fn an_address_failing_too_often_waits() {
        let f = Failures::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            assert!(f.blocked(a).is_none());
            f.failed(a);
        }
        assert!(f.blocked(a).is_some_and(|w| w <= FAILURE_WINDOW));
        assert!(f.blocked(b).is_none(), "others are not held up");
    }
}
