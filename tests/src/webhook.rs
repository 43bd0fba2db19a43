//! A webhook receiver for tests: records every delivery; can refuse the first N with 503.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub timestamp: String,
    pub signature: Option<String>,
    pub content_type: String,
    /// The `traceparent` HTTP header.
    pub traceparent: Option<String>,
    pub body: Vec<u8>,
    pub event: Value,
}

impl Delivery {
    pub fn event_type(&self) -> &str {
        self.event["type"].as_str().unwrap_or_default()
    }

    /// Checks the Standard Webhooks signature with `key`, computed here independently.
    pub fn signed_with(&self, key: &[u8]) -> bool {
        let Some(sig) = &self.signature else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{}.{}.", self.id, self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        sig.split(' ').any(|s| s == expected)
    }
}

#[derive(Default)]
struct Shared {
    deliveries: Mutex<Vec<Delivery>>,
    refuse: AtomicUsize,
}

pub struct WebhookSink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if s.refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.deliveries.lock().unwrap().push(Delivery {
        id: h("webhook-id").unwrap_or_default(),
        timestamp: h("webhook-timestamp").unwrap_or_default(),
        signature: h("webhook-signature"),
        content_type: h("content-type").unwrap_or_default(),
        traceparent: h("traceparent"),
        body: body.to_vec(),
        event,
    });
    StatusCode::NO_CONTENT
}

impl WebhookSink {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(0).await
    }

    /// Listens on 127.0.0.1:`port`.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(WebhookSink { addr, shared, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answers the next `n` deliveries with 503.
    pub fn refuse_next(&self, n: usize) {
        self.shared.refuse.store(n, Ordering::SeqCst);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().unwrap().clone()
    }

    /// The deliveries after the first `seen` (without copying those).
    pub fn deliveries_since(&self, seen: usize) -> Vec<Delivery> {
        let all = self.shared.deliveries.lock().unwrap();
        all.get(seen..)
            .map(<[Delivery]>::to_vec)
            .unwrap_or_default()
    }

    pub fn of_type(&self, ty: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.event_type() == ty)
            .collect()
    }
}
