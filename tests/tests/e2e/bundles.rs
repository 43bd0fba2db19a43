//! Bundle formats the unpack service reads, and bundles it must refuse.

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
    fixtures::{Compression, sample, sha256, tar_bytes},
    webhook::WebhookSink,
};

const DONE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_squashfs_compression_is_read_in_place() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let mut uploads = Vec::new();
    let kinds: [(&str, Option<Compression>); 5] = [
        ("gzip", Some(Compression::Gzip)),
        ("xz", Some(Compression::Xz)),
        ("zstd", Some(Compression::Zstd)),
        ("lz4", Some(Compression::Lz4)),
        ("none", None),
    ];
    for (name, comp) in kinds {
        let file_name = format!("{name}.squashfs");
        let layout = sample(name, name, 0);
        let path = dir.path().join(&file_name);
        match comp {
            Some(c) => layout.write_squashfs(&path, c)?,
            // Uncompressed, written by Debian's mksquashfs rather than backhand.
            None => layout.mksquashfs(&path, &["-noI", "-noD", "-noF", "-noX"])?,
        }
        let bytes = std::fs::read(&path)?;
        let (status, body) = app.put(&file_name, bytes, None).await?;
        assert_eq!(status, 202, "{name}: {body}");
        uploads.push((name, body["id"].as_str().unwrap().to_string(), layout));
    }
    for (name, id, layout) in &uploads {
        let rec = app.wait_done(id, DONE).await?;
        assert_eq!(rec["phase"], "Published", "{name}: {rec:#}");
        // The bundles share repositories and tags (the last one wins the tag), so look
        // each image up by its digest.
        for want in &layout.images {
            let (manifest, _) = app
                .manifest(&want.repo, &want.digest)
                .await?
                .unwrap_or_else(|| panic!("{name}: {}@{} missing", want.repo, want.digest));
            assert_eq!(sha256(&manifest), want.digest, "{name}");
        }
    }
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_blob_fails_the_bundle_and_tags_nothing() -> anyhow::Result<()> {
    let hook = WebhookSink::start().await?;
    let app = spawn_app(Options {
        webhooks: vec![hook.url()],
        ..Default::default()
    })
    .await?;
    let mut layout = sample("corrupt", "corrupt", 0);
    let tool = layout
        .images
        .iter()
        .find(|i| i.repo == "demo/tool")
        .unwrap()
        .clone();
    let bad = tool.blobs.last().unwrap().clone();
    layout.corrupt(&bad);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("corrupt.squashfs");
    layout.write_squashfs(&path, Compression::Zstd)?;

    let (status, body) = app
        .put("corrupt.squashfs", std::fs::read(&path)?, None)
        .await?;
    assert_eq!(status, 202, "{body}");
    let rec = app.wait_done(body["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap();
    // The reason names the image and the blob, so a person can act on it.
    assert!(error.contains(&bad), "{error}");
    assert!(error.contains("example.com/demo/tool:2.1"), "{error}");

    // The corrupt blob was found as it was sent: every image's content that was sound
    // may be in the registry by digest, but no tag of the bundle was set.
    for img in &layout.images {
        assert!(
            app.tags(&img.repo).await?.is_empty(),
            "{} was tagged",
            img.repo
        );
    }
    for repo in app.catalog().await? {
        assert!(app.tags(&repo).await?.is_empty(), "{repo} was tagged");
    }
    let failed = eventually("bundle.failed webhook", DONE, || async {
        hook.of_type("io.shipperd.bundle.failed").into_iter().next()
    })
    .await?;
    assert_eq!(failed.event["data"]["error"], error);
    assert!(hook.of_type("io.shipperd.image.published").is_empty());
    app.stop().await
}

/// A large blob is streamed, not read beforehand: the registry's digest check on commit
/// (`DIGEST_INVALID`) is what finds it corrupt, and the bundle still tags nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_large_blob_is_refused_by_the_registry_and_tags_nothing() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let mut layout = sample("corruptbig", "corruptbig", 2);
    let big = layout.images[0].blobs.last().unwrap().clone();
    assert!(layout.blobs[&big].len() > 1 << 20);
    layout.corrupt(&big);
    let (status, body) = app
        .put("corrupt-big.tar", tar_bytes(&layout.oci_files(""))?, None)
        .await?;
    assert_eq!(status, 202, "{body}");
    let rec = app.wait_done(body["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap();
    assert!(error.contains(&big), "{error}");
    assert!(error.contains("is corrupt in the bundle"), "{error}");
    assert!(error.contains("example.com/demo/app:1.0"), "{error}");
    assert_eq!(app.blob("demo/app", &big).await?, None, "committed");
    for repo in app.catalog().await? {
        assert!(app.tags(&repo).await?.is_empty(), "{repo} was tagged");
    }
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_that_is_not_a_bundle_fails_with_its_format() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let (status, body) = app
        .put(
            "notes.squashfs",
            b"PK\x03\x04 this is a zip, whatever the name says".to_vec(),
            None,
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let rec = app.wait_done(body["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("unsupported bundle format: unknown"),
        "{rec:#}"
    );

    // A squashfs without an OCI layout is refused with a reason too.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("readme.txt"), "no images here")?;
    let out = dir.path().join("empty.squashfs");
    let st = std::process::Command::new("mksquashfs")
        .arg(dir.path().join("readme.txt"))
        .arg(&out)
        .args(["-noappend", "-quiet", "-no-progress"])
        .status()?;
    assert!(st.success());
    let (_, body) = app
        .put("empty.squashfs", std::fs::read(&out)?, None)
        .await?;
    let rec = app.wait_done(body["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("found neither an OCI image layout"),
        "{rec:#}"
    );
    app.stop().await
}
