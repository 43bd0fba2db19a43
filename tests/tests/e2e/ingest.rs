//! Taking bundles in: checksums, duplicates, the drop directory.

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
    fixtures::{Compression, sample, sha256},
};

const DONE: Duration = Duration::from_secs(90);

fn bundle(salt: &str) -> anyhow::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.squashfs");
    sample(salt, "b", 0).write_squashfs(&path, Compression::Lz4)?;
    Ok(std::fs::read(path)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_checksum_is_refused_and_nothing_is_kept() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let bytes = bundle("mismatch")?;
    let wrong = "0".repeat(64);
    let (status, body) = app.put("b.squashfs", bytes.clone(), Some(&wrong)).await?;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("checksum mismatch"), "{error}");
    assert!(
        error.contains(&sha256(&bytes)[7..]),
        "the answer names the real checksum: {error}"
    );
    assert_eq!(app.temp_files(), 0);
    assert_eq!(app.stored_bundles(), 0);
    assert!(app.bundles().await?.is_empty());

    let (status, _) = app
        .put("b.squashfs", bytes.clone(), Some("not-hex"))
        .await?;
    assert_eq!(status, 400);
    let (status, _) = app.put("..hidden", bytes, None).await?;
    assert_eq!(status, 400);
    assert_eq!(app.temp_files(), 0);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_bundle_twice_is_one_bundle_processed_once() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let bytes = bundle("twice")?;
    let id = sha256(&bytes)[7..].to_string();
    let (status, first) = app.put("one.squashfs", bytes.clone(), None).await?;
    assert_eq!(status, 202);
    assert_eq!(first["id"], id.as_str());
    app.wait_done(&id, DONE).await?;

    // Same bytes under another name, with and without the checksum: same id, 200.
    let (status, again) = app.put("two.squashfs", bytes.clone(), None).await?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["status"], "Published");
    let (status, again) = app.put("three.squashfs", bytes, Some(&id)).await?;
    assert_eq!(status, 200);
    assert_eq!(again["id"], id.as_str());

    let all = app.bundles().await?;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["name"], "one.squashfs");
    assert_eq!(app.stored_bundles(), 1);
    assert_eq!(app.temp_files(), 0);

    // One bundle.received and one bundle.published on the bus, not two.
    let js = async_nats::jetstream::new(async_nats::connect(app.nats.url()).await?);
    let stream = js.get_stream("SHIPPERD").await?;
    let info = stream
        .info_with_subjects("shipperd.events.bundle.>")
        .await?;
    use futures::TryStreamExt;
    let counts: std::collections::HashMap<String, usize> = info.try_collect().await?;
    assert_eq!(
        counts.get("shipperd.events.bundle.received"),
        Some(&1),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("shipperd.events.bundle.published"),
        Some(&1),
        "{counts:?}"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_copied_into_the_drop_directory_is_taken_once_complete() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        drop_dir: true,
        ..Default::default()
    })
    .await?;
    let drop = app.drop_dir.clone().unwrap();
    let bytes = bundle("dropped")?;
    let id = sha256(&bytes)[7..].to_string();
    // As rsync does: write under a hidden temp name, then rename.
    eventually("drop dir to exist", DONE, || async {
        drop.exists().then_some(())
    })
    .await?;
    let tmp = drop.join(".dropped.squashfs.Xa81b2");
    std::fs::write(&tmp, &bytes[..bytes.len() / 2])?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes[bytes.len() / 2..]))?;
    std::fs::rename(&tmp, drop.join("dropped.squashfs"))?;

    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["name"], "dropped.squashfs");
    assert_eq!(rec["size"], bytes.len() as u64);
    // Moved into the store, not copied.
    assert!(!drop.join("dropped.squashfs").exists());
    assert_eq!(app.stored_bundles(), 1);
    app.stop().await
}

/// Nothing of a dropped file has been taken: it is still where the user put it, and
/// only the `before` bundles taken earlier are known and stored.
async fn untouched(
    app: &shipperd_tests::app::TestApp,
    file: &std::path::Path,
    before: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        file.exists(),
        "{} was taken while being written",
        file.display()
    );
    anyhow::ensure!(
        app.bundles().await?.len() == before,
        "a bundle was recorded"
    );
    anyhow::ensure!(app.stored_bundles() == before, "a bundle was stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowly_written_dropped_file_is_taken_only_when_complete() -> anyhow::Result<()> {
    use std::io::Write;
    let quiet = Duration::from_secs(3);
    let app = spawn_app(Options {
        drop_dir: true,
        drop_quiet: Some(quiet),
        ..Default::default()
    })
    .await?;
    let dir = app.drop_dir.clone().unwrap();
    eventually("drop dir to exist", DONE, || async {
        dir.exists().then_some(())
    })
    .await?;

    // Written in place by a writer that keeps the file open and pauses longer than
    // the quiet time between pieces: not taken until it closes it.
    let bytes = bundle("held-open")?;
    let path = dir.join("held-open.squashfs");
    let mut f = std::fs::File::create(&path)?;
    for piece in bytes.chunks(bytes.len().div_ceil(3)) {
        f.write_all(piece)?;
        f.flush()?;
        tokio::time::sleep(quiet + Duration::from_millis(1500)).await;
        untouched(&app, &path, 0).await?;
    }
    drop(f);
    let id = sha256(&bytes)[7..].to_string();
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["size"], bytes.len() as u64);

    // Written by pieces, closed in between (as a resumed copy), pausing longer than a
    // poll but less than the quiet time: taken only once complete and quiet.
    let bytes = bundle("by-pieces")?;
    let path = dir.join("by-pieces.squashfs");
    for piece in bytes.chunks(bytes.len().div_ceil(4)) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?
            .write_all(piece)?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        untouched(&app, &path, 1).await?;
    }
    let id = sha256(&bytes)[7..].to_string();
    assert_eq!(app.wait_done(&id, DONE).await?["phase"], "Published");

    // With a .sha256 beside it, a file that does not match yet is waited on, not
    // failed, and is taken as soon as it matches.
    let bytes = bundle("with-sum")?;
    let path = dir.join("with-sum.squashfs");
    std::fs::write(
        dir.join("with-sum.squashfs.sha256"),
        format!("{}  with-sum.squashfs\n", &sha256(&bytes)[7..]),
    )?;
    let (first, rest) = bytes.split_at(bytes.len() / 2);
    std::fs::write(&path, first)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(path.exists(), "taken half written");
    assert!(!dir.join("with-sum.squashfs.failed").exists());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)?
        .write_all(rest)?;
    let id = sha256(&bytes)[7..].to_string();
    assert_eq!(app.wait_done(&id, DONE).await?["phase"], "Published");
    assert_eq!(
        app.bundles().await?.len(),
        3,
        "only the three whole bundles"
    );
    app.stop().await
}
