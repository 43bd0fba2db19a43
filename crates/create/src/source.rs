//! Where images come from: registries (one client per registry host and credentials,
//! logging in for `pull` only, with the entry of `--authfile` that matches the image's
//! repository as podman and skopeo choose it: the longest of `host/ns/repo`, `host/ns`,
//! `host`), and OCI layout directories.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{Descriptor, layout::ANNOTATION_REF_NAME};
use shipperd_model::{Digest, Reference};
use shipperd_registry::Registry;
use shipperd_registry_targets::{AuthSpec, DockerAuth, DockerConfig, Mapping, Target, Transfer};

use crate::{Error, Result, cache::Cache, list};

/// How sources are reached.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// A `containers-auth.json` (or docker `config.json`).
    pub authfile: Option<PathBuf>,
    /// Hosts of token services other than a registry's own that may be sent its
    /// credentials (Docker Hub's `auth.docker.io` always may).
    pub token_hosts: Vec<String>,
    /// Downloads at once.
    pub concurrency: usize,
}

/// The registries met so far, by host and authfile entry.
pub struct Sources {
    opts: SourceOptions,
    auths: BTreeMap<String, DockerAuth>,
    registries: Mutex<HashMap<(String, String), Arc<Registry>>>,
}

/// `https://index.docker.io/v1/` → `docker.io`; `quay.io/org` stays.
fn auth_key(k: &str) -> String {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k)
        .trim_end_matches('/');
    let k = k.strip_suffix("/v1").or(k.strip_suffix("/v2")).unwrap_or(k);
    match k.split_once('/') {
        Some(("index.docker.io" | "registry-1.docker.io", rest)) => format!("docker.io/{rest}"),
        None if matches!(k, "index.docker.io" | "registry-1.docker.io") => "docker.io".into(),
        _ => k.to_string(),
    }
}

impl Sources {
    pub fn new(opts: SourceOptions) -> Result<Self> {
        let auths = match &opts.authfile {
            None => BTreeMap::new(),
            Some(p) => {
                let text = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                let file: DockerConfig = serde_json::from_slice(&text).map_err(|e| {
                    Error::Input(format!(
                        "{} is not a containers-auth.json: {e}",
                        p.display()
                    ))
                })?;
                file.auths
                    .into_iter()
                    .map(|(k, v)| (auth_key(&k), v))
                    .collect()
            }
        };
        Ok(Sources {
            opts,
            auths,
            registries: Mutex::default(),
        })
    }

    /// The authfile entry for `image`'s repository, most specific first.
    fn entry(&self, image: &Reference) -> Option<(&str, &DockerAuth)> {
        let host = image.host.as_deref().unwrap_or("docker.io");
        let mut scope = format!("{host}/{}", image.repository);
        loop {
            if let Some((k, e)) = self.auths.get_key_value(&scope) {
                return Some((k.as_str(), e));
            }
            match scope.rfind('/') {
                Some(i) => scope.truncate(i),
                None => return None,
            }
        }
    }

    /// The client for `image`'s registry.
    pub fn registry(&self, image: &Reference) -> Result<Arc<Registry>> {
        let host = image.host.clone().unwrap_or_else(|| "docker.io".into());
        let entry = self.entry(image);
        let key = (
            host.clone(),
            entry.map(|(k, _)| k.to_string()).unwrap_or_default(),
        );
        if let Some(r) = self.registries.lock().expect("not poisoned").get(&key) {
            return Ok(r.clone());
        }
        let mut auth = AuthSpec::default();
        if let Some((k, e)) = entry {
            let (username, password) = e
                .basic(k)
                .map_err(|e| Error::Input(format!("authfile: {e}")))?;
            auth.username = Some(username);
            auth.password = Some(password);
        }
        auth.token_hosts = self.opts.token_hosts.clone();
        if host == "docker.io" {
            auth.token_hosts.push("auth.docker.io".into());
        }
        let transfer = Transfer {
            concurrency: self.opts.concurrency.max(1),
            ..Transfer::default()
        };
        let target = Target::new(
            "source",
            &list::endpoint(&host),
            false,
            None,
            auth,
            Mapping::default(),
            transfer,
        )
        .map_err(|e| Error::Input(format!("source {host}: {e}")))?;
        let reg = Arc::new(
            Registry::source(target).map_err(|e| Error::Input(format!("source {host}: {e}")))?,
        );
        self.registries
            .lock()
            .expect("not poisoned")
            .insert(key, reg.clone());
        Ok(reg)
    }
}

/// Most bytes of an OCI layout's `index.json` read.
const MAX_INDEX: u64 = 16 << 20;

