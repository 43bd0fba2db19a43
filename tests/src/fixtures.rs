//! Real OCI images for tests: tar+gzip layers with files in them, image configs with the
//! right diff_ids, manifests, multi-platform indexes, laid out as an OCI image layout and
//! squashed into a bundle with backhand's writer (or with Debian's mksquashfs).

use std::{
    collections::BTreeMap,
    io::{Cursor, Write},
    path::Path,
    process::Command,
};

use anyhow::{Context, bail};
use backhand::{
    FilesystemCompressor, FilesystemWriter, NodeHeader,
    compression::{CompressionOptions, Compressor, Lz4},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A layer: its blob digest and size, and the digest of its uncompressed tar.
#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
}

/// An image the bundle holds, as the test expects to find it in the registry.
#[derive(Debug, Clone)]
pub struct ExpectedImage {
    /// Repository without host or prefix, e.g. `demo/app`.
    pub repo: String,
    pub tag: String,
    /// Digest of the top manifest or index.
    pub digest: String,
    pub media_type: String,
    /// Every manifest digest (children of an index included).
    pub manifests: Vec<String>,
    /// Every config and layer digest.
    pub blobs: Vec<String>,
}

/// Squashfs compression for [`LayoutBuilder::write_squashfs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4,
}

#[derive(Default, Clone)]
pub struct LayoutBuilder {
    pub blobs: BTreeMap<String, Vec<u8>>,
    index: Vec<Value>,
    pub images: Vec<ExpectedImage>,
    /// Docker schema 2 media types (manifest lists, v2 manifests) instead of OCI ones.
    pub docker: bool,
}

