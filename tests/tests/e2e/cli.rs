//! `shipperd status|retry|delete` against a running stack: a table of bundles, one
//! bundle's phase, counts and error in text and `--json`, the token the API asks for,
//! and errors a person can act on.

use std::{process::Command, time::Duration};

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{Compression, sample},
};

fn shipperd(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(args)
        .env_remove("SHIPPERD_SERVER")
        .env_remove("SHIPPERD_TOKEN_FILE")
        .output()
        .expect("shipperd runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_retry_and_delete_from_the_command_line() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        auth_tokens: Some("s3cret-token\n".into()),
        ..Default::default()
    })
    .await?;
    let token = app.data.path().join("tokens");
    let token = token.to_str().unwrap();
    let server = app.base.as_str();

    // A good bundle and a broken one, uploaded with the token.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("good.squashfs");
    let layout = sample("cli", "cli", 0);
    layout.write_squashfs(&path, Compression::Gzip)?;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (name, body) in [
        ("good.squashfs", std::fs::read(&path)?),
        ("broken.tar", b"this is not a bundle".repeat(100)),
    ] {
        let r: serde_json::Value = http
            .put(format!("{server}/v1/bundles/{name}"))
            .bearer_auth("s3cret-token")
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    let auth_http = {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("authorization", "Bearer s3cret-token".parse()?);
        reqwest::Client::builder().default_headers(h).build()?
    };
    for id in &ids {
        shipperd_tests::bundle_ended(&auth_http, server, id, None, Duration::from_secs(60)).await?;
    }
    let (good, broken) = (&ids[0], &ids[1]);

    // Without the token: refused, saying what to give.
    let (ok, _, err) = shipperd(&["status", "--server", server]);
    assert!(!ok);
    assert!(err.contains("--token-file"), "{err}");

    // The table: a header and one line per bundle.
    let (ok, out, err) = shipperd(&["status", "--server", server, "--token-file", token]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains(&good[..12]) && out.contains("Published"),
        "{out}"
    );
    assert!(
        out.contains(&broken[..12]) && out.contains("Failed"),
        "{out}"
    );

    // One bundle, as text and as the API's JSON.
    let (ok, out, _) = shipperd(&["status", "--server", server, "--token-file", token, good]);
    assert!(ok);
    assert!(out.contains("phase    Published"), "{out}");
    let n = layout.images.len();
    assert!(
        out.contains(&format!("images   {n} total, {n} published")),
        "{out}"
    );
    let (ok, out, _) = shipperd(&[
        "status",
        "--json",
        "--server",
        server,
        "--token-file",
        token,
        broken,
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["phase"], "Failed");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    let (_, out, _) = shipperd(&["status", "--server", server, "--token-file", token, broken]);
    assert!(out.contains("error    "), "{out}");

    // Retry of a published bundle is refused with the API's reason; delete works.
    let (ok, _, err) = shipperd(&["retry", "--server", server, "--token-file", token, good]);
    assert!(!ok);
    assert!(
        err.to_lowercase().contains("publish") || err.contains("409"),
        "{err}"
    );
    let (ok, out, err) = shipperd(&["delete", "--server", server, "--token-file", token, broken]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (ok, _, err) = shipperd(&["status", "--server", server, "--token-file", token, broken]);
    assert!(!ok);
    assert!(err.contains("no bundle with id"), "{err}");
    app.stop().await
}

/// `shipperd push`: a tar bundle in parts through a proxy that breaks the first try of
/// part 2 (503): that part is sent again and the bundle is published; the output on a
/// non-terminal is plain lines; several files are one bundle; a squashfs image (which
/// cannot be split) goes in one request, sent again whole when it is refused or cut; a bundle that
/// fails exits non-zero with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_uploads_in_parts_resumes_and_follows() -> anyhow::Result<()> {
    use shipperd_tests::{
        fixtures::tar_bytes,
        proxy::{Fault, Proxy},
    };
    let app = spawn_app(Options::default()).await?;
    let proxy = Proxy::start(&app.base).await?;
    let (mut broke_part, mut broke_put) = (false, false);
    proxy.rule(move |method, path| {
        // A hop that does not carry HTTP/2 (an OpenShift route without it): the watch
        // is answered 502.
        if path.starts_with("/shipperd.v1.") {
            return Fault::Status(502, None);
        }
        if method == "PUT" && path.contains("/parts/2?") && !broke_part {
            broke_part = true;
            return Fault::Status(503, None);
        }
        if method == "PUT" && path.starts_with("/v1/bundles/") && !broke_put {
            broke_put = true;
            return Fault::Status(503, None);
        }
        Fault::Pass
    });
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("push.tar");
    let whole = tar_bytes(&sample("push", "push", 3).oci_files(""))?;
    std::fs::write(&path, &whole)?;
    assert!(whole.len() > 2 << 20, "at least three parts of 1 MiB");

    let server = proxy.url();
    let (ok, out, err) = shipperd(&[
        "push",
        "--server",
        &server,
        "--part-size",
        "1048576",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("part 1/") && err.contains("bytes ("), "{err}");
    // Refused (503) or cut while still sending: part 2 goes again, alone.
    assert!(
        (err.contains("part 2: 503") || err.contains("part 2: error sending request"))
            && err.contains("part 2")
            && err.contains("(attempt 2)"),
        "{err}"
    );
    assert!(
        !err.contains("part 1: "),
        "only the broken part is sent again: {err}"
    );
    assert!(!err.contains('\r'), "no bar on a non-terminal: {err:?}");
    assert!(out.contains("push.tar: received as "), "{out}");
    // The watch cannot pass the proxy: push polls instead.
    assert!(err.contains("by polling"), "{err}");
    assert!(
        out.lines().last().unwrap_or_default().contains("Published"),
        "{out}"
    );

    // The same bytes as two files: read as one bundle (here in one part of both).
    let (a, b) = whole.split_at(whole.len() / 2);
    let (pa, pb) = (dir.path().join("p1"), dir.path().join("p2"));
    std::fs::write(&pa, a)?;
    std::fs::write(&pb, b)?;
    let (ok, out, err) = shipperd(&[
        "push",
        "--server",
        &app.base,
        "--name",
        "push.tar",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.lines().last().unwrap_or_default().contains("Published"),
        "{out}"
    );
    // Straight to the server, the bundle is followed with the gRPC watch.
    assert!(!err.contains("by polling"), "{err}");

    // A squashfs image: one request, sent again whole after the 503.
    let sq = dir.path().join("push.squashfs");
    sample("push-sq", "pushsq", 1).write_squashfs(&sq, Compression::Gzip)?;
    let (ok, out, err) = shipperd(&["push", "--server", &server, sq.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    // The proxy answers 503 without reading the body: the client sees the answer, or,
    // still sending, a connection cut under it. Either way the whole is sent again.
    assert!(
        (err.contains("upload: 503") || err.contains("upload: error sending request"))
            && err.contains("sending it again (attempt 2)"),
        "{err}"
    );
    assert!(
        out.lines().last().unwrap_or_default().contains("Published"),
        "{out}"
    );

    // A broken bundle: non-zero, with the reason.
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, b"not a bundle at all".repeat(64))?;
    let (ok, _, err) = shipperd(&["push", "--server", &app.base, bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("failed:"), "{err}");
    app.stop().await
}
