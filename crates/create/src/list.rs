//! What to carry: the lines of an images file (`--images FILE`).
//!
//! One image a line, `#` starting a comment, blank lines ignored:
//!
//! - a registry reference, by tag or digest (`quay.io/org/app:1`,
//!   `registry.example:5000/a/b@sha256:…`); a name with neither is `:latest`, and a
//!   name without a registry host is Docker Hub's (`docker.io/library/` for one
//!   component), as docker and skopeo read it;
//! - an OCI layout, `oci:DIR[:REF]`, then the name it is carried under when the
//!   layout's own `org.opencontainers.image.ref.name` is not a full reference
//!   (`oci:/src/app:1 quay.io/org/app:1`).
//!
//! Every image is named in the bundle by its full source reference, host included, so
//! the site can write mirror sets from it.

use std::path::{Path, PathBuf};

use shipperd_model::Reference;

use crate::{Error, Result};

/// The most lines an images file may have.
pub const MAX_IMAGES: usize = 100_000;

/// One image to carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wanted {
    /// From a registry, named by its full reference.
    Registry(Reference),
    /// From an OCI layout directory: the manifest named `reference` there (the only one
    /// when `None`), carried under `name` (else the layout's own name for it).
    Layout {
        dir: PathBuf,
        reference: Option<String>,
        name: Option<Reference>,
    },
}

impl Wanted {
    /// One line of an images file (without its comment), or `None` when it is empty.
    pub fn parse_line(line: &str) -> Result<Option<Wanted>> {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return Ok(None);
        }
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        let second = words.next();
        if words.next().is_some() {
            return Err(Error::Input(format!(
                "{line:?}: one reference a line (and, after an oci: layout, the name to carry it under)"
            )));
        }
        if let Some(rest) = first.strip_prefix("oci:") {
            let (dir, reference) = split_layout(rest);
            if dir.is_empty() {
                return Err(Error::Input(format!("{line:?}: oci: needs a directory")));
            }
            let name = second.map(full_reference).transpose()?;
            return Ok(Some(Wanted::Layout {
                dir: PathBuf::from(dir),
                reference: reference.map(str::to_string),
                name,
            }));
        }
        if second.is_some() {
            return Err(Error::Input(format!(
                "{line:?}: a registry image is carried under its own name; give one reference"
            )));
        }
        Ok(Some(Wanted::Registry(full_reference(first)?)))
    }

    /// The images of a file, in its order, without repeats.
    pub fn read_file(path: &Path) -> Result<Vec<Wanted>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut out: Vec<Wanted> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let wanted = Wanted::parse_line(line)
                .map_err(|e| Error::Input(format!("{}:{}: {e}", path.display(), n + 1)))?;
            if let Some(w) = wanted
                && !out.contains(&w)
            {
                if out.len() == MAX_IMAGES {
                    return Err(Error::Input(format!(
                        "{} names more than {MAX_IMAGES} images",
                        path.display()
                    )));
                }
                out.push(w);
            }
        }
        Ok(out)
    }
}

/// `DIR[:REF]`: the directory, and the reference after its first `:` (as skopeo's
/// `oci:` transport splits it: a directory's name cannot hold a `:`).
fn split_layout(s: &str) -> (&str, Option<&str>) {
    match s.split_once(':') {
        Some((dir, r)) if !r.is_empty() => (dir, Some(r)),
        Some((dir, _)) => (dir, None),
        None => (s, None),
    }
}

/// A reference completed as docker reads it: Docker Hub when no registry host is
/// named (`library/` for an official image), `latest` when no tag or digest is.
pub fn full_reference(s: &str) -> Result<Reference> {
    let last = s.rsplit('/').next().unwrap_or(s);
    let completed;
    let s = if !s.contains('@') && !last.contains(':') {
        completed = format!("{s}:latest");
        completed.as_str()
    } else {
        s
    };
    let mut r = Reference::parse(s).map_err(|e| Error::Input(e.to_string()))?;
    if r.host.is_none() {
        r.host = Some("docker.io".into());
        if !r.repository.contains('/') {
            r.repository = format!("library/{}", r.repository);
        }
    }
    if r.host.as_deref() == Some("index.docker.io") {
        r.host = Some("docker.io".into());
    }
    Ok(r)
}

/// Where a registry host is reached: Docker Hub's API host for `docker.io`, plain
/// HTTP for a loopback registry (as publish takes one), HTTPS for every other.
pub fn endpoint(host: &str) -> String {
    if host == "docker.io" {
        return "https://registry-1.docker.io".into();
    }
    if shipperd_registry_targets::is_loopback(host) {
        format!("http://{host}")
    } else {
        format!("https://{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_as_docker_reads_them() {
        let r = |s: &str| match Wanted::parse_line(s).unwrap() {
            Some(Wanted::Registry(r)) => r.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(r("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(r("  bitnami/redis:7 # cache"), "docker.io/bitnami/redis:7");
        assert_eq!(r("quay.io/org/app:1"), "quay.io/org/app:1");
        assert_eq!(r("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b:latest");
        let d = format!("quay.io/org/app@sha256:{}", "a".repeat(64));
        assert_eq!(r(&d), d);
        assert_eq!(Wanted::parse_line("  # nothing").unwrap(), None);
        assert!(Wanted::parse_line("Quay.io/Org/App:1").is_err());
        assert!(Wanted::parse_line("quay.io/a:1 quay.io/b:1").is_err());
        assert_eq!(
            Wanted::parse_line("oci:/src/app:v1 quay.io/org/app:1").unwrap(),
            Some(Wanted::Layout {
                dir: "/src/app".into(),
                reference: Some("v1".into()),
                name: Some(Reference::parse("quay.io/org/app:1").unwrap()),
            })
        );
        assert_eq!(
            Wanted::parse_line("oci:layout").unwrap(),
            Some(Wanted::Layout {
                dir: "layout".into(),
                reference: None,
                name: None
            })
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("docker.io"), "https://registry-1.docker.io");
        assert_eq!(endpoint("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(endpoint("quay.io"), "https://quay.io");
    }
}
