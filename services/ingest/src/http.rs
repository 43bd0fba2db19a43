//! The HTTP API: `PUT /v1/bundles/{name}`, multi-part uploads
//! (`PUT /v1/uploads/{name}/parts/{n}`, then `POST /v1/uploads/{name}/complete?parts=N`),
//! `GET /v1/bundles[/{id}[/images]]` (paged), `POST /v1/bundles/{id}/retry`,
//! `DELETE /v1/bundles/{id}`, health and metrics.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::json;
use shipperd_model::{BundleId, BundleSummary, ImagePhase, TargetName};
use tokio_util::sync::CancellationToken;

use shipperd_listener::{Bounds, Caller, Paced, PacedError};
use shipperd_store::{
    Origin, Store, UploadId, ops,
    ops::{MAX_PAGE, PAGE},
    parse_checksum,
};

use crate::{
    Error, Result,
    metrics::{self, metrics},
    views,
};

/// Which namespace uploads through this API act in: with `--auth kubernetes`, the one
/// whose rights on bundles are checked; only that namespace's `RegistryTarget`s
/// (`<namespace>/<name>`) may be named by `?target=` (cluster targets always may).
#[derive(Debug, Clone, Default)]
pub struct Uploads {
    pub namespace: Option<String>,
    /// The pace a body must keep (the listener's bounds).
    pub bounds: Bounds,
    /// The registry targets, where this process knows them (`shipperd all`): the
    /// inventory is checked against its registry.
    pub targets: Option<shipperd_registry_targets::LiveTargets>,
}

/// The API; `shutdown` also ends the gRPC watches (they would hold the drain open).
pub fn router(store: Arc<Store>, uploads: Uploads, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/v1/bundles", get(list))
        .route("/v1/bundles/{key}", put(upload).get(show).delete(delete))
        .route("/v1/bundles/{id}/images", get(images))
        .route("/v1/bundles/{id}/retry", post(retry))
        .route("/v1/bundles/{id}/check", post(check))
        .route("/v1/uploads/{name}/parts/{n}", put(upload_part))
        .route("/v1/uploads/{name}/complete", post(complete))
        .route("/v1/inventory", get(inventory))
        // The gRPC API (HTTP/2) beside the JSON one.
        .route_service(
            &format!("{}{{*method}}", crate::grpc::PATH),
            crate::grpc::service(store.clone(), shutdown),
        )
        // Bundles are streamed to disk, so no body limit applies here; the store enforces
        // its own (configurable) maximum size.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::Extension(Arc::new(uploads)))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(store.clone())
        .merge(probes(store))
        .merge(crate::ui::router())
}

/// A request body that must keep the listener's pace; what breaks it is the store's
/// to say (a slow body is cut with 408, a broken one is incomplete).
fn paced(body: Body, bounds: &Bounds) -> impl futures::Stream<Item = Result<bytes::Bytes>> + Unpin {
    use futures::StreamExt as _;
    Paced::new(body.into_data_stream(), bounds).map(|r| {
        r.map_err(|e| match e {
            PacedError::TooSlow(why) => Error::TooSlow(why),
            PacedError::Broken(why) => Error::Stream(why),
        })
    })
}

/// Each API request in a span of its own, continuing the caller's trace when it sends a
/// `traceparent`: a bundle uploaded by a traced client is one trace with its upload.
async fn trace_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let span = tracing::info_span!("http", method = %req.method(), path = %req.uri().path());
    {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        shipperd_bus::trace::set_parent_from(&span, header("traceparent"), header("tracestate"));
    }
    next.run(req).instrument(span).await
}

/// Liveness, readiness and metrics: open (no token), on the API's port and, with
/// `--health-listen`, on a port of their own, so probes are answered whatever the
/// API's clients do.
pub fn probes(store: Arc<Store>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics::serve))
        .with_state(store)
}

fn accepted(status: StatusCode, s: &BundleSummary) -> Response {
    (
        status,
        Json(json!({
            "id": s.id,
            "name": s.name,
            "size": s.size,
            "status": s.phase,
        })),
    )
        .into_response()
}

/// `?target=NAME`: the registry target the bundle goes to (default: the default one).
/// A namespaced target (`<namespace>/<name>`) only when uploads act in that namespace.
fn target_param(q: &HashMap<String, String>, uploads: &Uploads) -> Result<Option<TargetName>> {
    let target = match q.get("target").map(String::as_str) {
        None | Some("") => return Ok(None),
        Some(t) => TargetName::parse(t).map_err(|e| Error::BadRequest(e.to_string()))?,
    };
    if let (Some(ns), Some(own)) = (target.namespace(), &uploads.namespace)
        && ns != own
    {
        return Err(Error::Forbidden(format!(
            "target {target} belongs to namespace {ns}; uploads here act in namespace {own}: \
             name one of its targets or a cluster target"
        )));
    }
    Ok(Some(target))
}

