//! A registry token service (the docker token auth flow) on loopback: checks basic
//! credentials, and answers a JWT (ES256, the signing certificate in `x5c`) granting
//! what each `scope` asks. docker-registry verifies it against the certificate.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Json,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::pki::SigningCert;

pub const SERVICE: &str = "shipperd-test-registry";
pub const ISSUER: &str = "shipperd-test-issuer";

struct Inner {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    user: String,
    password: String,
    issued: AtomicU64,
    refused: AtomicU64,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub cert_pem: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl TokenServer {
    pub async fn start(user: &str, password: &str, cert: SigningCert) -> anyhow::Result<Self> {
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &cert.pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
        let inner = Arc::new(Inner {
            key,
            cert_der: cert.cert_der,
            user: user.into(),
            password: password.into(),
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TokenServer {
            addr,
            cert_pem: cert.cert_pem,
            inner,
            task,
        })
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The registry options that make it trust this service.
    pub fn registry_auth(&self) -> (String, String, String, String) {
        (
            self.realm(),
            SERVICE.into(),
            ISSUER.into(),
            self.cert_pem.clone(),
        )
    }

    /// Tokens issued and requests refused so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.issued.load(Ordering::Relaxed),
            self.inner.refused.load(Ordering::Relaxed),
        )
    }

    /// A token granting pull on `repos` (for the test's own checks).
    pub fn token_for(&self, repos: &[&str]) -> String {
        let access: Vec<_> = repos
            .iter()
            .map(|r| serde_json::json!({"type": "repository", "name": r, "actions": ["pull"]}))
            .collect();
        self.inner.sign("checker", access)
    }
}

impl Inner {
    fn sign(&self, sub: &str, access: Vec<serde_json::Value>) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT", "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": sub, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": uuid_like(now), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .expect("signing works");
        format!("{signing_input}.{}", b64(sig.as_ref()))
    }
}

fn uuid_like(now: u64) -> String {
    format!("{now:x}-{:x}", rand::random::<u64>())
}

async fn token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let creds = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    if creds.as_deref() != Some(&format!("{}:{}", inner.user, inner.password)) {
        inner.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    let mut access: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &q {
        // scope=repository:demo/app:pull,push
        if k == "scope"
            && let Some(rest) = v.strip_prefix("repository:")
            && let Some((name, actions)) = rest.rsplit_once(':')
        {
            access
                .entry(name.to_string())
                .or_default()
                .extend(actions.split(',').map(str::to_string));
        }
    }
    let access = access
        .into_iter()
        .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
        .collect();
    let t = inner.sign(&inner.user, access);
    inner.issued.fetch_add(1, Ordering::Relaxed);
    Json(serde_json::json!({"token": t, "access_token": t, "expires_in": 300})).into_response()
}
