//! `docker save` archives through the pipeline, and through `shipperd serve`:
//!
//! - one written by `skopeo copy ... docker-archive:` (plain tar, read in place);
//! - a legacy archive of three images written here as Docker wrote them before 25 (two
//!   tags on one image, a layer shared by two, a layer linked to another directory, an
//!   image saved by ID, a Docker short name), as gzip tar, plain tar and squashfs;
//! - Docker 25's archive (an OCI layout beside `manifest.json`), read as the layout;
//! - a legacy archive whose layer is not what its config names, and one whose
//!   `manifest.json` names a path outside it, refused by name;
//! - `--compress-layers`: gzip layers, deterministic, let go with the bundle.
//!
//! Each image is published with its config unchanged (the image ID stays), its layers
//! as they are (their digests are the diff IDs), and `serve` serves the same manifests.

use std::time::Duration;

use serde_json::Value;
use shipperd_tests::{
    app::{Options, TestApp, skopeo_raw, spawn_app},
    docker_save::{self, SavedImage, layer},
    fixtures::{TarCompression, compress, mksquashfs_dir, sample, sha256, tar_bytes},
};

const DONE: Duration = Duration::from_secs(90);

fn images() -> Vec<SavedImage> {
    let base = layer("etc/os-release", b"ID=saved\n");
    let api = layer("bin/api", &[0x41; 3000]);
    vec![
        SavedImage::new(
            &["example.com/team/api:1.0", "example.com/team/api:latest"],
            vec![base.clone(), api.clone()],
            "APP=api",
        ),
        // Docker's short names: Docker Hub's (`worker` is `docker.io/library/worker`).
        SavedImage::new(
            &["team/worker:2.0", "worker:latest"],
            vec![base, layer("bin/worker", &[0x57; 5000])],
            "APP=worker",
        ),
        // Saved by ID; its only layer has the api layer's bytes under another parent,
        // so Docker links its directory to the first.
        SavedImage::new(&[], vec![api], "APP=untagged"),
    ]
}

