//! `shipperd serve`: bundles served as a read-only registry where they lie. skopeo
//! reads every image of a squashfs and a tar bundle at its digest (the later bundle
//! winning a tag both name), copies one whole; `HEAD`, `Range`, `tags/list`,
//! `_catalog` pages, a refused push, and logging in with a token.

use std::{path::Path, process::Stdio, time::Duration};

use sha2::{Digest as _, Sha256};
use shipperd_tests::{
    app::{skopeo, skopeo_raw},
    docker_save,
    fixtures::{Compression, compress, sample, tar_bytes},
    servers::free_port,
};

pub(crate) struct Served {
    _child: tokio::process::Child,
    pub(crate) addr: String,
    _log: tempfile::NamedTempFile,
}

/// Starts `shipperd serve` on a free port; its log says why when it does not listen.
pub(crate) async fn serve(args: &[&str], bundles: &[&Path]) -> anyhow::Result<Served> {
    let addr = format!("127.0.0.1:{}", free_port());
    let log = tempfile::NamedTempFile::new()?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .arg("serve")
        .args(["--listen", &addr])
        .args(args)
        .args(bundles)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen()?)
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok(Served {
                _child: child,
                addr,
                _log: log,
            });
        }
        if child.try_wait()?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "shipperd serve did not listen: {}",
        std::fs::read_to_string(log.path())?
    )
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_a_registry_skopeo_pulls_from() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let first = sample("serve-a", "a", 0);
    let squash = dir.path().join("a.squashfs");
    first.write_squashfs(&squash, Compression::Gzip)?;
    let mut second = sample("serve-b", "b", 0);
    let app_digest = second
        .images
        .iter()
        .find(|i| i.repo == "demo/app")
        .unwrap()
        .digest
        .clone();
    let sbom = second.referrer(&app_digest, "application/spdx+json", b"{\"spdx\":1}");
    let sig = second.referrer(
        &app_digest,
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        b"signed",
    );
    let tar = dir.path().join("b.tar");
    std::fs::write(&tar, tar_bytes(&second.oci_files(""))?)?;
    let s = serve(&[], &[&squash, &tar]).await?;

    // Every tag at its digest: the second bundle's where both name it.
    for img in &second.images {
        let raw = skopeo_raw(&format!("{}/{}:{}", s.addr, img.repo, img.tag))?;
        assert_eq!(sha(&raw), img.digest, "{}:{}", img.repo, img.tag);
    }
    // The first bundle's images stay reachable by digest.
    for img in &first.images {
        let raw = skopeo_raw(&format!("{}/{}@{}", s.addr, img.repo, img.digest))?;
        assert_eq!(sha(&raw), img.digest);
    }
    // A whole image (a multi-arch index, every platform), copied and checked by skopeo.
    let multi = second
        .images
        .iter()
        .find(|i| i.repo == "demo/multi")
        .unwrap();
    let out = dir.path().join("copy");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{}/demo/multi:latest", s.addr),
        &format!("oci:{}:m", out.display()),
    ])?;
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json"))?)?;
    assert_eq!(index["manifests"][0]["digest"], multi.digest.as_str());

    let http = reqwest::Client::new();
    let base = format!("http://{}", s.addr);
    // Referrers: the API (with an artifactType filter) and the tag fallback.
    let referrers = |q: &str| {
        http.get(format!("{base}/v2/demo/app/referrers/{app_digest}{q}"))
            .send()
    };
    let r = referrers("").await?;
    assert_eq!(r.status(), 200);
    let doc: serde_json::Value = r.json().await?;
    let mut listed: Vec<&str> = doc["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut want = vec![sbom.as_str(), sig.as_str()];
    want.sort();
    assert_eq!(listed, want);
    let r = referrers("?artifactType=application%2Fspdx%2Bjson").await?;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let doc: serde_json::Value = r.json().await?;
    assert_eq!(doc["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(doc["manifests"][0]["digest"], sbom.as_str());
    assert_eq!(doc["manifests"][0]["artifactType"], "application/spdx+json");
    let fallback = format!("sha256-{}", &app_digest[7..]);
    let raw = skopeo_raw(&format!("{}/demo/app:{fallback}", s.addr))?;
    let index: serde_json::Value = serde_json::from_slice(&raw)?;
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    let again = skopeo_raw(&format!("{}/demo/app@{}", s.addr, sha(&raw)))?;
    assert_eq!(again, raw, "the fallback index by its digest too");
    let raw = skopeo_raw(&format!("{}/demo/app@{sbom}", s.addr))?;
    assert_eq!(sha(&raw), sbom);
    // HEAD: digest, length and type, no body.
    let app = second.images.iter().find(|i| i.repo == "demo/app").unwrap();
    let r = http
        .head(format!("{base}/v2/demo/app/manifests/1.0"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], app.digest.as_str());
    assert_eq!(r.headers()["content-type"], app.media_type.as_str());
    // A range of a blob.
    let blob = &app.blobs[app.blobs.len() - 1];
    let bytes = &second.blobs[blob];
    let r = http
        .get(format!("{base}/v2/demo/app/blobs/{blob}"))
        .header("range", "bytes=1-4")
        .send()
        .await?;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1-4/{}", bytes.len()).as_str()
    );
    assert_eq!(r.bytes().await?.as_ref(), &bytes[1..5]);
    let r = http
        .get(format!("{base}/v2/demo/app/blobs/{blob}"))
        .header("range", format!("bytes={}-", bytes.len()))
        .send()
        .await?;
    assert_eq!(r.status(), 416);
    // Pages of the catalog.
    let r = http.get(format!("{base}/v2/_catalog?n=1")).send().await?;
    let link = r.headers()["link"].to_str()?.to_string();
    let page: serde_json::Value = r.json().await?;
    assert_eq!(page["repositories"].as_array().unwrap().len(), 1);
    assert!(
        link.contains("last=") && link.contains("rel=\"next\""),
        "{link}"
    );
    let all: serde_json::Value = http
        .get(format!("{base}/v2/_catalog"))
        .send()
        .await?
        .json()
        .await?;
    // Both bundles' repositories (each names one of its own after its file).
    let repos: std::collections::BTreeSet<&str> = first
        .images
        .iter()
        .chain(&second.images)
        .map(|i| i.repo.as_str())
        .collect();
    let served: std::collections::BTreeSet<&str> = all["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert_eq!(served, repos, "{all}");
    // Following the `Link`s two at a time lists the same, each once.
    let mut walked = Vec::new();
    let mut next = Some(format!("{base}/v2/_catalog?n=2"));
    for _ in 0..100 {
        let Some(url) = next.take() else { break };
        let r = http.get(&url).send().await?;
        next = r
            .headers()
            .get("link")
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.strip_prefix('<')?.split_once('>'))
            .map(|(path, _)| format!("{base}{path}"));
        let page: serde_json::Value = r.json().await?;
        let names = page["repositories"].as_array().unwrap();
        assert!(names.len() <= 2);
        walked.extend(names.iter().map(|n| n.as_str().unwrap().to_string()));
    }
    assert!(next.is_none(), "the last page has no Link");
    let expected: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    assert_eq!(walked, expected);
    let tags: serde_json::Value = http
        .get(format!("{base}/v2/demo/app/tags/list"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(tags["tags"], serde_json::json!(["1.0"]));
    // Unknown names, and pushes, answered as a registry answers them.
    let r = http.get(format!("{base}/v2/nope/tags/list")).send().await?;
    assert_eq!(r.status(), 404);
    assert!(r.text().await?.contains("NAME_UNKNOWN"));
    let r = http
        .put(format!("{base}/v2/demo/app/manifests/evil"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(r.status(), 405);
    assert!(r.text().await?.contains("UNSUPPORTED"));
    let r = http
        .post(format!("{base}/v2/demo/app/blobs/uploads/"))
        .send()
        .await?;
    assert_eq!(r.status(), 405);

    // With a token file: a login is asked for, and the token is the password.
    std::fs::write(dir.path().join("tokens"), "serve-token\n")?;
    let token_file = dir.path().join("tokens");
    let locked = serve(
        &["--auth-token-file", token_file.to_str().unwrap()],
        &[&tar],
    )
    .await?;
    let r = http
        .get(format!("http://{}/v2/", locked.addr))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    // Docker's token flow, its realm where the client asked.
    assert_eq!(
        r.headers()["www-authenticate"].to_str()?,
        format!(
            r#"Bearer realm="http://{}/token",service="shipperd""#,
            locked.addr
        )
    );
    let token = |user: &str, password: &str| {
        http.get(format!(
            "http://{}/token?service=shipperd&scope=repository:demo/app:pull",
            locked.addr
        ))
        .basic_auth(user, Some(password))
        .send()
    };
    let r = token("anyone", "wrong").await?;
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("http://{}/token", locked.addr))
        .send()
        .await?;
    assert_eq!(r.status(), 401, "no anonymous tokens");
    let doc: serde_json::Value = token("anyone", "serve-token").await?.json().await?;
    assert_eq!(doc["expires_in"], 300);
    let issued = doc["token"].as_str().unwrap().to_string();
    assert_eq!(doc["access_token"], issued.as_str());
    let get = |auth: String| {
        http.get(format!("http://{}/v2/demo/app/tags/list", locked.addr))
            .header("authorization", auth)
            .send()
    };
    assert_eq!(get(format!("Bearer {issued}")).await?.status(), 200);
    // A token cannot be renewed with itself, nor its expiry moved.
    let r = http
        .get(format!("http://{}/token", locked.addr))
        .bearer_auth(&issued)
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let (_, sig) = issued["sst1.".len()..].split_once('.').unwrap();
    assert_eq!(
        get(format!("Bearer sst1.99999999999.{sig}"))
            .await?
            .status(),
        401
    );
    // The secret itself, as Basic's password or a bearer token, on every request.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("u:serve-token");
    assert_eq!(get(format!("Basic {basic}")).await?.status(), 200);
    assert_eq!(get("Bearer serve-token".into()).await?.status(), 200);

    // Users of an htpasswd file written by Apache's htpasswd (bcrypt), with skopeo.
    let o = std::process::Command::new("htpasswd")
        .args(["-nbB", "alice", "wonder land"])
        .output()
        .expect("htpasswd (scripts/install-deps.sh installs apache2-utils)");
    assert!(o.status.success());
    let users = dir.path().join("htpasswd");
    std::fs::write(&users, &o.stdout)?;
    let by_user = serve(&["--htpasswd", users.to_str().unwrap()], &[&tar]).await?;
    let inspect_user = |creds: &str| {
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", "--creds", creds])
            .arg(format!("docker://{}/demo/app:1.0", by_user.addr))
            .output()
    };
    let o = inspect_user("alice:wonder land")?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha(&o.stdout), app.digest);
    assert!(!inspect_user("alice:wonderland")?.status.success());
    assert!(!inspect_user("bob:wonder land")?.status.success());
    let inspect = |creds: &str| {
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", "--creds", creds])
            .arg(format!("docker://{}/demo/app:1.0", locked.addr))
            .output()
    };
    let o = inspect("anyone:serve-token")?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha(&o.stdout), app.digest);
    assert!(!inspect("anyone:wrong")?.status.success());
    Ok(())
}

/// Day 0 on a bastion: a directory watched for bundles, TLS with a CA made on first
/// start, and the install-config an OpenShift installer needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_directory_over_tls_and_the_install_config() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let drop = dir.path().join("bundles");
    std::fs::create_dir(&drop)?;
    let certs = dir.path().join("tls");
    // A cache kept from an earlier run, holding a blob nothing claims any more.
    let cache = dir.path().join("cache");
    let cached = cache.join("cas/blobs/sha256");
    std::fs::create_dir_all(&cached)?;
    std::fs::create_dir_all(cache.join("cas/refs"))?;
    let stale = "ab".repeat(32);
    std::fs::write(cached.join(&stale), b"stale")?;
    std::fs::write(cache.join("cas/refs/gone"), format!("{stale}\n"))?;
    let s = serve(
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--watch-dir",
            drop.to_str().unwrap(),
            "--watch-every",
            "200ms",
            "--tls-generate",
            certs.to_str().unwrap(),
            "--tls-host",
            "127.0.0.1",
        ],
        &[],
    )
    .await?;
    // Clients trust the CA it made (alone in a directory: skopeo reads *.crt as CAs).
    let trust = dir.path().join("trust");
    std::fs::create_dir(&trust)?;
    std::fs::copy(certs.join("ca.crt"), trust.join("ca.crt"))?;
    let inspect = |image: &str| {
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(&trust)
            .arg(format!("docker://{}/{image}", s.addr))
            .output()
    };
    let o = inspect("demo/app:1.0")?;
    assert!(!o.status.success(), "nothing served yet");

    // A bundle copied in (under a dot name, then renamed: as a copy tool does) appears.
    let layout = sample("serve-w", "w", 0);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    std::fs::write(drop.join(".w.tar.partial"), &bytes)?;
    std::fs::rename(drop.join(".w.tar.partial"), drop.join("w.tar"))?;
    let app = layout.images.iter().find(|i| i.repo == "demo/app").unwrap();
    let raw =
        shipperd_tests::eventually("the new bundle served", Duration::from_secs(30), || async {
            let o = inspect("demo/app:1.0").ok()?;
            o.status.success().then_some(o.stdout)
        })
        .await?;
    assert_eq!(sha(&raw), app.digest, "over TLS, verified by the made CA");
    let left = |d: &std::path::Path| std::fs::read_dir(d).map(|e| e.count()).unwrap_or(0);
    assert_eq!(left(&cached), 0, "the stale cache collected at start");

    // A compressed bundle is expanded into the cache; removed, it is no longer served
    // and its blobs leave the cache.
    let gz_layout = sample("serve-gz", "gz", 0);
    let gz = compress(
        tar_bytes(&gz_layout.oci_files(""))?,
        shipperd_tests::fixtures::TarCompression::Gzip,
    )?;
    std::fs::write(drop.join(".gz.partial"), gz)?;
    std::fs::rename(drop.join(".gz.partial"), drop.join("gz.tar.gz"))?;
    let tool = gz_layout
        .images
        .iter()
        .find(|i| i.repo == "demo/tool")
        .unwrap();
    let raw = shipperd_tests::eventually(
        "the gzip bundle served",
        Duration::from_secs(30),
        || async {
            let o = inspect(&format!("demo/tool@{}", tool.digest)).ok()?;
            o.status.success().then_some(o.stdout)
        },
    )
    .await?;
    assert_eq!(sha(&raw), tool.digest);
    assert!(left(&cached) > 0, "expanded into the cache");
    std::fs::remove_file(drop.join("gz.tar.gz"))?;
    shipperd_tests::eventually(
        "the removed bundle gone",
        Duration::from_secs(30),
        || async {
            let gone = !inspect(&format!("demo/tool@{}", tool.digest))
                .ok()?
                .status
                .success();
            (gone && left(&cached) == 0).then_some(())
        },
    )
    .await?;

    // What the installer needs, for what is served.
    let bundle = drop.join("w.tar");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args([
            "serve",
            "--print-install-config",
            "--advertise",
            "mirror.example:8443",
        ])
        .args(["--tls-generate", certs.to_str().unwrap()])
        .arg(&bundle)
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let yaml = String::from_utf8(o.stdout)?;
    assert!(
        yaml.contains("- mirror.example:8443/demo/app\n  source: example.com/demo/app\n"),
        "{yaml}"
    );
    let ca = std::fs::read_to_string(certs.join("ca.crt"))?;
    assert!(
        yaml.contains("additionalTrustBundle: |\n  -----BEGIN CERTIFICATE-----"),
        "{yaml}"
    );
    assert!(yaml.contains(ca.lines().nth(1).unwrap()), "the CA it made");
    Ok(())
}

