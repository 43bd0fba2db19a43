//! Logging in to `shipperd serve`, as clients log in to any registry.
//!
//! The secret is a token of `--auth-token-file` (one a line, read again when the file
//! changes; any user name), or a user's password of `--htpasswd` (bcrypt lines, as
//! `htpasswd -B` writes them and docker-registry reads them; read again when the file
//! changes). A client may present it on every request, as HTTP Basic (a token may also
//! be a bearer token); or it follows Docker's token flow, which is what the `401`
//! challenge asks for: `WWW-Authenticate: Bearer realm="<scheme>://<host>/token",
//! service="shipperd"`, then `GET /token` with the secret as Basic's password, which
//! answers a short-lived bearer token (`{"token", "access_token", "expires_in",
//! "issued_at"}`) to send instead. A bcrypt check is slow on purpose: at most two run at
//! once (on blocking threads), and a login that passed is remembered for the lifetime
//! of a token, by a hash of it. Issued tokens are signed with a key made at start
//! (HMAC-SHA256 over their expiry): they need no store, and a restart ends them (the
//! client asks again). Access is all or nothing, the server being read-only, so the
//! `scope` a client asks for is answered whole.
//!
//! A flood of bad passwords cannot hold up others' logins: an address may have one
//! bcrypt check running or waiting at a time, at most [`MAX_WAITING`] wait in all, and an
//! address with 20 failed logins in a minute is refused until the minute is over: each
//! answered `429` with `Retry-After`, before any check. The challenge's realm is the
//! `--advertise` URL when one is given (else the host the client asked for).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::http::{HeaderMap, HeaderValue, header};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use shipperd_listener::{Failures, Tokens};

/// How long an issued token is good for (Docker's registry issues 5-minute tokens too).
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// The path of the token endpoint (outside `/v2/`, where repository names live).
pub(crate) const TOKEN_PATH: &str = "/token";
const SERVICE: &str = "shipperd";
const PREFIX: &str = "sst1.";

pub(crate) struct Auth {
    tokens: Option<Tokens>,
    htpasswd: Option<Htpasswd>,
    key: [u8; 32],
    /// Where clients reach the server (`--advertise`): the challenge's realm.
    advertise: Option<String>,
}

/// What a login comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admitted,
    Refused,
    /// Not looked at: too many failed logins from this address, or checks waiting; try
    /// again after this long.
    Busy(Duration),
}

/// bcrypt checks waiting for their turn, from every address.
pub(crate) const MAX_WAITING: usize = 16;

/// What a request presents.
enum Presented {
    Basic { user: String, password: String },
    Bearer(String),
}

/// bcrypt checks running at once.
const CHECKS_AT_ONCE: usize = 2;

/// One address's place in the queue of bcrypt checks: let go when dropped.
struct Turn {
    queued: Arc<Mutex<HashSet<IpAddr>>>,
    from: IpAddr,
}