/// Uploads `body` as `name`; the bundle must end Failed: its reason.
async fn failed(app: &TestApp, name: &str, body: Vec<u8>) -> anyhow::Result<String> {
    let (st, b) = app.put(name, body, None).await?;
    assert_eq!(st, 202, "{b}");
    let rec = app.wait_done(b["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    Ok(rec["error"].as_str().unwrap_or_default().to_string())
}

/// Where a `RepoTags` entry lands with the default mapping (the host dropped): a
/// short name is Docker Hub's, so `worker` is `library/worker`.
fn landed(tag: &str) -> (String, &str) {
    let (repo, t) = tag.rsplit_once(':').unwrap();
    let repo = match repo.strip_prefix("example.com/") {
        Some(r) => r.to_string(),
        None if !repo.contains('/') => format!("library/{repo}"),
        None => repo.to_string(),
    };
    (repo, t)
}

/// The registry's manifest of `repo:reference`, parsed, with its digest.
async fn manifest(app: &TestApp, repo: &str, reference: &str) -> anyhow::Result<(Value, String)> {
    let (bytes, _) = app
        .manifest(repo, reference)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{repo}:{reference} is not in the registry"))?;
    Ok((serde_json::from_slice(&bytes)?, sha256(&bytes)))
}

/// Every tag of `images` is in the registry with its config unchanged and its layers
/// at their diff IDs, each blob's bytes hashing to its digest.
async fn check_published(app: &TestApp, images: &[SavedImage], what: &str) -> anyhow::Result<()> {
    for img in images {
        for t in &img.tags {
            let (repo, tag) = landed(t);
            let repo = repo.as_str();
            let (m, _) = manifest(app, repo, tag).await?;
            assert_eq!(
                m["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
                "{what} {t}"
            );
            assert_eq!(m["config"]["digest"], img.config_digest(), "{what} {t}");
            let layers: Vec<&str> = m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap())
                .collect();
            assert_eq!(
                layers,
                img.diff_ids(),
                "{what} {t}: layers at their diff IDs"
            );
            for d in layers.iter().copied().chain([img.config_digest().as_str()]) {
                let blob = app.blob(repo, d).await?.unwrap();
                assert_eq!(sha256(&blob), d, "{what} {t}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_save_archives_publish_with_their_image_ids() -> anyhow::Result<()> {
    shipperd_tests::init();
    let app = spawn_app(Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let images = images();
    let members = docker_save::legacy_members(&images);
    let legacy_tar = docker_save::tar(&members)?;
    let mut bundles = Vec::new();

    // skopeo's docker-archive of one image of an OCI layout.
    let layout = sample("dsave", "d", 0);
    let oci = dir.path().join("oci");
    layout.write_dir(&oci)?;
    let skopeo_archive = dir.path().join("skopeo.tar");
    docker_save::skopeo_archive(&oci, "1.0", &skopeo_archive, "example.com/skopeo/app:1.0")?;
    let app_img = layout.images.iter().find(|i| i.repo == "demo/app").unwrap();
    let original: Value = serde_json::from_slice(&layout.blobs[&app_img.digest])?;
    let (st, b) = app
        .put("skopeo.tar", std::fs::read(&skopeo_archive)?, None)
        .await?;
    assert_eq!(st, 202, "{b}");
    bundles.push((
        "skopeo docker-archive",
        b["id"].as_str().unwrap().to_string(),
    ));

    // The legacy archive, gzip-compressed (expanded: layers stored by their hashes).
    let (st, b) = app
        .put(
            "legacy.tar.gz",
            compress(legacy_tar.clone(), TarCompression::Gzip)?,
            None,
        )
        .await?;
    assert_eq!(st, 202, "{b}");
    bundles.push(("legacy gzip", b["id"].as_str().unwrap().to_string()));
    let legacy_id = b["id"].as_str().unwrap().to_string();

    // Docker 25: an OCI layout beside manifest.json; read as the layout.
    let d25 = sample("d25", "d25", 0);
    let mut files = d25.oci_files("");
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&serde_json::json!([{
            "Config": "blobs/sha256/0000",
            "RepoTags": ["ignored/by:layout"],
            "Layers": [],
        }]))?,
    ));
    files.push(("repositories".into(), b"{}".to_vec()));
    let (st, b) = app.put("d25.tar", tar_bytes(&files)?, None).await?;
    assert_eq!(st, 202, "{b}");
    bundles.push(("docker 25", b["id"].as_str().unwrap().to_string()));

    for (what, id) in &bundles {
        let rec = app.wait_done(id, DONE).await?;
        assert_eq!(rec["phase"], "Published", "{what}: {rec:#}");
    }
    // skopeo's: the config digest (the image ID) unchanged.
    let (m, _) = manifest(&app, "skopeo/app", "1.0").await?;
    assert_eq!(m["config"]["digest"], original["config"]["digest"]);
    // Docker 25's: the layout's own manifests, byte for byte.
    app.assert_published(&d25, "").await?;
    assert!(app.catalog().await?.iter().all(|r| r != "ignored/by"));

    // The legacy archive: every tag, config and layer; the untagged image by digest in
    // the repository named after the bundle.
    check_published(&app, &images, "legacy gzip").await?;
    let rec = app.bundle(&legacy_id).await?.unwrap();
    let listed = rec["images"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        5,
        "four tags and one image by digest: {rec:#}"
    );
    assert!(
        listed
            .iter()
            .any(|i| i["source"] == "docker.io/library/worker:latest"),
        "{rec:#}"
    );
    let untagged = listed
        .iter()
        .find(|i| i["source"].as_str().unwrap().contains('@'))
        .expect("the untagged image");
    let digest = untagged["digest"].as_str().unwrap();
    assert!(
        untagged["source"].as_str().unwrap().starts_with("legacy@"),
        "{untagged}"
    );
    let (m, _) = manifest(&app, "legacy", digest).await?;
    assert_eq!(m["config"]["digest"], images[2].config_digest());
    let (api, api_digest) = manifest(&app, "team/api", "1.0").await?;

    // The same archive as a plain tar (read in place) and as squashfs: the same
    // manifests (the made manifest is a function of the archive's content).
    let sq_dir = dir.path().join("sq");
    docker_save::write_dir(&members, &sq_dir)?;
    let sq = dir.path().join("legacy.squashfs");
    mksquashfs_dir(&sq_dir, &sq, &["-comp", "gzip"])?;
    let mut more = Vec::new();
    for (name, body) in [
        ("legacy-plain.tar", legacy_tar.clone()),
        ("legacy.squashfs", std::fs::read(&sq)?),
    ] {
        let (st, b) = app.put(name, body, None).await?;
        assert_eq!(st, 202, "{b}");
        more.push((name, b["id"].as_str().unwrap().to_string()));
    }
    for (name, id) in &more {
        let rec = app.wait_done(id, DONE).await?;
        assert_eq!(rec["phase"], "Published", "{name}: {rec:#}");
        let mine = rec["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["source"] == "example.com/team/api:1.0")
            .unwrap();
        assert_eq!(mine["digest"], api_digest.as_str(), "{name}");
        assert_eq!(
            rec["format"],
            if name.ends_with("tar") {
                "tar"
            } else {
                "squashfs"
            }
        );
    }
    check_published(&app, &images, "legacy tar and squashfs").await?;
    assert_eq!(
        api["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar"
    );

    // A layer that is not what its config names: refused by name, nothing tagged.
    let mut bad = docker_save::legacy_members(&[SavedImage::new(
        &["bad/image:1"],
        vec![layer("x", b"real")],
        "APP=bad",
    )]);
    for (path, m) in bad.iter_mut() {
        if path.ends_with("layer.tar") {
            *m = docker_save::Member::File(layer("x", b"swapped"));
        }
    }
    let body = compress(docker_save::tar(&bad)?, TarCompression::Gzip)?;
    let why = failed(&app, "bad.tar.gz", body).await?;
    assert!(
        why.contains("layer.tar hashes to sha256:") && why.contains("the image config names it"),
        "{why}"
    );
    assert!(app.tags("bad/image").await?.is_empty());

    // A manifest.json naming a file outside the archive: nothing is read from outside.
    let mut escape = docker_save::legacy_members(&[SavedImage::new(
        &["escape/image:1"],
        vec![layer("y", b"z")],
        "APP=escape",
    )]);
    let (_, m) = escape
        .iter_mut()
        .find(|(p, _)| p == "manifest.json")
        .unwrap();
    *m = docker_save::Member::File(
        br#"[{"Config":"../../../../etc/passwd","RepoTags":["escape/image:1"],"Layers":[]}]"#
            .to_vec(),
    );
    let why = failed(&app, "escape.tar", docker_save::tar(&escape)?).await?;
    assert!(
        why.contains("../../../../etc/passwd is missing from the bundle"),
        "{why}"
    );

    // `serve` of Docker 25's archive: its layout's manifests.
    let d25_tar = dir.path().join("d25.tar");
    std::fs::write(&d25_tar, tar_bytes(&files)?)?;
    let s25 = crate::serve::serve(&[], &[&d25_tar]).await?;
    for img in &d25.images {
        let raw = skopeo_raw(&format!("{}/{}:{}", s25.addr, img.repo, img.tag))?;
        assert_eq!(sha256(&raw), img.digest, "{}:{}", img.repo, img.tag);
    }

    // `serve` of the gzip archive serves the manifests the pipeline published.
    let gz = dir.path().join("legacy.tar.gz");
    std::fs::write(&gz, compress(legacy_tar, TarCompression::Gzip)?)?;
    let s = crate::serve::serve(&[], &[&gz]).await?;
    let raw = skopeo_raw(&format!("{}/team/api:latest", s.addr))?;
    assert_eq!(sha256(&raw), api_digest);
    let raw = skopeo_raw(&format!("{}/team/worker:2.0", s.addr))?;
    let (_, worker_digest) = manifest(&app, "team/worker", "2.0").await?;
    assert_eq!(sha256(&raw), worker_digest);
    app.stop().await?;

    // --compress-layers: the same archive (plain tar) with gzip layers; the config, so
    // the image ID, unchanged; the same digests on a second unpack of it.
    let app = spawn_app(Options {
        compress_layers: true,
        ..Options::default()
    })
    .await?;
    let mut digests = Vec::new();
    for name in ["gz-a.tar", "gz-b.tar"] {
        // Another file beside, so each is a bundle of its own.
        let mut these = members.clone();
        these.push((
            format!("{name}.txt"),
            docker_save::Member::File(name.as_bytes().to_vec()),
        ));
        let (st, b) = app.put(name, docker_save::tar(&these)?, None).await?;
        assert_eq!(st, 202, "{b}");
        let rec = app.wait_done(b["id"].as_str().unwrap(), DONE).await?;
        assert_eq!(rec["phase"], "Published", "{rec:#}");
        let mut d: Vec<String> = rec["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{} {}", i["source"], i["digest"]))
            .filter(|s| !s.contains('@'))
            .collect();
        d.sort();
        digests.push(d);
    }
    assert_eq!(digests[0], digests[1], "deterministic compression");
    for img in &images[..2] {
        let t = &img.tags[0];
        let (repo, tag) = landed(t);
        let repo = repo.as_str();
        let (m, digest) = manifest(&app, repo, tag).await?;
        assert_ne!(digest, api_digest);
        assert_eq!(m["config"]["digest"], img.config_digest(), "{t}");
        for (l, diff_id) in m["layers"].as_array().unwrap().iter().zip(img.diff_ids()) {
            assert_eq!(
                l["mediaType"],
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            );
            let d = l["digest"].as_str().unwrap();
            let blob = app.blob(repo, d).await?.unwrap();
            assert_eq!(sha256(&blob), d);
            assert_eq!(l["size"], blob.len());
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar)?;
            assert_eq!(
                sha256(&tar),
                diff_id,
                "{t}: the layer gunzips to its diff ID"
            );
        }
    }
    // What was compressed is let go once the bundles are done.
    let blobs = app.data.path().join("cas/blobs/sha256");
    shipperd_tests::eventually("the compressed layers let go", DONE, || async {
        let left = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        (left == 0).then_some(())
    })
    .await?;
    Ok(())
}
