//! Broken and hostile bundles: each one ends `Failed` with a reason that names what is
//! wrong, and the registry holds nothing from any of them.

use std::time::Duration;

use backhand::{FilesystemWriter, NodeHeader};
use serde_json::json;
use shipperd_bundle::Limits;
use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{
        LayoutBuilder, TarCompression, compress, mksquashfs_dir, sha256, tar_bytes, write_files,
    },
};

const DONE: Duration = Duration::from_secs(60);

/// A small valid image as OCI layout files.
fn image(salt: &str) -> (LayoutBuilder, Vec<(String, Vec<u8>)>) {
    let mut b = LayoutBuilder::new();
    let l = b.layer(
        &[("etc/salt", salt.as_bytes().to_vec())],
        flate2::Compression::fast(),
    );
    b.image(
        json!({ "org.opencontainers.image.ref.name": format!("example.com/hostile/{salt}:1") }),
        &[l],
        &format!("hostile/{salt}"),
        "1",
    );
    let files = b.oci_files("");
    (b, files)
}

/// An OCI layout whose index names one image with `desc`, plus `blobs` by their digest.
fn layout_with(desc: serde_json::Value, blobs: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    let mut desc = desc;
    desc["annotations"] =
        json!({ "org.opencontainers.image.ref.name": "example.com/hostile/raw:1" });
    let index = json!({ "schemaVersion": 2, "manifests": [desc] });
    let mut files = vec![(
        "index.json".to_string(),
        serde_json::to_vec(&index).unwrap(),
    )];
    for b in blobs {
        files.push((format!("blobs/sha256/{}", &sha256(b)[7..]), b.clone()));
    }
    files
}

/// A squashfs of one image whose layer is a sparse file of `size` bytes (its digest
/// made up: unpack looks blobs up by name and size, publish hashes them).
fn sparse_squashfs(size: u64) -> anyhow::Result<Vec<u8>> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = "ab".repeat(32);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "digest": format!("sha256:{layer}"), "size": size }],
    }))?;
    let d = json!({ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha256(&manifest), "size": manifest.len() });
    let dir = tempfile::tempdir()?;
    write_files(&layout_with(d, &[manifest, config.to_vec()]), dir.path())?;
    std::fs::File::create(dir.path().join(format!("blobs/sha256/{layer}")))?.set_len(size)?;
    let out = tempfile::NamedTempFile::new()?;
    mksquashfs_dir(dir.path(), out.path(), &[])?;
    let bytes = std::fs::read(out.path())?;
    assert!(
        bytes.len() < 64 << 10,
        "the hole is stored as nothing: {}",
        bytes.len()
    );
    Ok(bytes)
}

