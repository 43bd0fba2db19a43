//! Every bundle format people carry, through the real pipeline into docker-registry,
//! with every digest checked: Koffer (gzip tar of a registry tree under a prefix, named
//! `.tar.xz`, with its `.sha256`), oc-mirror (several tar parts of a registry tree, and
//! byte-split parts), Hauler (zstd tar of an OCI layout), Zarf (zstd tar, layout under
//! `images/`), xz tar, plain tar read in place, and squashfs of a registry tree.

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{
        Compression, TarCompression, compress, sample, tar_bytes, tar_parts, write_squashfs_files,
    },
};

const DONE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_format_is_published_byte_for_byte() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let mut done = Vec::new();

    // Koffer: gzip (named .tar.xz) of a registry tree under platform/mirror/.
    let koffer = sample("koffer", "koffer", 0);
    let body = compress(
        tar_bytes(&koffer.tree_files("platform/mirror/"))?,
        TarCompression::Gzip,
    )?;
    let (st, b) = app.put("koffer-bundle.tar.xz", body, None).await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "koffer",
        b["id"].as_str().unwrap().to_string(),
        koffer,
        "gzip",
    ));

    // The same with Docker schema 2 manifests and a manifest list, as `registry serve`
    // stores images pulled from Docker Hub.
    let docker = shipperd_tests::fixtures::sample_into(
        shipperd_tests::fixtures::LayoutBuilder::docker(),
        "docker",
        "docker",
        0,
    );
    let body = compress(
        tar_bytes(&docker.tree_files("mirror/"))?,
        TarCompression::Gzip,
    )?;
    let (st, b) = app.put("docker-v2.tar.gz", body, None).await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "docker v2",
        b["id"].as_str().unwrap().to_string(),
        docker,
        "gzip",
    ));

    // oc-mirror: three whole tars of a registry tree at the root, as one bundle.
    let ocm = sample("ocmirror", "ocmirror", 0);
    let parts = tar_parts(&ocm.tree_files(""), 3)?;
    let (st, b) = app.put_parts("mirror", parts).await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "oc-mirror",
        b["id"].as_str().unwrap().to_string(),
        ocm,
        "tar",
    ));

    // A part beyond `parts=N` is never read as part of the bundle: parts 1 and 2 of a
    // tar, and a part 4 holding only an index.json naming another image. Completing
    // with parts=2 is refused naming part 4; nothing became a bundle.
    let honest = sample("ocm-extra", "ocmextra", 0);
    let mut two = tar_parts(&honest.tree_files(""), 2)?;
    let evil = tar_bytes(&[(
        "index.json".to_string(),
        br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2,"annotations":{"org.opencontainers.image.ref.name":"evil/pwned:1"}}]}"#.to_vec(),
    )])?;
    let parts = vec![(1, two[0].clone()), (2, two[1].clone()), (4, evil)];
    let upload = app.upload_parts("extra", parts).await?;
    let (st, b) = app.complete("extra", &upload, 2).await?;
    assert_eq!(st, 409, "{b}");
    let why = b["error"].as_str().unwrap_or_default();
    assert!(why.contains("has part 4 beyond parts=2"), "{why}");
    assert!(app.bundles().await?.iter().all(|b| b["name"] != "extra"));
    // The same two parts, honestly uploaded, are a bundle of their own images.
    let (st, b) = app
        .put_parts("extra-honest", std::mem::take(&mut two))
        .await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "oc-mirror, 2 of 3 parts",
        b["id"].as_str().unwrap().to_string(),
        honest,
        "tar",
    ));

    // One tar of an OCI layout split at arbitrary bytes (`split -n 3`).
    let split = sample("split", "split", 0);
    let whole = tar_bytes(&split.oci_files(""))?;
    let third = whole.len() / 3 + 7;
    let pieces: Vec<Vec<u8>> = whole.chunks(third).map(<[u8]>::to_vec).collect();
    assert_eq!(pieces.len(), 3);
    let (st, b) = app.put_parts("split", pieces).await?;
    assert_eq!(st, 202, "{b}");
    done.push(("split", b["id"].as_str().unwrap().to_string(), split, "tar"));

    // Hauler: zstd tar of an OCI layout at the root.
    let hauler = sample("hauler", "haul", 0);
    let body = compress(tar_bytes(&hauler.oci_files(""))?, TarCompression::Zstd)?;
    let (st, b) = app.put("haul.tar.zst", body, None).await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "hauler",
        b["id"].as_str().unwrap().to_string(),
        hauler,
        "zstd",
    ));

    // Zarf: zstd tar, the layout under images/, beside other package files.
    let zarf = sample("zarf", "zarf-package-demo-amd64", 0);
    let mut files = zarf.oci_files("images/");
    files.push(("zarf.yaml".into(), b"kind: ZarfPackageConfig\n".to_vec()));
    files.push(("components/app.tar".into(), vec![7u8; 4096]));
    let body = compress(tar_bytes(&files)?, TarCompression::Zstd)?;
    let (st, b) = app
        .put("zarf-package-demo-amd64.tar.zst", body, None)
        .await?;
    assert_eq!(st, 202, "{b}");
    done.push(("zarf", b["id"].as_str().unwrap().to_string(), zarf, "zstd"));

    // xz tar of an OCI layout.
    let xz = sample("xz", "layout", 0);
    let body = compress(tar_bytes(&xz.oci_files(""))?, TarCompression::Xz)?;
    let (st, b) = app.put("layout.tar.xz", body, None).await?;
    assert_eq!(st, 202, "{b}");
    done.push(("xz", b["id"].as_str().unwrap().to_string(), xz, "xz"));

    // Plain tar of an OCI layout: read in place.
    let plain = sample("plain", "layout", 0);
    let (st, b) = app
        .put("layout.tar", tar_bytes(&plain.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{b}");
    done.push(("plain", b["id"].as_str().unwrap().to_string(), plain, "tar"));

    // squashfs of a registry tree.
    let sq = sample("sqtree", "sqtree", 0);
    let path = dir.path().join("tree.squashfs");
    write_squashfs_files(&sq.tree_files(""), &path, Compression::Zstd)?;
    let (st, b) = app
        .put("tree.squashfs", std::fs::read(&path)?, None)
        .await?;
    assert_eq!(st, 202, "{b}");
    done.push((
        "squashfs tree",
        b["id"].as_str().unwrap().to_string(),
        sq,
        "squashfs",
    ));

    for (what, id, layout, format) in &done {
        let rec = app.wait_done(id, DONE).await?;
        assert_eq!(rec["phase"], "Published", "{what}: {rec:#}");
        assert_eq!(rec["format"], *format, "{what}");
        assert_eq!(
            rec["images"].as_array().unwrap().len(),
            layout.images.len(),
            "{what}"
        );
    }
    // Tags are shared across bundles (demo/app:1.0 ...) and the bundles publish in
    // parallel, so whichever finished last holds a shared tag: each tag must point at
    // the digest one of the bundles gave it, and every manifest and blob is checked by
    // digest below.
    let mut wanted: std::collections::BTreeMap<(String, String), Vec<String>> =
        std::collections::BTreeMap::new();
    for (_, _, layout, _) in &done {
        for img in &layout.images {
            wanted
                .entry((img.repo.clone(), img.tag.clone()))
                .or_default()
                .push(img.digest.clone());
        }
    }
    for ((repo, tag), digests) in &wanted {
        let (top, _) = app
            .manifest(repo, tag)
            .await?
            .unwrap_or_else(|| panic!("{repo}:{tag} is not tagged"));
        let got = shipperd_tests::fixtures::sha256(&top);
        assert!(
            digests.contains(&got),
            "{repo}:{tag} is {got}, not one of {digests:?}"
        );
    }
    for (what, _, layout, _) in &done {
        for img in &layout.images {
            for m in &img.manifests {
                let (bytes, _) = app
                    .manifest(&img.repo, m)
                    .await?
                    .unwrap_or_else(|| panic!("{what}: {}@{m} missing", img.repo));
                assert_eq!(&shipperd_tests::fixtures::sha256(&bytes), m, "{what}");
            }
            for blob in &img.blobs {
                let bytes = app.blob(&img.repo, blob).await?.unwrap();
                assert_eq!(&shipperd_tests::fixtures::sha256(&bytes), blob, "{what}");
            }
        }
    }
    // The expanded blobs of finished bundles were collected: nothing is left behind.
    let cas = app.data.path().join("cas/blobs/sha256");
    let left: Vec<_> = std::fs::read_dir(&cas)?.collect();
    assert!(left.is_empty(), "{} blobs left in the store", left.len());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signatures_and_referrers_travel_with_their_images() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let mut b = sample("refs", "refs", 0);
    let app_img = b.images[0].clone();
    // An OCI 1.1 referrer of the image, unnamed in index.json.
    let sbom = b.referrer(&app_img.digest, "application/spdx+json", b"{\"spdx\":1}");
    // A cosign signature: an image tagged sha256-<hex>.sig in the same repository.
    let sig_layer = b.layer(
        &[("sig", b"signature".to_vec())],
        flate2::Compression::fast(),
    );
    let sig_tag = format!("{}.sig", app_img.digest.replace(':', "-"));
    b.image(
        serde_json::json!({ "org.opencontainers.image.ref.name":
            format!("example.com/{}:{sig_tag}", app_img.repo) }),
        &[sig_layer],
        &app_img.repo,
        &sig_tag,
    );
    let body = compress(tar_bytes(&b.oci_files(""))?, TarCompression::Zstd)?;
    let (st, r) = app.put("refs.tar.zst", body, None).await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    // The referrer is there by digest, and (docker-registry 2.8 has no referrers API)
    // listed under the fallback tag sha256-<subject hex>.
    let (bytes, _) = app
        .manifest(&app_img.repo, &sbom)
        .await?
        .expect("the referrer was published");
    assert_eq!(shipperd_tests::fixtures::sha256(&bytes), sbom);
    let fallback = app_img.digest.replace(':', "-");
    let (index, _) = app
        .manifest(&app_img.repo, &fallback)
        .await?
        .expect("the referrers fallback tag exists");
    let index: serde_json::Value = serde_json::from_slice(&index)?;
    let listed: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![sbom.as_str()]);
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/spdx+json"
    );
    app.stop().await
}
