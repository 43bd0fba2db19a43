//! An operator catalog's file-based catalog (FBC), read from the catalog image's layers
//! in the cache, and the bundle images (with their `relatedImages`) a configuration's
//! packages, channels and version ranges select.
//!
//! - The catalog's directory is its config's
//!   `operators.operatorframework.io.index.configs.v1` label (`/configs`); its `.json`
//!   (a stream of objects) and `.yaml` (documents) files are read as `opm` writes them,
//!   layer over layer (a later layer's file replaces an earlier one's, a whiteout removes
//!   it). Only `olm.package`, `olm.channel` and `olm.bundle` of the packages asked for
//!   are kept, and of a bundle only its version, image and related images: a catalog of
//!   thousands of bundles (with their icons) is read one object at a time.
//! - A package without channels means its default channel; a channel without versions
//!   means its head (the entry no other replaces or skips, the highest version among
//!   several), with `minVersion`/`maxVersion` (the channel's, else the package's) every
//!   entry in that range; `full: true` every bundle of every channel. No packages: every
//!   package so.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Read,
};

use serde::Deserialize;
use shipperd_bundle::ManifestDoc;
use shipperd_model::Digest;

use crate::{
    Error, Result,
    cache::Cache,
    isc::{CatalogSpec, PackageSpec, version},
};

/// The label naming a catalog image's FBC directory.
pub const CONFIGS_LABEL: &str = "operators.operatorframework.io.index.configs.v1";
/// The largest catalog file read.
const MAX_FILE: u64 = 512 << 20;
/// The largest image config read.
const MAX_CONFIG: usize = 4 << 20;

/// A channel's entries: (bundle name, the bundles it replaces and skips).
type Entries = Vec<(String, Vec<String>)>;

#[derive(Debug, Default)]
struct Package {
    default_channel: Option<String>,
    /// channel → its entries.
    channels: BTreeMap<String, Entries>,
    bundles: BTreeMap<String, Bundle>,
}

#[derive(Debug, Default)]
struct Bundle {
    version: Option<semver::Version>,
    image: Option<String>,
    related: Vec<String>,
}

/// One catalog file's objects, as far as they matter here.
#[derive(Debug, Default)]
struct FileObjects {
    packages: Vec<(String, Option<String>)>,
    /// (package, channel, entries)
    channels: Vec<(String, String, Entries)>,
    bundles: Vec<(String, String, Bundle)>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    #[serde(default)]
    replaces: Option<String>,
    #[serde(default)]
    skips: Vec<String>,
}

/// Which packages to keep (`None`: all).
struct Wanted<'a>(Option<BTreeSet<&'a str>>);

impl Wanted<'_> {
    fn wants(&self, p: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.contains(p))
    }
}

fn add_object(v: serde_json::Value, want: &Wanted, out: &mut FileObjects) {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    match v.get("schema").and_then(|x| x.as_str()) {
        Some("olm.package") => {
            if let Some(name) = s("name").filter(|n| want.wants(n)) {
                out.packages.push((name, s("defaultChannel")));
            }
        }
        Some("olm.channel") => {
            let (Some(pkg), Some(name)) = (s("package"), s("name")) else {
                return;
            };
            if !want.wants(&pkg) {
                return;
            }
            let entries: Vec<Entry> = v
                .get("entries")
                .and_then(|e| serde_json::from_value(e.clone()).ok())
                .unwrap_or_default();
            let entries = entries
                .into_iter()
                .map(|e| {
                    let mut gone = e.skips;
                    gone.extend(e.replaces);
                    (e.name, gone)
                })
                .collect();
            out.channels.push((pkg, name, entries));
        }
        Some("olm.bundle") => {
            let (Some(pkg), Some(name)) = (s("package"), s("name")) else {
                return;
            };
            if !want.wants(&pkg) {
                return;
            }
            let version = v
                .get("properties")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("olm.package"))
                .and_then(|p| p.get("value")?.get("version")?.as_str().map(str::to_string))
                .and_then(|v| version(&v).ok());
            let related = v
                .get("relatedImages")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("image")?.as_str().map(str::to_string))
                .filter(|i| !i.is_empty())
                .collect();
            out.bundles.push((
                pkg,
                name,
                Bundle {
                    version,
                    image: s("image"),
                    related,
                },
            ));
        }
        _ => {}
    }
}