impl LayoutBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder that writes Docker schema 2 manifests and manifest lists.
    pub fn docker() -> Self {
        LayoutBuilder {
            docker: true,
            ..Self::default()
        }
    }

    pub fn blob(&mut self, bytes: Vec<u8>) -> (String, u64) {
        let d = sha256(&bytes);
        let n = bytes.len() as u64;
        self.blobs.insert(d.clone(), bytes);
        (d, n)
    }

    /// A tar+gzip layer holding `files` (path, content).
    pub fn layer(&mut self, files: &[(&str, Vec<u8>)], level: flate2::Compression) -> Layer {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, content.as_slice())
                .expect("tar into memory");
        }
        let tar = tar.into_inner().expect("tar into memory");
        let diff_id = sha256(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
        gz.write_all(&tar).expect("gzip into memory");
        let (digest, size) = self.blob(gz.finish().expect("gzip into memory"));
        Layer {
            digest,
            size,
            diff_id,
        }
    }

    /// A single-platform manifest; returns its descriptor and the blobs it needs.
    fn types(&self) -> (&'static str, &'static str, &'static str, &'static str) {
        if self.docker {
            (DOCKER_MANIFEST, DOCKER_LIST, DOCKER_CONFIG, DOCKER_LAYER)
        } else {
            (OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER_GZIP)
        }
    }

    fn manifest(&mut self, layers: &[Layer], arch: &str) -> (Value, Vec<String>) {
        self.manifest_labelled(layers, arch, json!({}))
    }

    /// Adds a single-platform image whose config carries `labels` (e.g. an operator
    /// catalog's `operators.operatorframework.io.index.configs.v1`).
    pub fn labelled_image(
        &mut self,
        annotations: Value,
        layers: &[Layer],
        repo: &str,
        tag: &str,
        labels: Value,
    ) {
        let (mut desc, blobs) = self.manifest_labelled(layers, "amd64", labels);
        desc.as_object_mut().unwrap().remove("platform");
        let mt = self.types().0;
        self.name(desc, annotations, repo, tag, mt, blobs, vec![]);
    }

    fn manifest_labelled(
        &mut self,
        layers: &[Layer],
        arch: &str,
        labels: Value,
    ) -> (Value, Vec<String>) {
        let (mt_manifest, _, mt_config, mt_layer) = self.types();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Env": ["PATH=/usr/bin"], "Labels": labels },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>() },
        });
        let (cd, cs) = self.blob(serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": mt_manifest,
            "config": { "mediaType": mt_config, "digest": cd, "size": cs },
            "layers": layers.iter().map(|l| json!({
                "mediaType": mt_layer, "digest": l.digest, "size": l.size
            })).collect::<Vec<_>>(),
        });
        let (md, ms) = self.blob(serde_json::to_vec_pretty(&manifest).unwrap());
        let mut blobs = vec![cd];
        blobs.extend(layers.iter().map(|l| l.digest.clone()));
        (
            json!({ "mediaType": mt_manifest, "digest": md, "size": ms,
                    "platform": { "architecture": arch, "os": "linux" } }),
            blobs,
        )
    }

    /// Adds a single-platform image named in `index.json` by `annotations`.
    pub fn image(&mut self, annotations: Value, layers: &[Layer], repo: &str, tag: &str) {
        let (mut desc, blobs) = self.manifest(layers, "amd64");
        desc.as_object_mut().unwrap().remove("platform");
        let mt = self.types().0;
        self.name(desc, annotations, repo, tag, mt, blobs, vec![]);
    }

    /// Adds a multi-platform image: an index over one manifest per (arch, layers).
    pub fn multi_arch(
        &mut self,
        annotations: Value,
        per_arch: &[(&str, Vec<Layer>)],
        repo: &str,
        tag: &str,
    ) {
        let mut children = Vec::new();
        let mut blobs = Vec::new();
        for (arch, layers) in per_arch {
            let (desc, b) = self.manifest(layers, arch);
            blobs.extend(b);
            children.push(desc);
        }
        let mt_index = self.types().1;
        let index = json!({ "schemaVersion": 2, "mediaType": mt_index, "manifests": children });
        let (d, s) = self.blob(serde_json::to_vec_pretty(&index).unwrap());
        let child_digests = children
            .iter()
            .map(|c| c["digest"].as_str().unwrap().to_string())
            .collect();
        self.name(
            json!({ "mediaType": mt_index, "digest": d, "size": s }),
            annotations,
            repo,
            tag,
            mt_index,
            blobs,
            child_digests,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn name(
        &mut self,
        mut desc: Value,
        annotations: Value,
        repo: &str,
        tag: &str,
        media_type: &str,
        blobs: Vec<String>,
        children: Vec<String>,
    ) {
        desc["annotations"] = annotations;
        let digest = desc["digest"].as_str().unwrap().to_string();
        let mut manifests = children;
        manifests.push(digest.clone());
        self.index.push(desc);
        self.images.push(ExpectedImage {
            repo: repo.into(),
            tag: tag.into(),
            digest,
            media_type: media_type.into(),
            manifests,
            blobs,
        });
    }

    /// Pushes every image into the registry at `base` (`http://127.0.0.1:P`) as a
    /// client would: its blobs (one `POST` + `PUT` each), an index's children by
    /// digest, then the top manifest by tag.
    pub async fn push_to(&self, http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
        for img in &self.images {
            for b in &img.blobs {
                put_blob(http, base, &img.repo, &self.blobs[b]).await?;
            }
            for m in &img.manifests {
                let bytes = self.blobs[m].clone();
                let doc: Value = serde_json::from_slice(&bytes)?;
                let media_type = match doc["mediaType"].as_str() {
                    Some(t) => t.to_string(),
                    None if doc.get("manifests").is_some() => self.types().1.to_string(),
                    None => self.types().0.to_string(),
                };
                let reference = if *m == img.digest {
                    img.tag.clone()
                } else {
                    m.clone()
                };
                let r = http
                    .put(format!("{base}/v2/{}/manifests/{reference}", img.repo))
                    .header("content-type", media_type)
                    .body(bytes)
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status() == 201,
                    "PUT manifest {}:{reference}: {} {}",
                    img.repo,
                    r.status(),
                    r.text().await?
                );
            }
        }
        Ok(())
    }

    /// Adds an OCI 1.1 referrer (an SBOM-like artifact whose `subject` is the manifest
    /// `subject`), listed in `index.json` without a name; returns its digest.
    pub fn referrer(&mut self, subject: &str, artifact_type: &str, payload: &[u8]) -> String {
        let subject_size = self.blobs[subject].len();
        let subject_type = if self
            .images
            .iter()
            .any(|i| i.digest == subject && i.media_type == OCI_INDEX)
        {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        };
        let (ed, es) = self.blob(b"{}".to_vec());
        let (pd, ps) = self.blob(payload.to_vec());
        let m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": es },
            "layers": [{ "mediaType": "application/spdx+json", "digest": pd, "size": ps }],
            "subject": { "mediaType": subject_type, "digest": subject, "size": subject_size },
        });
        let (d, s) = self.blob(serde_json::to_vec(&m).unwrap());
        self.index
            .push(json!({ "mediaType": OCI_MANIFEST, "digest": d, "size": s,
                                "artifactType": artifact_type }));
        d
    }

    /// Adds a cosign signature image as cosign writes it, named `name` (e.g.
    /// `quay.io/org/app:sha256-<hex>.sig`): one layer, the signed payload, with its
    /// base64 signature in `dev.cosignproject.cosign/signature`.
    pub fn cosign_signature(&mut self, name: &str, payload: &[u8], signature: &str) -> String {
        let (cd, cs) = self.blob(
            br#"{"architecture":"","config":{},"os":"","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec(),
        );
        let (pd, ps) = self.blob(payload.to_vec());
        let m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs },
            "layers": [{ "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "digest": pd, "size": ps,
                "annotations": { "dev.cosignproject.cosign/signature": signature } }],
        });
        let (d, s) = self.blob(serde_json::to_vec(&m).unwrap());
        self.index
            .push(json!({ "mediaType": OCI_MANIFEST, "digest": d, "size": s,
            "annotations": { "org.opencontainers.image.ref.name": name } }));
        d
    }

    /// Flips bytes in the middle of a blob, keeping its name: a corrupt bundle.
    pub fn corrupt(&mut self, digest: &str) {
        let b = self.blobs.get_mut(digest).expect("blob exists");
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
    }

    fn files(&self) -> Vec<(String, Vec<u8>)> {
        self.oci_files("")
    }

    /// The files of the OCI layout, under `prefix` (`""` or e.g. `images/`).
    pub fn oci_files(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index });
        let mut files = vec![
            (
                format!("{prefix}oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (
                format!("{prefix}index.json"),
                serde_json::to_vec_pretty(&index).unwrap(),
            ),
        ];
        for (d, b) in &self.blobs {
            files.push((format!("{prefix}blobs/sha256/{}", &d[7..]), b.clone()));
        }
        files
    }

    /// The same images as a registry storage tree (what `registry serve` writes, and
    /// Koffer and oc-mirror carry) at `prefix`: `<prefix>docker/registry/v2/...`.
    pub fn tree_files(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let root = format!("{prefix}docker/registry/v2/");
        let mut files = Vec::new();
        for (d, b) in &self.blobs {
            let hex = &d[7..];
            files.push((
                format!("{root}blobs/sha256/{}/{hex}/data", &hex[..2]),
                b.clone(),
            ));
        }
        for img in &self.images {
            let repo = format!("{root}repositories/{}", img.repo);
            let link = |d: &str| d.as_bytes().to_vec();
            files.push((
                format!("{repo}/_manifests/tags/{}/current/link", img.tag),
                link(&img.digest),
            ));
            files.push((
                format!(
                    "{repo}/_manifests/tags/{}/index/sha256/{}/link",
                    img.tag,
                    &img.digest[7..]
                ),
                link(&img.digest),
            ));
            for m in &img.manifests {
                files.push((
                    format!("{repo}/_manifests/revisions/sha256/{}/link", &m[7..]),
                    link(m),
                ));
            }
            for b in &img.blobs {
                files.push((format!("{repo}/_layers/sha256/{}/link", &b[7..]), link(b)));
            }
        }
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        files
    }

    /// Writes the OCI layout as a directory.
    pub fn write_dir(&self, dir: &Path) -> anyhow::Result<()> {
        write_files(&self.files(), dir)
    }

    /// Squashes the layout into `out` with backhand's writer.
    pub fn write_squashfs(&self, out: &Path, compression: Compression) -> anyhow::Result<()> {
        write_squashfs_files(&self.files(), out, compression)
    }

    /// Squashes the layout with Debian's `mksquashfs` and extra flags (e.g. `-noI -noD
    /// -noF -noX` for an uncompressed image).
    pub fn mksquashfs(&self, out: &Path, flags: &[&str]) -> anyhow::Result<()> {
        mksquashfs_files(&self.files(), out, flags)
    }
}