/// A bundle id in a path; anything else names no bundle.
fn bundle_id(s: &str) -> Result<BundleId> {
    BundleId::from_checksum(s).map_err(|_| Error::NotFound(s.to_string()))
}

/// The number `?key=` gives, or `default`.
fn number(q: &HashMap<String, String>, key: &str, default: u32) -> Result<u32> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Error::BadRequest(format!("{key}={v:?}: expected a number"))),
    }
}

/// `?offset=&limit=`.
fn paging(q: &HashMap<String, String>) -> Result<(u32, u32)> {
    Ok((
        number(q, "offset", 0)?,
        number(q, "limit", PAGE)?.clamp(1, MAX_PAGE),
    ))
}

/// The body's length, if the client declared it.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Who sent the request (see [`Caller`]); anonymous when the API asks for no token.
fn uploader(caller: Option<&axum::Extension<Caller>>) -> &str {
    caller.map_or(shipperd_model::ANONYMOUS, |c| c.0.0.as_str())
}

async fn upload(
    State(store): State<Arc<Store>>,
    axum::Extension(uploads): axum::Extension<Arc<Uploads>>,
    caller: Option<axum::Extension<Caller>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let expected = q.get("sha256").map(|s| parse_checksum(s)).transpose()?;
    let target = target_param(&q, &uploads)?;
    if let Some(id) = &expected
        && let Some(s) = store.known(id).await?
        && s.expired_at.is_none()
        && !s.deleting
    {
        // Known by its checksum: no need to read (possibly gigabytes of) body again.
        return Ok(accepted(StatusCode::OK, &s));
    }
    match store
        .receive(
            &name,
            paced(body, &uploads.bounds),
            content_length(&headers),
            expected.as_ref(),
            &Origin::upload(target.as_ref(), uploader(caller.as_ref())),
        )
        .await
    {
        Ok(a) if a.created => Ok(accepted(StatusCode::ACCEPTED, &a.summary)),
        Ok(a) => Ok(accepted(StatusCode::OK, &a.summary)),
        Err(e) => {
            metrics().uploads_rejected.inc();
            tracing::warn!(error = %e, name, "upload refused");
            Err(e)
        }
    }
}

async fn upload_part(
    State(store): State<Arc<Store>>,
    axum::Extension(uploads): axum::Extension<Arc<Uploads>>,
    Path((name, n)): Path<(String, u32)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let expected = q.get("sha256").map(|s| parse_checksum(s)).transpose()?;
    let id = match q.get("upload_id") {
        Some(id) => UploadId::Given(id),
        None => UploadId::Start,
    };
    let part = store
        .receive_part(
            &name,
            n,
            id,
            paced(body, &uploads.bounds),
            content_length(&headers),
            expected.as_ref(),
        )
        .await
        .inspect_err(|e| {
            metrics().uploads_rejected.inc();
            tracing::warn!(error = %e, name, n, "part refused");
        })?;
    Ok((StatusCode::CREATED, Json(part)).into_response())
}

async fn complete(
    State(store): State<Arc<Store>>,
    axum::Extension(uploads): axum::Extension<Arc<Uploads>>,
    caller: Option<axum::Extension<Caller>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let parts = q
        .get("parts")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| crate::Error::BadPart("give the number of parts: ?parts=N".into()))?;
    let upload_id = q.get("upload_id").ok_or_else(|| {
        crate::Error::BadPart(
            "give the upload's id: ?upload_id=ID (returned with its first part)".into(),
        )
    })?;
    let a = store
        .complete(
            &name,
            upload_id,
            parts,
            &Origin::upload(
                target_param(&q, &uploads)?.as_ref(),
                uploader(caller.as_ref()),
            ),
        )
        .await?;
    Ok(accepted(
        if a.created {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        },
        &a.summary,
    ))
}

/// `GET /v1/bundles?offset=&limit=`: newest first.
async fn list(
    State(store): State<Arc<Store>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let (offset, limit) = paging(&q)?;
    let bundles = ops::listed(&store).await?;
    let total = bundles.len();
    let page: Vec<_> = bundles
        .iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(views::summary)
        .collect();
    let end = offset as usize + page.len();
    Ok(Json(json!({
        "bundles": page,
        "total": total,
        "offset": offset,
        "limit": limit,
        "next": (end < total).then_some(end),
    }))
    .into_response())
}

