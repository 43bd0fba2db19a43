//! The `Bundle` reconciler against a fake Kubernetes API server (a `tower_test` mock:
//! no cluster can be had here) and a real ShipperD (nats-server, docker-registry, the
//! services): a `Bundle` from a URL is fetched, published, and its status, conditions
//! and Events are written; deleting it removes its bundle from ShipperD.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use shipperd_model::{BundleId, DataDir};
use shipperd_operator::{
    Bundle,
    bundle::{Context, FINALIZER, adopt, reconcile},
};
use shipperd_store::{FetchSettings, Store};
use shipperd_tests::{
    app::{Options, TestApp, spawn_app},
    fixtures::{named_images, sample, sha256, tar_bytes},
};

/// What the fake API server holds and saw.
#[derive(Default)]
struct Fake {
    bundle: Value,
    events: Vec<Value>,
    requests: Vec<String>,
    /// Objects applied (server-side apply), by path.
    applied: Vec<(String, Value)>,
    /// Answer applies with 403 (an operator without the right to).
    refuse_apply: bool,
    /// ClusterRegistryTargets.
    cluster_targets: Vec<Value>,
    /// Answer the Bundle's own PATCH (the finalizer) with 500.
    fail_patch: bool,
    /// Objects applied and not deleted, by path.
    objects: std::collections::BTreeMap<String, Value>,
    /// Paths deleted.
    deleted: Vec<String>,
    /// Other Bundles the API server holds (reconciled before `bundle`), for reads.
    others: Vec<Value>,
}

/// The kinds the operator applies and lists, by their plural.
const LISTED: [&str; 5] = [
    "configmaps",
    "imagedigestmirrorsets",
    "imagetagmirrorsets",
    "catalogsources",
    "updateservices",
];

/// A fake API server for one `Bundle`: finalizer patches, status patches, Events.
fn fake_api(bundle: Value) -> (kube::Client, Arc<Mutex<Fake>>) {
    let fake = Arc::new(Mutex::new(Fake {
        bundle,
        ..Fake::default()
    }));
    (fake_api_on(fake.clone()), fake)
}

/// A client of the fake API server holding `fake` (several Bundles reconciled one after
/// another share what it holds: set `bundle`, the one before going to `others`).
fn fake_api_on(fake: Arc<Mutex<Fake>>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let f = fake.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut fk = f.lock().unwrap();
            fk.requests.push(format!("{method} {path}"));
            let name = fk.bundle["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let this = format!("/bundles/{name}");
            let status_of_this = format!("/bundles/{name}/status");
            let (status, answer) = match (method.as_str(), path.as_str()) {
                ("POST", p) if p.ends_with("/bundles") => {
                    // A Bundle created by the operator (for an upload).
                    let mut b = body.clone();
                    b["metadata"]["uid"] = json!("uid-created");
                    b["metadata"]["generation"] = json!(1);
                    b["metadata"]["resourceVersion"] = json!("1");
                    b["metadata"]["namespace"] = json!("ns");
                    fk.bundle = b.clone();
                    (201, b)
                }
                ("PATCH", p) if p.ends_with(&this) && fk.fail_patch => (
                    500,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "InternalError", "code": 500,
                           "message": "etcdserver: request timed out"}),
                ),
                ("PATCH", p) if p.ends_with(&this) => {
                    // The finalizer helper's JSON patch: test, then add (or remove).
                    for op in body.as_array().into_iter().flatten() {
                        match op["op"].as_str() {
                            Some("add") | Some("replace") => {
                                fk.bundle["metadata"]["finalizers"] = op["value"].clone()
                            }
                            Some("remove") => fk.bundle["metadata"]["finalizers"] = json!([]),
                            _ => {}
                        }
                    }
                    (200, fk.bundle.clone())
                }
                ("GET", p) if p.contains("/bundles/") => {
                    // A Bundle by namespace and name: this one, or one reconciled before.
                    let mut parts = p.rsplit('/');
                    let (name, ns) = (parts.next().unwrap_or(""), parts.nth(1).unwrap_or(""));
                    match std::iter::once(&fk.bundle)
                        .chain(fk.others.iter())
                        .find(|b| b["metadata"]["name"] == name && b["metadata"]["namespace"] == ns)
                    {
                        Some(b) => (200, b.clone()),
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404, "message": "not found"}),
                        ),
                    }
                }
                ("PATCH", p) if p.ends_with(&status_of_this) => {
                    fk.bundle["status"] = body["status"].clone();
                    (200, fk.bundle.clone())
                }
                ("POST", p) if p.ends_with("/events") => {
                    fk.events.push(body.clone());
                    (201, body)
                }
                ("PATCH", p) if p.contains("/events/") => (200, body),
                ("GET", p) if p.ends_with("/clusterregistrytargets") => (
                    200,
                    json!({"apiVersion": "shipperd.io/v1alpha1", "kind": "ClusterRegistryTargetList",
                           "metadata": {}, "items": fk.cluster_targets}),
                ),
                ("GET", p) if p.contains("/clusterregistrytargets/") => {
                    let name = p.rsplit('/').next().unwrap_or("");
                    match fk
                        .cluster_targets
                        .iter()
                        .find(|t| t["metadata"]["name"] == name)
                    {
                        Some(t) => (200, t.clone()),
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404, "message": "not found"}),
                        ),
                    }
                }
                ("GET", p) if p.ends_with("/registrytargets/internal") => (
                    200,
                    json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "RegistryTarget",
                            "metadata": { "name": "internal", "namespace": "ns" },
                            "spec": { "openshiftInternal": true } }),
                ),
                ("POST", p) if p.ends_with("/projectrequests") => {
                    fk.applied.push((p.to_string(), body.clone()));
                    (201, body)
                }
                ("GET", p) if LISTED.iter().any(|k| p.ends_with(&format!("/{k}"))) => {
                    // A list: what is kept under it (every namespace's, for a cluster-wide
                    // list of a namespaced kind).
                    let plural = p.rsplit('/').next().unwrap_or_default().to_string();
                    let items: Vec<Value> = fk
                        .objects
                        .iter()
                        .filter(|(k, _)| {
                            k.starts_with(&format!("{p}/"))
                                || (!p.contains("/namespaces/")
                                    && k.contains(&format!("/{plural}/"))
                                    && k.starts_with(
                                        p.split(&format!("/{plural}")).next().unwrap_or_default(),
                                    ))
                        })
                        .map(|(_, v)| v.clone())
                        .collect();
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
                    )
                }
                ("DELETE", p) if LISTED.iter().any(|k| p.contains(&format!("/{k}/"))) => {
                    match fk.objects.remove(p) {
                        Some(v) => {
                            fk.deleted.push(p.to_string());
                            (200, v)
                        }
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404, "message": "not found"}),
                        ),
                    }
                }
                ("PATCH", p) if LISTED.iter().any(|k| p.contains(&format!("/{k}/"))) => {
                    if fk.refuse_apply {
                        (
                            403,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "Forbidden", "code": 403,
                                   "message": "configmaps is forbidden"}),
                        )
                    } else {
                        fk.applied.push((p.to_string(), body.clone()));
                        fk.objects.insert(p.to_string(), body.clone());
                        (200, body)
                    }
                }
                _ => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            };
            drop(fk);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "default")
}

async fn context(app: &TestApp, client: kube::Client) -> anyhow::Result<Arc<Context>> {
    let bus = shipperd_bus::Bus::connect(&app.nats.url(), "test-operator").await?;
    let store = Store::open(bus.clone(), &DataDir::new(app.data.path()), 1 << 40).await?;
    let state = shipperd_state::StateStore::open(&bus).await?;
    let mut ctx = Context::new(
        client,
        Arc::new(store),
        state,
        FetchSettings {
            attempts: 3,
            stall_timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(50),
            // The test's file servers are on loopback.
            egress: shipperd_registry_targets::Egress {
                allow: vec!["127.0.0.0/8".parse().unwrap()],
            },
        },
    );
    // Uploads act in namespace `ns`; Bundles of other namespaces follow only what
    // they fetched. The operator runs in `shipperd`.
    ctx.upload_namespace = Some("ns".into());
    ctx.own_namespace = "shipperd".into();
    Ok(Arc::new(ctx))
}

/// A ClusterRegistryTarget as the admin writes it.
fn cluster_target(name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "ClusterRegistryTarget",
            "metadata": { "name": name, "uid": format!("uid-c-{name}"),
                          "generation": 1, "resourceVersion": "1" },
            "spec": spec })
}

