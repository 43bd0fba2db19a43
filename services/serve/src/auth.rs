//! Logging in to `shipperd serve`, as clients log in to any registry.
//!
//! The secret is a token of `--auth-token-file` (one a line, read again when the file
//! changes). A client may present it on every request, as the password of HTTP Basic
//! (any user name) or as a bearer token; or it follows Docker's token flow, which is
//! what the `401` challenge asks for: `WWW-Authenticate: Bearer realm="<scheme>://<host>/token",
//! service="shipperd"`, then `GET /token` with the secret as Basic's password, which
//! answers a short-lived bearer token (`{"token", "access_token", "expires_in",
//! "issued_at"}`) to send instead. Issued tokens are signed with a key made at start
//! (HMAC-SHA256 over their expiry): they need no store, and a restart ends them (the
//! client asks again). Access is all or nothing, the server being read-only, so the
//! `scope` a client asks for is answered whole.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use shipperd_ingest::Tokens;

/// How long an issued token is good for (Docker's registry issues 5-minute tokens too).
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// The path of the token endpoint (outside `/v2/`, where repository names live).
pub(crate) const TOKEN_PATH: &str = "/token";
const SERVICE: &str = "shipperd";
const PREFIX: &str = "sst1.";

pub(crate) struct Auth {
    tokens: Tokens,
    key: [u8; 32],
}

/// What a request presents.
enum Presented {
    /// Basic's password, or a bearer token.
    Secret(String),
    Bearer(String),
}

fn presented(headers: &HeaderMap) -> Option<Presented> {
    use base64::Engine as _;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Presented::Bearer(rest.trim().to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (_, password) = text.split_once(':')?;
        return Some(Presented::Secret(password.to_string()));
    }
    None
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Auth {
    pub(crate) fn new(tokens: Tokens) -> Self {
        Auth {
            tokens,
            key: rand::random(),
        }
    }

    fn secret_ok(&self, secret: &str) -> bool {
        self.tokens
            .admits(&Sha256::digest(secret.as_bytes()).into())
    }

    fn mac(&self, expiry: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(PREFIX.as_bytes());
        mac.update(expiry.to_string().as_bytes());
        mac
    }

    /// A token good until `now + TOKEN_LIFETIME`.
    fn issue(&self, now: SystemTime) -> String {
        let expiry = unix(now) + TOKEN_LIFETIME.as_secs();
        let sig = hex::encode(self.mac(expiry).finalize().into_bytes());
        format!("{PREFIX}{expiry}.{sig}")
    }

    /// Was `token` issued here, and is it still good at `now`?
    fn issued(&self, token: &str, now: SystemTime) -> bool {
        let Some((expiry, sig)) = token.strip_prefix(PREFIX).and_then(|t| t.split_once('.')) else {
            return false;
        };
        let (Ok(expiry), Ok(sig)) = (expiry.parse::<u64>(), hex::decode(sig)) else {
            return false;
        };
        // The canonical form only: the signature covers the decimal expiry as written.
        expiry.to_string() == token[PREFIX.len()..].split_once('.').map_or("", |p| p.0)
            && unix(now) < expiry
            && self.mac(expiry).verify_slice(&sig).is_ok()
    }

    /// May this request read?
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        match presented(headers) {
            Some(Presented::Secret(s)) => self.secret_ok(&s),
            Some(Presented::Bearer(t)) => self.issued(&t, SystemTime::now()) || self.secret_ok(&t),
            None => false,
        }
    }

    /// `GET /token`: a bearer token for a client presenting the secret (never for one
    /// presenting an issued token: a token taken cannot be renewed).
    pub(crate) fn token(&self, headers: &HeaderMap) -> Option<serde_json::Value> {
        let secret = match presented(headers)? {
            Presented::Secret(s) | Presented::Bearer(s) => s,
        };
        if !self.secret_ok(&secret) {
            return None;
        }
        let now = SystemTime::now();
        let token = self.issue(now);
        Some(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME.as_secs(),
            "issued_at": humantime::format_rfc3339_seconds(now).to_string(),
        }))
    }

    /// The challenge of a `401` on `/v2/`: Docker's token flow, its realm at the host
    /// the client asked for; Basic when that host is not a plain host name.
    pub(crate) fn challenge(
        &self,
        headers: &HeaderMap,
        authority: Option<&str>,
        tls: bool,
    ) -> HeaderValue {
        let host = authority
            .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            });
        let value = match host {
            Some(h) => format!(
                r#"Bearer realm="{}://{h}{TOKEN_PATH}",service="{SERVICE}""#,
                if tls { "https" } else { "http" }
            ),
            None => format!(r#"Basic realm="{SERVICE}""#),
        };
        HeaderValue::from_str(&value).expect("checked characters only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "s3cret\n").unwrap();
        let a = Auth::new(Tokens::new(f));
        assert!(a.secret_ok("s3cret"));
        a
    }

    #[test]
    fn issued_tokens_expire_and_cannot_be_forged() {
        let a = auth();
        let now = SystemTime::now();
        let t = a.issue(now);
        assert!(a.issued(&t, now));
        assert!(!a.issued(&t, now + TOKEN_LIFETIME), "expired");
        // Another expiry under the same signature.
        let (_, sig) = t[PREFIX.len()..].split_once('.').unwrap();
        let later = unix(now) + 10 * TOKEN_LIFETIME.as_secs();
        assert!(!a.issued(&format!("{PREFIX}{later}.{sig}"), now));
        let expiry = unix(now) + TOKEN_LIFETIME.as_secs();
        assert!(
            !a.issued(&format!("{PREFIX}0{expiry}.{sig}"), now),
            "not canonical"
        );
        // Another server's key.
        let b = auth();
        assert!(!b.issued(&t, now));
        assert!(!a.issued("sst1.", now) && !a.issued("nonsense", now));
    }

    #[test]
    fn the_challenge_names_a_plain_host_only() {
        let a = auth();
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("mirror.example:8443"),
        );
        assert_eq!(
            a.challenge(&h, None, true),
            r#"Bearer realm="https://mirror.example:8443/token",service="shipperd""#
        );
        h.insert(header::HOST, HeaderValue::from_static("evil\"x"));
        assert_eq!(a.challenge(&h, None, false), r#"Basic realm="shipperd""#);
    }
}
