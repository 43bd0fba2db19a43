//! A bundle fetched from a URL (a `Bundle` resource's `url` source): a connection cut
//! mid-way is resumed with `Range`, the bytes are checked against the sha256 the source
//! names, and the bundle is published like an upload.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::Response,
    routing::get,
};
use shipperd_model::{BundleId, DataDir};
use shipperd_store::{FetchSettings, FetchSource, Store};
use shipperd_tests::{
    app::{Options, TestApp, spawn_app},
    fixtures::{sample, sha256, tar_bytes},
};

const DONE: Duration = Duration::from_secs(90);

/// A file server whose first answer is cut after `cut` bytes; `ranges` says whether it
/// honours `Range` afterwards (else it sends the whole file again).
#[derive(Clone)]
struct Server {
    bytes: Arc<Vec<u8>>,
    cut: usize,
    ranges: bool,
    requests: Arc<AtomicUsize>,
    seen_ranges: Arc<Mutex<Vec<String>>>,
}

async fn serve(State(s): State<Server>, headers: HeaderMap) -> Response {
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(r) = &range {
        s.seen_ranges.lock().unwrap().push(r.clone());
    }
    let total = s.bytes.len();
    if n == 0 {
        // The whole length announced, a part sent, then the connection breaks.
        let part = bytes::Bytes::copy_from_slice(&s.bytes[..s.cut]);
        let stream =
            futures::stream::iter(vec![Ok(part), Err(std::io::Error::other("connection cut"))]);
        return Response::builder()
            .header(header::CONTENT_LENGTH, total)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let from = range.filter(|_| s.ranges).and_then(|r| {
        r.strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse::<usize>()
            .ok()
    });
    match from {
        Some(from) => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {from}-{}/{total}", total - 1),
            )
            .body(Body::from(s.bytes[from..].to_vec()))
            .unwrap(),
        None => Response::new(Body::from(s.bytes.as_ref().clone())),
    }
}

async fn start(bytes: Vec<u8>, ranges: bool) -> anyhow::Result<(String, Server)> {
    let server = Server {
        cut: bytes.len() * 2 / 5,
        bytes: Arc::new(bytes),
        ranges,
        requests: Arc::default(),
        seen_ranges: Arc::default(),
    };
    let app = Router::new()
        .route("/bundles/{name}", get(serve))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}/bundles/b.tar?token=secret",
        listener.local_addr()?
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, server))
}

async fn store(app: &TestApp) -> anyhow::Result<Store> {
    let bus = shipperd_bus::Bus::connect(&app.nats.url(), "test-fetch").await?;
    Ok(Store::open(bus, &DataDir::new(app.data.path()), 1 << 40).await?)
}