/// Reconciles the fake's `Bundle` until `done` holds (a minute at most).
async fn reconcile_until(
    ctx: &Arc<Context>,
    fake: &Arc<Mutex<Fake>>,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let current = fake.lock().unwrap().bundle.clone();
        if done(&current) {
            return Ok(current);
        }
        anyhow::ensure!(Instant::now() < deadline, "not done: {current:#}");
        let b: Bundle = serde_json::from_value(current)?;
        reconcile(Arc::new(b), ctx.clone()).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_from_a_url_is_published_and_its_status_and_events_written() -> anyhow::Result<()>
{
    let app = spawn_app(Options::default()).await?;
    let mut layout = sample("operator", "b1", 1);
    // An operator catalog: a CatalogSource is made for it.
    let fbc = layout.layer(
        &[("configs/index.json", b"{}".to_vec())],
        flate2::Compression::fast(),
    );
    layout.labelled_image(
        json!({ "org.opencontainers.image.ref.name": "example.com/redhat/redhat-operator-index:v4.18" }),
        &[fbc],
        "redhat/redhat-operator-index",
        "v4.18",
        json!({ "operators.operatorframework.io.index.configs.v1": "/configs" }),
    );
    // It carries a release signature where oc-mirror keeps them, and a file that is not
    // one beside it.
    let sig_hex = "ab".repeat(32);
    let mut files = layout.oci_files("");
    files.push((
        format!("working-dir/signatures/4.18.1-x86_64-sha256-{sig_hex}"),
        b"a signature".to_vec(),
    ));
    files.push((
        "working-dir/signatures/README".into(),
        b"not a signature".to_vec(),
    ));
    let bytes = tar_bytes(&files)?;
    let id = sha256(&bytes)[7..].to_string();
    // The file server cuts its first answer half-way; the fetch resumes with Range.
    let served = Arc::new(bytes.clone());
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ranges = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = ranges.clone();
    let files = Router::new().route(
        "/b1.tar",
        get(move |headers: http::HeaderMap| {
            let (b, first, seen) = (served.clone(), first.clone(), seen.clone());
            async move {
                let total = b.len();
                if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    let part = bytes::Bytes::copy_from_slice(&b[..total / 2]);
                    let stream = futures::stream::iter(vec![
                        Ok(part),
                        Err(std::io::Error::other("connection cut")),
                    ]);
                    return Response::builder()
                        .header("content-length", total)
                        .body(axum::body::Body::from_stream(stream))
                        .unwrap();
                }
                let range = headers
                    .get("range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                seen.lock().unwrap().push(range.to_string());
                let from: usize = range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                Response::builder()
                    .status(206)
                    .header(
                        "content-range",
                        format!("bytes {from}-{}/{total}", total - 1),
                    )
                    .body(axum::body::Body::from(b[from..].to_vec()))
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/b1.tar", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, files).await });

    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "b1", "namespace": "ns", "uid": "uid-1", "generation": 1,
                      "resourceVersion": "1" },
        "spec": { "source": { "url": { "url": url, "sha256": id } },
                  "applyClusterResources": true, "tagMirrorSet": true },
    }));
    // The admin's default target (the services know it as `default`) lets its bundles
    // apply cluster resources.
    fake.lock().unwrap().cluster_targets = vec![cluster_target(
        "default",
        json!({ "url": app.registry.url(), "default": true,
                "clusterResources": { "apply": true, "tagMirrorSets": true,
                                      "namespaces": ["ns"] } }),
    )];
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    // Each reconcile is counted (this process's metrics; other tests' add to them).
    let metrics = shipperd_telemetry::metrics::render();
    assert!(
        metrics.contains(r#"shipperd_operator_reconciles_total{kind="Bundle",result="ok"} "#),
        "{metrics}"
    );

    assert_eq!(done["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(
        *ranges.lock().unwrap(),
        [format!("bytes={}-", bytes.len() / 2)]
    );
    let st = &done["status"];
    assert_eq!(st["bundleId"], id);
    assert_eq!(st["observedGeneration"], 1);
    let n = layout.images.len() as u64;
    assert_eq!(st["images"]["published"], n, "{st:#}");
    assert_eq!(st["imagesSummary"], format!("{n}/{n}"));
    assert_eq!(st["progress"], "100%");
    assert_eq!(st["clusterResources"], "b1-cluster-resources");
    let ready = condition(st, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Published"))
    );
    app.assert_published(&layout, "").await?;
    {
        let fk = fake.lock().unwrap();
        let reasons: Vec<&str> = fk
            .events
            .iter()
            .filter_map(|e| e["reason"].as_str())
            .collect();
        assert!(reasons.contains(&"Published"), "{reasons:?}");
        assert!(reasons.contains(&"ClusterResourcesApplied"), "{reasons:?}");
        // The generated resources: in a ConfigMap the Bundle owns and names, and applied.
        let (_, cm) = fk
            .applied
            .iter()
            .find(|(p, _)| p.ends_with("/namespaces/ns/configmaps/b1-cluster-resources"))
            .expect("the ConfigMap");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["name"], "b1");
        let yaml = cm["data"]["cluster-resources.yaml"].as_str().unwrap();
        // Named by tag, with a catalog: oc-mirror's operator ITMS, no IDMS.
        assert!(yaml.contains("name: itms-operator-0"), "{yaml}");
        assert!(!yaml.contains("ImageDigestMirrorSet"), "{yaml}");
        // demo/app, demo/tool and demo/multi landed under the same path: one namespace entry.
        assert!(yaml.contains("- source: example.com/demo\n"), "{yaml}");
        // Cluster-wide: the bundle's contribution, kept where no tenant writes, then the
        // objects oc-mirror would name.
        assert!(
            fk.objects
                .contains_key("/api/v1/namespaces/shipperd/configmaps/shipperd-cluster-uid-1"),
            "{:?}",
            fk.objects.keys()
        );
        let itms = fk
            .objects
            .get("/apis/config.openshift.io/v1/imagetagmirrorsets/itms-operator-0")
            .expect("the ITMS");
        assert_eq!(
            itms["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "shipperd"
        );
        let cs = fk
            .objects
            .get("/apis/operators.coreos.com/v1alpha1/namespaces/openshift-marketplace/catalogsources/cs-redhat-operator-index-v4-18")
            .expect("one catalog");
        assert_eq!(
            cs["spec"]["image"],
            format!("{}/redhat/redhat-operator-index:v4.18", app.registry.host())
        );
        // The release signature, where OpenShift looks for it (as oc-mirror writes it).
        let sigs = fk
            .objects
            .get("/api/v1/namespaces/openshift-config-managed/configmaps/mirrored-release-signatures")
            .expect("the signatures' ConfigMap");
        assert_eq!(
            sigs["metadata"]["labels"]["release.openshift.io/verification-signatures"],
            ""
        );
        {
            use base64::Engine as _;
            let data = sigs["binaryData"].as_object().unwrap();
            assert_eq!(data.len(), 1, "{data:?}");
            let sig = data[&format!("sha256-{sig_hex}-1")].as_str().unwrap();
            assert_eq!(
                base64::engine::general_purpose::STANDARD.decode(sig)?,
                b"a signature"
            );
        }
        assert!(
            fk.events
                .iter()
                .all(|e| e["regarding"]["name"] == "b1" && e["regarding"]["kind"] == "Bundle"),
            "{:#?}",
            fk.events
        );
    }

    // Deleted: ShipperD forgets the bundle (its images stay in the registry).
    fake.lock().unwrap().bundle["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
    let gone = reconcile_until(&ctx, &fake, |b| {
        b["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.is_empty())
    })
    .await?;
    assert!(gone["metadata"]["deletionTimestamp"].is_string());
    assert!(app.bundle(&id).await?.is_none(), "ShipperD still has it");
    {
        // No published bundle needs them now: its contribution and the objects go.
        let fk = fake.lock().unwrap();
        for kind in [
            "configmaps/shipperd-cluster-uid-1",
            "imagetagmirrorsets/itms-operator-0",
            "catalogsources/cs-redhat-operator-index-v4-18",
            "openshift-config-managed/configmaps/mirrored-release-signatures",
        ] {
            assert!(
                fk.deleted.iter().any(|p| p.ends_with(kind)),
                "{kind}: {:?}",
                fk.deleted
            );
        }
        assert!(
            !fk.objects
                .keys()
                .any(|k| k.contains("mirrorsets") || k.contains("catalogsources")),
            "{:?}",
            fk.objects.keys()
        );
    }
    assert!(
        !DataDir::new(app.data.path())
            .bundle_dir(&BundleId::parse(&id)?)
            .exists()
    );
    app.assert_published(&layout, "").await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_that_cannot_be_fetched_fails_the_bundle_with_a_reason() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "b1", "namespace": "ns", "uid": "uid-2", "generation": 2,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "source": { "url": {
            "url": "http://127.0.0.1:9/missing.tar?token=hunter2",
            "sha256": "e".repeat(64) } } },
    }));
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
    let st = &done["status"];
    let failed = condition(st, "Failed");
    assert_eq!(
        (&failed["status"], &failed["reason"]),
        (&json!("True"), &json!("FetchFailed"))
    );
    let why = failed["message"].as_str().unwrap();
    assert!(why.contains("failed 3 times"), "{why}");
    assert!(!why.contains("hunter2"), "{why}");
    assert!(
        fake.lock()
            .unwrap()
            .events
            .iter()
            .any(|e| e["reason"] == "Failed" && e["type"] == "Warning")
    );
    // Edited (a new generation): fetched again.
    fake.lock().unwrap().bundle["metadata"]["generation"] = json!(3);
    let again = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Fetching").await?;
    assert_eq!(again["status"]["observedGeneration"], 3);

    // An https URL whose CA ConfigMap is missing: failed, saying so.
    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "b1", "namespace": "ns", "uid": "uid-3", "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "source": { "url": {
            "url": "https://127.0.0.1:9/b.tar", "sha256": "d".repeat(64),
            "ca": { "configMapKeyRef": { "name": "internal-ca", "key": "ca.crt" } } } } },
    }));
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
    let why = done["status"]["error"].as_str().unwrap();
    assert!(
        why.contains("the URL's CA: ConfigMap internal-ca not found"),
        "{why}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploaded_bundle_gets_a_bundle_object_that_follows_it() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("adopt", "adopt", 0);
    let (st, r) = app
        .put("adopt.tar", tar_bytes(&layout.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let (client, fake) = fake_api(json!({ "metadata": { "name": "" } }));
    // No right to write ConfigMaps: the status follows all the same.
    fake.lock().unwrap().refuse_apply = true;
    let ctx = context(&app, client.clone()).await?;
    let summary = ctx.state.summary(&BundleId::parse(&id)?).await?.unwrap();
    let api: kube::Api<Bundle> = kube::Api::namespaced(client, "ns");
    assert!(adopt(&api, &summary).await?);
    {
        let fk = fake.lock().unwrap();
        let b = &fk.bundle;
        assert_eq!(b["metadata"]["name"], format!("adopt-tar-{}", &id[..12]));
        assert_eq!(b["spec"]["source"]["upload"]["bundleId"], id);
        assert_eq!(b["spec"]["source"]["upload"]["name"], "adopt.tar");
    }
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    assert_eq!(done["status"]["bundleId"], id);
    assert_eq!(done["metadata"]["finalizers"], json!([FINALIZER]));
    assert!(done["status"]["clusterResources"].is_null());
    let fk = fake.lock().unwrap();
    assert!(
        fk.events
            .iter()
            .any(|e| e["reason"] == "ClusterResourcesFailed" && e["type"] == "Warning"),
        "{:#?}",
        fk.events
    );
    Ok(())
}

/// A fake API server holding RegistryTargets, ClusterRegistryTargets, WebhookTargets
/// and Secrets of any namespace.
#[derive(Default)]
struct FakeTargets {
    targets: Vec<Value>,
    cluster_targets: Vec<Value>,
    secrets: Vec<Value>,
    configmaps: Vec<Value>,
    webhooks: Vec<Value>,
}

fn fake_targets_api(state: Arc<Mutex<FakeTargets>>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut st = state.lock().unwrap();
            let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404, "message": "not found"});
            // `/.../namespaces/NS/...`: that namespace only.
            let ns: Option<String> = path
                .split("/namespaces/")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .map(str::to_string);
            let in_ns = |o: &Value| {
                ns.as_deref()
                    .is_none_or(|n| o["metadata"]["namespace"] == n)
            };
            let list = |kind: &str, items: &[Value]| {
                let items: Vec<&Value> = items.iter().filter(|o| in_ns(o)).collect();
                (
                    200,
                    json!({"apiVersion": "shipperd.io/v1alpha1", "kind": kind,
                             "metadata": {}, "items": items}),
                )
            };
            let last = path.rsplit('/').next().unwrap_or("").to_string();
            let (status, answer) = match method.as_str() {
                "GET" if path.ends_with("/clusterregistrytargets") => {
                    list("ClusterRegistryTargetList", &st.cluster_targets)
                }
                "GET" if path.ends_with("/registrytargets") => {
                    list("RegistryTargetList", &st.targets)
                }
                "GET" if path.ends_with("/webhooktargets") => {
                    list("WebhookTargetList", &st.webhooks)
                }
                "GET" if path.contains("/secrets/") || path.contains("/configmaps/") => {
                    let objects = if path.contains("/secrets/") {
                        &st.secrets
                    } else {
                        &st.configmaps
                    };
                    match objects
                        .iter()
                        .find(|o| in_ns(o) && o["metadata"]["name"] == last)
                    {
                        Some(s) => (200, s.clone()),
                        None => (404, not_found),
                    }
                }
                "GET" => (404, not_found),
                "PATCH" if path.ends_with("/status") => {
                    let name = path.rsplit('/').nth(1).unwrap_or("").to_string();
                    let list = if path.contains("/webhooktargets/") {
                        &mut st.webhooks
                    } else if path.contains("/clusterregistrytargets/") {
                        &mut st.cluster_targets
                    } else {
                        &mut st.targets
                    };
                    match list
                        .iter_mut()
                        .find(|t| in_ns(t) && t["metadata"]["name"] == name)
                    {
                        Some(t) => {
                            t["status"] = body["status"].clone();
                            (200, t.clone())
                        }
                        None => (404, not_found),
                    }
                }
                _ => (405, json!({})),
            };
            drop(st);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "ns")
}

