//! A fake Kubernetes API (the real one cannot be had here) for `--auth kubernetes`: its
//! TokenReview knows two tokens, alice's and bob's, and its SubjectAccessReview lets
//! alice create and get bundles in namespace `mirror`.

use std::sync::{Arc, Mutex};

use axum::{Json, Router, extract::State, routing::post};
use serde_json::{Value, json};

#[derive(Default)]
pub struct Seen {
    pub token_reviews: usize,
    pub access_reviews: Vec<Value>,
}

pub async fn start() -> anyhow::Result<(String, Arc<Mutex<Seen>>)> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(
                |State(s): State<Arc<Mutex<Seen>>>, Json(review): Json<Value>| async move {
                    s.lock().unwrap().token_reviews += 1;
                    let user = match review["spec"]["token"].as_str() {
                        Some("alice-token") => Some("alice"),
                        Some("bob-token") => Some("bob"),
                        _ => None,
                    };
                    let status = match user {
                        Some(u) => json!({
                            "authenticated": true,
                            "user": {"username": u, "uid": format!("uid-{u}"), "groups": ["system:authenticated"]}
                        }),
                        None => json!({"authenticated": false}),
                    };
                    Json(json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "metadata": {},
                        "spec": review["spec"],
                        "status": status,
                    }))
                },
            ),
        )
        .route(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            post(
                |State(s): State<Arc<Mutex<Seen>>>, Json(review): Json<Value>| async move {
                    let spec = review["spec"].clone();
                    s.lock().unwrap().access_reviews.push(spec.clone());
                    let r = &spec["resourceAttributes"];
                    let allowed = spec["user"] == "alice"
                        && r["namespace"] == "mirror"
                        && r["group"] == "shipperd.io"
                        && r["resource"] == "bundles"
                        && (r["verb"] == "create" || r["verb"] == "get");
                    Json(json!({
                        "apiVersion": "authorization.k8s.io/v1",
                        "kind": "SubjectAccessReview",
                        "metadata": {},
                        "spec": spec,
                        "status": {"allowed": allowed},
                    }))
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, seen))
}
