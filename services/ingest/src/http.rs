//! The HTTP API: `PUT /v1/bundles/{name}`, multi-part uploads
//! (`PUT /v1/uploads/{name}/parts/{n}`, then `POST /v1/uploads/{name}/complete?parts=N`),
//! `GET /v1/bundles[/{id}]`, health and metrics.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::json;
use shipperd_bus::BundleRecord;

use crate::{
    Result,
    metrics::{self, METRICS},
    store::{Store, parse_checksum},
};

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/v1/bundles", get(list))
        .route("/v1/bundles/{key}", put(upload).get(show))
        .route("/v1/uploads/{name}/parts/{n}", put(upload_part))
        .route("/v1/uploads/{name}/complete", post(complete))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|| async { metrics::render() }))
        // Bundles are streamed to disk, so no body limit applies here; the store enforces
        // its own (configurable) maximum size.
        .layer(DefaultBodyLimit::disable())
        .with_state(store)
}

fn accepted(status: StatusCode, rec: &BundleRecord) -> Response {
    (
        status,
        Json(json!({
            "id": rec.id,
            "name": rec.name,
            "size": rec.size,
            "status": rec.phase,
        })),
    )
        .into_response()
}

/// `?target=NAME`: the registry target the bundle goes to (default: the default one).
fn target_param(q: &HashMap<String, String>) -> Result<Option<&str>> {
    match q.get("target").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(t)
            if t.len() <= 63
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            Ok(Some(t))
        }
        Some(t) => Err(crate::Error::BadRequest(format!(
            "target {t:?}: names are up to 63 letters, digits and - _ ."
        ))),
    }
}

async fn upload(
    State(store): State<Arc<Store>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response> {
    let expected = q.get("sha256").map(|s| parse_checksum(s)).transpose()?;
    let target = target_param(&q)?;
    if let Some(id) = &expected
        && let Some(rec) = store.known(id).await?
    {
        // Known by its checksum: no need to read (possibly gigabytes of) body again.
        return Ok(accepted(StatusCode::OK, &rec));
    }
    match store
        .receive(&name, body.into_data_stream(), expected.as_deref(), target)
        .await
    {
        Ok(a) if a.created => Ok(accepted(StatusCode::ACCEPTED, &a.record)),
        Ok(a) => Ok(accepted(StatusCode::OK, &a.record)),
        Err(e) => {
            METRICS.uploads_rejected.add(1);
            tracing::warn!(error = %e, name, "upload refused");
            Err(e)
        }
    }
}

async fn upload_part(
    State(store): State<Arc<Store>>,
    Path((name, n)): Path<(String, u32)>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response> {
    let expected = q.get("sha256").map(|s| parse_checksum(s)).transpose()?;
    let part = store
        .receive_part(&name, n, body.into_data_stream(), expected.as_deref())
        .await
        .inspect_err(|e| {
            METRICS.uploads_rejected.add(1);
            tracing::warn!(error = %e, name, n, "part refused");
        })?;
    Ok((StatusCode::CREATED, Json(part)).into_response())
}

async fn complete(
    State(store): State<Arc<Store>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let parts = q
        .get("parts")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| crate::Error::BadPart("give the number of parts: ?parts=N".into()))?;
    let a = store.complete(&name, parts, target_param(&q)?).await?;
    Ok(accepted(
        if a.created {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        },
        &a.record,
    ))
}

async fn list(State(store): State<Arc<Store>>) -> Result<Response> {
    let mut bundles = store.state().list().await?;
    bundles.sort_by(|a, b| b.received_at.cmp(&a.received_at));
    Ok(Json(json!({ "bundles": bundles })).into_response())
}

async fn show(State(store): State<Arc<Store>>, Path(id): Path<String>) -> Result<Response> {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no bundle with id {id:?}") })),
        )
            .into_response()
    };
    let Ok(id) = parse_checksum(&id) else {
        return Ok(not_found());
    };
    Ok(match store.known(&id).await? {
        Some(rec) => Json(rec).into_response(),
        None => not_found(),
    })
}

async fn ready(State(store): State<Arc<Store>>) -> Response {
    if store.bus().is_connected() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS").into_response()
    }
}