/// The condition of type `ty` in a status.
fn condition<'a>(status: &'a Value, ty: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .unwrap_or_else(|| panic!("no {ty} condition in {status:#}"))
}

fn registry_target(name: &str, spec: Value) -> Value {
    registry_target_in("ns", name, spec)
}

fn registry_target_in(ns: &str, name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "RegistryTarget",
            "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                          "generation": 1, "resourceVersion": "1" },
            "spec": spec })
}

fn basic_auth(name: &str, user: &str, password: &str) -> Value {
    basic_auth_in("ns", name, user, password)
}

/// A basic-auth Secret labelled for ShipperD.
fn basic_auth_in(ns: &str, name: &str, user: &str, password: &str) -> Value {
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({ "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": { "name": name, "namespace": ns,
                          "labels": { "shipperd.io/credentials": "true" } },
            "data": { "username": b(user), "password": b(password) } })
}

fn ready_of(st: &Arc<Mutex<FakeTargets>>, name: &str) -> (String, String) {
    ready_in(st, "ns", name)
}

fn ready_in(st: &Arc<Mutex<FakeTargets>>, ns: &str, name: &str) -> (String, String) {
    let s = st.lock().unwrap();
    let t = s
        .targets
        .iter()
        .chain(s.cluster_targets.iter())
        .find(|t| {
            t["metadata"]["name"] == name
                && (t["metadata"]["namespace"] == ns || t["metadata"]["namespace"].is_null())
        })
        .unwrap();
    let c = &t["status"]["conditions"][0];
    (
        c["status"].as_str().unwrap_or("").to_string(),
        c["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// RegistryTargets become the targets file the services follow; one that cannot be used
/// is `Ready=False` with the reason and stays out; a rotated Secret reaches publish
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_targets_are_applied_and_a_rotated_secret_reaches_publish() -> anyhow::Result<()> {
    use shipperd_operator::targets::{Output, TargetsContext, reconcile as reconcile_target};
    use shipperd_tests::{
        pki,
        servers::{Registry, RegistryOptions},
        token::TokenServer,
    };

    shipperd_tests::init();
    let tokens = TokenServer::start("mirror", "s3cret", pki::token_signing_cert()?).await?;
    let registry = Registry::start_with(RegistryOptions {
        token: Some(tokens.registry_auth()),
        ..Default::default()
    })
    .await?;
    let url = registry.url();
    let app = shipperd_tests::app::spawn_app_with(
        Options {
            targets_toml: Some("[[target]]\nname = \"good\"\nurl = \"{registry}\"\n".into()),
            follow_targets: true,
            ..Default::default()
        },
        registry,
    )
    .await?;
    let state = Arc::new(Mutex::new(FakeTargets {
        targets: vec![
            registry_target(
                "good",
                json!({ "url": url, "default": true,
                "credentials": { "secretName": "push" },
                "transfer": { "retries": 1 } }),
            ),
            registry_target(
                "nosecret",
                json!({ "url": url,
                "credentials": { "secretName": "missing" } }),
            ),
            registry_target("badurl", json!({ "url": "ftp://nowhere" })),
        ],
        secrets: vec![basic_auth("push", "mirror", "an old password")],
        ..FakeTargets::default()
    }));
    let ctx = Arc::new(TargetsContext::new(
        fake_targets_api(state.clone()),
        Output {
            file: app.data.path().join("targets.toml"),
            secrets: app.data.path().join("config/secrets"),
        },
        "shipperd",
    ));
    let get = |name: &str| -> anyhow::Result<Arc<shipperd_operator::RegistryTarget>> {
        let t = state
            .lock()
            .unwrap()
            .targets
            .iter()
            .find(|t| t["metadata"]["name"] == name)
            .cloned()
            .unwrap();
        Ok(Arc::new(serde_json::from_value(t)?))
    };
    for name in ["good", "nosecret", "badurl"] {
        reconcile_target(get(name)?, ctx.clone()).await?;
    }
    assert_eq!(ready_of(&state, "good"), ("True".into(), "Applied".into()));
    assert_eq!(
        ready_of(&state, "nosecret"),
        ("False".into(), "SecretNotFound".into())
    );
    assert_eq!(ready_of(&state, "badurl").0, "False");
    assert_eq!(ready_of(&state, "badurl").1, "InvalidTarget");
    let file = std::fs::read_to_string(app.data.path().join("targets.toml"))?;
    assert!(
        file.contains("name = \"ns/good\"") && !file.contains("nosecret"),
        "{file}"
    );
    assert!(
        file.contains("default = \"\""),
        "a namespaced target is never the default: {file}"
    );
    assert!(
        !file.contains("an old password"),
        "the password is in its own file: {file}"
    );

    // The services follow the file (every 2 s); the old password is refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let put = |salt: &'static str| {
        let app = &app;
        async move {
            let b = sample(salt, salt, 0);
            let (st, r) = app
                .put_with(
                    &format!("{salt}.tar"),
                    tar_bytes(&b.oci_files(""))?,
                    "target=ns/good",
                )
                .await?;
            anyhow::ensure!(st == 202, "{r}");
            app.wait_done(r["id"].as_str().unwrap(), Duration::from_secs(60))
                .await
        }
    };
    let rec = put("oldpw").await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    assert!(
        rec["error"].as_str().unwrap().contains("refused"),
        "{rec:#}"
    );

    // The Secret is rotated: reconciled (a Secret change triggers it), the next push
    // logs in with the new password, no restart.
    state.lock().unwrap().secrets = vec![basic_auth("push", "mirror", "s3cret")];
    reconcile_target(get("good")?, ctx.clone()).await?;
    let rec = put("newpw").await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    Ok(())
}

/// WebhookTargets become the webhooks file notify follows: the valid one gets the event
/// types it asked for, signed with its Secret; the others are `Ready=False`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_targets_reach_notify_without_a_restart() -> anyhow::Result<()> {
    use base64::Engine as _;
    use shipperd_operator::webhooks::{WebhooksContext, reconcile as reconcile_webhook};
    use shipperd_tests::webhook::WebhookSink;

    let app = spawn_app(Options {
        follow_webhooks: true,
        ..Default::default()
    })
    .await?;
    let sink = WebhookSink::start().await?;
    // Another namespace's webhook: it hears nothing of the upload namespace's bundles.
    let other = WebhookSink::start().await?;
    let hook_in = |ns: &str, name: &str, spec: Value| {
        json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "WebhookTarget",
                "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                              "generation": 1, "resourceVersion": "1" },
                "spec": spec })
    };
    let hook = |name: &str, spec: Value| hook_in("ns", name, spec);
    let secret = base64::engine::general_purpose::STANDARD.encode("whsec_c2VjcmV0LWJ5dGVz");
    let state = Arc::new(Mutex::new(FakeTargets {
        webhooks: vec![
            hook(
                "chat",
                json!({ "url": format!("{}?token=hunter2", sink.url()),
                                 "types": ["io.shipperd.bundle.published"],
                                 "signingSecret": { "name": "hook", "key": "secret" } }),
            ),
            hook(
                "ftp",
                json!({ "url": "ftp://nowhere",
                                "signingSecret": { "name": "hook", "key": "secret" } }),
            ),
            hook(
                "nosecret",
                json!({ "url": sink.url(),
                                     "signingSecret": { "name": "missing", "key": "secret" } }),
            ),
            hook_in(
                "team-b",
                "theirs",
                json!({ "url": other.url(), "signingSecret": { "name": "hook", "key": "secret" } }),
            ),
        ],
        secrets: vec![
            json!({ "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                              "metadata": { "name": "hook", "namespace": "ns",
                                            "labels": { "shipperd.io/credentials": "true" } },
                              "data": { "secret": secret } }),
            json!({ "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                              "metadata": { "name": "hook", "namespace": "team-b",
                                            "labels": { "shipperd.io/credentials": "true" } },
                              "data": { "secret": secret } }),
        ],
        ..FakeTargets::default()
    }));
    let ctx = Arc::new(WebhooksContext {
        client: fake_targets_api(state.clone()),
        file: app.data.path().join("webhooks.toml"),
        secrets: app.data.path().join("config/webhooks"),
        watch_namespace: None,
        upload_namespace: Some("ns".into()),
    });
    for name in ["chat", "ftp", "nosecret"] {
        let w = state
            .lock()
            .unwrap()
            .webhooks
            .iter()
            .find(|w| w["metadata"]["name"] == name)
            .cloned()
            .unwrap();
        reconcile_webhook(Arc::new(serde_json::from_value(w)?), ctx.clone()).await?;
    }
    let ready = |name: &str| {
        let s = state.lock().unwrap();
        let w = s
            .webhooks
            .iter()
            .find(|w| w["metadata"]["name"] == name)
            .unwrap();
        let c = &w["status"]["conditions"][0];
        (
            c["status"].clone(),
            c["reason"].clone(),
            c["message"].clone(),
        )
    };
    let (st, reason, message) = ready("chat");
    assert_eq!((st, reason), (json!("True"), json!("Applied")));
    assert!(!message.as_str().unwrap().contains("hunter2"), "{message}");
    assert_eq!(ready("ftp").1, "InvalidURL");
    assert_eq!(ready("nosecret").1, "SecretNotFound");

    // notify looks at the file every 2 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let layout = sample("hooked", "hooked", 0);
    let (code, r) = app
        .put("hooked.tar", tar_bytes(&layout.oci_files(""))?, None)
        .await?;
    assert_eq!(code, 202, "{r}");
    let rec = app
        .wait_done(r["id"].as_str().unwrap(), Duration::from_secs(60))
        .await?;
    assert_eq!(rec["phase"], "Published");
    let got = shipperd_tests::eventually(
        "bundle.published at the webhook",
        Duration::from_secs(30),
        || async {
            sink.of_type("io.shipperd.bundle.published")
                .into_iter()
                .next()
        },
    )
    .await?;
    assert!(got.signature.is_some(), "signed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let types: Vec<String> = sink
        .deliveries()
        .iter()
        .map(|d| d.event_type().to_string())
        .collect();
    assert!(
        types.iter().all(|t| t == "io.shipperd.bundle.published"),
        "only the types asked for: {types:?}"
    );
    let file = std::fs::read_to_string(app.data.path().join("webhooks.toml"))?;
    assert!(file.contains("namespace = \"team-b\""), "{file}");
    assert!(
        other.deliveries().is_empty(),
        "team-b heard of another namespace's bundle: {:?}",
        other
            .deliveries()
            .iter()
            .map(|d| d.event_type().to_string())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A `path` source: a file on the shared volume, taken into the store (hashed in place,
/// moved in) and published; a path leaving the data directory is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_from_a_path_on_the_volume_is_taken_and_published() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("pathsrc", "p1", 0);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let id = sha256(&bytes)[7..].to_string();
    let file = app.data.path().join("import/ns/incoming/p1.tar");
    std::fs::create_dir_all(file.parent().unwrap())?;
    std::fs::write(&file, &bytes)?;
    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "p1", "namespace": "ns", "uid": "uid-p1", "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "source": { "path": { "path": "incoming/p1.tar" } } },
    }));
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    assert_eq!(done["status"]["bundleId"], id);
    assert!(!file.exists(), "the file was moved into the store");
    app.assert_published(&layout, "").await?;

    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "p2", "namespace": "ns", "uid": "uid-p2", "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "source": { "path": { "path": "../../etc/passwd" } } },
    }));
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
    let why = done["status"]["error"].as_str().unwrap();
    assert!(why.contains("without `..`"), "{why}");

    // Nothing outside the import directory is reached through a link, at the end of the
    // path or on the way; a wrong sha256 does not tell the file's real one.
    let import = app.data.path().join("import/ns");
    let outside = app.data.path().join("config/other.tar");
    std::fs::create_dir_all(outside.parent().unwrap())?;
    std::fs::write(&outside, &bytes)?;
    std::os::unix::fs::symlink(&outside, import.join("link.tar"))?;
    std::os::unix::fs::symlink(app.data.path().join("config"), import.join("dirlink"))?;
    std::fs::write(import.join("mine.tar"), &bytes)?;
    for (name, path, sha, expect) in [
        ("p4", "link.tar", None, "symbolic link"),
        ("p5", "dirlink/other.tar", None, "symbolic link"),
        ("p6", "mine.tar", Some("f".repeat(64)), "not the one given"),
    ] {
        let mut source = json!({ "path": path });
        if let Some(sha) = &sha {
            source["sha256"] = json!(sha);
        }
        let (client, fake) = fake_api(json!({
            "apiVersion": "shipperd.io/v1alpha1",
            "kind": "Bundle",
            "metadata": { "name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                          "generation": 1, "resourceVersion": "1", "finalizers": [FINALIZER] },
            "spec": { "source": { "path": source } },
        }));
        let ctx = context(&app, client).await?;
        let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
        let why = done["status"]["error"].as_str().unwrap();
        assert!(why.contains(expect), "{path}: {why}");
        assert!(!why.contains(&id), "{path}: the real sha256 is told: {why}");
    }
    assert!(
        outside.exists() && import.join("mine.tar").exists(),
        "nothing was taken"
    );
    Ok(())
}