/// The other bundle shapes, served as they are: a Koffer registry tree in a gzip tar
/// (expanded once to the cache) and an oc-mirror archive of three parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_koffer_tree_and_a_multi_part_archive_are_served() -> anyhow::Result<()> {
    use shipperd_tests::fixtures::{TarCompression, tar_parts};
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let koffer = sample("serve-k", "k", 0);
    let tgz = dir.path().join("k.tar.gz");
    std::fs::write(
        &tgz,
        compress(
            tar_bytes(&koffer.tree_files("platform/mirror/"))?,
            TarCompression::Gzip,
        )?,
    )?;
    let mirror = sample("serve-m", "m", 0);
    let parts = dir.path().join("m");
    std::fs::create_dir(&parts)?;
    for (i, p) in tar_parts(&mirror.oci_files(""), 3)?.into_iter().enumerate() {
        std::fs::write(parts.join(format!("mirror_{:06}.tar", i + 1)), p)?;
    }
    let cache = dir.path().join("cache");
    let s = serve(&["--cache-dir", cache.to_str().unwrap()], &[&tgz, &parts]).await?;
    // The tree's tags, and the archive's (which wins the tags both name).
    for img in &koffer.images {
        let raw = skopeo_raw(&format!("{}/{}@{}", s.addr, img.repo, img.digest))?;
        assert_eq!(sha(&raw), img.digest, "{}", img.repo);
    }
    for img in &mirror.images {
        let raw = skopeo_raw(&format!("{}/{}:{}", s.addr, img.repo, img.tag))?;
        assert_eq!(sha(&raw), img.digest, "{}:{}", img.repo, img.tag);
    }
    // A range of each blob of the expanded (gzip) bundle, and of the parts.
    let http = reqwest::Client::new();
    for (layout, name) in [(&koffer, "koffer"), (&mirror, "parts")] {
        let img = layout.images.iter().find(|i| i.repo == "demo/app").unwrap();
        for blob in &img.blobs {
            let bytes = &layout.blobs[blob];
            let from = bytes.len() / 3;
            let r = http
                .get(format!("http://{}/v2/demo/app/blobs/{blob}", s.addr))
                .header("range", format!("bytes={from}-"))
                .send()
                .await?;
            assert_eq!(r.status(), 206, "{name}");
            assert_eq!(r.bytes().await?.as_ref(), &bytes[from..], "{name} {blob}");
        }
    }
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{}/demo/tool:2.1", s.addr),
        &format!("oci:{}:t", dir.path().join("copy").display()),
    ])?;
    Ok(())
}