/// A tar with one raw member whose name (and link target) bypass the tar crate's checks.
fn raw_member(mut tar: Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    let data = b"evil";
    h.set_size(if kind == tar::EntryType::Regular {
        4
    } else {
        0
    });
    h.set_cksum();
    // Before the end-of-archive blocks.
    let end = tar.len() - 1024;
    let mut member = h.as_bytes().to_vec();
    if kind == tar::EntryType::Regular {
        member.extend_from_slice(data);
        member.resize(1024, 0);
    }
    tar.splice(end..end, member);
    tar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_bundles_fail_with_a_reason_and_publish_nothing() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        limits: Some(Limits {
            max_entries: 500,
            expansion_floor: 4 << 20,
            max_expansion_ratio: 20,
            ..Limits::default()
        }),
        ..Options::default()
    })
    .await?;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();

    let (_, files) = image("truncated");
    let whole = tar_bytes(&files)?;
    cases.push((
        "truncated tar",
        whole[..whole.len() * 6 / 10].to_vec(),
        "truncated",
    ));

    let (_, files) = image("gzcut");
    let gz = compress(tar_bytes(&files)?, TarCompression::Gzip)?;
    cases.push((
        "truncated gzip",
        gz[..gz.len() / 2].to_vec(),
        "corrupt or truncated",
    ));

    let (_, files) = image("gzbad");
    let mut gz = compress(tar_bytes(&files)?, TarCompression::Gzip)?;
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    cases.push(("corrupt gzip", gz, "corrupt"));

    // A small squashfs whose layer is a sparse file: stored as nothing, read back as
    // 64 MiB of zeros, far over what its few KiB may expand to.
    cases.push((
        "sparse squashfs",
        sparse_squashfs(64 << 20)?,
        "(--max-expansion 20)",
    ));

    let (mut b, _) = image("wrongdigest");
    let layer = b.images[0].blobs[1].clone();
    b.corrupt(&layer);
    // Found as publish hashes the blob on its way out: the bundle fails, tagging nothing.
    cases.push((
        "wrong digest",
        tar_bytes(&b.oci_files(""))?,
        "is corrupt in the bundle",
    ));

    let (b, _) = image("wrongdigestgz");
    let mut files = b.oci_files("");
    let layer = &b.images[0].blobs[1][7..];
    for (p, data) in &mut files {
        if p.ends_with(layer) {
            data[0] ^= 0xff;
        }
    }
    cases.push((
        "wrong digest, compressed",
        compress(tar_bytes(&files)?, TarCompression::Zstd)?,
        "hashes to",
    ));

    let (b, mut files) = image("missing");
    let layer = b.images[0].blobs[1][7..].to_string();
    files.retain(|(p, _)| !p.ends_with(&layer));
    // Not in the bundle and not in the registry either (a differential bundle's blob
    // must be there already).
    cases.push((
        "missing blob",
        tar_bytes(&files)?,
        "is not in the bundle, and",
    ));

    let (b, mut files) = image("sizelies");
    let layer = b.images[0].blobs[1][7..].to_string();
    for (p, data) in &mut files {
        if p.ends_with(&layer) {
            data.push(0);
        }
    }
    cases.push(("size lies", tar_bytes(&files)?, "the manifest says"));

    let not_json = b"this is { not json".to_vec();
    let d = json!({ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha256(&not_json), "size": not_json.len() });
    cases.push((
        "manifest not JSON",
        tar_bytes(&layout_with(d, &[not_json]))?,
        "not valid JSON",
    ));

    let mut huge = br#"{"schemaVersion":2,"pad":""#.to_vec();
    huge.resize(5 << 20, b' ');
    let d = json!({ "digest": sha256(&huge), "size": huge.len() });
    cases.push((
        "huge manifest",
        tar_bytes(&layout_with(d, &[huge]))?,
        "over the limit",
    ));

    let d = json!({ "digest": format!("sha512:{}", "a".repeat(128)), "size": 10 });
    cases.push((
        "other algorithm",
        tar_bytes(&layout_with(d, &[]))?,
        "invalid digest",
    ));

    let d = json!({ "digest": "sha256:../../../../etc/passwd", "size": 10 });
    cases.push((
        "digest with a path",
        tar_bytes(&layout_with(d, &[]))?,
        "invalid digest",
    ));

    let (_, files) = image("dotdot");
    let t = raw_member(
        tar_bytes(&files)?,
        b"../../evil",
        tar::EntryType::Regular,
        b"",
    );
    cases.push(("`..` in tar", t, "`..` component"));

    let (_, files) = image("absolute");
    let t = raw_member(
        tar_bytes(&files)?,
        b"/etc/evil",
        tar::EntryType::Regular,
        b"",
    );
    cases.push(("absolute path in tar", t, "absolute path"));

    let (_, files) = image("symlink");
    let t = raw_member(
        tar_bytes(&files)?,
        b"blobs/sha256/shadow",
        tar::EntryType::Symlink,
        b"../../../etc/shadow",
    );
    cases.push(("symlink out of tar", t, "points outside the bundle"));

    let (_, files) = image("sqlink");
    let mut fs = FilesystemWriter::default();
    let h = NodeHeader {
        permissions: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };
    fs.push_dir_all("blobs/sha256", h)?;
    for (p, data) in &files {
        fs.push_file(std::io::Cursor::new(data.clone()), p, h)?;
    }
    fs.push_symlink("/etc/shadow", "blobs/shadow", h)?;
    let mut sq = std::io::Cursor::new(Vec::new());
    fs.write(&mut sq)?;
    cases.push((
        "symlink out of squashfs",
        sq.into_inner(),
        "points outside the bundle",
    ));

    let (b, _) = image("danglinglink");
    let mut files = b.tree_files("");
    let nowhere = format!("sha256:{}", "e".repeat(64));
    for (p, data) in &mut files {
        if p.ends_with("current/link") {
            *data = nowhere.clone().into_bytes();
        }
    }
    cases.push((
        "link to nothing",
        tar_bytes(&files)?,
        "is not in the bundle, and",
    ));

    let (_, mut files) = image("bomb");
    files.push(("zeros".into(), vec![0u8; 64 << 20]));
    cases.push((
        "decompression bomb",
        compress(tar_bytes(&files)?, TarCompression::Gzip)?,
        "decompression bomb",
    ));

    let (_, mut files) = image("tiny");
    for i in 0..600 {
        files.push((format!("tiny/{i}"), vec![b'x']));
    }
    cases.push((
        "many tiny entries",
        tar_bytes(&files)?,
        "more than 500 entries",
    ));

    let mut ids = Vec::new();
    for (i, (what, body, _)) in cases.iter().enumerate() {
        let (st, b) = app.put(&format!("hostile-{i}"), body.clone(), None).await?;
        assert_eq!(st, 202, "{what}: {b}");
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    for ((what, _, reason), id) in cases.iter().zip(&ids) {
        let rec = app.wait_done(id, DONE).await?;
        assert_eq!(rec["phase"], "Failed", "{what}: {rec:#}");
        let error = rec["error"].as_str().unwrap_or_default();
        eprintln!("{what}: {error}");
        assert!(error.contains(reason), "{what}: {error:?} lacks {reason:?}");
    }
    // Content of a bundle found corrupt while publishing may be in the registry, by
    // digest (for its garbage collection); no tag is.
    for repo in app.catalog().await? {
        assert_eq!(
            app.tags(&repo).await?,
            Vec::<String>::new(),
            "{repo} was tagged"
        );
    }
    // Nothing was written outside the data directory's own places.
    assert!(!app.data.path().join("../evil").exists());
    let cas = app.data.path().join("cas/blobs/sha256");
    if cas.exists() {
        assert_eq!(
            std::fs::read_dir(&cas)?.count(),
            0,
            "failed bundles left blobs"
        );
    }
    app.stop().await
}