/// `path` sources by descriptor, per namespace: team-b's Bundle cannot take the file
/// staged for team-a (`import/team-a/`), by its name or by `..`; a file checked and
/// opened, then swapped for a symbolic link to a file outside before it is moved, is not
/// followed: the link is put back, the file outside stays, nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_sources_are_taken_by_descriptor_from_their_namespaces_directory() -> anyhow::Result<()>
{
    let app = spawn_app(Options::default()).await?;
    let import = app.data.path().join("import");
    let bytes = tar_bytes(&sample("staged", "staged", 0).oci_files(""))?;
    std::fs::create_dir_all(import.join("team-a"))?;
    std::fs::create_dir_all(import.join("team-b"))?;
    std::fs::write(import.join("team-a/staged.tar"), &bytes)?;
    for (name, path, why) in [
        (
            "b1",
            "staged.tar",
            "not in the import directory of namespace team-b",
        ),
        ("b2", "../team-a/staged.tar", "without `..`"),
    ] {
        let (client, fake) = fake_api(json!({
            "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
            "metadata": { "name": name, "namespace": "team-b", "uid": format!("uid-{name}"),
                          "generation": 1, "resourceVersion": "1" },
            "spec": { "source": { "path": { "path": path } } },
        }));
        let ctx = context(&app, client).await?;
        let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
        let error = done["status"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{path}: {error}");
    }
    assert!(
        import.join("team-a/staged.tar").exists(),
        "team-a's file was taken"
    );
    assert_eq!(app.stored_bundles(), 0);

    // Checked and opened; then, before it is moved, the name points somewhere else.
    let outside = app.data.path().join("config/outside.tar");
    std::fs::create_dir_all(outside.parent().unwrap())?;
    std::fs::write(&outside, b"not for the taking")?;
    let opened = shipperd_operator::bundle::confined(&import, "team-a", "staged.tar")
        .map_err(anyhow::Error::msg)?;
    std::fs::rename(
        import.join("team-a/staged.tar"),
        import.join("team-a/kept.tar"),
    )?;
    std::os::unix::fs::symlink(&outside, import.join("team-a/staged.tar"))?;
    let bus = shipperd_bus::Bus::connect(&app.nats.url(), "test-swap").await?;
    let store = Store::open(bus, &DataDir::new(app.data.path()), 1 << 40).await?;
    let origin = shipperd_store::Origin {
        owner: Some("team-a".into()),
        ..Default::default()
    };
    let err = store
        .receive_opened("staged.tar", opened, None, &origin)
        .await
        .expect_err("a swapped file is not taken");
    assert!(
        err.to_string().contains("was replaced while it was read"),
        "{err}"
    );
    let link = std::fs::symlink_metadata(import.join("team-a/staged.tar"))?;
    assert!(link.file_type().is_symlink(), "the link was put back");
    assert_eq!(std::fs::read(&outside)?, b"not for the taking");
    assert!(import.join("team-a/kept.tar").exists());
    assert_eq!(app.stored_bundles(), 0);

    // Unswapped, the same descriptor path takes it.
    std::fs::remove_file(import.join("team-a/staged.tar"))?;
    std::fs::rename(
        import.join("team-a/kept.tar"),
        import.join("team-a/staged.tar"),
    )?;
    let opened = shipperd_operator::bundle::confined(&import, "team-a", "staged.tar")
        .map_err(anyhow::Error::msg)?;
    let a = store
        .receive_opened("staged.tar", opened, None, &origin)
        .await?;
    assert_eq!(a.summary.owner.as_deref(), Some("team-a"));
    assert!(
        !import.join("team-a/staged.tar").exists(),
        "moved into the store"
    );
    app.stop().await
}

/// A Bundle for OpenShift's internal registry: the projects its images land in are
/// checked; a missing one is named in a Warning Event, or created when allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_openshift_projects_are_named_or_created() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        targets_toml: Some("[[target]]\nname = \"internal\"\nurl = \"{registry}\"\n".into()),
        ..Default::default()
    })
    .await?;
    let layout = sample("projects", "p3", 0);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let file = app.data.path().join("import/ns/incoming/p3.tar");
    std::fs::create_dir_all(file.parent().unwrap())?;
    std::fs::write(&file, &bytes)?;
    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1",
        "kind": "Bundle",
        "metadata": { "name": "p3", "namespace": "ns", "uid": "uid-p3", "generation": 1,
                      "resourceVersion": "1", "finalizers": [FINALIZER] },
        "spec": { "source": { "path": { "path": "incoming/p3.tar" } },
                  "clusterTarget": "internal" },
    }));
    fake.lock().unwrap().cluster_targets = vec![cluster_target(
        "internal",
        json!({ "openshiftInternal": true }),
    )];
    let ctx = context(&app, client.clone()).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    let id = BundleId::parse(done["status"]["bundleId"].as_str().unwrap())?;
    {
        let fk = fake.lock().unwrap();
        let missing = fk
            .events
            .iter()
            .find(|e| e["reason"] == "ProjectMissing")
            .expect("a ProjectMissing event");
        let note = missing["note"].as_str().unwrap();
        assert!(note.contains("demo") && note.contains("p3"), "{note}");
        assert!(
            !fk.applied
                .iter()
                .any(|(p, _)| p.ends_with("/projectrequests"))
        );
    }
    // Allowed to: each missing project is requested.
    let summary = ctx.state.summary(&id).await?.unwrap();
    let b: Bundle = serde_json::from_value(fake.lock().unwrap().bundle.clone())?;
    let checked =
        shipperd_operator::projects::check(&client, &ctx.state, &b, &summary, true).await?;
    assert_eq!(checked.unwrap().created, ["demo", "p3"]);
    let fk = fake.lock().unwrap();
    let requested: Vec<&str> = fk
        .applied
        .iter()
        .filter(|(p, _)| p.ends_with("/apis/project.openshift.io/v1/projectrequests"))
        .filter_map(|(_, v)| v["metadata"]["name"].as_str())
        .collect();
    assert_eq!(requested, ["demo", "p3"]);
    Ok(())
}

