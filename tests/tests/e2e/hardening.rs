//! What a bundle may not do to the data volume: expanding a compressed bundle keeps the
//! volume's free-space reserve (the bundle fails, saying so; the process and other
//! bundles go on), and a bundle deleted while it is unpacked leaves nothing behind.

use std::{path::Path, time::Duration};

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{TarCompression, compress, sample, tar_bytes},
};

const DONE: Duration = Duration::from_secs(90);

/// Bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expanding_a_compressed_bundle_keeps_the_free_space_reserve() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        limits: Some(shipperd_bundle::Limits {
            // More than any volume has free: every expansion would break the reserve.
            min_free_bytes: u64::MAX / 4,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let gz = sample("reserve-gz", "reserve-gz", 0);
    let body = compress(tar_bytes(&gz.oci_files(""))?, TarCompression::Gzip)?;
    let (st, b) = app.put("reserve-gz.tar.gz", body, None).await?;
    assert_eq!(st, 202, "{b}");
    let failed = app.wait_done(b["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(failed["phase"], "Failed", "{failed:#}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("no room to expand the bundle: the data volume has "),
        "{why}"
    );
    assert!(why.contains("--min-free-bytes"), "{why}");
    // Nothing of it stays in the blob store.
    assert_eq!(bytes_under(&app.data.path().join("cas/blobs")), 0);
    // A plain tar is read in place, needs no room, and is published meanwhile.
    let plain = sample("reserve-tar", "reserve-tar", 0);
    let (st, b) = app
        .put("reserve-tar.tar", tar_bytes(&plain.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{b}");
    let done = app.wait_done(b["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(done["phase"], "Published", "{done:#}");
    app.assert_published(&plain, "").await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_deleted_while_it_is_unpacked_leaves_nothing() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let data = app.data.path().to_path_buf();
    let before = bytes_under(&data.join("bundles")) + bytes_under(&data.join("cas"));
    // A large random layer: expanding it into the blob store takes a while.
    let b = sample("deleted-mid-unpack", "deleted-mid-unpack", 48);
    let body = compress(tar_bytes(&b.oci_files(""))?, TarCompression::Gzip)?;
    let (st, r) = app.put("deleted-mid-unpack.tar.gz", body, None).await?;
    assert_eq!(st, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    shipperd_tests::eventually("the unpack", Duration::from_secs(30), || async {
        let s = app.bundle(&id).await.ok()??;
        (s["phase"] == "Unpacking").then_some(())
    })
    .await?;
    let url = format!("{}/v1/bundles/{id}", app.base);
    let plain = app.http.delete(&url).send().await?;
    assert_eq!(
        plain.status(),
        409,
        "not without force while it is unpacked"
    );
    let forced = app.http.delete(format!("{url}?force=true")).send().await?;
    assert_eq!(forced.status(), 200);
    assert_eq!(app.http.get(&url).send().await?.status(), 404);
    // The unpack stops at its next check and lets go of what it wrote: the bundle, its
    // plans, its refs and blobs in the shared store.
    let left = shipperd_tests::eventually(
        "nothing left of the bundle",
        Duration::from_secs(30),
        || async {
            let now = bytes_under(&data.join("bundles")) + bytes_under(&data.join("cas"));
            (now <= before).then_some(now)
        },
    )
    .await;
    let refs: Vec<_> = std::fs::read_dir(data.join("cas/refs"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_ok(),
        "{} bytes stay under bundles/ and cas/ (refs: {refs:?})",
        bytes_under(&data.join("bundles")) + bytes_under(&data.join("cas"))
    );
    assert!(refs.is_empty(), "{refs:?}");
    // And stays so: what the unpack still wrote before it saw the deletion (it looks
    // every second, between reads) goes too, and nothing comes back after.
    let size = || bytes_under(&data.join("bundles")) + bytes_under(&data.join("cas"));
    let settled =
        shipperd_tests::eventually("nothing coming back", Duration::from_secs(30), || async {
            let first = size();
            tokio::time::sleep(Duration::from_secs(2)).await;
            (first <= before && size() <= before).then_some(())
        })
        .await;
    assert!(settled.is_ok(), "{} bytes came back", size());
    app.stop().await
}