/// A `docker save` archive of the legacy layout (written by `skopeo copy ...
/// docker-archive:`): served with a manifest made for it, the image's config unchanged
/// (its image ID the same) and its layers as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_archive_is_served_with_its_image_id() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let layout = sample("serve-d", "d", 0);
    let oci = dir.path().join("oci");
    layout.write_dir(&oci)?;
    let archive = dir.path().join("saved.tar");
    docker_save::skopeo_archive(&oci, "1.0", &archive, "example.com/demo/app:1.0")?;
    let app = layout.images.iter().find(|i| i.repo == "demo/app").unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&layout.blobs[&app.digest])?;
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();

    let s = serve(&[], &[&archive]).await?;
    let config_bytes = skopeo(&[
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/demo/app:1.0", s.addr),
    ])?;
    assert_eq!(
        sha(&config_bytes),
        config,
        "the image ID is the config's digest, unchanged"
    );
    let raw = skopeo_raw(&format!("{}/demo/app:1.0", s.addr))?;
    let made: serde_json::Value = serde_json::from_slice(&raw)?;
    assert_eq!(
        made["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        made["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar"
    );
    // Every layer is served at its digest (skopeo checks each as it copies).
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/demo/app:1.0", s.addr),
        &format!("oci:{}:x", dir.path().join("back").display()),
    ])?;

    // A target's path mapping: the host kept, a prefix, at most two components.
    let mapped = ["--prefix", "mirror", "--keep-host", "--max-depth", "2"];
    let m = serve(&mapped, &[&archive]).await?;
    let raw2 = skopeo_raw(&format!("{}/mirror/example.com-demo-app:1.0", m.addr))?;
    assert_eq!(raw2, raw);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args([
            "serve",
            "--print-install-config",
            "--advertise",
            "bastion:5000",
        ])
        .args(mapped)
        .arg(&archive)
        .output()?;
    let yaml = String::from_utf8(o.stdout)?;
    assert!(
        yaml.contains(
            "- bastion:5000/mirror/example.com-demo-app\n  source: example.com/demo/app\n"
        ),
        "{yaml}"
    );
    // A prefix no registry accepts is refused at start, by name.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["serve", "--print-install-config", "--prefix", "Mirror/../x"])
        .arg(&archive)
        .output()?;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("prefix \"Mirror/../x\""), "{err}");
    Ok(())
}