/// Two tenants: team-b's Bundles cannot follow (read), nor delete, the bundle team-a
/// brought in, nor one that came through the ingest endpoint (the upload namespace's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_cannot_follow_or_delete_another_namespaces_bundle() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("tenancy", "ta", 0);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let id = sha256(&bytes)[7..].to_string();
    std::fs::create_dir_all(app.data.path().join("import/team-a"))?;
    std::fs::write(app.data.path().join("import/team-a/ta.tar"), &bytes)?;
    let bundle = |ns: &str, name: &str, source: Value| {
        json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
                "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                              "generation": 1, "resourceVersion": "1" },
                "spec": { "source": source } })
    };
    let (client, fake) = fake_api(bundle(
        "team-a",
        "a",
        json!({ "path": { "path": "ta.tar" } }),
    ));
    let ctx = context(&app, client).await?;
    let mine = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    assert_eq!(mine["status"]["bundleId"], id);
    assert_eq!(
        ctx.state
            .summary(&BundleId::parse(&id)?)
            .await?
            .unwrap()
            .owner
            .as_deref(),
        Some("team-a")
    );

    // Its images are not team-a's (whose tags team-a's bundle owns now).
    let (st, r) = app
        .put(
            "uploaded.tar",
            tar_bytes(&shipperd_tests::fixtures::catalog(3, "tu").oci_files(""))?,
            None,
        )
        .await?;
    assert_eq!(st, 202, "{r}");
    let uploaded = r["id"].as_str().unwrap().to_string();
    app.wait_done(&uploaded, Duration::from_secs(60)).await?;

    for (name, source, of) in [
        (
            "b1",
            json!({ "upload": { "name": "x.tar", "bundleId": id } }),
            &id,
        ),
        (
            "b2",
            json!({ "url": { "url": "http://127.0.0.1:9/x.tar", "sha256": id } }),
            &id,
        ),
        (
            "b3",
            json!({ "upload": { "name": "u.tar", "bundleId": uploaded } }),
            &uploaded,
        ),
    ] {
        let (client, fake) = fake_api(bundle("team-b", name, source));
        let ctx = context(&app, client).await?;
        let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
        let st = &done["status"];
        assert_eq!(
            condition(st, "Failed")["reason"],
            "NotOwned",
            "{name}: {st:#}"
        );
        assert!(
            st["images"].is_null() && st["bundleId"].is_null() && st["bytesTotal"] == 0,
            "{name}: nothing of the other bundle is shown: {st:#}"
        );
        assert!(
            fake.lock()
                .unwrap()
                .events
                .iter()
                .any(|e| e["reason"] == "NotOwned"),
            "{name}: a Warning Event"
        );
        // Deleting team-b's Bundle leaves the other bundle alone.
        fake.lock().unwrap().bundle["metadata"]["deletionTimestamp"] =
            json!("2026-12-04T00:00:00Z");
        reconcile_until(&ctx, &fake, |b| {
            b["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.is_empty())
        })
        .await?;
        assert!(
            app.bundle(of).await?.is_some(),
            "{name}: the bundle was deleted"
        );
    }
    // The upload namespace's own Bundle does follow the upload.
    let (client, fake) = fake_api(bundle(
        "ns",
        "u",
        json!({ "upload": { "name": "u.tar", "bundleId": uploaded } }),
    ));
    let ctx = context(&app, client).await?;
    reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    app.stop().await
}