/// An OCI layout directory given as a source.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
    index: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

impl Layout {
    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join("index.json");
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        if len > MAX_INDEX {
            return Err(Error::Input(format!(
                "{} is {len} bytes, more than the {MAX_INDEX} read",
                p.display()
            )));
        }
        let index: IndexJson = serde_json::from_reader(std::io::BufReader::new(f))
            .map_err(|e| Error::Input(format!("{} is not an OCI index: {e}", p.display())))?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            index: index.manifests,
        })
    }

    /// The manifest named `reference` (`org.opencontainers.image.ref.name`), or the only
    /// one when none is asked for; and the name the layout gives it.
    pub fn find(&self, reference: Option<&str>) -> Result<(Descriptor, Option<String>)> {
        let name = |d: &Descriptor| d.annotations.get(ANNOTATION_REF_NAME).cloned();
        let found: Vec<&Descriptor> = match reference {
            Some(r) => self
                .index
                .iter()
                .filter(|d| name(d).as_deref() == Some(r))
                .collect(),
            None => self.index.iter().collect(),
        };
        match found.as_slice() {
            [one] => Ok(((*one).clone(), name(one))),
            [] => Err(Error::Input(format!(
                "oci:{}: no image named {}",
                self.dir.display(),
                reference.unwrap_or("(any)")
            ))),
            _ => Err(Error::Input(format!(
                "oci:{}: {} images match; name one (oci:DIR:REF)",
                self.dir.display(),
                found.len()
            ))),
        }
    }

    /// Copies blob `desc` into the cache, checked against its digest.
    pub fn copy_blob(&self, desc: &Descriptor, cache: &Cache) -> Result<()> {
        let from = self
            .dir
            .join("blobs")
            .join("sha256")
            .join(desc.digest.hex());
        let to = cache.partial(&desc.digest);
        let mut src = std::fs::File::open(&from).map_err(|e| Error::io(&from, e))?;
        let mut dst = std::fs::File::create(&to).map_err(|e| Error::io(&to, e))?;
        let mut hashing = Hashing {
            inner: &mut dst,
            hasher: Sha256::new(),
            len: 0,
        };
        std::io::copy(&mut src, &mut hashing).map_err(|e| Error::io(&from, e))?;
        let (len, hex) = (hashing.len, hex::encode(hashing.hasher.finalize()));
        if len != desc.size || hex != desc.digest.hex() {
            let _ = std::fs::remove_file(&to);
            return Err(Error::Damaged(format!(
                "{} ({len} bytes hashing to sha256:{hex}, not {} of {} bytes)",
                from.display(),
                desc.digest,
                desc.size
            )));
        }
        cache.commit(&desc.digest)
    }

    /// The bytes of manifest `digest`, checked.
    pub fn manifest(&self, digest: &Digest) -> Result<Vec<u8>> {
        let p = self.dir.join("blobs").join("sha256").join(digest.hex());
        let bytes = read_bounded(&p, shipperd_registry::pull::MAX_MANIFEST as u64)?;
        if Digest::of(&bytes) != *digest {
            return Err(Error::Damaged(p.display().to_string()));
        }
        Ok(bytes)
    }
}

fn read_bounded(p: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(p, e))?;
    if out.len() as u64 > max {
        return Err(Error::Input(format!(
            "{} is larger than the {max} bytes a manifest may be",
            p.display()
        )));
    }
    Ok(out)
}

/// A writer that hashes what goes through it.
pub(crate) struct Hashing<W> {
    pub inner: W,
    pub hasher: Sha256,
    pub len: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authfile_keys_as_containers_reads_them() {
        assert_eq!(auth_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(auth_key("quay.io"), "quay.io");
        assert_eq!(auth_key("quay.io/org"), "quay.io/org");
        assert_eq!(auth_key("http://reg:5000"), "reg:5000");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"quay.io":{{"auth":"{}"}},"quay.io/org/app":{{"auth":"{}"}}}}}}"#,
                b64("a:1"),
                b64("b:2")
            ),
        )
        .unwrap();
        let s = Sources::new(SourceOptions {
            authfile: Some(f),
            ..Default::default()
        })
        .unwrap();
        let r = |x: &str| list::full_reference(x).unwrap();
        assert_eq!(
            s.entry(&r("quay.io/org/app:1")).unwrap().0,
            "quay.io/org/app"
        );
        assert_eq!(s.entry(&r("quay.io/org/other:1")).unwrap().0, "quay.io");
        assert!(s.entry(&r("ghcr.io/org/app:1")).is_none());
    }
}
