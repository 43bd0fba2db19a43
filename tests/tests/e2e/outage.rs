//! A crash loses nothing: a registry that goes away mid-publish only delays the bundle.

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
    fixtures::{Compression, sample, sha256},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_delays_the_bundle_and_loses_nothing() -> anyhow::Result<()> {
    let mut app = spawn_app(Options {
        // Retries at 1, 2, 4, 8 s: room for the registry to come back.
        publish_retry: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await?;
    app.registry.kill();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o.squashfs");
    let layout = sample("outage", "o", 0);
    layout.write_squashfs(&path, Compression::Xz)?;
    let (_, body) = app.put("o.squashfs", std::fs::read(&path)?, None).await?;
    let id = body["id"].as_str().unwrap().to_string();

    // Unpacked, jobs out, pushes failing: the bundle waits in Publishing.
    eventually(
        "bundle to reach Publishing",
        Duration::from_secs(30),
        || async {
            let b = app.bundle(&id).await.ok()??;
            (b["phase"] == "Publishing").then_some(())
        },
    )
    .await?;
    app.registry.restart().await?;

    let rec = app.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    for want in &layout.images {
        let (m, _) = app.manifest(&want.repo, &want.tag).await?.expect("tagged");
        assert_eq!(sha256(&m), want.digest);
    }
    app.stop().await
}
