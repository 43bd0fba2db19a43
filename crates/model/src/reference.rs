//! Image references: `[host[:port]/]repository[:tag][@sha256:...]`, and where an image
//! lands in the target registry (`<registry>/<prefix>/<repository>:<tag>`: the source host
//! is dropped, the repository path kept, the digest never changes).

use std::fmt;

use crate::{Digest, ParseError};

type Result<T, E = ParseError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub host: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn bad(reference: &str, problem: impl Into<String>) -> ParseError {
    ParseError::Reference {
        reference: reference.to_string(),
        problem: problem.into(),
    }
}

/// A repository path component: lowercase letters, digits and `._-`, alphanumeric at both ends.
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || b"._-".contains(&x))
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|x| x.is_ascii_alphanumeric() || b".-:[]".contains(&x))
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() > 512 {
            return Err(bad(s, "longer than 512 characters"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        let last_slash = name.rfind('/');
        let (name, tag) = match name.rfind(':') {
            Some(i) if last_slash.is_none_or(|s| i > s) => {
                (&name[..i], Some(name[i + 1..].to_string()))
            }
            _ => (name, None),
        };
        let (host, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_string()), rest.to_string())
            }
            _ => (None, name.to_string()),
        };
        if let Some(h) = &host
            && !valid_host(h)
        {
            return Err(bad(s, format!("invalid registry host {h:?}")));
        }
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(bad(
                s,
                "repository path components must be lowercase letters, digits and . _ -",
            ));
        }
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(bad(s, format!("invalid tag {t:?}")));
        }
        if tag.is_none() && digest.is_none() {
            return Err(bad(s, "names neither a tag nor a digest"));
        }
        Ok(Reference {
            host,
            repository,
            tag,
            digest,
        })
    }

    /// Where this image lands: `registry_host/prefix/repository`, same tag and digest.
    pub fn retarget(&self, registry_host: &str, prefix: &str) -> Reference {
        let prefix = prefix.trim_matches('/');
        let repository = if prefix.is_empty() {
            self.repository.clone()
        } else {
            format!("{prefix}/{}", self.repository)
        };
        Reference {
            host: Some(registry_host.to_string()),
            repository,
            tag: self.tag.clone(),
            digest: self.digest.clone(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Reference::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A repository name made from a bundle's file name, for images the bundle names by tag
/// only (`org.opencontainers.image.ref.name: "1.0"`): `My_Apps-v2.squashfs` → `my_apps-v2`.
pub fn repository_from_bundle_name(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
    let mut base = base.as_str();
    for ext in [
        ".squashfs",
        ".sqfs",
        ".sqsh",
        ".zst",
        ".gz",
        ".xz",
        ".tgz",
        ".tar",
        ".img",
    ] {
        base = base.strip_suffix(ext).unwrap_or(base);
    }
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "bundle".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_shapes() {
        let r = Reference::parse("quay.io/org/app:1.2").unwrap();
        assert_eq!(r.host.as_deref(), Some("quay.io"));
        assert_eq!(r.repository, "org/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));

        let r = Reference::parse("localhost:5000/app:v1").unwrap();
        assert_eq!(r.host.as_deref(), Some("localhost:5000"));
        assert_eq!(r.repository, "app");

        let r = Reference::parse("library/alpine:3.19").unwrap();
        assert_eq!(r.host, None);
        assert_eq!(r.repository, "library/alpine");

        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("reg.io/app@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().map(Digest::as_str), Some(d.as_str()));
    }

    #[test]
    fn rejects_bad_names() {
        for s in [
            "App:1",
            "app",
            "reg.io/../x:1",
            "app:-bad",
            "app@sha256:zz",
            "a//b:1",
        ] {
            assert!(Reference::parse(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn retarget_drops_host_and_adds_prefix() {
        let r = Reference::parse("quay.io/org/app:1.2").unwrap();
        assert_eq!(
            r.retarget("127.0.0.1:5000", "/mirror/").to_string(),
            "127.0.0.1:5000/mirror/org/app:1.2"
        );
        assert_eq!(r.retarget("r:1", "").to_string(), "r:1/org/app:1.2");
    }

    #[test]
    fn bundle_names_become_repositories() {
        assert_eq!(repository_from_bundle_name("My Apps.squashfs"), "my-apps");
        assert_eq!(repository_from_bundle_name("x/haul.tar.zst"), "haul");
        assert_eq!(repository_from_bundle_name("..."), "bundle");
    }
}

/// A target registry given as a URL: `http://127.0.0.1:5000` or `https://reg.example`
/// (the scheme decides TLS; a bare host means https).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    pub https: bool,
    /// `host[:port]`, as it appears in image references.
    pub host: String,
}

impl RegistryUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if url.contains("://") {
            return Err(bad(url, "registry URL scheme must be http or https"));
        } else {
            (true, url)
        };
        let host = rest.trim_end_matches('/');
        if !valid_host(host) {
            return Err(bad(
                url,
                "registry URL must be scheme://host[:port] with no path",
            ));
        }
        Ok(RegistryUrl {
            https,
            host: host.to_string(),
        })
    }
}

#[cfg(test)]
mod registry_url_tests {
    use super::*;

    #[test]
    fn scheme_decides_tls() {
        let r = RegistryUrl::parse("http://127.0.0.1:5000/").unwrap();
        assert!(!r.https);
        assert_eq!(r.host, "127.0.0.1:5000");
        assert!(RegistryUrl::parse("reg.example").unwrap().https);
        assert!(RegistryUrl::parse("ftp://x").is_err());
        assert!(RegistryUrl::parse("http://x/v2/").is_err());
    }
}

/// A URL as it may be shown in logs, status and errors: without credentials
/// (`user:pass@`), query or fragment, which often carry tokens.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// Only `scheme://host[:port]` of `url`: for URLs whose path may be their secret
/// (Slack, Teams and Discord webhooks put the token there), in logs, spans, status and
/// events.
pub fn url_origin(url: &str) -> String {
    let redacted = redact_url(url);
    let (scheme, rest) = redacted.split_once("://").unwrap_or(("", &redacted));
    let host = rest.split('/').next().unwrap_or_default();
    if scheme.is_empty() {
        host.to_string()
    } else {
        format!("{scheme}://{host}")
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn credentials_and_queries_never_show() {
        assert_eq!(
            super::redact_url("https://u:p@hooks.example:8443/a/b?token=x#f"),
            "https://hooks.example:8443/a/b"
        );
        assert_eq!(super::redact_url("http://h/x"), "http://h/x");
        assert_eq!(
            super::url_origin("https://u:p@hooks.slack.com:443/services/T0/B0/secret?x=1"),
            "https://hooks.slack.com:443"
        );
        assert_eq!(super::url_origin("http://h"), "http://h");
    }
}
