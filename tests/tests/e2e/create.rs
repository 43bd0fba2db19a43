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
    // A tar.zst in parts of 1 MiB (as oc-mirror names them): their concatenation is the
    // whole bundle, and `shipperd push` takes them as one.
    let zst = dir.path().join("whole.tar.zst");
    create(&zst, &images, &cache, &[])?;
    let split = dir.path().join("split.tar.zst");
    create(&split, &images, &cache, &["--max-part-size", "1M"])?;
    let parts: Vec<std::path::PathBuf> = (1..)
        .map(|n| dir.path().join(format!("split_{n:06}.tar.zst")))
        .take_while(|p| p.exists())
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    let joined: Vec<u8> = parts
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(joined, std::fs::read(&zst)?);
    let mut args = vec!["push".to_string()];
    args.extend(parts.iter().map(|p| p.display().to_string()));
    args.extend([
        "--name".into(),
        "split.tar.zst".into(),
        "--server".into(),
        app.base.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = shipperd(&args);
    assert!(ok, "{out}{err}");
    app.assert_published(&layout, "").await?;
    // One platform of the multi-arch image: kept as it is (the index names a manifest
    // the bundle leaves out), or rewritten, which publishes an index of that platform.
    let multi = &layout.images[2];
    let amd64 = multi.manifests[0].clone();
    let plan = |extra: &[&str]| -> anyhow::Result<serde_json::Value> {
        let mut args = vec![
            "create",
            "p.tar",
            "--images",
            images.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--plan",
            "--json",
        ];
        args.extend(extra);
        let (ok, out, err) = shipperd(&args);
        anyhow::ensure!(ok, "{err}");
        Ok(serde_json::from_str(&out)?)
    };
    let sparse = plan(&["--platform", "linux/amd64"])?;
    assert_eq!(sparse["images"][2]["digest"], multi.digest.as_str());
    assert_eq!(sparse["images"][2]["manifests"], 2, "{sparse}");
    let rewritten = plan(&["--platform", "linux/amd64", "--rewrite-index"])?;
    assert_ne!(rewritten["images"][2]["digest"], multi.digest.as_str());
    assert_eq!(rewritten["images"][2]["manifests"], 2);
    let amd = dir.path().join("amd.tar");
    create(
        &amd,
        &images,
        &cache,
        &["--platform", "linux/amd64", "--rewrite-index"],
    )?;
    let (status, body) = app.put("amd.tar", std::fs::read(&amd)?, None).await?;
    assert_eq!(status, 202, "{body}");
    // The tag moves to the rewritten index (the same owner and source may move it).
    let done = app
        .wait_done(body["id"].as_str().unwrap(), Duration::from_secs(60))
        .await?;
    assert_eq!(done["phase"], "Published", "{done}");
    let (index, _) = app.manifest("demo/multi", "latest").await?.expect("tagged");
    let index: serde_json::Value = serde_json::from_slice(&index)?;
    let children: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(children, vec![amd64.as_str()]);
    let (ok, _, err) = shipperd(&[
        "create",
        "x.tar",
        "--images",
        images.to_str().unwrap(),
        "--platform",
        "amd64",
    ]);
    assert!(!ok && err.contains("os/architecture"), "{err}");

    let (ok, _, err) = shipperd(&[
        "create",
        dir.path().join("no.squashfs").to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--max-part-size",
        "1M",
    ]);
    assert!(!ok && err.contains("cannot be split"), "{err}");
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

/// The blob files (`blobs/sha256/<hex>`) a tar bundle carries, as digests.
fn carried(tar_path: &Path) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    let mut a = tar::Archive::new(std::fs::File::open(tar_path)?);
    for e in a.entries()? {
        let e = e?;
        let p = e.path()?.to_string_lossy().into_owned();
        if let Some(hex) = p.strip_prefix("blobs/sha256/")
            && !hex.is_empty()
        {
            out.insert(format!("sha256:{hex}"));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day_two_carries_exactly_what_the_site_lacks() -> anyhow::Result<()> {
    shipperd_tests::init();
    let http = reqwest::Client::new();
    let source = servers::Registry::start().await?;
    let host = source.host();
    let day1 = sample("day1", "demo/bundle", 1);
    day1.push_to(&http, &source.url()).await?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let mut lines = format!(
        "{host}/demo/app:1.0\n{host}/demo/tool:2.1\n{host}/demo/multi:latest\n{host}/demo/bundle:v3\n"
    );
    let images = dir.path().join("images.txt");
    std::fs::write(&images, &lines)?;
    let full = dir.path().join("full.tar");
    create(&full, &images, &cache, &[])?;

    // The site takes the full bundle in.
    let app = Box::pin(spawn_app(Options::default())).await?;
    let publish = |path: std::path::PathBuf| {
        let app = &app;
        async move {
            let (status, body) = app.put("b.tar", std::fs::read(&path)?, None).await?;
            anyhow::ensure!(status == 202 || status == 200, "{status} {body}");
            let id = body["id"].as_str().unwrap_or_default().to_string();
            app.wait_done(&id, Duration::from_secs(60)).await
        }
    };
    let done = publish(full.clone()).await?;
    assert_eq!(done["phase"], "Published", "{done}");

    // Day 2 at the source: a new tag of demo/app on the same base layer, a new image,
    // and a second tag of an image the site has.
    let mut day2 = shipperd_tests::fixtures::LayoutBuilder::new();
    let level = flate2::Compression::fast();
    let base = day2.layer(
        &[
            ("etc/os-release", b"NAME=ShipperD sample day1\n".to_vec()),
            ("usr/share/base.txt", vec![b'b'; 64 * 1024]),
        ],
        level,
    );
    assert!(
        day1.blobs.contains_key(&base.digest),
        "day 2 shares day 1's base layer"
    );
    let v2 = day2.layer(&[("app/v2", b"version 2".to_vec())], level);
    day2.image(serde_json::json!({}), &[base, v2], "demo/app", "2.0");
    let fresh = day2.layer(
        &[("srv/new", vec![b'n'; 300 * 1024])],
        flate2::Compression::none(),
    );
    day2.image(serde_json::json!({}), &[fresh], "demo/new", "1");
    day2.push_to(&http, &source.url()).await?;
    let app1 = &day1.images[0];
    let r = http
        .put(format!("{}/v2/demo/app/manifests/1.0-again", source.url()))
        .header("content-type", app1.media_type.as_str())
        .body(day1.blobs[&app1.digest].clone())
        .send()
        .await?;
    assert_eq!(r.status(), 201);
    lines.push_str(&format!(
        "{host}/demo/app:2.0\n{host}/demo/new:1\n{host}/demo/app:1.0-again\n"
    ));
    std::fs::write(&images, &lines)?;

    // The site loses day 1's base layer (a retention rule, a restored backup): its
    // inventory, checked against the registry, no longer lists it.
    let base_layer = day2.images[0].blobs[1].clone();
    assert!(day1.blobs.contains_key(&base_layer));
    for repo in ["demo/app", "demo/tool", "demo/multi"] {
        let r = http
            .delete(format!(
                "{}/v2/{repo}/blobs/{base_layer}",
                app.registry.url()
            ))
            .send()
            .await?;
        assert!(r.status() == 202 || r.status() == 404, "{}", r.status());
    }

    // The site says what it has; the delta carries exactly the rest.
    let inv = dir.path().join("inventory.json");
    let (ok, out, err) = shipperd(&[
        "inventory",
        "--server",
        &app.base,
        "-o",
        inv.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("1 missing (left out)"), "{out}");
    let inventory: serde_json::Value = serde_json::from_slice(&std::fs::read(&inv)?)?;
    assert_eq!(
        inventory["repositories"][format!("{host}/demo/app")]["tags"]["1.0"],
        app1.digest.as_str(),
        "{inventory}"
    );
    assert!(
        inventory["checked"]["missing"].as_u64() >= Some(1),
        "{inventory}"
    );
    assert_eq!(
        inventory["checked"]["all"], true,
        "a sample that misses checks all"
    );
    let hex = base_layer.trim_start_matches("sha256:");
    assert!(
        !inventory["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == hex),
        "the lost layer is not listed"
    );
    let delta = dir.path().join("delta.tar");
    create(&delta, &images, &cache, &["--have", inv.to_str().unwrap()])?;
    let mut day1_blobs: std::collections::BTreeSet<&String> =
        day1.images.iter().flat_map(|i| &i.blobs).collect();
    day1_blobs.remove(&base_layer);
    let lacking: std::collections::BTreeSet<String> = day2
        .images
        .iter()
        .flat_map(|i| i.blobs.iter().chain(&i.manifests))
        .filter(|d| !day1_blobs.contains(d))
        .cloned()
        .collect();
    assert_eq!(
        carried(&delta)?,
        lacking,
        "the delta carries exactly what the site lacks"
    );

    // It publishes: every reference right, the retag included.
    let done = publish(delta.clone()).await?;
    assert_eq!(done["phase"], "Published", "{done}");
    app.assert_published(&day2, "").await?;
    let (again, _) = app
        .manifest("demo/app", "1.0-again")
        .await?
        .expect("the second tag is set");
    assert_eq!(shipperd_tests::fixtures::sha256(&again), app1.digest);

    // Another site refuses it before pushing anything.
    let other = Box::pin(spawn_app(Options::default())).await?;
    let (status, body) = other.put("d.tar", std::fs::read(&delta)?, None).await?;
    assert!(status == 202, "{status} {body}");
    let id = body["id"].as_str().unwrap_or_default().to_string();
    let done = other.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(done["phase"], "Failed", "{done}");
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("made against the inventory of registry"),
        "{error}"
    );
    assert!(other.catalog().await?.is_empty(), "nothing pushed");
    other.stop().await?;
    app.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_blob_costs_one_resumed_request() -> anyhow::Result<()> {
    shipperd_tests::init();
    let source = servers::Registry::start().await?;
    let layout = sample("cut", "demo/bundle", 4);
    layout
        .push_to(&reqwest::Client::new(), &source.url())
        .await?;
    let (big, size) = layout
        .blobs
        .iter()
        .map(|(d, b)| (d.clone(), b.len()))
        .max_by_key(|(_, n)| *n)
        .unwrap();
    assert!(size > 4 << 20);
    let proxy = Proxy::start(&source.url()).await?;
    let mut cut_once = true;
    let needle = format!("/blobs/{big}");
    proxy.rule(move |method, path| {
        if method == "GET" && path.ends_with(&needle) && std::mem::take(&mut cut_once) {
            shipperd_tests::proxy::Fault::CutAfter(1 << 20)
        } else {
            shipperd_tests::proxy::Fault::Pass
        }
    });
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images.txt");
    std::fs::write(&images, format!("{}/demo/app:1.0\n", proxy.addr))?;
    create(
        &dir.path().join("b.tar"),
        &images,
        &dir.path().join("cache"),
        &[],
    )?;
    let gets: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{big}")))
        .collect();
    assert_eq!(gets.len(), 2, "one cut download and one resumed: {gets:?}");
    assert_eq!(gets[0].range, None);
    let from: u64 = gets[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("the second request asks for the rest");
    assert!(from > 0 && from <= 1 << 20, "resumed from {from}");
    Ok(())
}

/// Runs `shipperd create` and kills it (SIGKILL) once the proxy has passed on `at`
/// blob downloads; returns whether it was killed (else it finished).
async fn create_killed_at(proxy: &Proxy, at: usize, args: &[&str]) -> anyhow::Result<bool> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "create failed before the kill");
            return Ok(false);
        }
        if blob_gets(proxy) >= at {
            child.kill()?;
            child.wait()?;
            return Ok(true);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "create took too long");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_killed_twice_finishes_with_the_same_bytes_fetching_nothing_twice()
-> anyhow::Result<()> {
    shipperd_tests::init();
    let source = servers::Registry::start().await?;
    let names: Vec<(String, String, String)> = (0..30)
        .map(|i| (format!("img{i}"), format!("many/img{i}"), "1".to_string()))
        .collect();
    let refs: Vec<(&str, &str, &str)> = names
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    let layout = shipperd_tests::fixtures::named_images("kill", &refs);
    layout
        .push_to(&reqwest::Client::new(), &source.url())
        .await?;
    let proxy = Proxy::start(&source.url()).await?;
    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images.txt");
    let lines: String = names
        .iter()
        .map(|(_, repo, tag)| format!("{}/{repo}:{tag}\n", proxy.addr))
        .collect();
    std::fs::write(&images, lines)?;
    let arg = |p: &Path| p.to_str().unwrap().to_string();

    // An uninterrupted run, for the bytes to compare with.
    let whole = dir.path().join("whole.squashfs");
    create(&whole, &images, &dir.path().join("cache-whole"), &[])?;
    let total = blob_gets(&proxy);
    assert_eq!(total, 60, "a layer and a config per image");
    proxy.clear_log();

    // One download at a time, each slowed: killed at 30 %, then at 70 %.
    proxy.rule(|method, path| {
        if method == "GET" && path.contains("/blobs/") {
            shipperd_tests::proxy::Fault::Delay(Duration::from_millis(60))
        } else {
            shipperd_tests::proxy::Fault::Pass
        }
    });
    let out = dir.path().join("resumed.squashfs");
    let cache = dir.path().join("cache");
    let args = [
        "create".to_string(),
        arg(&out),
        "--images".into(),
        arg(&images),
        "--cache-dir".into(),
        arg(&cache),
        "--concurrency".into(),
        "1".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cached = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(cache.join("blobs/sha256"))
            .map(|d| {
                d.filter_map(|e| Some(format!("sha256:{}", e.ok()?.file_name().to_str()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        create_killed_at(&proxy, total * 3 / 10, &args).await?,
        "killed at 30 %"
    );
    let after_first = cached();
    let seen_first = blob_gets(&proxy);
    assert!(
        create_killed_at(&proxy, seen_first + total * 4 / 10, &args).await?,
        "killed at 70 %"
    );
    let after_second = cached();
    let seen_second = blob_gets(&proxy);
    assert!(!out.exists(), "a killed run leaves no output");
    create(&out, &images, &cache, &["--concurrency", "1"])?;
    assert_eq!(
        std::fs::read(&out)?,
        std::fs::read(&whole)?,
        "byte-identical"
    );

    // No blob the cache held when a run was killed was downloaded again.
    let log = proxy.log();
    let gets: Vec<&str> = log
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains("/blobs/sha256:"))
        .map(|s| s.path.rsplit('/').next().unwrap_or_default())
        .collect();
    let again = |held: &std::collections::BTreeSet<String>, from: usize| {
        gets[from..].iter().filter(|d| held.contains(**d)).count()
    };
    assert_eq!(again(&after_first, seen_first), 0, "{after_first:?}");
    assert_eq!(again(&after_second, seen_second), 0, "{after_second:?}");
    assert!(after_second.len() > after_first.len());
    assert!(
        gets.len() <= total + 2,
        "{} downloads for {total} blobs: at most the two cut by a kill again",
        gets.len()
    );
    Ok(())
}

/// One small image at `repo:tag` with a layer of its own.
fn small(b: &mut shipperd_tests::fixtures::LayoutBuilder, repo: &str, tag: &str) -> String {
    let l = b.layer(
        &[("etc/image", format!("{repo}:{tag}").into_bytes())],
        flate2::Compression::fast(),
    );
    b.image(serde_json::json!({}), &[l], repo, tag);
    b.images.last().unwrap().digest.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_set_configuration_carries_what_its_catalog_selects() -> anyhow::Result<()> {
    use shipperd_tests::fixtures::LayoutBuilder;
    shipperd_tests::init();
    let http = reqwest::Client::new();
    let source = servers::Registry::start().await?;
    let src = source.host();

    // Operator images (named by digest in relatedImages), bundle images, and a catalog
    // of three packages: alpha (stable 1.0 → 1.1 → 1.2, fast 2.0), beta (stable 0.1 →
    // 0.2, its default channel), gamma (not asked for).
    let mut carried = LayoutBuilder::new();
    let mut by_digest = LayoutBuilder::new();
    let mut left = LayoutBuilder::new();
    let mut bundles = serde_json::Map::new();
    for (pkg, v, wanted) in [
        ("alpha", "1.0.0", false),
        ("alpha", "1.1.0", true),
        ("alpha", "1.2.0", true),
        ("alpha", "2.0.0", false),
        ("beta", "0.1.0", false),
        ("beta", "0.2.0", true),
        ("gamma", "1.0.0", false),
    ] {
        let op = if wanted {
            let op = small(
                &mut by_digest,
                &format!("ops/{pkg}-operator"),
                &format!("v{v}"),
            );
            small(&mut carried, &format!("ops/{pkg}-bundle"), v);
            op
        } else {
            let op = small(&mut left, &format!("ops/{pkg}-operator"), &format!("v{v}"));
            small(&mut left, &format!("ops/{pkg}-bundle"), v);
            op
        };
        bundles.insert(
            format!("{pkg}.v{v}"),
            serde_json::json!({
                "schema": "olm.bundle", "package": pkg, "name": format!("{pkg}.v{v}"),
                "image": format!("{src}/ops/{pkg}-bundle:{v}"),
                "properties": [{"type": "olm.package", "value": {"packageName": pkg, "version": v}}],
                "relatedImages": [{"name": "operator", "image": format!("{src}/ops/{pkg}-operator@{op}")}],
            }),
        );
    }
    let json_lines = |objs: &[serde_json::Value]| {
        objs.iter()
            .map(|o| o.to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    };
    let ch = |pkg: &str, name: &str, entries: &[(&str, Option<&str>)]| {
        serde_json::json!({"schema": "olm.channel", "package": pkg, "name": name,
            "entries": entries.iter().map(|(n, r)| serde_json::json!({"name": n, "replaces": r})).collect::<Vec<_>>()})
    };
    let alpha = json_lines(&[
        serde_json::json!({"schema": "olm.package", "name": "alpha", "defaultChannel": "fast"}),
        ch(
            "alpha",
            "stable",
            &[
                ("alpha.v1.0.0", None),
                ("alpha.v1.1.0", Some("alpha.v1.0.0")),
                ("alpha.v1.2.0", Some("alpha.v1.1.0")),
            ],
        ),
        ch("alpha", "fast", &[("alpha.v2.0.0", None)]),
        bundles["alpha.v1.0.0"].clone(),
        bundles["alpha.v1.1.0"].clone(),
        bundles["alpha.v1.2.0"].clone(),
        bundles["alpha.v2.0.0"].clone(),
    ]);
    let beta = format!(
        "---\nschema: olm.package\nname: beta\ndefaultChannel: stable\n---\n{}\n---\n{}\n---\n{}\n",
        ch(
            "beta",
            "stable",
            &[("beta.v0.1.0", None), ("beta.v0.2.0", Some("beta.v0.1.0"))]
        ),
        bundles["beta.v0.1.0"],
        bundles["beta.v0.2.0"],
    );
    let gamma = json_lines(&[
        serde_json::json!({"schema": "olm.package", "name": "gamma", "defaultChannel": "stable"}),
        ch("gamma", "stable", &[("gamma.v1.0.0", None)]),
        bundles["gamma.v1.0.0"].clone(),
    ]);
    let fbc = carried.layer(
        &[
            ("configs/alpha/catalog.json", alpha),
            ("configs/beta/catalog.yaml", beta.into_bytes()),
            ("configs/gamma/catalog.json", gamma),
        ],
        flate2::Compression::fast(),
    );
    carried.labelled_image(
        serde_json::json!({}),
        &[fbc],
        "ops/catalog",
        "v1",
        serde_json::json!({ "operators.operatorframework.io.index.configs.v1": "/configs" }),
    );
    small(&mut carried, "demo/extra", "1.0");
    small(&mut left, "demo/blocked", "1.0");
    for b in [&carried, &by_digest, &left] {
        b.push_to(&http, &source.url()).await?;
    }

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("isc.yaml");
    std::fs::write(
        &config,
        format!(
            "kind: ImageSetConfiguration\napiVersion: mirror.openshift.io/v2alpha1\nmirror:\n  operators:\n  - catalog: {src}/ops/catalog:v1\n    packages:\n    - name: alpha\n      channels:\n      - name: stable\n        minVersion: 1.1.0\n        maxVersion: 1.2.0\n    - name: beta\n  additionalImages:\n  - name: {src}/demo/extra:1.0\n  - name: {src}/demo/blocked:1.0\n  blockedImages:\n  - name: {src}/demo/blocked\n"
        ),
    )?;
    let cache = dir.path().join("cache");
    let (ok, plan, err) = shipperd(&[
        "create",
        dir.path().join("x.tar").to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--plan",
        "--json",
    ]);
    assert!(ok, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&plan)?;
    let mut names: Vec<String> = plan["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = carried
        .images
        .iter()
        .map(|i| format!("{src}/{}:{}", i.repo, i.tag))
        .chain(
            by_digest
                .images
                .iter()
                .map(|i| format!("{src}/{}@{}", i.repo, i.digest)),
        )
        .collect();
    expected.sort();
    assert_eq!(names, expected, "the catalog selects these, and only these");

    let out = dir.path().join("ops.tar");
    let (ok, _, err) = shipperd(&[
        "create",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let app = Box::pin(spawn_app(Options::default())).await?;
    let (status, body) = app.put("ops.tar", std::fs::read(&out)?, None).await?;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_done(body["id"].as_str().unwrap(), Duration::from_secs(60))
        .await?;
    assert_eq!(done["phase"], "Published", "{done}");
    app.assert_published(&carried, "").await?;
    for img in &by_digest.images {
        let (bytes, _) = app
            .manifest(&img.repo, &img.digest)
            .await?
            .unwrap_or_else(|| panic!("{}@{} is at the site", img.repo, img.digest));
        assert_eq!(shipperd_tests::fixtures::sha256(&bytes), img.digest);
    }
    for img in &left.images {
        assert!(
            app.manifest(&img.repo, &img.digest).await?.is_none(),
            "{}:{} is not carried",
            img.repo,
            img.tag
        );
    }
    app.stop().await?;
    Ok(())
}

async fn put_manifest(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(bytes.to_vec())
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "PUT manifest {}", r.status());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_and_referrers_arrive_with_their_images() -> anyhow::Result<()> {
    use shipperd_tests::fixtures::{LayoutBuilder, OCI_INDEX, OCI_MANIFEST, sha256};
    shipperd_tests::init();
    let http = reqwest::Client::new();
    let source = servers::Registry::start().await?;
    let src = source.host();
    let layout = sample("attached", "demo/bundle", 0);
    layout.push_to(&http, &source.url()).await?;
    let app_img = &layout.images[0];
    let subject = app_img.digest.clone();
    let hex = subject.trim_start_matches("sha256:");

    // A cosign signature beside it (its own tag), and an SBOM referrer, listed under
    // the fallback tag as clients do where the registry has no referrers API.
    let mut sigs = LayoutBuilder::new();
    let payload = sigs.layer(
        &[("payload.json", b"{\"critical\":{}}".to_vec())],
        flate2::Compression::fast(),
    );
    sigs.image(
        serde_json::json!({}),
        &[payload],
        "demo/app",
        &format!("sha256-{hex}.sig"),
    );
    sigs.push_to(&http, &source.url()).await?;
    let sig_digest = sigs.images[0].digest.clone();
    sigs.blobs
        .insert(subject.clone(), layout.blobs[&subject].clone());
    let sbom = sigs.referrer(
        &subject,
        "application/spdx+json",
        b"{\"spdxVersion\":\"SPDX-2.3\"}",
    );
    let sbom_bytes = sigs.blobs[&sbom].clone();
    let sbom_doc: serde_json::Value = serde_json::from_slice(&sbom_bytes)?;
    shipperd_tests::fixtures::put_blob(&http, &source.url(), "demo/app", b"{}").await?;
    shipperd_tests::fixtures::put_blob(
        &http,
        &source.url(),
        "demo/app",
        b"{\"spdxVersion\":\"SPDX-2.3\"}",
    )
    .await?;
    assert_eq!(
        sbom_doc["layers"][0]["digest"],
        sha256(b"{\"spdxVersion\":\"SPDX-2.3\"}")
    );
    put_manifest(
        &http,
        &source.url(),
        "demo/app",
        &sbom,
        OCI_MANIFEST,
        &sbom_bytes,
    )
    .await?;
    let fallback = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sbom, "size": sbom_bytes.len(), "artifactType": "application/spdx+json"}]});
    put_manifest(
        &http,
        &source.url(),
        "demo/app",
        &format!("sha256-{hex}"),
        OCI_INDEX,
        &serde_json::to_vec(&fallback)?,
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images.txt");
    std::fs::write(
        &images,
        format!("{src}/demo/app:1.0\n{src}/demo/tool:2.1\n"),
    )?;
    let cache = dir.path().join("cache");
    // Two simple-signing signatures in a file:// lookaside, named by registries.d.
    let sigstore = dir.path().join("sigstore");
    let sig_dir = sigstore.join(format!("demo/app@sha256={hex}"));
    std::fs::create_dir_all(&sig_dir)?;
    std::fs::write(sig_dir.join("signature-1"), b"first signature")?;
    std::fs::write(sig_dir.join("signature-2"), b"second signature")?;
    let registries_d = dir.path().join("registries.d");
    std::fs::create_dir(&registries_d)?;
    std::fs::write(
        registries_d.join("site.yaml"),
        format!(
            "docker:\n  {src}/demo:\n    lookaside: file://{}\n",
            sigstore.display()
        ),
    )?;
    let rd = registries_d.to_str().unwrap();
    let (ok, plan, err) = shipperd(&[
        "create",
        dir.path().join("x.tar").to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--plan",
        "--json",
        "--registries.d",
        rd,
    ]);
    assert!(ok, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&plan)?;
    let names: Vec<&str> = plan["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&format!("{src}/demo/app:sha256-{hex}.sig").as_str()),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("{src}/demo/app@{sbom}").as_str()),
        "{names:?}"
    );
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(plan["signatures"], 2, "{plan}");
    let (ok, plain, _) = shipperd(&[
        "create",
        dir.path().join("x.tar").to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--plan",
        "--json",
        "--without-attached",
    ]);
    assert!(ok);
    let plain: serde_json::Value = serde_json::from_str(&plain)?;
    assert_eq!(plain["images"].as_array().map(Vec::len), Some(2));

    let out = dir.path().join("b.tar");
    create(&out, &images, &cache, &["--registries.d", rd])?;
    let mut t = tar::Archive::new(std::fs::File::open(&out)?);
    let mut sigs_found = Vec::new();
    for e in t.entries()? {
        let mut e = e?;
        let p = e.path()?.to_string_lossy().into_owned();
        if p.starts_with("sigstore/") && !p.ends_with('/') {
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body)?;
            sigs_found.push((p, body));
        }
    }
    assert_eq!(
        sigs_found,
        vec![
            (
                format!("sigstore/demo/app@sha256={hex}/signature-1"),
                "first signature".to_string()
            ),
            (
                format!("sigstore/demo/app@sha256={hex}/signature-2"),
                "second signature".to_string()
            ),
        ]
    );
    let app = Box::pin(spawn_app(Options::default())).await?;
    let (status, body) = app.put("b.tar", std::fs::read(&out)?, None).await?;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_done(body["id"].as_str().unwrap(), Duration::from_secs(60))
        .await?;
    assert_eq!(done["phase"], "Published", "{done}");
    let (sig, _) = app
        .manifest("demo/app", &format!("sha256-{hex}.sig"))
        .await?
        .expect("the signature's tag");
    assert_eq!(sha256(&sig), sig_digest);
    let (got, _) = app.manifest("demo/app", &sbom).await?.expect("the SBOM");
    assert_eq!(got, sbom_bytes);
    let (listed, _) = app
        .manifest("demo/app", &format!("sha256-{hex}"))
        .await?
        .expect("the referrers tag");
    assert!(
        String::from_utf8_lossy(&listed).contains(&sbom),
        "the site lists the SBOM under its subject"
    );
    app.stop().await?;
    Ok(())
}
