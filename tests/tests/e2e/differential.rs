//! Day-2 differential bundles: archives that carry only what was added since the last
//! mirror (oc-mirror v2's archives, Zarf's `--differential` packages). What they leave
//! out must be in the target registry already; only what is in neither fails.

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};
use shipperd_tests::{
    app::{Options, TestApp, spawn_app},
    fixtures::{LayoutBuilder, TarCompression, compress, tar_bytes, tar_parts},
};

const DONE: Duration = Duration::from_secs(90);

/// The files oc-mirror v2 puts beside the registry tree in its archives.
fn working_dir() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "working-dir/.oc-mirror.log".into(),
            b"mirroring 4 images\n".to_vec(),
        ),
        (
            "working-dir/cluster-resources/idms-oc-mirror.yaml".into(),
            b"apiVersion: config.openshift.io/v1\nkind: ImageDigestMirrorSet\n".to_vec(),
        ),
        (
            "working-dir/info/history.json".into(),
            br#"{"blobs":[]}"#.to_vec(),
        ),
    ]
}

/// Day 1: an image and a two-platform index sharing a base layer. Day 2 (a clone of it,
/// plus): a new version of the image (the base and its old layer reused), a new index
/// reusing the arm64 manifest unchanged, an image in a new repository on the base
/// layer, and a new tag for a Day-1 digest.
fn days() -> (LayoutBuilder, LayoutBuilder) {
    let fast = flate2::Compression::fast();
    let mut d1 = LayoutBuilder::new();
    let base = d1.layer(
        &[
            ("etc/os-release", b"NAME=day1 base\n".to_vec()),
            ("usr/share/base.bin", vec![7u8; 300 << 10]),
        ],
        flate2::Compression::none(),
    );
    let app1 = d1.layer(&[("app/v1", b"app one".to_vec())], fast);
    d1.image(json!({}), &[base.clone(), app1.clone()], "demo/app", "1.0");
    let amd = d1.layer(&[("bin/hello", b"amd64 one".to_vec())], fast);
    let arm = d1.layer(&[("bin/hello", b"arm64 one".to_vec())], fast);
    d1.multi_arch(
        json!({}),
        &[
            ("amd64", vec![base.clone(), amd]),
            ("arm64", vec![arm.clone()]),
        ],
        "demo/multi",
        "1.0",
    );

    let mut d2 = d1.clone();
    let app2 = d2.layer(&[("app/v2", b"app two".to_vec())], fast);
    d2.image(json!({}), &[base.clone(), app1, app2], "demo/app", "1.1");
    let amd2 = d2.layer(&[("bin/hello", b"amd64 two".to_vec())], fast);
    d2.multi_arch(
        json!({}),
        &[("amd64", vec![base.clone(), amd2]), ("arm64", vec![arm])],
        "demo/multi",
        "2.0",
    );
    let other = d2.layer(&[("srv/other", b"other".to_vec())], fast);
    d2.image(json!({}), &[base, other], "demo/other", "1");
    let mut stable = d1.images[0].clone();
    stable.tag = "stable".into();
    d2.images.push(stable);
    (d1, d2)
}

/// `layout`'s registry tree with `working-dir/` beside it, in three whole tars, without
/// the blob (and manifest) files of `shipped` (what an earlier mirror carried).
fn archive(
    layout: &LayoutBuilder,
    shipped: Option<&LayoutBuilder>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let left_out: BTreeSet<String> = shipped
        .map(|s| s.blobs.keys().map(|d| d[7..].to_string()).collect())
        .unwrap_or_default();
    let mut files: Vec<(String, Vec<u8>)> = layout
        .tree_files("")
        .into_iter()
        .filter(|(p, _)| {
            !(p.ends_with("/data")
                && p.rsplit('/')
                    .nth(1)
                    .is_some_and(|hex| left_out.contains(hex)))
        })
        .collect();
    files.extend(working_dir());
    tar_parts(&files, 3)
}

