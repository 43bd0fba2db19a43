//! `docker save` archives of the legacy layout (and `skopeo copy ... docker-archive:`):
//! `manifest.json` lists each image's config file, its `RepoTags` and its layer files,
//! which are uncompressed tars whose digests are the config's `rootfs.diff_ids`. There
//! is no registry manifest in them: one is made (Docker schema 2, the config unchanged,
//! so the image ID stays, and the layers as they are).

use std::collections::HashMap;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{BundleFs, Descriptor, Digest, Reference};

use crate::MAX_MANIFEST;

pub(crate) const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Images one archive may list.
const MAX_IMAGES: usize = 10_000;

/// What a legacy archive names.
#[derive(Default)]
pub(crate) struct Legacy {
    /// (repository, tag, host, the made manifest).
    pub tags: Vec<(String, String, Option<String>, Descriptor)>,
    /// Made manifests, by digest.
    pub manifests: HashMap<Digest, Vec<u8>>,
    /// Config and layer files, by digest.
    pub paths: HashMap<Digest, String>,
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads `manifest.json` of `fs`, if it is a legacy archive's.
pub(crate) fn read(fs: &dyn BundleFs) -> Result<Option<Legacy>, String> {
    if !fs.exists("manifest.json") {
        return Ok(None);
    }
    let bytes = fs
        .read_small("manifest.json", MAX_MANIFEST)
        .map_err(|e| e.to_string())?;
    let list: Vec<Value> = serde_json::from_slice(&bytes)
        .map_err(|e| format!("manifest.json is not a docker archive's: {e}"))?;
    if list.len() > MAX_IMAGES {
        return Err(format!(
            "manifest.json lists {} images, more than {MAX_IMAGES}",
            list.len()
        ));
    }
    let mut out = Legacy::default();
    // Each config file read once, however many entries name it.
    let mut configs: HashMap<String, (Vec<u8>, String)> = HashMap::new();
    for (i, entry) in list.iter().enumerate() {
        let what = |s: &str| format!("manifest.json, image {i}: {s}");
        let config_path = entry["Config"].as_str().ok_or_else(|| what("no Config"))?;
        if !configs.contains_key(config_path) {
            let bytes = fs
                .read_small(config_path, MAX_MANIFEST)
                .map_err(|e| what(&e.to_string()))?;
            let digest = sha(&bytes);
            configs.insert(config_path.to_string(), (bytes, digest));
        }
        let (config, config_digest) = &configs[config_path];
        let config_digest = config_digest.clone();
        let doc: Value = serde_json::from_slice(config)
            .map_err(|e| what(&format!("its config does not parse: {e}")))?;
        let diff_ids: Vec<&str> = doc["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let layers: Vec<&str> = entry["Layers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if layers.len() != diff_ids.len() {
            return Err(what(&format!(
                "{} layers, but its config lists {} diff_ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        let mut descs = Vec::new();
        for (path, id) in layers.iter().zip(&diff_ids) {
            let digest = Digest::parse(id).map_err(|e| what(&e.to_string()))?;
            let (_, size) = fs.locate(path).map_err(|e| what(&e.to_string()))?;
            out.paths.insert(digest.clone(), path.to_string());
            descs.push(json!({"mediaType": LAYER, "size": size, "digest": digest.as_str()}));
        }
        let cd = Digest::parse(&config_digest).map_err(|e| what(&e.to_string()))?;
        out.paths.insert(cd, config_path.to_string());
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "size": config.len(), "digest": config_digest},
            "layers": descs,
        }))
        .expect("JSON serializes");
        let digest = Digest::parse(&sha(&manifest)).map_err(|e| what(&e.to_string()))?;
        let desc = Descriptor::new(MANIFEST, digest.clone(), manifest.len() as u64);
        for tag in entry["RepoTags"].as_array().into_iter().flatten() {
            let Some(r) = tag.as_str().and_then(|t| Reference::parse(t).ok()) else {
                continue;
            };
            if let Some(t) = r.tag.clone() {
                out.tags
                    .push((r.repository.clone(), t, r.host.clone(), desc.clone()));
            }
        }
        out.manifests.insert(digest, manifest);
    }
    Ok(Some(out))
}
