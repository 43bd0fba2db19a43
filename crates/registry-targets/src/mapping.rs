//! Where a source image lands in a target registry. The digest never changes; only the
//! repository path does, in this order:
//!
//! 1. **renames**: the first rule whose `from` equals the source repository, or is a
//!    leading part of it (whole path components), replaces that part with `to`
//!    (`openshift/release` → `ocp/release` also turns `openshift/release/x` into
//!    `ocp/release/x`);
//! 2. **keep_host**: the source registry host becomes the first path component
//!    (`quay.io/org/app` → `quay.io/org/app`; a `:port` becomes `-port`); by default the
//!    host is dropped (`org/app`);
//! 3. **prefix** goes in front (`mirror/org/app`); `{namespace}` in it is the namespace
//!    the bundle belongs to (the `Bundle`'s, or `upload_namespace` for what came through
//!    the ingest endpoint), so a shared target lands each tenant's images in its own
//!    project (`{namespace}` at depth 2 on OpenShift: `team-a/org-app`);
//! 4. **max_depth** (for registries that cap path depth: OpenShift's `namespace/name` is
//!    2, Quay's `org/repo` is 2): when the path has more components than that, the first
//!    `max_depth - 1` are kept and the rest are joined with `-`
//!    (`mirror/quay.io/org/app` at depth 2 → `mirror/quay.io-org-app`).
//!
//! Flattening can make two sources meet (`a/b-c` and `a/b/c`); unpack refuses a bundle
//! in which two different images would land on the same tag.

use serde::{Deserialize, Serialize};
use shipperd_model::{Reference, reference::valid_component};

use crate::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_host: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<usize>,
    #[serde(default, rename = "rename", skip_serializing_if = "Vec::is_empty")]
    pub renames: Vec<Rename>,
    /// What `{namespace}` in `prefix` is for a bundle no `Bundle` brought in (the
    /// operator's upload namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_namespace: Option<String>,
}

/// In a prefix: the namespace the bundle belongs to.
pub const NAMESPACE: &str = "{namespace}";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    pub from: String,
    pub to: String,
}

/// Longest repository name registries accept.
const MAX_REPOSITORY: usize = 255;

fn check_path(what: &str, path: &str, empty_ok: bool) -> Result<()> {
    if path.is_empty() && empty_ok {
        return Ok(());
    }
    if !path.split('/').all(valid_component) {
        return Err(Error::Mapping(format!(
            "{what} {path:?}: path components must be lowercase letters, digits and . _ -"
        )));
    }
    Ok(())
}

impl Mapping {
    /// Checks the rules once, when the configuration is loaded.
    pub fn validate(&self) -> Result<()> {
        let prefix = self.prefix.trim_matches('/');
        if prefix.contains(NAMESPACE) && !prefix.split('/').any(|c| c == NAMESPACE) {
            return Err(Error::Mapping(format!(
                "prefix {prefix:?}: {NAMESPACE} must be a whole path component"
            )));
        }
        check_path("prefix", &prefix.replace(NAMESPACE, "ns"), true)?;
        if let Some(ns) = &self.upload_namespace {
            check_path("upload_namespace", ns, false)?;
        }
        if self.max_depth == Some(0) {
            return Err(Error::Mapping("max_depth must be at least 1".into()));
        }
        for r in &self.renames {
            check_path("rename from", &r.from, false)?;
            check_path("rename to", &r.to, false)?;
        }
        Ok(())
    }

    /// The repository `source` lands in (without the target's host), for a bundle of no
    /// namespace.
    pub fn repository(&self, source: &Reference) -> Result<String> {
        self.repository_in(source, None)
    }

    /// The repository `source` of a bundle of `namespace` lands in.
    pub fn repository_in(&self, source: &Reference, namespace: Option<&str>) -> Result<String> {
        let mut repo = source.repository.clone();
        if let Some(rule) = self.renames.iter().find(|r| {
            repo == r.from
                || repo
                    .strip_prefix(&r.from)
                    .is_some_and(|rest| rest.starts_with('/'))
        }) {
            repo = format!("{}{}", rule.to, &repo[rule.from.len()..]);
        }
        let mut parts: Vec<String> = Vec::new();
        let mut prefix = self.prefix.trim_matches('/').to_string();
        if prefix.contains(NAMESPACE) {
            let Some(ns) = namespace.or(self.upload_namespace.as_deref()) else {
                return Err(Error::Mapping(format!(
                    "the prefix names {NAMESPACE}, and {source} belongs to no namespace"
                )));
            };
            prefix = prefix.replace(NAMESPACE, ns);
        }
        if !prefix.is_empty() {
            parts.extend(prefix.split('/').map(str::to_string));
        }
        if self.keep_host
            && let Some(host) = &source.host
        {
            parts.push(host.to_ascii_lowercase().replace([':', '[', ']'], "-"));
        }
        parts.extend(repo.split('/').map(str::to_string));
        if let Some(depth) = self.max_depth
            && parts.len() > depth
        {
            let tail = parts.split_off(depth - 1).join("-");
            parts.push(tail);
        }
        let out = parts.join("/");
        if out.len() > MAX_REPOSITORY {
            return Err(Error::Mapping(format!(
                "{source} maps to a repository longer than {MAX_REPOSITORY} characters"
            )));
        }
        check_path("mapped repository", &out, false)?;
        Ok(out)
    }