fn quick() -> FetchSettings {
    FetchSettings {
        attempts: 4,
        stall_timeout: Duration::from_secs(5),
        retry_base: Duration::from_millis(50),
        // The test's file servers are on loopback.
        egress: shipperd_registry_targets::Egress {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_cut_mid_way_resumes_and_publishes() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("fetch", "fetch", 2);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let id = BundleId::parse(&sha256(&bytes)[7..])?;
    let (url, server) = start(bytes.clone(), true).await?;
    let store = store(&app).await?;
    let source = FetchSource {
        url: url.clone(),
        sha256: id.clone(),
        ca_pem: None,
        owner: None,
    };
    let accepted = store.fetch("fetch.tar", &source, None, &quick()).await?;
    assert!(accepted.created);
    assert_eq!(accepted.summary.size, bytes.len() as u64);
    // Two requests: the cut one, then the rest from where it stopped.
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        *server.seen_ranges.lock().unwrap(),
        [format!("bytes={}-", server.cut)]
    );
    let rec = app.wait_done(id.as_str(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["name"], "fetch.tar");
    app.assert_published(&layout, "").await?;

    // Known by its sha256: nothing is fetched again.
    let again = store.fetch("fetch.tar", &source, None, &quick()).await?;
    assert!(!again.created);
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    app.stop().await
}

/// A fetch that gives up (its replica lost the lead, or stopped) leaves what arrived on
/// the shared volume; the next fetch of the bundle, by another replica, resumes it with
/// `Range` from there. Deleting the Bundle mid-way removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_left_unfinished_is_resumed_by_another_replica() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("fetch-resume", "resume", 2);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let id = BundleId::parse(&sha256(&bytes)[7..])?;
    let (url, server) = start(bytes.clone(), true).await?;
    let source = FetchSource {
        url,
        sha256: id.clone(),
        ca_pem: None,
        owner: Some("team-a".into()),
    };
    let first = store(&app).await?;
    let once = FetchSettings {
        attempts: 1,
        ..quick()
    };
    let err = first
        .fetch("resume.tar", &source, None, &once)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed 1 times"), "{err}");
    let part = app.data.path().join(format!("fetch/{id}.part"));
    assert_eq!(
        std::fs::metadata(&part)?.len(),
        server.cut as u64,
        "what arrived is kept"
    );
    drop(first);

    let second = store(&app).await?;
    let accepted = second.fetch("resume.tar", &source, None, &quick()).await?;
    assert!(accepted.created);
    assert_eq!(accepted.summary.owner.as_deref(), Some("team-a"));
    assert_eq!(
        *server.seen_ranges.lock().unwrap(),
        [format!("bytes={}-", server.cut)],
        "resumed from where the first replica stopped"
    );
    assert!(!part.exists());
    let rec = app.wait_done(id.as_str(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");

    // Given up again, then its Bundle deleted: nothing of it stays.
    let other = sample("fetch-forget", "forget", 1);
    let bytes = tar_bytes(&other.oci_files(""))?;
    let id = BundleId::parse(&sha256(&bytes)[7..])?;
    let (url, _server) = start(bytes, true).await?;
    let source = FetchSource {
        url,
        sha256: id.clone(),
        ca_pem: None,
        owner: None,
    };
    second
        .fetch("forget.tar", &source, None, &once)
        .await
        .unwrap_err();
    let part = app.data.path().join(format!("fetch/{id}.part"));
    assert!(part.exists());
    second.forget_fetch(&id).await;
    assert!(!part.exists());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_without_ranges_is_fetched_again_and_a_wrong_sha256_keeps_nothing()
-> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let layout = sample("fetch-norange", "norange", 1);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    let id = BundleId::parse(&sha256(&bytes)[7..])?;
    let (url, server) = start(bytes.clone(), false).await?;
    let store = store(&app).await?;

    // The checksum the resource names is not the file's: refused, nothing kept.
    let wrong = FetchSource {
        url: url.clone(),
        sha256: BundleId::parse(&"e".repeat(64))?,
        ca_pem: None,
        owner: None,
    };
    let err = store
        .fetch("wrong.tar", &wrong, None, &quick())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(app.temp_files(), 0);
    assert!(
        !app.data
            .path()
            .join(format!("fetch/{}.part", "e".repeat(64)))
            .exists(),
        "a whole, wrong file is not kept to resume"
    );
    assert!(app.bundle(&"e".repeat(64)).await?.is_none());

    // The cut transfer cannot be resumed (the server ignores Range): fetched again whole.
    server.requests.store(0, Ordering::SeqCst);
    let source = FetchSource {
        url,
        sha256: id.clone(),
        ca_pem: None,
        owner: None,
    };
    let accepted = store.fetch("norange.tar", &source, None, &quick()).await?;
    assert!(accepted.created);
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        3,
        "cut, whole again from a range, then whole"
    );
    let rec = app.wait_done(id.as_str(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(app.temp_files(), 0);

    // A URL's query (a token, often) never shows in errors.
    let gone = FetchSource {
        url: "http://127.0.0.1:9/bundle.tar?token=hunter2".into(),
        sha256: BundleId::parse(&"f".repeat(64))?,
        ca_pem: None,
        owner: None,
    };
    let err = store
        .fetch(
            "gone.tar",
            &gone,
            None,
            &FetchSettings {
                attempts: 2,
                ..quick()
            },
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("failed 2 times"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    app.stop().await
}

/// A `Bundle`'s URL is a tenant's: by default it reaches no loopback, private or
/// link-local address, named by address or by a name that resolves there; the file
/// server is never asked. The admin's allowed networks let it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_to_a_private_address_is_refused_unless_allowed() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let bytes = tar_bytes(&sample("egress", "egress", 0).oci_files(""))?;
    let id = BundleId::parse(&sha256(&bytes)[7..])?;
    let (url, server) = start(bytes, true).await?;
    let store = store(&app).await?;
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
    let strict = FetchSettings {
        egress: Default::default(),
        ..quick()
    };
    for to in [
        url.clone(),
        format!("http://localhost:{port}/bundle"),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let source = FetchSource {
            url: to.clone(),
            sha256: id.clone(),
            ca_pem: None,
            owner: Some("team-a".into()),
        };
        let err = store
            .fetch("egress.tar", &source, None, &strict)
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("not reached") || err.to_string().contains("not allowed"),
            "{to}: {err}"
        );
    }
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "the server was asked"
    );
    assert_eq!(app.stored_bundles(), 0);
    // Allowed by the admin: fetched.
    let source = FetchSource {
        url,
        sha256: id,
        ca_pem: None,
        owner: Some("team-a".into()),
    };
    assert!(
        store
            .fetch("egress.tar", &source, None, &quick())
            .await?
            .created
    );
    app.stop().await
}