async fn publish_parts(app: &TestApp, name: &str, parts: Vec<Vec<u8>>) -> anyhow::Result<Value> {
    let (st, b) = app.put_parts(name, parts).await?;
    assert_eq!(st, 202, "{b}");
    app.wait_done(b["id"].as_str().unwrap(), DONE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_day2_archive_takes_what_it_leaves_out_from_the_registry() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let (d1, d2) = days();
    let rec = publish_parts(&app, "day1", archive(&d1, None)?).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["blobs_absent"], Value::Null, "day 1 carries everything");

    // Day 2 names every image, but carries only what is new.
    let parts = archive(&d2, Some(&d1))?;
    let rec = publish_parts(&app, "day2", parts).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&d2, "").await?;
    // Left out: the base, app and arm64 layers, Day 1's configs and manifests.
    let absent = rec["blobs_absent"].as_u64().unwrap_or_default();
    assert!(absent >= 6, "{rec:#}");
    let sources = &rec["blob_sources"];
    assert!(sources["uploaded"].as_u64() >= Some(3), "{rec:#}");
    assert!(
        sources["present"].as_u64().unwrap_or(0) + sources["mounted"].as_u64().unwrap_or(0) >= 3,
        "{rec:#}"
    );
    // The new repository got the base layer by a mount from another.
    assert!(sources["mounted"].as_u64() >= Some(1), "{rec:#}");
    // Every image is tagged, and the new tag of a Day-1 digest too.
    let images = rec["images"].as_array().unwrap();
    // And one by digest: Day 1's amd64 manifest, a revision of the tree that no tag
    // reaches once its index is left out (checked present, like the rest).
    assert_eq!(images.len(), d2.images.len() + 1, "{rec:#}");
    assert!(images.iter().all(|i| i["tagged"] == true), "{rec:#}");

    // Zarf-style: an OCI layout (tar.zst) carrying only what is new since day 2.
    let mut d3 = d2.clone();
    let fast = flate2::Compression::fast();
    let base = d1.images[0].blobs[1].clone();
    let newer = d3.layer(&[("app/v3", b"app three".to_vec())], fast);
    let base_layer = shipperd_tests::fixtures::Layer {
        size: d1.blobs[&base].len() as u64,
        diff_id: diff_id(&d1.blobs[&base]),
        digest: base,
    };
    d3.image(
        json!({ "org.opencontainers.image.ref.name": "example.com/demo/app:1.2" }),
        &[base_layer, newer],
        "demo/app",
        "1.2",
    );
    let files: Vec<(String, Vec<u8>)> = d3
        .oci_files("")
        .into_iter()
        .filter(|(p, _)| {
            !p.strip_prefix("blobs/sha256/")
                .is_some_and(|hex| d2.blobs.contains_key(&format!("sha256:{hex}")))
        })
        .collect();
    let body = compress(tar_bytes(&files)?, TarCompression::Zstd)?;
    let (st, b) = app.put("day3.tar.zst", body, None).await?;
    assert_eq!(st, 202, "{b}");
    let rec = app.wait_done(b["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    let (top, _) = app.manifest("demo/app", "1.2").await?.expect("tagged");
    assert_eq!(
        shipperd_tests::fixtures::sha256(&top),
        d3.images.last().unwrap().digest
    );
    app.stop().await
}

/// The uncompressed digest of a gzip layer, for a config's `diff_ids`.
fn diff_id(gz: &[u8]) -> String {
    use std::io::Read as _;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    shipperd_tests::fixtures::sha256(&tar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_day2_archive_fails_naming_what_neither_it_nor_the_registry_has() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let (d1, d2) = days();
    // Day 1 never reached this registry.
    let rec = publish_parts(&app, "day2-alone", archive(&d2, Some(&d1))?).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap();
    assert!(error.contains("is not in the bundle, and"), "{error}");
    // It names an image and a digest a person can look for.
    let named = d2
        .images
        .iter()
        .any(|i| error.contains(&format!("{}:{}", i.repo, i.tag)));
    assert!(named, "{error}");
    let missing = d1.blobs.keys().any(|d| error.contains(d.as_str()));
    assert!(missing, "{error}");
    // The images it could push are in the registry by digest, but nothing is tagged.
    for repo in app.catalog().await? {
        assert!(app.tags(&repo).await?.is_empty(), "{repo} was tagged");
    }
    let images = rec["images"].as_array().unwrap();
    assert!(images.iter().all(|i| i["tagged"] == false), "{rec:#}");
    app.stop().await
}