impl Turn {
    /// A place for `from`, unless it has one already or the queue is full.
    fn take(queued: &Arc<Mutex<HashSet<IpAddr>>>, from: IpAddr) -> Option<Self> {
        let mut q = queued.lock().unwrap_or_else(|p| p.into_inner());
        // One place per address; at most the checks running and those waiting in all.
        if q.len() >= CHECKS_AT_ONCE + MAX_WAITING || !q.insert(from) {
            return None;
        }
        Some(Turn {
            queued: queued.clone(),
            from,
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        q.remove(&self.from);
    }
}

/// Largest htpasswd file read.
const MAX_HTPASSWD_BYTES: u64 = 1 << 20;
/// Logins remembered at most (then forgotten all at once).
const MAX_REMEMBERED: usize = 1024;

/// A file's length and modification time, `None` when it cannot be looked at.
type Stamp = Option<(u64, SystemTime)>;

/// `--htpasswd`: users and their bcrypt hashes.
struct Htpasswd {
    path: PathBuf,
    /// The file's stamp when it was last read (`None`: never), and its users.
    users: Mutex<(Option<Stamp>, HashMap<String, String>)>,
    /// Logins that passed lately: SHA-256 of user and password → good until.
    passed: Mutex<HashMap<[u8; 32], Instant>>,
    /// bcrypt checks at once.
    permits: tokio::sync::Semaphore,
    /// Addresses with a check running or waiting.
    queued: Arc<Mutex<HashSet<IpAddr>>>,
    /// Failed logins per address.
    failures: Failures,
    /// Checked for an unknown user, so it costs what a known one does.
    decoy: String,
}

impl Htpasswd {
    fn new(path: PathBuf) -> Self {
        let h = Htpasswd {
            path,
            users: Mutex::new((None, HashMap::new())),
            passed: Mutex::new(HashMap::new()),
            permits: tokio::sync::Semaphore::new(CHECKS_AT_ONCE),
            queued: Arc::default(),
            failures: Failures::default(),
            decoy: bcrypt::hash(rand::random::<u64>().to_string(), 10).expect("bcrypt hashes"),
        };
        h.reload();
        h
    }

    /// Reads the file again when it changed. An unreadable file admits no one.
    fn reload(&self) {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        // Read again only when it changed (an unreadable file is looked at again, and
        // warned about, only once it changes too).
        if users.0 == Some(stamp) {
            return;
        }
        let mut found = HashMap::new();
        match read_bounded(&self.path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    match line.split_once(':') {
                        Some((user, hash))
                            if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) =>
                        {
                            found.insert(user.to_string(), hash.to_string());
                        }
                        _ => tracing::warn!(
                            file = %self.path.display(),
                            line = n + 1,
                            "not a user with a bcrypt hash (htpasswd -B); that line admits no one"
                        ),
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, file = %self.path.display(), "cannot read the htpasswd file; it admits no one")
            }
        }
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *users = (Some(stamp), found);
    }

    async fn admits(&self, user: &str, password: &str, from: IpAddr) -> Verdict {
        self.reload();
        let mut key = Sha256::new();
        key.update(user.as_bytes());
        key.update([0]);
        key.update(password.as_bytes());
        let key: [u8; 32] = key.finalize().into();
        let now = Instant::now();
        if self
            .passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return Verdict::Admitted;
        }
        if let Some(wait) = self.failures.blocked(from) {
            return Verdict::Busy(wait);
        }
        let Some(_turn) = Turn::take(&self.queued, from) else {
            return Verdict::Busy(Duration::from_secs(1));
        };
        let (read_at, known) = {
            let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            (users.0, users.1.get(user).cloned())
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return Verdict::Refused;
        };
        let hash = known.clone().unwrap_or_else(|| self.decoy.clone());
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
            && known.is_some();
        if !ok {
            self.failures.failed(from);
            return Verdict::Refused;
        }
        // Remembered only if the file did not change during the check.
        let unchanged = self.users.lock().unwrap_or_else(|p| p.into_inner()).0 == read_at;
        if unchanged {
            let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
            if passed.len() >= MAX_REMEMBERED {
                passed.clear();
            }
            passed.insert(key, now + TOKEN_LIFETIME);
        }
        Verdict::Admitted
    }
}

