//! `shipperd create`: a bundle made from a real docker-registry (the connected side),
//! carried to a site and published there with every digest the source has; the same
//! inputs give the same bytes, a second run with the same cache fetches no blob again,
//! and the tar is an OCI layout skopeo reads.

use std::{path::Path, process::Command, time::Duration};

use shipperd_tests::{
    app::{Options, skopeo, spawn_app},
    fixtures::sample,
    proxy::Proxy,
    servers,
};

fn shipperd(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(args)
        .output()
        .expect("shipperd runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn create(out: &Path, images: &Path, cache: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "create",
        out.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend(extra);
    let (ok, stdout, stderr) = shipperd(&args);
    anyhow::ensure!(ok, "shipperd create failed: {stderr}{stdout}");
    Ok(stdout)
}

/// Blob downloads the proxy passed on.
fn blob_gets(p: &Proxy) -> usize {
    p.log()
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("/blobs/sha256:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_made_from_a_registry_publishes_with_the_sources_digests() -> anyhow::Result<()> {
    shipperd_tests::init();
    // The connected side: a registry holding the sample images (a multi-arch index,
    // a shared layer, a 2 MiB layer), reached through a proxy that logs every request.
    let source = servers::Registry::start().await?;
    let layout = sample("create", "demo/bundle", 2);
    layout
        .push_to(&reqwest::Client::new(), &source.url())
        .await?;
    let proxy = Proxy::start(&source.url()).await?;
    let host = proxy.addr.to_string();

    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images.txt");
    let bundle_img = &layout.images[3];
    std::fs::write(
        &images,
        format!(
            "# the sample, by tag and by tag and digest\n\
             {host}/demo/app:1.0\n{host}/demo/tool:2.1\n\n{host}/demo/multi:latest  # index\n\
             {host}/demo/bundle:v3@{}\n",
            bundle_img.digest
        ),
    )?;
    let cache = dir.path().join("cache");

    // The plan fetches no blob, and says what is to fetch.
    let (ok, plan, err) = shipperd(&[
        "create",
        dir.path().join("x.squashfs").to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--plan",
        "--json",
    ]);
    anyhow::ensure!(ok, "--plan failed: {err}");
    let plan: serde_json::Value = serde_json::from_str(&plan)?;
    assert_eq!(plan["images"].as_array().map(Vec::len), Some(4), "{plan}");
    assert_eq!(
        plan["images"][2]["manifests"], 3,
        "an index and its two children"
    );
    assert!(plan["to_fetch"].as_u64() > Some(2 << 20), "{plan}");
    assert_eq!(blob_gets(&proxy), 0, "the plan fetches no blob");
    assert!(!dir.path().join("x.squashfs").exists());

    // A squashfs, then a tar from the same cache: nothing fetched again.
    let sq = dir.path().join("site.squashfs");
    create(&sq, &images, &cache, &[])?;
    let first_gets = blob_gets(&proxy);
    let distinct: std::collections::BTreeSet<&String> =
        layout.images.iter().flat_map(|i| &i.blobs).collect();
    assert_eq!(first_gets, distinct.len(), "each blob fetched once");
    let tar = dir.path().join("site.tar");
    create(&tar, &images, &cache, &[])?;
    create(&dir.path().join("again.squashfs"), &images, &cache, &[])?;
    assert_eq!(
        blob_gets(&proxy),
        first_gets,
        "the cache serves the second run"
    );
    assert_eq!(
        std::fs::read(&sq)?,
        std::fs::read(dir.path().join("again.squashfs"))?,
        "the same inputs give the same bytes"
    );
    // A fresh cache, a second later: the same bytes again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = dir.path().join("fresh.tar");
    create(&fresh, &images, &dir.path().join("cache2"), &[])?;
    assert_eq!(std::fs::read(&tar)?, std::fs::read(&fresh)?);

    // The tar is an OCI layout skopeo reads, each image under its full source name.
    let oci = dir.path().join("oci");
    std::fs::create_dir(&oci)?;
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&oci)
        .status()?;
    assert!(st.success());
    let raw = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:{host}/demo/multi:latest", oci.display()),
    ])?;
    assert_eq!(
        shipperd_tests::fixtures::sha256(&raw),
        layout.images[2].digest
    );
    skopeo(&[
        "copy",
        "--all",
        &format!("oci:{}:{host}/demo/app:1.0", oci.display()),
        &format!("dir:{}", dir.path().join("copied").display()),
    ])?;

    // The site: both bundles publish every digest as the source has it.
    let app = Box::pin(spawn_app(Options::default())).await?;
    for (name, path) in [("site.squashfs", &sq), ("site.tar", &tar)] {
        let (status, body) = app.put(name, std::fs::read(path)?, None).await?;
        assert!(status == 202 || status == 200, "{status} {body}");
        let id = body["id"].as_str().unwrap().to_string();
        let done = app.wait_done(&id, Duration::from_secs(60)).await?;
        assert_eq!(done["phase"], "Published", "{done}");
        app.assert_published(&layout, "").await?;
    }
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_by_name_and_writes_nothing() -> anyhow::Result<()> {
    let source = servers::Registry::start().await?;
    let host = source.host();
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images.txt");
    std::fs::write(&images, format!("{host}/nothing/here:1\n"))?;
    let out = dir.path().join("b.tar");
    let err = create(&out, &images, &dir.path().join("cache"), &[]).unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains(&format!("{host}/nothing/here:1")) && err.contains("not found"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::write(&images, "Not A Reference\n")?;
    let err = create(&out, &images, &dir.path().join("cache"), &[]).unwrap_err();
    assert!(err.to_string().contains("images.txt:1"), "{err}");
    Ok(())
}