/// `GET /v1/inventory[?target=NAME]`: what ShipperD published to the target (see
/// [`crate::inventory`]), for `shipperd create --have`.
async fn inventory(
    State(store): State<Arc<Store>>,
    axum::Extension(uploads): axum::Extension<Arc<Uploads>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let target = target_param(&q, &uploads)?;
    let all = match q.get("check").map(String::as_str) {
        None | Some("sample") => false,
        Some("all") => true,
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "check={other:?}: sample (the default) or all"
            )));
        }
    };
    let check = uploads
        .targets
        .as_ref()
        .map(|targets| crate::inventory::Check { targets, all });
    let inv = crate::inventory::build(&store, target.as_ref(), check).await?;
    Ok(Json(inv).into_response())
}

async fn summary_of(store: &Store, id: &str) -> Result<BundleSummary> {
    let id = bundle_id(id)?;
    match store.known(&id).await? {
        Some(s) if !s.deleting => Ok(s),
        _ => Err(Error::NotFound(id.to_string())),
    }
}

/// `GET /v1/bundles/{id}[?limit=N]`: the status, and the first page of images (`N`,
/// default 100; 0 for none, e.g. when polling).
async fn show(
    State(store): State<Arc<Store>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let s = summary_of(&store, &id).await?;
    let limit = number(&q, "limit", PAGE)?.min(MAX_PAGE);
    let page = store.state().page(&s, None, 0, limit).await?;
    let mut doc = views::summary(&s);
    doc["images"] = page.images.iter().map(|i| views::image(&s, i)).collect();
    doc["images_next"] = json!(page.next);
    Ok(Json(doc).into_response())
}

/// `GET /v1/bundles/{id}/images?phase=&offset=&limit=`: images in index order from
/// `offset`; `next` is the offset of the following page.
async fn images(
    State(store): State<Arc<Store>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let s = summary_of(&store, &id).await?;
    let (offset, limit) = paging(&q)?;
    let phase = match q.get("phase").map(String::as_str) {
        None | Some("") => None,
        Some(p) => Some(ImagePhase::parse(p).ok_or_else(|| {
            Error::BadRequest(format!(
                "phase={p:?}: expected Pending, Published or Failed"
            ))
        })?),
    };
    let page = store.state().page(&s, phase, offset, limit).await?;
    let total = phase.map_or(s.counts.total, |p| s.counts.of(p));
    Ok(Json(json!({
        "images": page.images.iter().map(|i| views::image(&s, i)).collect::<Vec<_>>(),
        "total": total,
        "offset": offset,
        "limit": limit,
        "next": page.next,
    }))
    .into_response())
}

/// `POST /v1/bundles/{id}/check`: is what the bundle published still in its registry
/// (see [`crate::check`])? 200 with what was found, drift or not.
async fn check(
    State(store): State<Arc<Store>>,
    axum::Extension(uploads): axum::Extension<Arc<Uploads>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = bundle_id(&id)?;
    let Some(targets) = uploads.targets.as_ref() else {
        return Err(Error::BadRequest(
            "this ingest does not know the registry targets (run `shipperd all`, or check \
             from a process that has --targets)"
                .into(),
        ));
    };
    let drift = crate::check::check(&store, targets, &id).await?;
    Ok(Json(drift).into_response())
}

/// `POST /v1/bundles/{id}/retry`.
async fn retry(State(store): State<Arc<Store>>, Path(id): Path<String>) -> Result<Response> {
    let id = bundle_id(&id)?;
    let r = ops::retry(&store, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": r.summary.id,
            "status": r.summary.phase,
            "generation": r.summary.generation,
            "images": r.images,
        })),
    )
        .into_response())
}

/// `DELETE /v1/bundles/{id}[?force=true]`.
async fn delete(
    State(store): State<Arc<Store>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response> {
    let id = bundle_id(&id)?;
    let force = q.get("force").is_some_and(|v| v == "true" || v == "1");
    ops::delete(&store, &id, force).await?;
    Ok(Json(json!({ "id": id, "deleted": true })).into_response())
}

async fn ready(State(store): State<Arc<Store>>) -> Response {
    if store.bus().is_connected() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_name_only_their_own_namespaces_targets() {
        let q = |t: &str| HashMap::from([("target".to_string(), t.to_string())]);
        let here = Uploads {
            namespace: Some("shipperd".into()),
            ..Uploads::default()
        };
        let refused = target_param(&q("team-a/mirror"), &here).unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(
            refused.to_string().contains("namespace team-a"),
            "{refused}"
        );
        let own = target_param(&q("shipperd/mirror"), &here).unwrap().unwrap();
        assert_eq!(own.namespace(), Some("shipperd"));
        assert!(target_param(&q("quay"), &here).unwrap().is_some());
        assert!(target_param(&HashMap::new(), &here).unwrap().is_none());
        // Without Kubernetes authentication (a token file: the admin's), any target.
        assert!(target_param(&q("team-a/mirror"), &Uploads::default()).is_ok());
        assert_eq!(
            target_param(&q("a/b/c"), &here).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
