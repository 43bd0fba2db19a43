//! Simple-signing signatures from a lookaside (`--registries.d DIR`), read as skopeo and
//! podman read it: every `*.yaml` of the directory, `docker:` entries by registry,
//! namespace or repository (the most specific wins) and `default-docker:`, each with a
//! `lookaside:` (or the older `sigstore:`) URL, `https://`, `http://` or `file://`.
//! An image's signatures are `<URL>/<repository path>@sha256=<hex>/signature-<n>` from
//! 1 until the first that is missing; they are carried at the top of the bundle in the
//! same layout, `sigstore/<repository path>@sha256=<hex>/signature-<n>`, as
//! `skopeo copy --sign-by` writes them to a `file://` lookaside.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use shipperd_model::{Backoff, Digest, Reference};

use crate::{Error, Result};

/// Most signatures read per image.
const MAX_SIGNATURES: u32 = 64;
/// The largest signature read.
const MAX_SIGNATURE: usize = 4 << 20;
/// Attempts at one signature over a network that fails.
const ATTEMPTS: u32 = 4;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    default_docker: Option<Entry>,
    #[serde(default)]
    docker: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    lookaside: Option<String>,
    #[serde(default)]
    sigstore: Option<String>,
}

impl Entry {
    fn url(&self) -> Option<&str> {
        self.lookaside.as_deref().or(self.sigstore.as_deref())
    }
}

/// The lookasides a `registries.d` directory names.
#[derive(Debug, Default)]
pub struct Lookasides {
    default: Option<String>,
    scopes: BTreeMap<String, String>,
    /// Made when an `http(s)://` lookaside is first read.
    http: std::sync::OnceLock<reqwest::Client>,
}

impl Lookasides {
    /// Reads every `*.yaml` of `dir` (sorted; a scope given twice is refused, as
    /// containers/image refuses it).
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        paths.sort();
        let mut out = Lookasides::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            let f: File = serde_yaml::from_str(&text)
                .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
            if let Some(d) = f.default_docker.as_ref().and_then(Entry::url) {
                if out.default.is_some() {
                    return Err(Error::Input(format!(
                        "{}: default-docker is set in more than one file",
                        p.display()
                    )));
                }
                out.default = Some(d.to_string());
            }
            for (scope, e) in f.docker {
                let Some(url) = e.url() else { continue };
                if out.scopes.insert(scope.clone(), url.to_string()).is_some() {
                    return Err(Error::Input(format!(
                        "{}: docker scope {scope} is set in more than one file",
                        p.display()
                    )));
                }
            }
        }
        Ok(out)
    }

    /// The lookaside of `image`: its repository's, namespace's or registry's entry,
    /// else the default.
    pub fn url_for(&self, image: &Reference) -> Option<&str> {
        let host = image.host.as_deref().unwrap_or("docker.io");
        let mut scope = format!("{host}/{}", image.repository);
        loop {
            if let Some(u) = self.scopes.get(&scope) {
                return Some(u);
            }
            match scope.rfind('/') {
                Some(i) => scope.truncate(i),
                None => return self.default.as_deref(),
            }
        }
    }

    /// The signatures of `image` at `digest` (in order), with their paths in the
    /// bundle.
    pub async fn signatures(
        &self,
        image: &Reference,
        digest: &Digest,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let Some(base) = self.url_for(image) else {
            return Ok(Vec::new());
        };
        let rel = format!("{}@sha256={}", image.repository, digest.hex());
        let mut out = Vec::new();
        for n in 1..=MAX_SIGNATURES {
            let url = format!("{}/{rel}/signature-{n}", base.trim_end_matches('/'));
            match self.get(&url).await? {
                Some(bytes) => out.push((format!("sigstore/{rel}/signature-{n}"), bytes)),
                None => break,
            }
        }
        Ok(out)
    }

    /// One signature, `None` when there is none.
    async fn get(&self, url: &str) -> Result<Option<Vec<u8>>> {
        if let Some(path) = url.strip_prefix("file://") {
            return match std::fs::read(path) {
                Ok(b) if b.len() > MAX_SIGNATURE => Err(Error::Input(format!(
                    "{url} is larger than a signature may be"
                ))),
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(Path::new(path), e)),
            };
        }
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(Error::Input(format!(
                "lookaside {url}: only https://, http:// and file:// are read"
            )));
        }
        let http = match self.http.get() {
            Some(h) => h,
            None => {
                let h = reqwest::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .timeout(std::time::Duration::from_secs(60))
                    .build()
                    .map_err(|e| Error::Input(format!("an HTTP client: {e}")))?;
                self.http.get_or_init(|| h)
            }
        };
        let backoff = Backoff::new(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(10),
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failed = match http.get(url).send().await {
                Ok(r) if r.status() == 404 || r.status() == 403 => return Ok(None),
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) if b.len() > MAX_SIGNATURE => {
                        return Err(Error::Input(format!(
                            "{url} is larger than a signature may be"
                        )));
                    }
                    Ok(b) => return Ok(Some(b.to_vec())),
                    Err(e) => e.to_string(),
                },
                Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                    format!("answered {}", r.status())
                }
                Ok(r) => {
                    return Err(Error::Source {
                        what: format!("lookaside {url}"),
                        cause: format!("answered {}", r.status()),
                    });
                }
                Err(e) => e.to_string(),
            };
            if attempt >= ATTEMPTS {
                return Err(Error::Source {
                    what: format!("lookaside {url}"),
                    cause: failed,
                });
            }
            backoff.retry(attempt).wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_as_containers_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.yaml"),
            "default-docker:\n  lookaside: file:///var/lib/sigs\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("redhat.yaml"),
            "docker:\n  registry.redhat.io:\n    sigstore: https://registry.redhat.io/containers/sigstore\n  quay.io/org/app:\n    lookaside: https://sigs.example/app\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ignored.conf"), "not yaml: [").unwrap();
        let l = Lookasides::read_dir(dir.path()).unwrap();
        let r = |s: &str| crate::list::full_reference(s).unwrap();
        assert_eq!(
            l.url_for(&r("registry.redhat.io/ubi9/ubi:9")),
            Some("https://registry.redhat.io/containers/sigstore")
        );
        assert_eq!(
            l.url_for(&r("quay.io/org/app:1")),
            Some("https://sigs.example/app")
        );
        assert_eq!(
            l.url_for(&r("quay.io/org/other:1")),
            Some("file:///var/lib/sigs")
        );
        std::fs::write(
            dir.path().join("twice.yaml"),
            "docker:\n  registry.redhat.io:\n    lookaside: https://elsewhere\n",
        )
        .unwrap();
        assert!(Lookasides::read_dir(dir.path()).is_err());
    }
}