fn read_bounded(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_HTPASSWD_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
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
        let (user, password) = text.split_once(':')?;
        return Some(Presented::Basic {
            user: user.to_string(),
            password: password.to_string(),
        });
    }
    None
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Auth {
    /// `None` when neither file is given: the registry is open. `advertise`: where
    /// clients reach the server (`https://mirror.example:5000`, or `host[:port]`).
    pub(crate) fn new(
        tokens: Option<PathBuf>,
        htpasswd: Option<PathBuf>,
        advertise: Option<String>,
    ) -> Option<Self> {
        if tokens.is_none() && htpasswd.is_none() {
            return None;
        }
        Some(Auth {
            tokens: tokens.map(Tokens::new),
            htpasswd: htpasswd.map(Htpasswd::new),
            key: rand::random(),
            advertise,
        })
    }

    /// A token of the token file?
    fn secret_ok(&self, secret: &str) -> bool {
        self.tokens.as_ref().is_some_and(|t| {
            t.admits(&Sha256::digest(secret.as_bytes()).into())
                .is_some()
        })
    }

    /// A login with a user name and a password, from `from`: a token (any user), or a
    /// user of the htpasswd file.
    async fn login(&self, user: &str, password: &str, from: IpAddr) -> Verdict {
        if self.secret_ok(password) {
            return Verdict::Admitted;
        }
        match &self.htpasswd {
            Some(h) => h.admits(user, password, from).await,
            None => Verdict::Refused,
        }
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

    /// May this request (from `from`) read?
    pub(crate) async fn admits(&self, headers: &HeaderMap, from: IpAddr) -> Verdict {
        let yes = |b: bool| {
            if b {
                Verdict::Admitted
            } else {
                Verdict::Refused
            }
        };
        match presented(headers) {
            Some(Presented::Basic { user, password }) => self.login(&user, &password, from).await,
            Some(Presented::Bearer(t)) => {
                yes(self.issued(&t, SystemTime::now()) || self.secret_ok(&t))
            }
            None => Verdict::Refused,
        }
    }

    /// `GET /token`: a bearer token for a client presenting the secret (never for one
    /// presenting an issued token: a token taken cannot be renewed).
    pub(crate) async fn token(
        &self,
        headers: &HeaderMap,
        from: IpAddr,
    ) -> Result<serde_json::Value, Verdict> {
        let verdict = match presented(headers) {
            Some(Presented::Basic { user, password }) => self.login(&user, &password, from).await,
            Some(Presented::Bearer(t)) if self.secret_ok(&t) => Verdict::Admitted,
            _ => Verdict::Refused,
        };
        if verdict != Verdict::Admitted {
            return Err(verdict);
        }
        let now = SystemTime::now();
        let token = self.issue(now);
        Ok(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME.as_secs(),
            "issued_at": humantime::format_rfc3339_seconds(now).to_string(),
        }))
    }

    /// The challenge of a `401` on `/v2/`: Docker's token flow, its realm at the
    /// `--advertise` URL, else at the host the client asked for; Basic when that host is
    /// not a plain host name.
    pub(crate) fn challenge(
        &self,
        headers: &HeaderMap,
        authority: Option<&str>,
        tls: bool,
    ) -> HeaderValue {
        if let Some(a) = &self.advertise {
            let base = if a.contains("://") {
                a.trim_end_matches('/').to_string()
            } else {
                format!("{}://{a}", if tls { "https" } else { "http" })
            };
            if let Ok(v) = HeaderValue::from_str(&format!(
                r#"Bearer realm="{base}{TOKEN_PATH}",service="{SERVICE}""#
            )) {
                return v;
            }
        }
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
        let a = Auth::new(Some(f), None, None).unwrap();
        assert!(a.secret_ok("s3cret"));
        a
    }

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn htpasswd_users_log_in_with_their_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw1", 4).unwrap();
        std::fs::write(&f, format!("# users\nalice:{hash}\nbob:{{SHA}}x\n")).unwrap();
        let a = Auth::new(None, Some(f.clone()), None).unwrap();
        let ok = |user: &'static str, pw: &'static str| {
            let a = &a;
            async move { a.login(user, pw, HERE).await == Verdict::Admitted }
        };
        assert!(ok("alice", "pw1").await);
        assert!(ok("alice", "pw1").await, "remembered");
        assert!(!ok("alice", "pw2").await);
        assert!(!ok("bob", "x").await, "not bcrypt: no one");
        assert!(!ok("carol", "pw1").await);
        assert!(!a.secret_ok("pw1"), "a password is no token");
        // Alice removed: the remembered login goes with the old file.
        std::fs::write(&f, format!("carol:{}\n", bcrypt::hash("pw3", 4).unwrap())).unwrap();
        assert!(!ok("alice", "pw1").await);
        assert!(ok("carol", "pw3").await);
        assert!(Auth::new(None, None, None).is_none());
        // An address that keeps failing waits, before any check; others do not.
        for _ in 0..shipperd_listener::MAX_FAILURES {
            a.login("carol", "wrong", HERE).await;
        }
        assert!(matches!(
            a.login("carol", "wrong", HERE).await,
            Verdict::Busy(_)
        ));
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(a.login("carol", "pw3", other).await, Verdict::Admitted);
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
        // With --advertise, the client's Host says nothing.
        let mut b = auth();
        b.advertise = Some("https://bastion.example:5000/".into());
        assert_eq!(
            b.challenge(&h, None, false),
            r#"Bearer realm="https://bastion.example:5000/token",service="shipperd""#
        );
        b.advertise = Some("bastion.example:5000".into());
        assert_eq!(
            b.challenge(&h, None, true),
            r#"Bearer realm="https://bastion.example:5000/token",service="shipperd""#
        );
    }
}