/// The objects of one catalog file (`.json` or `.yaml`).
fn read_file(path: &str, r: impl Read, want: &Wanted) -> Result<FileObjects> {
    let bad = |e: &dyn std::fmt::Display| Error::Input(format!("catalog file {path}: {e}"));
    let mut out = FileObjects::default();
    if path.ends_with(".json") {
        for v in serde_json::Deserializer::from_reader(std::io::BufReader::new(r))
            .into_iter::<serde_json::Value>()
        {
            add_object(v.map_err(|e| bad(&e))?, want, &mut out);
        }
    } else {
        for doc in serde_yaml::Deserializer::from_reader(r) {
            let v = serde_json::Value::deserialize(doc).map_err(|e| bad(&e))?;
            if !v.is_null() {
                add_object(v, want, &mut out);
            }
        }
    }
    Ok(out)
}

/// A layer's tar, decompressed as its first bytes say (gzip, zstd, or none).
fn layer_reader(file: std::fs::File) -> Result<Box<dyn Read>> {
    use std::io::{BufRead as _, BufReader};
    let mut r = BufReader::with_capacity(1 << 16, file);
    let head = r.fill_buf().map_err(|e| Error::Input(e.to_string()))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r).map_err(|e| Error::Input(e.to_string()))?,
        )
    } else {
        Box::new(r)
    })
}