    /// `source` retargeted: `host/<mapped repository>`, same tag and digest.
    pub fn map(&self, source: &Reference, host: &str) -> Result<Reference> {
        self.map_in(source, host, None)
    }

    /// [`Mapping::map`] for a bundle of `namespace`.
    pub fn map_in(
        &self,
        source: &Reference,
        host: &str,
        namespace: Option<&str>,
    ) -> Result<Reference> {
        Ok(Reference {
            host: Some(host.to_string()),
            repository: self.repository_in(source, namespace)?,
            tag: source.tag.clone(),
            digest: source.digest.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(m: &Mapping, s: &str) -> String {
        m.repository(&Reference::parse(s).unwrap()).unwrap()
    }

    #[test]
    fn default_drops_the_host() {
        let m = Mapping::default();
        assert_eq!(map(&m, "quay.io/org/app:1"), "org/app");
        assert_eq!(map(&m, "library/alpine:3"), "library/alpine");
    }

    #[test]
    fn prefix_and_host() {
        let m = Mapping {
            keep_host: true,
            prefix: "/mirror/".into(),
            ..Default::default()
        };
        assert_eq!(map(&m, "quay.io/org/app:1"), "mirror/quay.io/org/app");
        assert_eq!(map(&m, "localhost:5000/app:1"), "mirror/localhost-5000/app");
        assert_eq!(map(&m, "org/app:1"), "mirror/org/app");
    }

    #[test]
    fn depth_flattens_the_tail() {
        let m = Mapping {
            keep_host: true,
            prefix: "mirror".into(),
            max_depth: Some(2),
            ..Default::default()
        };
        assert_eq!(map(&m, "quay.io/org/app:1"), "mirror/quay.io-org-app");
        assert_eq!(map(&m, "app:1"), "mirror/app");
        let one = Mapping {
            max_depth: Some(1),
            ..Default::default()
        };
        assert_eq!(map(&one, "a/b/c:1"), "a-b-c");
        let three = Mapping {
            max_depth: Some(3),
            ..Default::default()
        };
        assert_eq!(map(&three, "a/b/c/d/e:1"), "a/b/c-d-e");
    }

    #[test]
    fn renames_match_whole_components() {
        let m = Mapping {
            renames: vec![Rename {
                from: "openshift/release".into(),
                to: "ocp/release".into(),
            }],
            ..Default::default()
        };
        assert_eq!(map(&m, "quay.io/openshift/release:4"), "ocp/release");
        assert_eq!(map(&m, "openshift/release/x:4"), "ocp/release/x");
        assert_eq!(
            map(&m, "openshift/release-images:4"),
            "openshift/release-images"
        );
    }

    #[test]
    fn a_namespace_prefix_is_the_bundles_namespace() {
        let m = Mapping {
            prefix: NAMESPACE.into(),
            max_depth: Some(2),
            upload_namespace: Some("shipperd".into()),
            ..Default::default()
        };
        m.validate().unwrap();
        let src = Reference::parse("quay.io/org/app:1").unwrap();
        assert_eq!(
            m.repository_in(&src, Some("team-a")).unwrap(),
            "team-a/org-app"
        );
        assert_eq!(m.repository_in(&src, None).unwrap(), "shipperd/org-app");
        let none = Mapping {
            upload_namespace: None,
            ..m.clone()
        };
        assert!(none.repository_in(&src, None).is_err());
        for bad in ["x{namespace}", "{namespace}-x/y"] {
            let m = Mapping {
                prefix: bad.into(),
                ..Default::default()
            };
            assert!(m.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        let m = Mapping {
            prefix: "Mirror".into(),
            ..Default::default()
        };
        assert!(m.validate().is_err());
        let m = Mapping {
            max_depth: Some(0),
            ..Default::default()
        };
        assert!(m.validate().is_err());
    }
}
