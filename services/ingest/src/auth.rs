//! Bearer tokens on every `/v1` route (health, readiness and metrics stay open): the
//! tokens are the lines of `--auth-token-file`, read again when the file changes;
//! compared in constant time (as SHA-256 digests, so their lengths leak nothing either);
//! never logged. With `--auth kubernetes` a token not in the file is reviewed by the
//! Kubernetes API instead (see `review`). A request without a valid token is answered
//! 401 with `WWW-Authenticate`, one whose user lacks the right 403, both before its body
//! is read, so nothing of it is stored.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
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
    /// The file's stamp when read, and its tokens' digests.
    cached: Mutex<(Stamp, Vec<[u8; 32]>)>,
}

impl Tokens {
    pub fn new(path: PathBuf) -> Self {
        Tokens {
            path,
            cached: Mutex::new((None, Vec::new())),
        }
    }

    /// The digests of the tokens now (the file read again when it changed; a file that
    /// cannot be read admits no one).
    fn current(&self) -> Vec<[u8; 32]> {
        let stamp = stamp(&self.path);
        let mut cached = self.cached.lock().expect("not poisoned");
        if stamp.is_none() || cached.0 != stamp {
            let tokens = std::fs::read_to_string(&self.path)
                .map(|text| {
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(|t| Sha256::digest(t.as_bytes()).into())
                        .collect()
                })
                .unwrap_or_else(|error| {
                    tracing::error!(%error, file = %self.path.display(), "cannot read the auth token file; refusing every request");
                    Vec::new()
                });
            *cached = (stamp, tokens);
        }
        cached.1.clone()
    }

    /// Is the token whose digest is `d` one of the tokens?
    pub fn admits(&self, d: &[u8; 32]) -> bool {
        // Every token compared, each in constant time.
        self.current()
            .iter()
            .fold(false, |found, t| found | same_secret(t, d))
    }
}

/// Are `a` and `b` equal? Compared in constant time for equal lengths (give digests:
/// their length says nothing).
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who may use the API: the token file's tokens, and with `--auth kubernetes` whoever
/// the Kubernetes API says may.
pub struct Gate {
    pub tokens: Option<Tokens>,
    pub review: Option<Review>,
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

/// Refuses a `/v1` request without a valid bearer token, or whose user may not do it.
pub async fn require(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") && req.uri().path() != "/v1" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = presented else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (Authorization: Bearer <token>)".into(),
        );
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if gate.tokens.as_ref().is_some_and(|t| t.admits(&digest)) {
        return next.run(req).await;
    }
    let Some(review) = &gate.review else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not valid".into(),
        );
    };
    let verb = match *req.method() {
        Method::GET | Method::HEAD => "get",
        Method::DELETE => "delete",
        _ => "create",
    };
    match review.check(token, digest, verb).await {
        Verdict::Allowed => next.run(req).await,
        Verdict::Unauthenticated => refuse(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not valid (the Kubernetes API does not know it)".into(),
        ),
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
