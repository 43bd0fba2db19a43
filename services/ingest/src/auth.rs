//! Bearer tokens on every `/v1` route (health, readiness and metrics stay open): the
//! tokens are the lines of `--auth-token-file`, read again when the file changes;
//! compared in constant time (as SHA-256 digests, so their lengths leak nothing either);
//! never logged. A request without a known token is answered 401 with
//! `WWW-Authenticate` before its body is read, so nothing of it is stored.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest as _, Sha256};

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

    /// Is `presented` one of the tokens?
    pub fn admits(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every token compared, each in constant time.
        self.current().iter().fold(false, |found, t| {
            let diff = t
                .iter()
                .zip(d.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (diff == 0)
        })
    }
}

/// Refuses a `/v1` request without a known bearer token.
pub async fn require(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") && req.uri().path() != "/v1" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if tokens.admits(t) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, r#"Bearer realm="shipperd""#)],
            axum::Json(serde_json::json!({
                "error": "a bearer token is required (Authorization: Bearer <token>)"
            })),
        )
            .into_response(),
    }
}