/// Writes `files` as a squashfs image with backhand's writer.
pub fn write_squashfs_files(
    files: &[(String, Vec<u8>)],
    out: &Path,
    compression: Compression,
) -> anyhow::Result<()> {
    {
        let (id, options) = match compression {
            Compression::Gzip => (Compressor::Gzip, None),
            Compression::Xz => (Compressor::Xz, None),
            Compression::Zstd => (Compressor::Zstd, None),
            Compression::Lz4 => (
                Compressor::Lz4,
                Some(CompressionOptions::Lz4(Lz4 {
                    version: 1,
                    flags: 0,
                })),
            ),
        };
        let mut fs = FilesystemWriter::default();
        fs.set_compressor(FilesystemCompressor::new(id, options)?);
        let dir = NodeHeader {
            permissions: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let file = NodeHeader {
            permissions: 0o644,
            ..dir
        };
        let mut made = std::collections::HashSet::new();
        for (p, b) in files {
            if let Some((parent, _)) = p.rsplit_once('/')
                && made.insert(parent.to_string())
            {
                fs.push_dir_all(parent, dir)?;
            }
            fs.push_file(Cursor::new(b.as_slice()), p, file)?;
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
        fs.write(&mut f)?;
        f.flush()?;
        Ok(())
    }
}

/// Writes `files` into a directory.
pub fn write_files(files: &[(String, Vec<u8>)], dir: &Path) -> anyhow::Result<()> {
    for (p, b) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, b)?;
    }
    Ok(())
}