/// A later bundle that claims another image's layer digest with other bytes (a hostile
/// or broken bundle beside a good one) is passed over: the unrelated image is served
/// with its right bytes, from the bundle whose copy hashes to its digest. A digest only
/// a wrong copy holds is not served: its download fails, and it is 404 from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadowing_bundle_does_not_serve_its_wrong_bytes() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let good = sample("shadowed", "good", 0);
    let app = good.images.iter().find(|i| i.repo == "demo/app").unwrap();
    let layer = app.blobs.last().unwrap().clone();
    let good_tar = dir.path().join("good.tar");
    std::fs::write(&good_tar, tar_bytes(&good.oci_files(""))?)?;
    // The shadow: an image of its own, and a file at the good layer's digest with other
    // bytes of the same length.
    let shadow = sample("shadow", "shadow", 0);
    let mut files = shadow.oci_files("");
    let size = good
        .oci_files("")
        .into_iter()
        .find(|(p, _)| p.ends_with(&layer[7..]))
        .map(|(_, b)| b.len())
        .unwrap();
    files.push((format!("blobs/sha256/{}", &layer[7..]), vec![0x5a; size]));
    let shadow_tar = dir.path().join("shadow.tar");
    std::fs::write(&shadow_tar, tar_bytes(&files)?)?;
    let s = serve(&[], &[&good_tar, &shadow_tar]).await?;

    // The good image's layer: the right bytes, though the newer bundle holds the digest.
    let http = reqwest::Client::new();
    let base = format!("http://{}", s.addr);
    for _ in 0..2 {
        let r = http
            .get(format!("{base}/v2/demo/app/blobs/{layer}"))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert_eq!(sha(&r.bytes().await?), layer);
    }
    // The whole image, copied and checked by skopeo.
    let out = dir.path().join("copy");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{}/demo/app@{}", s.addr, app.digest),
        &format!("oci:{}:a", out.display()),
    ])?;

    // Served alone, the wrong copy is never passed off as the blob.
    let alone = serve(&[], &[&shadow_tar]).await?;
    let url = format!("http://{}/v2/demo/app/blobs/{layer}", alone.addr);
    // A small blob is one chunk: the answer may be cut before its headers went out.
    let whole = match http.get(&url).send().await {
        Ok(first) => first
            .bytes()
            .await
            .is_ok_and(|b| sha(&b) == layer || b.len() == size),
        Err(_) => false,
    };
    assert!(!whole, "the wrong bytes went out whole");
    // On a new connection: the first one was cut when the wrong bytes were found.
    let again = reqwest::Client::new().get(&url).send().await?;
    assert_eq!(again.status(), 404);
    Ok(())
}