/// A squashfs image whose inode table is many tiny compressed metadata blocks (each
/// unpacks to 8 KiB: a 1 MiB file held 260 MB, a 4 MiB one 1 GB, in backhand before any
/// entry limit ran) is refused from its block headers alone: uploaded to one `shipperd
/// all` process, its peak memory stays within 64 MiB of what it was idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squashfs_metadata_bomb_is_refused_without_its_memory() -> anyhow::Result<()> {
    use shipperd_tests::{
        process::ShipperdProcess,
        servers::{Nats, Registry},
    };
    shipperd_tests::init();
    let nats = Nats::start().await?;
    let registry = Registry::start().await?;
    let data = tempfile::tempdir()?;
    let args = shipperd_tests::process::all_args(
        &nats,
        data.path(),
        &registry,
        &["--min-free-bytes", "0"],
    );
    let app = ShipperdProcess::start(env!("CARGO_BIN_EXE_shipperd-process"), args).await?;
    let http = reqwest::Client::new();
    let base = app.base();
    // Idle: started, connected, one request answered.
    let list = http.get(format!("{base}/v1/bundles")).send().await?;
    assert_eq!(list.status(), 200);
    let idle = app.peak_rss()?;
    for (mib, inodes) in [(1usize, 1u32), (4, 1), (4, 500_000)] {
        let bomb = shipperd_bundle::fuzzing::squashfs_metadata_bomb(mib << 20, inodes);
        let put: serde_json::Value = http
            .put(format!("{base}/v1/bundles/bomb-{mib}-{inodes}.squashfs"))
            .body(bomb)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = put["id"].as_str().unwrap_or_default().to_string();
        let rec = shipperd_tests::bundle_ended(&http, &base, &id, None, DONE)
            .await
            .map_err(|e| anyhow::anyhow!("{e}: {}", app.log()))?;
        assert_eq!(rec["phase"], "Failed", "{rec:#}");
        let error = rec["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("metadata unpacks to more than"),
            "{mib} MiB: {error}"
        );
    }
    let peak = app.peak_rss()?;
    eprintln!(
        "shipperd all: {} MiB idle, {} MiB peak after three metadata bombs",
        idle >> 20,
        peak >> 20
    );
    assert!(
        peak < idle + (64 << 20),
        "peak {} MiB, idle {} MiB",
        peak >> 20,
        idle >> 20
    );
    Ok(())
}