/// Squashes `files` with Debian's `mksquashfs` and extra flags.
pub fn mksquashfs_files(
    files: &[(String, Vec<u8>)],
    out: &Path,
    flags: &[&str],
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_files(files, dir.path())?;
    mksquashfs_dir(dir.path(), out, flags)
}

/// Squashes directory `dir` with Debian's `mksquashfs` and extra flags (sparse files
/// stay sparse: their holes are stored as nothing).
pub fn mksquashfs_dir(dir: &Path, out: &Path, flags: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("mksquashfs")
        .arg(dir)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress"])
        .args(flags)
        .status()
        .context("running mksquashfs (scripts/install-deps.sh installs squashfs-tools)")?;
    if !status.success() {
        bail!("mksquashfs failed: {status}");
    }
    Ok(())
}

/// How an archive bundle is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarCompression {
    None,
    Gzip,
    Zstd,
    Xz,
}

/// A tar archive of `files` (with their parent directories, as GNU tar writes them).
/// Uploads `bytes` into `repo` of the registry at `base` as a client would (`POST`, then
/// `PUT` with the digest).
pub async fn put_blob(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 202, "POST blob upload: {}", r.status());
    let loc = r.headers()["location"].to_str()?.to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let d = sha256(bytes);
    let r = http
        .put(format!("{loc}{sep}digest={d}"))
        .body(bytes.to_vec())
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "PUT blob {d}: {}", r.status());
    Ok(())
}

pub fn tar_bytes(files: &[(String, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut ar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (p, _) in files {
        let mut acc = String::new();
        for c in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            acc.push_str(c);
            acc.push('/');
            dirs.insert(acc.clone());
        }
    }
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        ar.append_data(&mut h, &d, std::io::empty())?;
    }
    for (p, b) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(b.len() as u64);
        ar.append_data(&mut h, p, b.as_slice())?;
    }
    Ok(ar.into_inner()?)
}

/// Compresses a tar as the bundle tools do (Koffer: gzip; Hauler, Zarf: zstd).
pub fn compress(tar: Vec<u8>, how: TarCompression) -> anyhow::Result<Vec<u8>> {
    Ok(match how {
        TarCompression::None => tar,
        TarCompression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar)?;
            e.finish()?
        }
        TarCompression::Zstd => zstd::stream::encode_all(tar.as_slice(), 3)?,
        TarCompression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(&tar)?;
            e.finish()?
        }
    })
}

/// oc-mirror style: the files spread over `n` separate tar archives (each whole, as
/// `mirror_000001.tar`, `mirror_000002.tar`, ... are), in part order.
pub fn tar_parts(files: &[(String, Vec<u8>)], n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut groups = vec![Vec::new(); n];
    for (i, f) in files.iter().enumerate() {
        groups[i % n].push(f.clone());
    }
    groups.iter().map(|g| tar_bytes(g)).collect()
}

/// The sample bundle: a layer shared by two images, a multi-platform index, and images
/// named each way an OCI layout names them (containerd name, full ref.name, tag-only
/// ref.name, which lands in a repository named after the bundle). `salt` makes the
/// bytes (and so the bundle id) differ between bundles; `big_layer_mb` adds a layer of
/// that many MiB of random data to the first image.
pub fn sample(salt: &str, bundle_repo: &str, big_layer_mb: usize) -> LayoutBuilder {
    sample_into(LayoutBuilder::new(), salt, bundle_repo, big_layer_mb)
}

