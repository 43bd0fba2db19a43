//! ShipperD's container image without a container engine: an OCI image layout built
//! from the `shipperd` binary, the shared libraries it loads (as `ldd` names them), CA
//! certificates and a passwd naming the non-root user, in one layer. Reproducible: every
//! file's time is `SOURCE_DATE_EPOCH` (0 unless set), owners and modes are fixed, entries
//! are sorted, gzip carries no time or name; the same inputs give the same digest.
//! `scripts/build-image.sh` runs it (`shipperd-dev build-image`); the `Containerfile`
//! is the same image for sites with podman or docker.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The image's non-root user (as distroless's `nonroot`).
pub const UID: u64 = 65532;

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The `shipperd` binary.
    pub binary: PathBuf,
    /// `name:tag` written as the layout's `org.opencontainers.image.ref.name`.
    pub reference: String,
    /// The CA bundle copied to `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_bundle: PathBuf,
    /// Seconds since the epoch for every timestamp.
    pub epoch: u64,
    /// gzip the layer (else an uncompressed tar layer).
    pub gzip: bool,
}

impl ImageSpec {
    pub fn new(binary: impl Into<PathBuf>, reference: &str) -> Self {
        ImageSpec {
            binary: binary.into(),
            reference: reference.into(),
            ca_bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
            epoch: std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            gzip: true,
        }
    }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    /// Digest of the image manifest (`sha256:...`).
    pub manifest: String,
    pub layer: String,
    pub config: String,
}

enum Entry {
    Dir { mode: u32, uid: u64 },
    File { bytes: Vec<u8>, mode: u32 },
}

/// The shared libraries `binary` loads, with the path the loader asks for.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: nothing to add.
        if text.contains("not a dynamic executable") || out.stderr.starts_with(b"\tnot a dynamic") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
    }
    Ok(libs)
}

fn add_parents(files: &mut BTreeMap<String, Entry>, path: &str) {
    let mut acc = String::new();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    for p in &parts[..parts.len().saturating_sub(1)] {
        acc.push_str(p);
        acc.push('/');
        files.entry(acc.clone()).or_insert(Entry::Dir {
            mode: 0o755,
            uid: 0,
        });
    }
}

/// The root filesystem, path (relative, directories ending in `/`) → entry.
fn rootfs(spec: &ImageSpec) -> anyhow::Result<BTreeMap<String, Entry>> {
    let mut files = BTreeMap::new();
    let mut file = |path: &str, bytes: Vec<u8>, mode: u32| {
        add_parents(&mut files, path);
        files.insert(path.to_string(), Entry::File { bytes, mode });
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    file("usr/local/bin/shipperd", read(&spec.binary)?, 0o755);
    for lib in shared_libraries(&spec.binary)? {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_string();
        file(&inside, read(&lib)?, 0o755);
    }
    file(
        "etc/ssl/certs/ca-certificates.crt",
        read(&spec.ca_bundle)?,
        0o644,
    );
    file(
        "etc/passwd",
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\nshipperd:x:{UID}:{UID}:shipperd:/var/lib/shipperd:/sbin/nologin\n"
        )
        .into_bytes(),
        0o644,
    );
    file(
        "etc/group",
        format!("root:x:0:\nshipperd:x:{UID}:\n").into_bytes(),
        0o644,
    );
    add_parents(&mut files, "var/lib/shipperd/x");
    files.insert(
        "var/lib/shipperd/".into(),
        Entry::Dir {
            mode: 0o770,
            uid: UID,
        },
    );
    files.insert(
        "tmp/".into(),
        Entry::Dir {
            mode: 0o1777,
            uid: 0,
        },
    );
    Ok(files)
}

fn layer_tar(files: &BTreeMap<String, Entry>, epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, e) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(epoch);
        match e {
            Entry::Dir { mode, uid } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File { bytes, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, path, bytes.as_slice())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn rfc3339(epoch: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Builds the image as an OCI image layout in `out` (emptied first).
pub fn build(spec: &ImageSpec, out: &Path) -> anyhow::Result<Built> {
    let tar = layer_tar(&rootfs(spec)?, spec.epoch)?;
    let diff_id = digest(&tar);
    let (layer, layer_type) = if spec.gzip {
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar)?;
        (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (tar, "application/vnd.oci.image.layer.v1.tar")
    };
    let created = rfc3339(spec.epoch);
    let version = spec.reference.rsplit(':').next().unwrap_or("latest");
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "User": format!("{UID}:{UID}"),
            "Entrypoint": ["/usr/local/bin/shipperd"],
            "Cmd": ["all"],
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                "SHIPPERD_DATA_DIR=/var/lib/shipperd"
            ],
            "WorkingDir": "/var/lib/shipperd",
            "ExposedPorts": {"8080/tcp": {}, "8081/tcp": {}},
            "Labels": {
                "org.opencontainers.image.title": "shipperd",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0",
                "org.opencontainers.image.description": "Carries bundles of container images into a disconnected registry"
            }
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "shipperd-dev build-image"}]
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len()
        },
        "layers": [{"mediaType": layer_type, "digest": digest(&layer), "size": layer.len()}]
    }))?;
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": spec.reference}
        }]
    }))?;
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    for b in [&layer, &config, &manifest] {
        let d = digest(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b)?;
    }
    std::fs::write(out.join("index.json"), index)?;
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(Built {
        manifest: digest(&manifest),
        layer: digest(&layer),
        config: digest(&config),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_806_400), "2025-12-04T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
