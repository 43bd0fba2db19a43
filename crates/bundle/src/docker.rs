//! `docker save` archives of the legacy layout (also `podman save` and `skopeo copy ...
//! docker-archive:`): `manifest.json` lists each image's config file, its `RepoTags` and
//! its layer files (`<id>/layer.tar`, `<hex>.tar` or `blobs/sha256/<hex>`), which are
//! uncompressed tars whose digests are the config's `rootfs.diff_ids`. No registry
//! manifest is in them: one is made per image, Docker schema 2, with the config as it
//! is (so the image ID stays the same) and the layers as they are (the uncompressed
//! layer media type, so each layer's digest is its diff ID).
//!
//! Docker 25 and later write an OCI image layout beside `manifest.json`; that layout is
//! read as any other, and this reader is not used.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    BundleFs, Descriptor, Digest, Error, LayoutImage, Limits, Reference, Result, catalog::Location,
    layout::DOCKER_MANIFEST,
};

pub const MANIFEST_JSON: &str = "manifest.json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
/// An uncompressed layer: its digest is its diff ID.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// What a legacy archive holds.
#[derive(Debug, Default)]
pub struct DockerArchive {
    /// Images by their `RepoTags` (one per tag).
    pub images: Vec<LayoutImage>,
    /// Images without a tag (saved by ID): their made manifests, by digest.
    pub untagged: Vec<Descriptor>,
    /// The made manifests, by digest.
    pub made: HashMap<Digest, Vec<u8>>,
    /// Config and layer files, by digest.
    pub files: Vec<(Digest, String)>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// Is the member at `path` a file a legacy archive keeps by name (a layer tar or a config
/// named by its digest) rather than by blob path? A compressed archive's such members are
/// stored by their digest as they are expanded, the way blob files are.
pub fn is_member_by_name(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    let depth = path.matches('/').count();
    let hex_named = |ext: &str| {
        base.strip_suffix(ext).is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    let meta = ["manifest.json", "index.json", "repositories", "oci-layout"];
    (depth <= 1 && base.ends_with(".tar"))
        || (depth == 0 && base.ends_with(".json") && !meta.contains(&base))
        || (hex_named(".json") && depth <= 1)
}

/// Reads the legacy archive `fs` holds, if it has a `manifest.json`. Configs are read
/// (each once, however many entries name it); layers are looked up, not read.
pub fn read(fs: &dyn BundleFs, limits: &Limits) -> Result<Option<DockerArchive>> {
    if !fs.exists(MANIFEST_JSON) {
        return Ok(None);
    }
    let bytes = fs.read_small(MANIFEST_JSON, limits.max_index_bytes)?;
    let list: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: MANIFEST_JSON.into(),
        reason: format!("not a docker archive's manifest.json: {e}"),
    })?;
    drop(bytes);
    if list.len() > limits.max_images {
        return Err(Error::Hostile(format!(
            "{MANIFEST_JSON} lists {} images, over the limit of {} (maxImages)",
            list.len(),
            limits.max_images
        )));
    }
    let mut out = DockerArchive::default();
    let mut names = BTreeMap::new();
    // Each config read once: path → (digest, size, diff IDs).
    let mut configs: HashMap<String, (Digest, u64, Vec<Digest>)> = HashMap::new();
    let mut located: HashMap<Digest, String> = HashMap::new();
    for (i, entry) in list.into_iter().enumerate() {
        let what = |s: String| Error::Layout(format!("{MANIFEST_JSON}, image {i}: {s}"));
        if !configs.contains_key(&entry.config) {
            let bytes = fs.read_small(&entry.config, limits.max_manifest_bytes)?;
            let digest = Digest::of(&bytes);
            let doc: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
                path: entry.config.clone(),
                reason: format!("the image config does not parse: {e}"),
            })?;
            let diff_ids = doc["rootfs"]["diff_ids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or(""))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .map(|s| {
                    Digest::parse(s).map_err(|e| {
                        what(format!(
                            "its config {} lists diff ID {s:?}: {e}",
                            entry.config
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            located.insert(digest.clone(), entry.config.clone());
            configs.insert(entry.config.clone(), (digest, bytes.len() as u64, diff_ids));
        }
        let (config_digest, config_size, diff_ids) = &configs[&entry.config];
        if entry.layers.len() != diff_ids.len() {
            return Err(what(format!(
                "{} layers, but its config lists {} diff IDs",
                entry.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(entry.layers.len());
        for (path, id) in entry.layers.iter().zip(diff_ids) {
            let (at, size) = fs.locate(path)?;
            stored_as(path, &at, id)?;
            located.entry(id.clone()).or_insert_with(|| path.clone());
            layers
                .push(json!({"mediaType": LAYER_MEDIA_TYPE, "size": size, "digest": id.as_str()}));
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "size": config_size, "digest": config_digest.as_str()},
            "layers": layers,
        }))
        .expect("JSON serializes");
        let desc = Descriptor::new(
            DOCKER_MANIFEST,
            Digest::of(&manifest),
            manifest.len() as u64,
        );
        let tags = entry.repo_tags.unwrap_or_default();
        if tags.is_empty() && !out.untagged.iter().any(|d| d.digest == desc.digest) {
            out.untagged.push(desc.clone());
        }
        for tag in tags {
            let source = Reference::parse(&tag)
                .map(docker_hub)
                .map_err(|e| what(format!("RepoTags names {tag:?}: {e}")))?;
            if source.tag.is_none() {
                return Err(what(format!("RepoTags names {tag:?}, which has no tag")));
            }
            names.entry(source.to_string()).or_insert(LayoutImage {
                source,
                descriptor: desc.clone(),
            });
        }
        out.made.insert(desc.digest, manifest);
    }
    out.images = names.into_values().collect();
    out.files = located.into_iter().collect();
    out.files.sort_unstable_by(|a, b| a.1.cmp(&b.1));
    Ok(Some(out))
}

/// Gzip-compressed layer (`--compress-layers`).
pub const LAYER_GZIP_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// What [`compress_layers`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    pub layers: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Gzip-compresses the layers of a legacy archive's images (`--compress-layers`) into
/// the CAS, claimed for the bundle, and makes their manifests again with the compressed
/// layers (the config unchanged: its diff IDs name the uncompressed tars, as they must).
/// The compression is deterministic (no name, no time in the gzip header, one level),
/// so the same archive always gives the same digests. `room` is asked as the CAS
/// fills.
pub fn compress_layers(
    found: &mut crate::Discovered,
    fs: &dyn BundleFs,
    cas: &crate::cas::Cas,
    claim: &mut crate::cas::Claim,
    room: &dyn Fn() -> Result<()>,
) -> Result<Compressed> {
    let mut done = Compressed::default();
    // diff ID → the compressed layer's descriptor.
    let mut layers: HashMap<Digest, Descriptor> = HashMap::new();
    let mut renamed: HashMap<Digest, Descriptor> = HashMap::new();
    let mut made: Vec<(Digest, Vec<u8>)> = found.made.drain().collect();
    made.sort_by(|a, b| a.0.cmp(&b.0));
    for (old, bytes) in made {
        let mut doc: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: format!("the manifest made for {old}"),
            reason: e.to_string(),
        })?;
        for layer in doc["layers"].as_array_mut().into_iter().flatten() {
            if layer["mediaType"] != LAYER_MEDIA_TYPE {
                continue;
            }
            let diff_id = Digest::parse(layer["digest"].as_str().unwrap_or_default())?;
            if !layers.contains_key(&diff_id) {
                let path = found
                    .blob_paths
                    .get(&diff_id)
                    .ok_or_else(|| Error::Missing(format!("layer {diff_id}")))?;
                let (reader, size) = fs.open(&path)?;
                let mut gz = flate2::GzBuilder::new().read(reader, flate2::Compression::default());
                let (hex, len) = cas.put_stream(claim, &mut gz, &path, room)?;
                let digest = Digest::from_hex(&hex)?;
                found.stored.insert(digest.clone(), cas.blob_path(&hex));
                done.layers += 1;
                done.bytes_in += size;
                done.bytes_out += len;
                layers.insert(
                    diff_id.clone(),
                    Descriptor::new(LAYER_GZIP_MEDIA_TYPE, digest, len),
                );
            }
            let d = &layers[&diff_id];
            *layer =
                json!({"mediaType": d.media_type, "size": d.size, "digest": d.digest.as_str()});
        }
        let again = serde_json::to_vec(&doc).expect("JSON serializes");
        let desc = Descriptor::new(DOCKER_MANIFEST, Digest::of(&again), again.len() as u64);
        found.made.insert(desc.digest.clone(), again);
        renamed.insert(old, desc);
    }
    let swap = |d: &mut Descriptor| {
        if let Some(new) = renamed.get(&d.digest) {
            *d = new.clone();
        }
    };
    found
        .images
        .iter_mut()
        .for_each(|i| swap(&mut i.descriptor));
    found.unnamed.iter_mut().for_each(|(_, d)| swap(d));
    Ok(done)
}

/// A name as `docker save` writes it is Docker's short form: without a registry host
/// it is Docker Hub's (`busybox` is `docker.io/library/busybox`, `team/app` is
/// `docker.io/team/app`), which is where a cluster asks for it and so where a mirror
/// must put it.
fn docker_hub(mut r: Reference) -> Reference {
    if r.host.is_none() {
        r.host = Some("docker.io".into());
        if !r.repository.contains('/') {
            r.repository = format!("library/{}", r.repository);
        }
    }
    r
}

/// A layer stored by its digest as the archive was expanded must be the file its config
/// names: one whose bytes are not its diff ID is refused here, by name, not later by the
/// registry. (A config's digest is what its bytes hash to, by construction.)
fn stored_as(path: &str, at: &Location, digest: &Digest) -> Result<()> {
    match at {
        Location::Cas { hex } if hex != digest.hex() => Err(Error::Hostile(format!(
            "{path} hashes to sha256:{hex}, but the image config names it {digest}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_docker_hub_names() {
        let full = |s: &str| docker_hub(Reference::parse(s).unwrap()).to_string();
        assert_eq!(full("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(full("team/app:2"), "docker.io/team/app:2");
        assert_eq!(full("quay.io/team/app:2"), "quay.io/team/app:2");
        assert_eq!(full("localhost/app:1"), "localhost/app:1");
    }

    #[test]
    fn members_kept_by_name() {
        let h = "ab".repeat(32);
        assert!(is_member_by_name("0123/layer.tar"));
        assert!(is_member_by_name(&format!("{h}.tar")));
        assert!(is_member_by_name(&format!("{h}.json")));
        assert!(!is_member_by_name("manifest.json"));
        assert!(!is_member_by_name("a/b/layer.tar"));
        assert!(is_member_by_name("config.json"));
        assert!(!is_member_by_name("index.json"));
        assert!(!is_member_by_name("a/config.json"));
    }
}