/// Tags have owners across namespaces: team-a's Bundle sets `quay.io/org/app:1`;
/// team-b's Bundles, with other bytes for it (from the same host, or naming another),
/// fail naming team-a, and tag nothing, not even their other image. team-a moves its
/// own tag on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_cannot_move_another_namespaces_tag() -> anyhow::Result<()> {
    let owned = spawn_app(Options::default()).await?;
    let app = &owned;
    let import = app.data.path().join("import");
    std::fs::create_dir_all(&import)?;
    let image = |salt: &str, names: &[(&str, &str)]| {
        let names: Vec<_> = names.iter().map(|(n, r)| (*n, *r, "1")).collect();
        shipperd_tests::fixtures::named_images(salt, &names)
    };
    let publish =
        |ns: &'static str, file: &'static str, b: shipperd_tests::fixtures::LayoutBuilder| {
            let import = &import;
            async move {
                std::fs::create_dir_all(import.join(ns))?;
                std::fs::write(import.join(ns).join(file), tar_bytes(&b.oci_files(""))?)?;
                let (client, fake) = fake_api(json!({
                "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
                "metadata": { "name": file.trim_end_matches(".tar"), "namespace": ns,
                              "uid": format!("uid-{ns}-{file}"), "generation": 1,
                              "resourceVersion": "1" },
                "spec": { "source": { "path": { "path": file } } } }));
                let ctx = context(app, client).await?;
                let done = reconcile_until(&ctx, &fake, |b| {
                    b["status"]["phase"] == "Published" || b["status"]["phase"] == "Failed"
                })
                .await?;
                anyhow::Ok((b, done["status"].clone()))
            }
        };
    let digest = |repo: &'static str| async move {
        anyhow::Ok(app.manifest(repo, "1").await?.map(|(m, _)| sha256(&m)))
    };
    let (a, st) = publish(
        "team-a",
        "a1.tar",
        image("a1", &[("quay.io/org/app:1", "org/app")]),
    )
    .await?;
    assert_eq!(st["phase"], "Published", "{st:#}");
    assert_eq!(digest("org/app").await?, Some(a.images[0].digest.clone()));
    for (file, name) in [
        ("b1.tar", "quay.io/org/app:1"),
        ("b2.tar", "mirror.example/org/app:1"),
    ] {
        let b = image(
            file,
            &[("quay.io/team-b/tool:1", "team-b/tool"), (name, "org/app")],
        );
        let (_, st) = publish("team-b", file, b).await?;
        assert_eq!(st["phase"], "Failed", "{file}: {st:#}");
        let error = st["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("tag org/app:1 belongs to namespace team-a (from quay.io/org/app)"),
            "{file}: {error}"
        );
        assert_eq!(digest("org/app").await?, Some(a.images[0].digest.clone()));
        assert_eq!(
            digest("team-b/tool").await?,
            None,
            "{file}: its other image was tagged"
        );
    }
    let (a2, st) = publish(
        "team-a",
        "a2.tar",
        image("a2", &[("quay.io/org/app:1", "org/app")]),
    )
    .await?;
    assert_eq!(st["phase"], "Published", "{st:#}");
    assert_eq!(digest("org/app").await?, Some(a2.images[0].digest.clone()));
    owned.stop().await
}

/// Cluster configuration only through the admin's ClusterRegistryTarget that allows
/// it, for the namespaces it lists: a namespace's Bundle through its own target applies
/// nothing cluster-wide; nor does a tenant's through a shared target that allows
/// applying (as the shipped `openshift-internal` does) but does not list its namespace;
/// one that lists it applies, and one that allows mirror sets but not
/// ImageTagMirrorSets applies no ITMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespaced_bundle_never_changes_cluster_configuration() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        targets_toml: Some(
            "[[target]]\nname = \"team-b/mirror\"\nurl = \"{registry}\"\n\n\
             [[target]]\nname = \"open\"\nurl = \"{registry}\"\n"
                .into(),
        ),
        ..Default::default()
    })
    .await?;
    std::fs::create_dir_all(app.data.path().join("import/team-b"))?;
    for (name, spec, listed) in [
        ("own", json!({ "target": "mirror" }), json!([])),
        ("viacluster", json!({ "clusterTarget": "open" }), json!([])),
        (
            "listed",
            json!({ "clusterTarget": "open" }),
            json!(["team-b"]),
        ),
    ] {
        let layout = sample(name, name, 0);
        std::fs::write(
            app.data.path().join(format!("import/team-b/{name}.tar")),
            tar_bytes(&layout.oci_files(""))?,
        )?;
        let mut spec = spec;
        spec["source"] = json!({ "path": { "path": format!("{name}.tar") } });
        spec["applyClusterResources"] = json!(true);
        spec["tagMirrorSet"] = json!(true);
        let (client, fake) = fake_api(json!({
            "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
            "metadata": { "name": name, "namespace": "team-b", "uid": format!("uid-{name}"),
                          "generation": 1, "resourceVersion": "1" },
            "spec": spec,
        }));
        fake.lock().unwrap().cluster_targets = vec![cluster_target(
            "open",
            json!({ "url": app.registry.url(),
                    "clusterResources": { "apply": true, "namespaces": listed } }),
        )];
        let ctx = context(&app, client).await?;
        let done = reconcile_until(&ctx, &fake, |b| {
            b["status"]["phase"] == "Published" && b["status"]["clusterResources"].is_string()
        })
        .await?;
        let fk = fake.lock().unwrap();
        let applied = |kind: &str| fk.applied.iter().filter(|(p, _)| p.contains(kind)).count();
        let (_, cm) = fk
            .applied
            .iter()
            .find(|(p, _)| {
                p.ends_with(&format!(
                    "/namespaces/team-b/configmaps/{name}-cluster-resources"
                ))
            })
            .expect("the ConfigMap beside the Bundle");
        let yaml = cm["data"]["cluster-resources.yaml"].as_str().unwrap();
        assert!(
            yaml.contains("kind: ImageTagMirrorSet"),
            "asked for: {yaml}"
        );
        assert_eq!(
            applied("/imagetagmirrorsets/"),
            0,
            "{name}: {:?}",
            fk.applied
        );
        let refused = fk
            .events
            .iter()
            .find(|e| e["reason"] == "ClusterResourcesNotAllowed")
            .unwrap_or_else(|| panic!("{name}: no Warning Event: {:#?}", fk.events));
        assert_eq!(refused["type"], "Warning");
        assert_eq!(applied("/imagedigestmirrorsets/"), 0, "{:?}", fk.applied);
        assert_eq!(applied("/catalogsources/"), 0);
        let contributed = applied("/namespaces/shipperd/configmaps/shipperd-cluster-");
        let note = refused["note"].as_str().unwrap();
        match name {
            "own" => {
                assert_eq!(contributed, 0, "a namespace's target has no say");
                assert!(note.contains("ClusterRegistryTarget"), "{note}");
            }
            "viacluster" => {
                assert_eq!(contributed, 0, "a tenant the admin did not list has no say");
                assert!(
                    note.contains("lets only the namespaces") && note.contains("not team-b"),
                    "{note}"
                );
            }
            _ => {
                assert_eq!(contributed, 1, "{:?}", fk.applied);
                assert!(note.contains("tagMirrorSets"), "{note}");
            }
        }
        assert_eq!(done["status"]["phase"], "Published");
    }
    app.stop().await
}

