//! A fake Kubernetes API server on loopback for a whole `shipperd operator` process (the
//! real one cannot be had here): every list is empty, every watch stays open with
//! nothing to say, Events are taken, and Leases are kept (get, create, replace with
//! `resourceVersion` checks), so leader election runs as against a real server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// What the fake server holds and saw.
#[derive(Default)]
pub struct Api {
    /// Leases by `namespace/name`.
    pub leases: BTreeMap<String, Value>,
    pub requests: Vec<String>,
    /// `Bundle`s every list of bundles returns (patches are answered with them).
    pub bundles: Vec<Value>,
    version: u64,
}

impl Api {
    /// The holder of lease `namespace/name`, if it has one.
    pub fn lease_holder(&self, key: &str) -> Option<String> {
        self.leases.get(key)?["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    }
}

fn status(code: u16, reason: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": reason, "code": code, "message": reason}),
        ),
    )
        .into_response()
}

async fn answer(State(api): State<Arc<Mutex<Api>>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{query}"));
    if query.contains("watch=true") || query.contains("watch=1") {
        // Open, and nothing happens.
        return Response::new(Body::from_stream(futures::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >()));
    }
    // /apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]
    if let Some(rest) = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/") {
        let mut parts = rest.split('/');
        let (ns, _, name) = (parts.next(), parts.next(), parts.next());
        let mut api = api.lock().unwrap();
        let key = format!("{}/{}", ns.unwrap_or(""), name.unwrap_or(""));
        return match (method, name) {
            (Method::GET, Some(_)) => match api.leases.get(&key) {
                Some(l) => axum::Json(l.clone()).into_response(),
                None => status(404, "NotFound"),
            },
            (Method::POST, None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                let key = format!("{}/{name}", ns.unwrap_or(""));
                if api.leases.contains_key(&key) {
                    return status(409, "AlreadyExists");
                }
                api.version += 1;
                let mut l = body;
                l["metadata"]["resourceVersion"] = json!(api.version.to_string());
                l["metadata"]["namespace"] = json!(ns);
                api.leases.insert(key, l.clone());
                (StatusCode::CREATED, axum::Json(l)).into_response()
            }
            (Method::PUT, Some(_)) => {
                let held = api
                    .leases
                    .get(&key)
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if held != Some(body["metadata"]["resourceVersion"].clone()) {
                    return status(409, "Conflict");
                }
                api.version += 1;
                let mut l = body;
                l["metadata"]["resourceVersion"] = json!(api.version.to_string());
                api.leases.insert(key, l.clone());
                axum::Json(l).into_response()
            }
            _ => status(405, "MethodNotAllowed"),
        };
    }
    let api = api.lock().unwrap();
    if path.contains("/bundles") {
        let named = path
            .rsplit('/')
            .find(|p| *p != "status")
            .unwrap_or_default();
        let one = api.bundles.iter().find(|b| b["metadata"]["name"] == named);
        match (&method, one) {
            (&Method::GET, None) if path.ends_with("/bundles") => {
                return axum::Json(json!({
                    "apiVersion": "shipperd.io/v1alpha1", "kind": "BundleList",
                    "metadata": {"resourceVersion": "1"}, "items": api.bundles
                }))
                .into_response();
            }
            (_, Some(b)) => return axum::Json(b.clone()).into_response(),
            _ => {}
        }
    }
    match method {
        Method::GET => axum::Json(json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": "1"}, "items": []
        }))
        .into_response(),
        Method::POST => (StatusCode::CREATED, axum::Json(body)).into_response(),
        _ => status(404, "NotFound"),
    }
}

/// Starts the server; its URL, what it holds, and a kubeconfig file for it in `dir`.
pub async fn start(
    dir: &std::path::Path,
) -> anyhow::Result<(String, Arc<Mutex<Api>>, std::path::PathBuf)> {
    let api = Arc::new(Mutex::new(Api::default()));
    let app = Router::new().fallback(answer).with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: shipperd\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
        ),
    )?;
    Ok((url, api, kubeconfig))
}
