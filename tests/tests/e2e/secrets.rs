//! Secrets stay secret: webhook URLs with credentials, tokens and secret paths, a registry's upload
//! session state (`?_state=`), the API's bearer tokens (right and wrong) appear nowhere
//! in the logs (at debug level), the bundle's status or the events; webhook redirects
//! are not followed.
//!
//! The registry here is a fake that misbehaves on purpose: it opens upload sessions whose
//! `Location` (carrying a secret `_state`) points at a closed port, so every blob upload
//! fails with a connection error naming that URL.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{sample, tar_bytes},
    webhook::WebhookSink,
};

const UPLOAD_STATE: &str = "SECRET-UPLOAD-STATE-7f3a";
const HOOK_PASS: &str = "SECRET-HOOK-PASS-91c2";
const HOOK_TOKEN: &str = "SECRET-HOOK-TOKEN-55de";
const SINK_TOKEN: &str = "SECRET-SINK-TOKEN-0b81";
/// A webhook whose path is its secret, as Slack's, Teams' and Discord's are.
const HOOK_PATH: &str = "SECRET-HOOK-PATH-2a6f";
const API_TOKEN: &str = "SECRET-API-TOKEN-c4e0";
const WRONG_TOKEN: &str = "SECRET-WRONG-TOKEN-e9d7";

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn serve(app: Router) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A registry whose upload sessions lead to a closed port.
async fn fake_registry() -> anyhow::Result<std::net::SocketAddr> {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let app = Router::new().fallback(move |req: Request| async move {
        let path = req.uri().path().to_string();
        match (req.method().as_str(), path.as_str()) {
            ("GET", "/v2/") => (StatusCode::OK, "{}").into_response(),
            ("POST", p) if p.ends_with("/blobs/uploads/") => {
                let repo = p
                    .trim_start_matches("/v2/")
                    .trim_end_matches("/blobs/uploads/");
                let mut h = HeaderMap::new();
                h.insert(
                    header::LOCATION,
                    format!("http://{dead}/v2/{repo}/blobs/uploads/0d1e?_state={UPLOAD_STATE}")
                        .parse()
                        .unwrap(),
                );
                h.insert("docker-upload-uuid", "0d1e".parse().unwrap());
                (StatusCode::ACCEPTED, h).into_response()
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    });
    serve(app).await
}

/// A webhook that answers every delivery with a redirect to `to`.
async fn redirecting(to: String) -> anyhow::Result<std::net::SocketAddr> {
    let app = Router::new().fallback(move || {
        let to = to.clone();
        async move {
            Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, to)
                .body(axum::body::Body::empty())
                .unwrap()
        }
    });
    serve(app).await
}

#[tokio::test(flavor = "current_thread")]
async fn secrets_stay_out_of_logs_status_and_events() -> anyhow::Result<()> {
    // Everything this test's tasks log (they all run on this thread), at debug level
    // for ShipperD's crates.
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,shipperd=debug,shipperd_ingest=debug,shipperd_unpack=debug,shipperd_publish=debug,shipperd_notify=debug",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let registry = fake_registry().await?;
    let sink = WebhookSink::start().await?;
    let elsewhere = WebhookSink::start().await?;
    let redirect = redirecting(elsewhere.url()).await?;
    let mut app = spawn_app(Options {
        targets_toml: Some(format!(
            "[[target]]\nname = \"default\"\nurl = \"http://{registry}\"\n[target.transfer]\nretries = 1\nretry_base = 0.05\n"
        )),
        max_attempts: Some(1),
        webhooks: vec![
            format!("http://{}/hook?token={SINK_TOKEN}", sink.addr),
            format!("http://hook:{HOOK_PASS}@{redirect}/hook?token={HOOK_TOKEN}"),
            format!("http://{}/services/T0/{HOOK_PATH}", redirect),
        ],
        auth_tokens: Some(format!("{API_TOKEN}\n")),
        ..Default::default()
    })
    .await?;

    let body = tar_bytes(&sample("secrets", "secrets", 0).oci_files(""))?;
    let url = format!("{}/v1/bundles/secrets.tar", app.base);
    let refused = app
        .http
        .put(&url)
        .bearer_auth(WRONG_TOKEN)
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(refused.status(), 401);
    let mut auth = HeaderMap::new();
    auth.insert(
        header::AUTHORIZATION,
        format!("Bearer {API_TOKEN}").parse()?,
    );
    app.http = reqwest::Client::builder().default_headers(auth).build()?;
    let (status, accepted) = app.put("secrets.tar", body, None).await?;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_string();
    let done = app.wait_done(&id, Duration::from_secs(90)).await?;
    assert_eq!(done["phase"], "Failed", "{done:#}");
    let images = app
        .http
        .get(format!("{}/v1/bundles/{id}/images", app.base))
        .send()
        .await?
        .text()
        .await?;
    shipperd_tests::eventually("the failure's event", Duration::from_secs(30), || async {
        (!sink.of_type("io.shipperd.bundle.failed").is_empty()).then_some(())
    })
    .await?;
    // The redirecting webhook was tried (and failed) at least once.
    shipperd_tests::eventually(
        "a failed delivery logged",
        Duration::from_secs(30),
        || async {
            logs.text()
                .contains("webhook delivery failed")
                .then_some(())
        },
    )
    .await?;

    let status = format!("{done}\n{images}");
    let events: String = sink
        .deliveries()
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    let logged = logs.text();
    // The paths that could leak were taken: the uploads failed on the connection to
    // the session's URL, and the redirect was answered.
    assert!(status.contains("connection to"), "{status}");
    assert!(logged.contains("redirects are not followed"), "{logged}");
    assert!(elsewhere.deliveries().is_empty(), "a redirect was followed");
    assert!(
        logged.contains(&format!("http://{redirect}")),
        "webhooks are logged by scheme and host: {logged}"
    );
    for secret in [
        UPLOAD_STATE,
        HOOK_PATH,
        HOOK_PASS,
        HOOK_TOKEN,
        SINK_TOKEN,
        API_TOKEN,
        WRONG_TOKEN,
    ] {
        assert!(
            !logged.contains(secret),
            "{secret} is in the logs:\n{logged}"
        );
        assert!(
            !status.contains(secret),
            "{secret} is in the status:\n{status}"
        );
        assert!(
            !events.contains(secret),
            "{secret} is in the events:\n{events}"
        );
    }
    app.stop().await
}