/// Cluster resources never replace another namespace's: team-b's Bundle makes the
/// CatalogSource oc-mirror names `cs-redhat-operator-index-v4-18`; team-c's catalog
/// named the same (another image) does not replace it, and team-c's Bundle gets a
/// Warning Event naming team-b's. Contributions are derived again from the Bundles and
/// ShipperD's state: ConfigMaps made by hand in the operator's namespace (one naming no
/// Bundle, one naming team-c's Bundle with another uid) apply nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_resources_never_replace_another_namespaces() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    for ns in ["team-b", "team-c"] {
        std::fs::create_dir_all(app.data.path().join("import").join(ns))?;
    }
    let catalog = |salt: &str, name: &str, repo: &str| {
        let mut b = shipperd_tests::fixtures::LayoutBuilder::new();
        let fbc = b.layer(
            &[(
                "configs/index.json",
                format!("{{\"{salt}\":1}}").into_bytes(),
            )],
            flate2::Compression::fast(),
        );
        b.labelled_image(
            json!({ "org.opencontainers.image.ref.name": name }),
            &[fbc],
            repo,
            "v4.18",
            json!({ "operators.operatorframework.io.index.configs.v1": "/configs" }),
        );
        b
    };
    let bundle = |ns: &str, name: &str| {
        json!({ "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
                "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                              "generation": 1, "resourceVersion": "1" },
                "spec": { "source": { "path": { "path": format!("{name}.tar") } },
                          "applyClusterResources": true } })
    };
    for (name, layout) in [
        (
            "b1",
            catalog(
                "b",
                "registry.redhat.io/redhat/redhat-operator-index:v4.18",
                "redhat/redhat-operator-index",
            ),
        ),
        (
            "c1",
            catalog(
                "c",
                "evil.example/x/redhat-operator-index:v4.18",
                "x/redhat-operator-index",
            ),
        ),
    ] {
        std::fs::write(
            app.data.path().join(format!(
                "import/{}/{name}.tar",
                if name == "b1" { "team-b" } else { "team-c" }
            )),
            tar_bytes(&layout.oci_files(""))?,
        )?;
    }
    let fake = Arc::new(Mutex::new(Fake {
        bundle: bundle("team-b", "b1"),
        // The services know the default target as `default`.
        cluster_targets: vec![cluster_target(
            "default",
            json!({ "url": app.registry.url(), "default": true,
                    "clusterResources": { "apply": true, "namespaces": ["team-b", "team-c"] } }),
        )],
        ..Fake::default()
    }));
    let ctx = context(&app, fake_api_on(fake.clone())).await?;
    let published = |b: &Value| {
        b["status"]["phase"] == "Published" && b["status"]["clusterResources"].is_string()
    };
    reconcile_until(&ctx, &fake, published).await?;
    const CS: &str = "/apis/operators.coreos.com/v1alpha1/namespaces/openshift-marketplace/catalogsources/cs-redhat-operator-index-v4-18";
    let image = |fake: &Arc<Mutex<Fake>>| {
        fake.lock()
            .unwrap()
            .objects
            .get(CS)
            .map(|o| o["spec"]["image"].clone())
    };
    let theirs = json!(format!(
        "{}/redhat/redhat-operator-index:v4.18",
        app.registry.host()
    ));
    assert_eq!(image(&fake), Some(theirs.clone()));

    // ConfigMaps made by hand where contributions are kept: asking for a tag mirror set.
    let forged = json!({ "digest": {}, "catalogs": {},
                         "tag": { "generic": { "quay.io/evil": ["evil.example/evil"] } } });
    {
        let mut fk = fake.lock().unwrap();
        for (name, annotations) in [
            ("shipperd-cluster-forged", json!({})),
            (
                "shipperd-cluster-uid-team-c-c1",
                json!({ "shipperd.io/bundle": "team-c/c1", "shipperd.io/bundle-uid": "another" }),
            ),
        ] {
            fk.objects.insert(
                format!("/api/v1/namespaces/shipperd/configmaps/{name}"),
                json!({ "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": { "name": name, "namespace": "shipperd",
                                      "labels": { "shipperd.io/cluster-resources": "contribution" },
                                      "annotations": annotations },
                        "data": { "gathered.json": forged.to_string() } }),
            );
        }
        // team-c's Bundle next (team-b's stays on the API server).
        let before = std::mem::replace(&mut fk.bundle, bundle("team-c", "c1"));
        fk.others.push(before);
        fk.events.clear();
    }
    // The hand-made one naming team-c's Bundle is replaced by its real contribution as
    // it applies; the other stays, and applies nothing.
    reconcile_until(&ctx, &fake, published).await?;
    assert_eq!(
        image(&fake),
        Some(theirs),
        "team-b's CatalogSource was replaced"
    );
    {
        let fk = fake.lock().unwrap();
        let conflict = fk
            .events
            .iter()
            .find(|e| e["reason"] == "ClusterResourcesConflict")
            .unwrap_or_else(|| panic!("no Warning Event: {:#?}", fk.events));
        assert_eq!(conflict["type"], "Warning");
        assert_eq!(conflict["regarding"]["name"], "c1");
        let note = conflict["note"].as_str().unwrap();
        assert!(
            note.contains("CatalogSource cs-redhat-operator-index-v4-18")
                && note.contains("Bundle team-b/b1's (namespace team-b)")
                && note.contains("Bundle team-c/c1's is not applied"),
            "{note}"
        );
        assert!(
            fk.objects
                .contains_key("/api/v1/namespaces/shipperd/configmaps/shipperd-cluster-forged"),
            "the forged ConfigMap is left alone"
        );
        let applied: Vec<&String> = fk.objects.keys().collect();
        assert!(
            !applied.iter().any(|k| k.contains("imagetagmirrorsets")),
            "a hand-made contribution applied something: {applied:#?}"
        );
        assert!(
            !fk.applied
                .iter()
                .any(|(_, v)| v.to_string().contains("quay.io/evil")),
            "{:#?}",
            fk.applied
        );
    }
    app.stop().await
}