/// [`sample`] built into `b` (e.g. one with Docker media types).
pub fn sample_into(
    mut b: LayoutBuilder,
    salt: &str,
    bundle_repo: &str,
    big_layer_mb: usize,
) -> LayoutBuilder {
    let fast = flate2::Compression::fast();
    let shared = b.layer(
        &[
            (
                "etc/os-release",
                format!("NAME=ShipperD sample {salt}\n").into_bytes(),
            ),
            ("usr/share/base.txt", vec![b'b'; 64 * 1024]),
        ],
        fast,
    );
    let mut app_layers = vec![
        shared.clone(),
        b.layer(
            &[(
                "app/run.sh",
                format!("#!/bin/sh\necho app {salt}\n").into_bytes(),
            )],
            fast,
        ),
    ];
    if big_layer_mb > 0 {
        let mut data = vec![0u8; big_layer_mb << 20];
        rand::Rng::fill(&mut rand::rng(), data.as_mut_slice());
        // Stored (level 0) gzip: valid gzip, no time wasted compressing random bytes.
        app_layers.push(b.layer(&[("app/big.bin", data)], flate2::Compression::none()));
    }
    b.image(
        json!({ "io.containerd.image.name": "example.com/demo/app:1.0",
                "org.opencontainers.image.ref.name": "1.0" }),
        &app_layers,
        "demo/app",
        "1.0",
    );
    let tool = b.layer(
        &[("usr/bin/tool", format!("tool {salt}").into_bytes())],
        fast,
    );
    b.image(
        json!({ "org.opencontainers.image.ref.name": "example.com/demo/tool:2.1" }),
        &[shared.clone(), tool],
        "demo/tool",
        "2.1",
    );
    let amd = b.layer(&[("bin/hello", format!("amd64 {salt}").into_bytes())], fast);
    let arm = b.layer(&[("bin/hello", format!("arm64 {salt}").into_bytes())], fast);
    b.multi_arch(
        json!({ "org.opencontainers.image.ref.name": "example.com/demo/multi:latest" }),
        &[("amd64", vec![shared.clone(), amd]), ("arm64", vec![arm])],
        "demo/multi",
        "latest",
    );
    let tagged = b.layer(&[("srv/v3", format!("v3 {salt}").into_bytes())], fast);
    b.image(
        json!({ "org.opencontainers.image.ref.name": "v3" }),
        &[tagged],
        bundle_repo,
        "v3",
    );
    b
}

/// One small image per `(name, repo, tag)`: named `name` (its ref name annotation),
/// expected at `repo:tag`, each with a layer of its own made of `salt`.
pub fn named_images(salt: &str, names: &[(&str, &str, &str)]) -> LayoutBuilder {
    let mut b = LayoutBuilder::new();
    for (name, repo, tag) in names {
        let l = b.layer(
            &[("etc/image", format!("{salt} {name}").into_bytes())],
            flate2::Compression::fast(),
        );
        b.image(
            json!({ "org.opencontainers.image.ref.name": name }),
            &[l],
            repo,
            tag,
        );
    }
    b
}

/// A bundle shaped like an OpenShift operator-catalog mirror: `n` small images in
/// nested repositories, ten tags per repository (`catalog/op-<g>/bundle:v0.<k>`, from
/// `registry.example.com`), every image with a layer of its own and its own config,
/// each group of ten sharing an operator layer, and all sharing one base layer.
pub fn catalog(n: usize, salt: &str) -> LayoutBuilder {
    let mut b = LayoutBuilder::new();
    let fast = flate2::Compression::fast();
    let base = b.layer(
        &[(
            "etc/os-release",
            format!("NAME=catalog base {salt}\n").into_bytes(),
        )],
        fast,
    );
    let mut group = None;
    for i in 0..n {
        let g = i / 10;
        if i % 10 == 0 {
            group = Some(b.layer(
                &[(
                    "opt/operator",
                    format!("operator {g} {salt}\n").into_bytes(),
                )],
                fast,
            ));
        }
        let own = b.layer(
            &[(
                "manifests/csv.yaml",
                format!("bundle {i} {salt}\n").into_bytes(),
            )],
            fast,
        );
        let repo = format!("catalog/op-{g}/bundle");
        let tag = format!("v0.{}", i % 10);
        b.image(
            json!({ "org.opencontainers.image.ref.name": format!("registry.example.com/{repo}:{tag}") }),
            &[base.clone(), group.clone().expect("set at i % 10 == 0"), own],
            &repo,
            &tag,
        );
    }
    b
}
