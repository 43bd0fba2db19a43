//! The gRPC API (`shipperd.v1.Bundles`) on the HTTP API's port, read by clients made from
//! `proto/` by the reference compiler (Python grpcio) and by `shipperd events`: a watch
//! sees the bundles there are, a marker, then a new bundle from Received to Published
//! in order; Get and List answer; the same bearer token is required, refused as gRPC
//! clients read refusals.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{Compression, sample},
};
use tokio::io::AsyncBufReadExt as _;

fn pypi() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/pypi")
}

/// Python modules for `proto/`, made by grpcio-tools' protoc, in `out`.
fn python_stubs(out: &Path) -> anyhow::Result<()> {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let o = std::process::Command::new("python3")
        .env("PYTHONPATH", pypi())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(["shipperd/v1/events.proto", "shipperd/v1/bundles.proto"])
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A Python gRPC client: `watch ID|- TOKEN` prints each message as a JSON line until
/// the bundle is Published or Failed; `get ID TOKEN` and `list TOKEN` print the answer,
/// or `{"code": ...}` when refused.
const CLIENT: &str = r#"
import json, sys, grpc
from google.protobuf import json_format
from shipperd.v1 import bundles_pb2, bundles_pb2_grpc
addr, what, *rest = sys.argv[1:]
stub = bundles_pb2_grpc.BundlesStub(grpc.insecure_channel(addr))
md = [("authorization", "Bearer " + rest[-1])] if rest and rest[-1] != "-" else []
show = lambda m: print(json.dumps(json_format.MessageToDict(m)), flush=True)
try:
    if what == "watch":
        for m in stub.Watch(bundles_pb2.WatchRequest(id=rest[0] if rest[0] != "-" else ""), metadata=md, timeout=120):
            show(m)
            if m.bundle.phase in (bundles_pb2.BUNDLE_PHASE_PUBLISHED, bundles_pb2.BUNDLE_PHASE_FAILED):
                break
    elif what == "get":
        show(stub.Get(bundles_pb2.GetRequest(id=rest[0]), metadata=md, timeout=30))
    elif what == "list":
        show(stub.List(bundles_pb2.ListRequest(limit=10), metadata=md, timeout=30))
except grpc.RpcError as e:
    print(json.dumps({"code": e.code().name, "details": e.details()}), flush=True)
"#;

fn python(stubs: &Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("python3");
    c.env(
        "PYTHONPATH",
        format!("{}:{}", stubs.display(), pypi().display()),
    )
    .args(["-c", CLIENT])
    .args(args)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

async fn python_once(stubs: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let o = tokio::time::timeout(Duration::from_secs(60), python(stubs, args).output()).await??;
    anyhow::ensure!(
        o.status.success(),
        "python: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn phase_rank(p: &str) -> usize {
    [
        "BUNDLE_PHASE_RECEIVED",
        "BUNDLE_PHASE_UNPACKING",
        "BUNDLE_PHASE_PUBLISHING",
        "BUNDLE_PHASE_TAGGING",
        "BUNDLE_PHASE_PUBLISHED",
    ]
    .iter()
    .position(|x| *x == p)
    .unwrap_or(usize::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_follows_a_bundle_to_its_end_for_a_client_made_by_protoc() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        auth_tokens: Some("grpc-token\n".into()),
        ..Default::default()
    })
    .await?;
    let addr = app.base.trim_start_matches("http://").to_string();
    let stubs = tempfile::tempdir()?;
    python_stubs(stubs.path())?;

    // Without the token, or with a wrong one: refused as gRPC says.
    let refused = python_once(stubs.path(), &[&addr, "list", "-"]).await?;
    assert_eq!(refused["code"], "UNAUTHENTICATED", "{refused}");
    assert!(
        refused["details"]
            .as_str()
            .unwrap_or_default()
            .contains("bearer token"),
        "{refused}"
    );
    let wrong = python_once(stubs.path(), &[&addr, "watch", "-", "not-it"]).await?;
    assert_eq!(wrong["code"], "UNAUTHENTICATED", "{wrong}");

    // A watch of every bundle, opened before there is any.
    let mut watcher = python(stubs.path(), &[&addr, "watch", "-", "grpc-token"]).spawn()?;
    let mut lines = tokio::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .unwrap_or_default();
    let first: serde_json::Value = serde_json::from_str(&first)?;
    assert_eq!(
        first,
        serde_json::json!({"synced": true}),
        "no bundle yet: the marker alone"
    );

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("grpc.squashfs");
    let layout = sample("grpc", "grpc", 1);
    layout.write_squashfs(&path, Compression::Gzip)?;
    let resp = app
        .http
        .put(format!("{}/v1/bundles/grpc.squashfs", app.base))
        .bearer_auth("grpc-token")
        .body(std::fs::read(&path)?)
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await?["id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut seen = Vec::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(90), lines.next_line()).await?? {
        seen.push(serde_json::from_str::<serde_json::Value>(&l)?);
    }
    let status = watcher.wait().await?;
    assert!(status.success(), "{seen:#?}");
    assert!(!seen.is_empty());
    // Every message is about this bundle; its phase never goes back; it ends Published
    // with every image counted.
    let mut rank = 0;
    for m in &seen {
        assert_eq!(m["bundle"]["id"], id.as_str(), "{m}");
        let r = phase_rank(m["bundle"]["phase"].as_str().unwrap_or_default());
        assert!(r != usize::MAX && r >= rank, "phases in order: {seen:#?}");
        rank = r;
    }
    let last = &seen[seen.len() - 1]["bundle"];
    assert_eq!(last["phase"], "BUNDLE_PHASE_PUBLISHED", "{seen:#?}");
    let images = layout.images.len() as u64;
    assert_eq!(last["images"]["total"].as_u64(), Some(images), "{last}");
    assert_eq!(last["images"]["published"].as_u64(), Some(images), "{last}");
    assert_eq!(last["name"], "grpc.squashfs");
    assert!(last["finishedAt"].is_string(), "{last}");

    // Get and List.
    let got = python_once(stubs.path(), &[&addr, "get", &id, "grpc-token"]).await?;
    assert_eq!(got["bundle"]["phase"], "BUNDLE_PHASE_PUBLISHED", "{got}");
    let missing = python_once(stubs.path(), &[&addr, "get", &"0".repeat(64), "grpc-token"]).await?;
    assert_eq!(missing["code"], "NOT_FOUND", "{missing}");
    let bad = python_once(stubs.path(), &[&addr, "get", "../etc", "grpc-token"]).await?;
    assert_eq!(bad["code"], "INVALID_ARGUMENT", "{bad}");
    let list = python_once(stubs.path(), &[&addr, "list", "grpc-token"]).await?;
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["bundles"][0]["id"], id.as_str());

    // A watch of the one bundle, now: its status, then the marker.
    let one = python_once(stubs.path(), &[&addr, "watch", &id, "grpc-token"]).await?;
    assert_eq!(one["bundle"]["phase"], "BUNDLE_PHASE_PUBLISHED", "{one}");

    // `shipperd events` (the CLI's tonic client): the bundle as a line, and as JSON.
    let token = app.data.path().join("tokens");
    let cli = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
            .arg("events")
            .args([
                "--server",
                &app.base,
                "--token-file",
                token.to_str().unwrap(),
            ])
            .args(args)
            .env_remove("SHIPPERD_SERVER")
            .output()
            .expect("shipperd runs");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr)),
        )
    };
    let (ok, out, err) = cli(&[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&id[..12]) && out.contains("grpc.squashfs") && out.contains("Published"),
        "{out}"
    );
    let (ok, out, err) = cli(&["--json", &id]);
    assert!(ok, "{out}\n{err}");
    let m: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())?;
    assert_eq!(m["bundle"]["phase"], "Published", "{out}");
    assert_eq!(m["bundle"]["images"]["total"].as_u64(), Some(images));
    let (ok, _, err) = cli(&[&"1".repeat(64)]);
    assert!(!ok && err.contains("no bundle with id"), "{err}");
    Ok(())
}