/// The manifest of `top` (an index's `linux/amd64` child, else its first) and its
/// config's catalog directory.
fn catalog_manifest(cache: &Cache, top: &Digest) -> Result<(ManifestDoc, String)> {
    let doc = |d: &Digest| -> Result<ManifestDoc> {
        ManifestDoc::parse(d.as_str(), &cache.read(d)?).map_err(|e| Error::Input(e.to_string()))
    };
    let mut m = doc(top)?;
    if let Some(children) = &m.manifests {
        let pick = children
            .iter()
            .find(|c| {
                c.platform.as_ref().is_some_and(|p| {
                    p.get("os").and_then(|o| o.as_str()) == Some("linux")
                        && p.get("architecture").and_then(|a| a.as_str()) == Some("amd64")
                })
            })
            .or(children.first())
            .ok_or_else(|| Error::Input("the catalog index lists no manifest".into()))?;
        m = doc(&pick.digest)?;
    }
    let config = m
        .config
        .as_ref()
        .ok_or_else(|| Error::Input("the catalog manifest has no config".into()))?;
    let bytes = cache.read(&config.digest)?;
    if bytes.len() > MAX_CONFIG {
        return Err(Error::Input("the catalog's config is too large".into()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::Input(format!("catalog config: {e}")))?;
    let dir = v
        .pointer("/config/Labels")
        .and_then(|l| l.get(CONFIGS_LABEL))
        .and_then(|d| d.as_str())
        .ok_or_else(|| {
            Error::Input(format!(
                "not a file-based catalog: its config has no {CONFIGS_LABEL} label"
            ))
        })?;
    let dir = format!("{}/", dir.trim_matches('/'));
    Ok((m, dir))
}

/// Reads the catalog image `top` (its manifests and layers in `cache`) and returns the
/// images `spec` selects: bundle images and their related images, each once, sorted.
pub fn select(cache: &Cache, top: &Digest, spec: &CatalogSpec) -> Result<Vec<String>> {
    let (manifest, dir) = catalog_manifest(cache, top)?;
    let want = Wanted(
        (!spec.packages.is_empty())
            .then(|| spec.packages.iter().map(|p| p.name.as_str()).collect()),
    );
    // Layer over layer: path → its objects (a later layer's file replaces).
    let mut files: HashMap<String, FileObjects> = HashMap::new();
    for layer in &manifest.layers {
        let path = cache.path(&layer.digest);
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut tar = tar::Archive::new(layer_reader(f)?);
        let bad = |e: std::io::Error| Error::Input(format!("catalog layer {}: {e}", layer.digest));
        for entry in tar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            let name = name
                .trim_start_matches("./")
                .trim_start_matches('/')
                .to_string();
            let Some(rel) = name.strip_prefix(&dir) else {
                continue;
            };
            let file_name = rel.rsplit('/').next().unwrap_or(rel);
            if let Some(gone) = file_name.strip_prefix(".wh.") {
                let parent = &name[..name.len() - file_name.len()];
                let target = format!("{parent}{gone}");
                files.retain(|p, _| p != &target && !p.starts_with(&format!("{target}/")));
                continue;
            }
            if !entry.header().entry_type().is_file()
                || !(rel.ends_with(".json") || rel.ends_with(".yaml") || rel.ends_with(".yml"))
            {
                continue;
            }
            if entry.header().size().unwrap_or(0) > MAX_FILE {
                return Err(Error::Input(format!(
                    "catalog file {name} is larger than {MAX_FILE} bytes"
                )));
            }
            let objects = read_file(&name, entry.take(MAX_FILE), &want)?;
            files.insert(name, objects);
        }
    }
    let mut packages: BTreeMap<String, Package> = BTreeMap::new();
    let mut paths: Vec<&String> = files.keys().collect();
    paths.sort();
    for p in paths {
        let f = &files[p];
        for (name, default) in &f.packages {
            packages.entry(name.clone()).or_default().default_channel = default.clone();
        }
        for (pkg, ch, entries) in &f.channels {
            packages
                .entry(pkg.clone())
                .or_default()
                .channels
                .insert(ch.clone(), entries.clone());
        }
    }
    for (_, f) in files.drain() {
        for (pkg, name, b) in f.bundles {
            packages.entry(pkg).or_default().bundles.insert(name, b);
        }
    }
    let specs: Vec<PackageSpec> = if spec.packages.is_empty() {
        packages
            .keys()
            .map(|n| PackageSpec {
                name: n.clone(),
                ..Default::default()
            })
            .collect()
    } else {
        spec.packages.clone()
    };
    let mut images = BTreeSet::new();
    for ps in &specs {
        let pkg = packages.get(&ps.name).ok_or_else(|| {
            let known: Vec<&str> = packages.keys().map(String::as_str).take(20).collect();
            Error::Input(format!(
                "catalog {} has no package {} (it has: {})",
                spec.catalog,
                ps.name,
                known.join(", ")
            ))
        })?;
        for name in select_bundles(pkg, ps, spec.full).map_err(|e| {
            Error::Input(format!(
                "catalog {}, package {}: {e}",
                spec.catalog, ps.name
            ))
        })? {
            let b = &pkg.bundles[&name];
            images.extend(b.image.iter().cloned());
            images.extend(b.related.iter().cloned());
        }
    }
    Ok(images.into_iter().collect())
}

/// The bundles of `pkg` that `ps` selects, by name.
fn select_bundles(
    pkg: &Package,
    ps: &PackageSpec,
    full: bool,
) -> std::result::Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    let channels: Vec<(String, Option<&String>, Option<&String>)> = if !ps.channels.is_empty() {
        ps.channels
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.min_version.as_ref().or(ps.min_version.as_ref()),
                    c.max_version.as_ref().or(ps.max_version.as_ref()),
                )
            })
            .collect()
    } else if full {
        pkg.channels
            .keys()
            .map(|c| (c.clone(), ps.min_version.as_ref(), ps.max_version.as_ref()))
            .collect()
    } else {
        let d = pkg
            .default_channel
            .clone()
            .or_else(|| (pkg.channels.len() == 1).then(|| pkg.channels.keys().next().cloned())?)
            .ok_or("it names no default channel: name the channels")?;
        vec![(d, ps.min_version.as_ref(), ps.max_version.as_ref())]
    };
    for (ch, min, max) in channels {
        let entries = pkg.channels.get(&ch).ok_or_else(|| {
            let known: Vec<&str> = pkg.channels.keys().map(String::as_str).collect();
            format!("no channel {ch} (it has: {})", known.join(", "))
        })?;
        let v = |name: &str| pkg.bundles.get(name).and_then(|b| b.version.clone());
        if min.is_none() && max.is_none() && !full {
            // The head: no other entry replaces or skips it; the highest of several.
            let gone: BTreeSet<&str> = entries
                .iter()
                .flat_map(|(_, g)| g.iter().map(String::as_str))
                .collect();
            let head = entries
                .iter()
                .filter(|(n, _)| !gone.contains(n.as_str()))
                .max_by(|a, b| v(&a.0).cmp(&v(&b.0)))
                .ok_or_else(|| format!("channel {ch} has no head"))?;
            out.insert(head.0.clone());
            continue;
        }
        let (min, max) = (
            min.map(|m| version(m)).transpose()?,
            max.map(|m| version(m)).transpose()?,
        );
        let before = out.len();
        for (name, _) in entries {
            let Some(ver) = v(name) else { continue };
            if min.as_ref().is_none_or(|m| ver >= *m) && max.as_ref().is_none_or(|m| ver <= *m) {
                out.insert(name.clone());
            }
        }
        if out.len() == before {
            return Err(format!("channel {ch} has no bundle in the version range"));
        }
    }
    for name in &out {
        if !pkg.bundles.contains_key(name) {
            return Err(format!(
                "bundle {name} is named by a channel but not in the catalog"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package() -> Package {
        let mut p = Package {
            default_channel: Some("stable".into()),
            ..Default::default()
        };
        p.channels.insert(
            "stable".into(),
            vec![
                ("op.v1.0.0".into(), vec![]),
                ("op.v1.1.0".into(), vec!["op.v1.0.0".into()]),
                ("op.v1.2.0".into(), vec!["op.v1.1.0".into()]),
            ],
        );
        p.channels
            .insert("fast".into(), vec![("op.v2.0.0".into(), vec![])]);
        for (n, v) in [
            ("op.v1.0.0", "1.0.0"),
            ("op.v1.1.0", "1.1.0"),
            ("op.v1.2.0", "1.2.0"),
            ("op.v2.0.0", "2.0.0"),
        ] {
            p.bundles.insert(
                n.into(),
                Bundle {
                    version: Some(version(v).unwrap()),
                    image: Some(format!("quay.io/op/bundle:{v}")),
                    related: vec![],
                },
            );
        }
        p
    }

    #[test]
    fn heads_ranges_and_channels() {
        let p = package();
        let spec = |channels: Vec<(&str, Option<&str>, Option<&str>)>| PackageSpec {
            name: "op".into(),
            channels: channels
                .into_iter()
                .map(|(n, a, b)| crate::isc::ChannelSpec {
                    name: n.into(),
                    min_version: a.map(Into::into),
                    max_version: b.map(Into::into),
                })
                .collect(),
            ..Default::default()
        };
        let names = |s: BTreeSet<String>| s.into_iter().collect::<Vec<_>>().join(" ");
        assert_eq!(
            names(select_bundles(&p, &spec(vec![]), false).unwrap()),
            "op.v1.2.0"
        );
        assert_eq!(
            names(select_bundles(&p, &spec(vec![("stable", Some("1.1.0"), None)]), false).unwrap()),
            "op.v1.1.0 op.v1.2.0"
        );
        assert_eq!(
            names(
                select_bundles(
                    &p,
                    &spec(vec![("stable", Some("v1.0"), Some("1.1.0"))]),
                    false
                )
                .unwrap()
            ),
            "op.v1.0.0 op.v1.1.0"
        );
        assert_eq!(
            names(select_bundles(&p, &spec(vec![("fast", None, None)]), false).unwrap()),
            "op.v2.0.0"
        );
        assert_eq!(select_bundles(&p, &spec(vec![]), true).unwrap().len(), 4);
        let err = select_bundles(&p, &spec(vec![("candidate", None, None)]), false).unwrap_err();
        assert!(
            err.contains("no channel candidate") && err.contains("fast, stable"),
            "{err}"
        );
        let err =
            select_bundles(&p, &spec(vec![("stable", Some("3.0.0"), None)]), false).unwrap_err();
        assert!(err.contains("version range"), "{err}");
    }

    #[test]
    fn catalog_files_in_json_and_yaml() {
        let want = Wanted(Some(BTreeSet::from(["a"])));
        let json = r#"{"schema":"olm.package","name":"a","defaultChannel":"s","icon":{"base64data":"AAAA"}}
{"schema":"olm.channel","package":"a","name":"s","entries":[{"name":"a.v1","skipRange":"<1"}]}
{"schema":"olm.bundle","package":"a","name":"a.v1","image":"q.io/a/b@sha256:00","properties":[{"type":"olm.package","value":{"packageName":"a","version":"1.0.0"}}],"relatedImages":[{"name":"op","image":"q.io/a/op:1"},{"image":""}]}
{"schema":"olm.bundle","package":"other","name":"o.v1","image":"q.io/o/b:1"}"#;
        let f = read_file("configs/a/catalog.json", json.as_bytes(), &want).unwrap();
        assert_eq!(f.packages, vec![("a".to_string(), Some("s".to_string()))]);
        assert_eq!(f.channels.len(), 1);
        assert_eq!(f.bundles.len(), 1, "another package's bundle is not kept");
        assert_eq!(f.bundles[0].2.related, vec!["q.io/a/op:1".to_string()]);
        let yaml = "---\nschema: olm.package\nname: a\ndefaultChannel: s\n---\nschema: olm.channel\npackage: a\nname: s\nentries:\n- name: a.v1\n";
        let f = read_file("configs/a/catalog.yaml", yaml.as_bytes(), &want).unwrap();
        assert_eq!((f.packages.len(), f.channels.len()), (1, 1));
        assert!(read_file("x.json", &b"{not json"[..], &want).is_err());
    }
}
