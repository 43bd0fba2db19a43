//! Drift (issue 32): what a Published bundle put in the registry, changed behind
//! ShipperD's back — a tag re-pushed to another digest, a manifest deleted — is found by
//! `POST /v1/bundles/{id}/check` and `shipperd check ID`, each image named with what was
//! found; an untouched bundle checks in sync.

use std::{process::Command, time::Duration};

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{named_images, tar_bytes},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_and_a_deleted_manifest_are_found_and_named() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let b = named_images(
        "drift",
        &[
            ("quay.io/drift/app:1", "drift/app", "1"),
            ("quay.io/drift/app:2", "drift/app", "2"),
            ("quay.io/drift/other:1", "drift/other", "1"),
        ],
    );
    let (status, r) = app
        .put("drift.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(status, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let rec = app.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");

    // Untouched: in sync.
    let (status, d) = app.post(&format!("/v1/bundles/{id}/check")).await?;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["checked"], 3, "{d:#}");
    assert_eq!(d["in_sync"], true, "{d:#}");

    // Behind ShipperD's back: app:1 re-pushed with app:2's manifest, other's manifest
    // deleted (its tag goes with it).
    let (app2, media) = app.manifest("drift/app", "2").await?.expect("app:2");
    let put = app
        .reg_http
        .put(format!("{}/v2/drift/app/manifests/1", app.registry.url()))
        .header("content-type", media)
        .body(app2)
        .send()
        .await?;
    assert_eq!(put.status(), 201);
    let other = &b.images[2].digest;
    let del = app
        .reg_http
        .delete(format!(
            "{}/v2/drift/other/manifests/{other}",
            app.registry.url()
        ))
        .send()
        .await?;
    assert_eq!(del.status(), 202);

    let (status, d) = app.post(&format!("/v1/bundles/{id}/check")).await?;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["in_sync"], false, "{d:#}");
    assert_eq!(d["checked"], 3, "{d:#}");
    assert_eq!(d["moved_tags"], 1, "{d:#}");
    assert_eq!(d["missing_tags"], 1, "{d:#}");
    assert_eq!(d["missing_manifests"], 1, "{d:#}");
    let first = d["first"].as_array().unwrap();
    assert_eq!(first.len(), 2, "{d:#}");
    let found = |repo: &str| {
        first
            .iter()
            .find(|f| f["target"].as_str().unwrap_or_default().contains(repo))
            .map(|f| f["found"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        found("drift/app:1"),
        format!("tag moved to {}", b.images[1].digest),
        "{d:#}"
    );
    assert_eq!(
        found("drift/other:1"),
        "tag missing, manifest missing",
        "{d:#}"
    );

    // The command line says the same and exits non-zero.
    let o = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["check", "--server", &app.base, &id])
        .env_remove("SHIPPERD_SERVER")
        .env_remove("SHIPPERD_TOKEN_FILE")
        .output()?;
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!o.status.success(), "{out}{err}");
    assert!(out.contains("1 tags moved"), "{out}");
    assert!(
        out.contains("drift/other:1") && out.contains("manifest missing"),
        "{out}"
    );
    assert!(err.contains("drifted"), "{err}");

    // Only a Published bundle is checked; an unknown one is not found.
    let (status, _) = app
        .post("/v1/bundles/00000000000000000000000000/check")
        .await?;
    assert!(status == 404 || status == 400, "{status}");
    app.stop().await
}