/// One writer renders every namespace's targets: two namespaces' `mirror` both stay
/// (as `team-a/mirror` and `team-b/mirror`); a deleted one leaves the file with its
/// credentials; ShipperD's service-account token goes to no other host, and a
/// namespace's target that uses it lands only in its own project; an unlabelled Secret
/// is not read; only a cluster target is the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targets_of_every_namespace_render_into_one_file_and_stay_apart() -> anyhow::Result<()> {
    use shipperd_operator::targets::{Output, TargetsContext, render};
    let data = tempfile::tempdir()?;
    let url = "http://127.0.0.1:5000";
    let mut unlabelled = basic_auth_in("team-b", "plain", "u", "p");
    unlabelled["metadata"]["labels"] = json!({});
    let state = Arc::new(Mutex::new(FakeTargets {
        targets: vec![
            registry_target_in(
                "team-a",
                "mirror",
                json!({ "url": url, "default": true,
                "credentials": { "secretName": "push" } }),
            ),
            registry_target_in(
                "team-b",
                "mirror",
                json!({ "url": url,
                "credentials": { "secretName": "push" } }),
            ),
            registry_target_in(
                "team-b",
                "steal",
                json!({ "url": "https://evil.example",
                "credentials": { "serviceAccountToken": true } }),
            ),
            registry_target_in("team-b", "internal", json!({ "openshiftInternal": true })),
            registry_target_in(
                "team-b",
                "elsewhere",
                json!({ "openshiftInternal": true,
                "mapping": { "prefix": "team-a" } }),
            ),
            registry_target_in(
                "team-b",
                "plain",
                json!({ "url": url,
                "credentials": { "secretName": "plain" } }),
            ),
        ],
        cluster_targets: vec![
            cluster_target("shared", json!({ "url": url, "default": true })),
            // For team-a's Bundles only: not for uploads (which act for the upload
            // namespace, `shipperd` here).
            cluster_target(
                "team-a-only",
                json!({ "url": url, "conditions": [{ "namespaces": ["team-a"] }] }),
            ),
        ],
        secrets: vec![
            basic_auth_in("team-a", "push", "a", "a-password"),
            basic_auth_in("team-b", "push", "b", "b-password"),
            unlabelled,
        ],
        // OpenShift injects the service CA into every namespace.
        configmaps: vec![json!({ "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "openshift-service-ca.crt", "namespace": "team-b" },
            "data": { "service-ca.crt": shipperd_tests::pki::loopback_server_cert()?.ca_pem } })],
        ..FakeTargets::default()
    }));
    let mut ctx = TargetsContext::new(
        fake_targets_api(state.clone()),
        Output::under(data.path()),
        "shipperd",
    );
    ctx.service_account_token = data.path().join("sa-token");
    ctx.upload_namespace = Some("shipperd".into());
    std::fs::write(&ctx.service_account_token, "a-token")?;
    let rendered = render(&ctx).await?;
    let file = std::fs::read_to_string(&ctx.output.file)?;
    let verdict = |ns: Option<&str>, name: &str| {
        rendered
            .verdicts
            .iter()
            .find(|(w, _)| w.namespace.as_deref() == ns && w.name == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    for t in [
        "team-a/mirror",
        "team-b/mirror",
        "team-b/internal",
        "shared",
    ] {
        assert!(
            file.contains(&format!("name = \"{t}\"")),
            "{t}: {file}\n{:#?}",
            rendered.verdicts
        );
    }
    assert!(file.contains("default = \"shared\""), "{file}");
    let parsed = shipperd_registry_targets::Targets::parse(&file, data.path())?;
    let uploads = |n: &str| {
        parsed
            .get(Some(&shipperd_model::TargetName::parse(n).unwrap()))
            .unwrap()
            .uploads
    };
    assert!(uploads("shared"));
    assert!(!uploads("team-a-only"), "{file}");
    let secrets = data.path().join("config/secrets");
    assert_eq!(
        std::fs::read(secrets.join("team-a/mirror/password"))?,
        b"a-password"
    );
    assert_eq!(
        std::fs::read(secrets.join("team-b/mirror/password"))?,
        b"b-password"
    );
    assert_eq!(
        verdict(Some("team-b"), "steal").unwrap_err().reason,
        "ServiceAccountTokenRefused"
    );
    assert!(!file.contains("evil.example"), "{file}");
    assert_eq!(
        verdict(Some("team-b"), "elsewhere").unwrap_err().reason,
        "ProjectNotOwn"
    );
    assert_eq!(
        verdict(Some("team-b"), "plain").unwrap_err().reason,
        "SecretNotLabelled"
    );
    assert!(
        verdict(Some("team-a"), "mirror")
            .unwrap()
            .contains("default is ignored")
    );
    // team-b's internal target lands only in team-b's project.
    let internal = file
        .split("[[target]]")
        .find(|s| s.contains("name = \"team-b/internal\""))
        .unwrap();
    assert!(internal.contains("prefix = \"team-b\""), "{internal}");

    // team-b deletes its mirror: gone from the file, with its password.
    state
        .lock()
        .unwrap()
        .targets
        .retain(|t| !(t["metadata"]["namespace"] == "team-b" && t["metadata"]["name"] == "mirror"));
    render(&ctx).await?;
    let file = std::fs::read_to_string(&ctx.output.file)?;
    assert!(
        !file.contains("team-b/mirror") && file.contains("team-a/mirror"),
        "{file}"
    );
    assert!(
        !secrets.join("team-b/mirror").exists(),
        "the password stayed"
    );
    assert!(secrets.join("team-a/mirror/password").exists());

    // Every target gone: the file says so, and the services know no target.
    {
        let mut st = state.lock().unwrap();
        st.targets.clear();
        st.cluster_targets.clear();
    }
    render(&ctx).await?;
    let t = shipperd_registry_targets::Targets::load(&ctx.output.file)?;
    assert_eq!(t.iter().count(), 0);
    assert!(t.get(None).is_err());
    assert!(!secrets.join("team-a").exists());
    Ok(())
}

/// An error that reaches the reconciler is shown as a `Reconciled=False` condition and a
/// Warning Event, gone once a reconcile succeeds; a spec the schema would refuse (an
/// object older than it) is `Failed` with reason `InvalidSpec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_errors_and_bad_specs_show_in_the_status() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("errors", "e1", 0);
    std::fs::create_dir_all(app.data.path().join("import/ns"))?;
    std::fs::write(
        app.data.path().join("import/ns/e1.tar"),
        tar_bytes(&layout.oci_files(""))?,
    )?;
    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
        "metadata": { "name": "e1", "namespace": "ns", "uid": "uid-e1", "generation": 1,
                      "resourceVersion": "1" },
        "spec": { "source": { "path": { "path": "e1.tar" } } },
    }));
    fake.lock().unwrap().fail_patch = true;
    let ctx = context(&app, client).await?;
    let b: Bundle = serde_json::from_value(fake.lock().unwrap().bundle.clone())?;
    assert!(reconcile(Arc::new(b), ctx.clone()).await.is_err());
    {
        let fk = fake.lock().unwrap();
        let c = condition(&fk.bundle["status"], "Reconciled");
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&json!("False"), &json!("ReconcileError"))
        );
        assert!(c["message"].as_str().unwrap().contains("etcdserver"), "{c}");
        assert!(
            fk.events
                .iter()
                .any(|e| e["reason"] == "ReconcileError" && e["type"] == "Warning")
        );
    }
    fake.lock().unwrap().fail_patch = false;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Published").await?;
    let kinds: Vec<&str> = done["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(kinds, ["Ready", "Failed"], "the error is gone");

    let (client, fake) = fake_api(json!({
        "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
        "metadata": { "name": "e2", "namespace": "ns", "uid": "uid-e2", "generation": 1,
                      "resourceVersion": "1" },
        "spec": { "source": { "url": { "url": "http://127.0.0.1:9/x.tar", "sha256": "not-hex" } } },
    }));
    let ctx = context(&app, client).await?;
    let done = reconcile_until(&ctx, &fake, |b| b["status"]["phase"] == "Failed").await?;
    let failed = condition(&done["status"], "Failed");
    assert_eq!(failed["reason"], "InvalidSpec", "{failed}");
    assert!(failed["message"].as_str().unwrap().contains("not-hex"));
    app.stop().await
}

/// Signature policies in the resources: a `ClusterRegistryTarget`'s binds every
/// namespace's target of the same registry, and a namespace's own adds to it, never
/// replaces it: a tenant policy of `insecureAcceptAnything` under a cluster policy that
/// requires a cosign key still does not admit an unsigned image. A policy that names a
/// file (it would read the services' own files) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_policy_adds_to_the_clusters_and_never_weakens_it() -> anyhow::Result<()> {
    use base64::Engine as _;
    use shipperd_operator::targets::{Output, TargetsContext, render};
    let data = tempfile::tempdir()?;
    let url = "http://127.0.0.1:5000";
    let public = data.path().join("cosign.pub");
    let sigs = super::trust::cosign_sign(data.path(), &public, &[])?;
    assert!(sigs.is_empty());
    let key = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&public)?);
    let strict = json!({ "default": [{ "type": "sigstoreSigned", "keyData": key,
        "signedIdentity": { "type": "matchRepository" } }] })
    .to_string();
    let open = json!({ "default": [{ "type": "insecureAcceptAnything" }] }).to_string();
    let paths = json!({ "default": [{ "type": "sigstoreSigned",
        "keyPath": "/var/run/secrets/kubernetes.io/serviceaccount/token" }] })
    .to_string();
    let state = Arc::new(Mutex::new(FakeTargets {
        targets: vec![
            registry_target_in(
                "team-a",
                "open",
                json!({ "url": url, "signaturePolicy": open }),
            ),
            registry_target_in(
                "team-a",
                "reads-files",
                json!({ "url": url, "signaturePolicy": paths }),
            ),
            registry_target_in(
                "team-b",
                "elsewhere",
                json!({ "url": "http://127.0.0.1:5001", "signaturePolicy": open }),
            ),
        ],
        cluster_targets: vec![cluster_target(
            "shared",
            json!({ "url": url, "default": true, "signaturePolicy": strict }),
        )],
        ..FakeTargets::default()
    }));
    let ctx = TargetsContext::new(
        fake_targets_api(state.clone()),
        Output::under(data.path()),
        "shipperd",
    );
    let rendered = render(&ctx).await?;
    let refused = rendered
        .verdicts
        .iter()
        .find(|(w, _)| w.name == "reads-files")
        .map(|(_, v)| v.clone())
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.reason, "InvalidPolicy");
    assert!(refused.message.contains("keyData"), "{}", refused.message);
    let file = std::fs::read_to_string(&ctx.output.file)?;
    let targets = shipperd_registry_targets::Targets::parse(&file, data.path())?;
    let policies = |name: &str| {
        targets
            .get(Some(&shipperd_model::TargetName::parse(name).unwrap()))
            .unwrap()
            .policies
            .clone()
    };
    let shared = policies("shared");
    assert_eq!(shared.len(), 1, "{file}");
    let team_a = policies("team-a/open");
    assert_eq!(team_a.len(), 2, "the cluster's, then its own: {file}");
    assert_eq!(team_a[0], shared[0]);
    assert_eq!(
        policies("team-b/elsewhere").len(),
        1,
        "another registry: its own only"
    );

    // What unpack makes of team-a's target: an unsigned image is refused.
    let bundle = data.path().join("unsigned.tar");
    std::fs::write(
        &bundle,
        tar_bytes(&named_images("policy", &[("quay.io/org/app:1", "org/app", "1")]).oci_files(""))?,
    )?;
    let scratch = tempfile::tempdir()?;
    let check = |paths: &[std::path::PathBuf]| -> anyhow::Result<Option<String>> {
        let p = shipperd_trust::Policies::load(paths)
            .map_err(anyhow::Error::msg)?
            .unwrap();
        Ok(shipperd_trust::verify_bundle(
            std::slice::from_ref(&bundle),
            &p,
            &shipperd_bundle::Limits::default(),
            scratch.path(),
        )?
        .rejection)
    };
    let why = check(&team_a)?.expect("rejected");
    assert!(why.contains("quay.io/org/app:1: unsigned"), "{why}");
    assert!(check(&policies("team-b/elsewhere"))?.is_none());
    Ok(())
}
