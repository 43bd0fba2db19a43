//! `docker save` archives written as Docker wrote them before version 25: each image's
//! config at `<config hex>.json`, each layer at `<layer id>/layer.tar` beside its
//! `json` and `VERSION`, a layer whose bytes another layer directory already holds
//! stored as a symbolic link to it, then `manifest.json` and `repositories`.

use std::collections::BTreeMap;

use serde_json::json;

use crate::fixtures::sha256;

/// One saved image.
#[derive(Debug, Clone)]
pub struct SavedImage {
    /// `RepoTags` (empty: saved by ID, `null` in `manifest.json`).
    pub tags: Vec<String>,
    pub config: Vec<u8>,
    /// Uncompressed layer tars, base first.
    pub layers: Vec<Vec<u8>>,
}

impl SavedImage {
    /// An image of `layers`, its config naming each layer's diff ID.
    pub fn new(tags: &[&str], layers: Vec<Vec<u8>>, env: &str) -> Self {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [env], "Cmd": ["/bin/app"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| json!({"created_by": "COPY app /"})).collect::<Vec<_>>(),
        }))
        .expect("JSON");
        SavedImage {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            config,
            layers,
        }
    }

    pub fn config_digest(&self) -> String {
        sha256(&self.config)
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha256(l)).collect()
    }
}

/// A layer tar holding one file.
pub fn layer(name: &str, body: &[u8]) -> Vec<u8> {
    crate::fixtures::tar_bytes(&[(name.to_string(), body.to_vec())]).expect("tar")
}

/// A file or a symbolic link of an archive.
#[derive(Debug, Clone)]
pub enum Member {
    File(Vec<u8>),
    Link(String),
}

/// The members of a legacy archive of `images`, in the order Docker writes them.
pub fn legacy_members(images: &[SavedImage]) -> Vec<(String, Member)> {
    let mut out: Vec<(String, Member)> = Vec::new();
    // A layer's v1 ID depends on its parent: the same bytes under another parent are
    // another directory, which Docker links to the first.
    let mut by_id: BTreeMap<String, ()> = BTreeMap::new();
    let mut by_bytes: BTreeMap<String, String> = BTreeMap::new();
    let mut manifest = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for img in images {
        let config_hex = img.config_digest()[7..].to_string();
        let config_path = format!("{config_hex}.json");
        out.push((config_path.clone(), Member::File(img.config.clone())));
        let mut parent = String::new();
        let mut paths = Vec::new();
        for l in &img.layers {
            let diff = sha256(l);
            let id = sha256(format!("{parent}\n{diff}").as_bytes())[7..].to_string();
            let path = format!("{id}/layer.tar");
            if by_id.insert(id.clone(), ()).is_none() {
                out.push((format!("{id}/VERSION"), Member::File(b"1.0".to_vec())));
                out.push((
                    format!("{id}/json"),
                    Member::File(serde_json::to_vec(&json!({"id": id, "parent": parent})).unwrap()),
                ));
                match by_bytes.get(&diff) {
                    Some(first) => out.push((path.clone(), Member::Link(format!("../{first}")))),
                    None => {
                        by_bytes.insert(diff.clone(), path.clone());
                        out.push((path.clone(), Member::File(l.clone())));
                    }
                }
            }
            paths.push(path);
            parent = id;
        }
        for t in &img.tags {
            let (repo, tag) = t.rsplit_once(':').expect("repo:tag");
            repositories
                .entry(repo.to_string())
                .or_default()
                .insert(tag.to_string(), parent.clone());
        }
        manifest.push(json!({
            "Config": config_path,
            "RepoTags": if img.tags.is_empty() { json!(null) } else { json!(img.tags) },
            "Layers": paths,
        }));
    }
    out.push((
        "manifest.json".into(),
        Member::File(serde_json::to_vec(&manifest).unwrap()),
    ));
    out.push((
        "repositories".into(),
        Member::File(serde_json::to_vec(&repositories).unwrap()),
    ));
    out
}

/// `members` as a tar (directories first, as Docker writes them).
pub fn tar(members: &[(String, Member)]) -> anyhow::Result<Vec<u8>> {
    let mut ar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (p, _) in members {
        if let Some((d, _)) = p.rsplit_once('/') {
            dirs.insert(format!("{d}/"));
        }
    }
    for d in dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        ar.append_data(&mut h, &d, std::io::empty())?;
    }
    for (p, m) in members {
        let mut h = tar::Header::new_ustar();
        match m {
            Member::File(b) => {
                h.set_mode(0o644);
                h.set_size(b.len() as u64);
                ar.append_data(&mut h, p, b.as_slice())?;
            }
            Member::Link(to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                ar.append_link(&mut h, p, to)?;
            }
        }
    }
    Ok(ar.into_inner()?)
}

/// `members` written into `dir` (links as symbolic links), for `mksquashfs`.
pub fn write_dir(members: &[(String, Member)], dir: &std::path::Path) -> anyhow::Result<()> {
    for (p, m) in members {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap())?;
        match m {
            Member::File(b) => std::fs::write(path, b)?,
            Member::Link(to) => std::os::unix::fs::symlink(to, path)?,
        }
    }
    Ok(())
}

/// The image tagged `tag` of the OCI layout `layout`, written by `skopeo copy` as a
/// `docker save` archive at `archive` naming it `name`.
pub fn skopeo_archive(
    layout: &std::path::Path,
    tag: &str,
    archive: &std::path::Path,
    name: &str,
) -> anyhow::Result<()> {
    crate::app::skopeo(&[
        "copy",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker-archive:{}:{name}", archive.display()),
    ])
    .map(drop)
}