/// A flood of bad passwords from one address does not hold up a user's login from
/// another: that address gets one bcrypt check at a time, then `429` (with
/// `Retry-After`) once it failed too often, and the valid login is answered in under
/// 0.5 s: about 0.1 s alone, 0.2 s while other tests load the machine, and seconds if it
/// waited behind the flood's 200 bcrypt checks. With `--advertise`, the login challenge
/// names that URL, whatever Host the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_htpasswd_flood_does_not_hold_up_a_valid_login() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("b.tar");
    std::fs::write(&tar, tar_bytes(&sample("flood", "flood", 0).oci_files(""))?)?;
    // Cost 8: about as slow as a real one, without making the test long.
    let o = std::process::Command::new("htpasswd")
        .args(["-nbB", "-C", "8", "alice", "wonder land"])
        .output()
        .expect("htpasswd (scripts/install-deps.sh installs apache2-utils)");
    assert!(o.status.success());
    let users = dir.path().join("htpasswd");
    std::fs::write(&users, &o.stdout)?;
    let s = serve(
        &[
            "--htpasswd",
            users.to_str().unwrap(),
            "--advertise",
            "https://bastion.example:5000",
        ],
        &[&tar],
    )
    .await?;
    let url = format!("http://{}/v2/", s.addr);
    let attacker = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()?;
    let user = reqwest::Client::new();

    // The challenge: the advertised URL, not the Host the client sent.
    let r = user.get(&url).header("host", "evil.example").send().await?;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="https://bastion.example:5000/token",service="shipperd""#
    );

    // 200 bad logins at once from 127.0.0.2.
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let (c, url) = (attacker.clone(), url.clone());
            tokio::spawn(async move {
                // 0: the connection closed (over --max-connections-per-client).
                c.get(&url)
                    .basic_auth("alice", Some(format!("guess-{i}")))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = std::time::Instant::now();
    let r = user
        .get(&url)
        .basic_auth("alice", Some("wonder land"))
        .send()
        .await?;
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    let mut statuses = std::collections::BTreeMap::new();
    for f in flood {
        *statuses.entry(f.await?).or_insert(0) += 1;
    }
    eprintln!("valid login in {took:?} during the flood; flood answered {statuses:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Refused before any check: 429, or the connection closed (over its cap).
    let refused = statuses.get(&429).unwrap_or(&0) + statuses.get(&0).unwrap_or(&0);
    assert!(refused >= 150, "{statuses:?}");
    assert_eq!(statuses.get(&200), None);
    // Bad logins one after another: after 20 failures in a minute the address is
    // refused before any check, with Retry-After. (A login that passed a moment ago is
    // remembered, and would still pass.)
    let mut last = None;
    for i in 0..=shipperd_listener::MAX_FAILURES {
        let r = attacker
            .get(&url)
            .basic_auth("alice", Some(format!("one more guess {i}")))
            .send()
            .await?;
        if r.status() == 429 {
            last = Some(r);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let r = last.expect("locked out within 20 failures");
    assert!(r.headers().contains_key("retry-after"));
    Ok(())
}
