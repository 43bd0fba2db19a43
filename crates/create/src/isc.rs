//! `--config FILE`: an oc-mirror v2 `ImageSetConfiguration`, the file OpenShift sites
//! already keep. Read: `mirror.additionalImages` (by tag or digest), `mirror.operators`
//! (a catalog image, and its packages with channels and min/max versions, resolved
//! from the catalog's file-based catalog by [`crate::fbc`]), and
//! `mirror.blockedImages` (left out). `mirror.platform` (releases) and `mirror.helm`
//! are refused with a clear message rather than silently skipped.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result, list};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    kind: Option<String>,
    api_version: Option<String>,
    #[serde(default)]
    mirror: Mirror,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mirror {
    #[serde(default)]
    platform: Option<serde_yaml::Value>,
    #[serde(default)]
    helm: Option<serde_yaml::Value>,
    #[serde(default)]
    operators: Vec<Operator>,
    #[serde(default)]
    additional_images: Vec<Named>,
    #[serde(default)]
    blocked_images: Vec<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Operator {
    catalog: String,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    packages: Vec<PackageSpec>,
}

/// One package of a catalog, as the configuration asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageSpec {
    pub name: String,
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub max_version: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    pub name: String,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub max_version: Option<String>,
}

/// One operator catalog to carry and resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSpec {
    pub catalog: shipperd_model::Reference,
    /// Every bundle of every package (`full: true`).
    pub full: bool,
    /// Empty: every package (the head of its default channel, unless `full`).
    pub packages: Vec<PackageSpec>,
}

/// What an `ImageSetConfiguration` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSet {
    pub images: Vec<list::Wanted>,
    pub catalogs: Vec<CatalogSpec>,
    /// Repositories (`host/repo`, from `blockedImages`) never carried.
    pub blocked: Vec<String>,
}

/// The largest configuration read.
const MAX_CONFIG: u64 = 4 << 20;

impl ImageSet {
    pub fn read_file(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len > MAX_CONFIG {
            return Err(Error::Input(format!(
                "{} is {len} bytes; an ImageSetConfiguration of more than {MAX_CONFIG} is not read",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let c: Config = serde_yaml::from_str(text)
            .map_err(|e| Error::Input(format!("not YAML of an ImageSetConfiguration: {e}")))?;
        if c.kind
            .as_deref()
            .is_some_and(|k| k != "ImageSetConfiguration")
        {
            return Err(Error::Input(format!(
                "kind {:?}: an ImageSetConfiguration is read",
                c.kind.unwrap_or_default()
            )));
        }
        if let Some(v) = &c.api_version
            && !v.starts_with("mirror.openshift.io/")
        {
            return Err(Error::Input(format!(
                "apiVersion {v:?}: mirror.openshift.io/v2alpha1 is read"
            )));
        }
        if c.mirror.platform.is_some() {
            return Err(Error::Input(
                "mirror.platform (OpenShift releases) is not carried by shipperd create yet: \
                 list the release images in additionalImages, or make that part with oc-mirror"
                    .into(),
            ));
        }
        if c.mirror.helm.is_some() {
            return Err(Error::Input(
                "mirror.helm (charts) is not carried by shipperd create".into(),
            ));
        }
        let mut set = ImageSet::default();
        for n in &c.mirror.blocked_images {
            let r = list::full_reference(&n.name)
                .or_else(|_| list::full_reference(&format!("{}:x", n.name)))
                .map_err(|e| Error::Input(format!("blockedImages {}: {e}", n.name)))?;
            set.blocked.push(repository_of(&r));
        }
        for n in &c.mirror.additional_images {
            let r = list::full_reference(&n.name)
                .map_err(|e| Error::Input(format!("additionalImages {}: {e}", n.name)))?;
            let w = list::Wanted::Registry(r);
            if !set.images.contains(&w) {
                set.images.push(w);
            }
        }
        for op in c.mirror.operators {
            let catalog = list::full_reference(&op.catalog)
                .map_err(|e| Error::Input(format!("operators catalog {}: {e}", op.catalog)))?;
            for p in &op.packages {
                if p.name.is_empty() {
                    return Err(Error::Input(format!(
                        "catalog {catalog}: a package without a name"
                    )));
                }
                for v in [&p.min_version, &p.max_version]
                    .into_iter()
                    .chain(
                        p.channels
                            .iter()
                            .flat_map(|c| [&c.min_version, &c.max_version]),
                    )
                    .flatten()
                {
                    version(v).map_err(|e| {
                        Error::Input(format!("catalog {catalog}, package {}: {e}", p.name))
                    })?;
                }
            }
            set.catalogs.push(CatalogSpec {
                catalog,
                full: op.full,
                packages: op.packages,
            });
        }
        Ok(set)
    }

    /// Is `r` in a blocked repository?
    pub fn is_blocked(&self, r: &shipperd_model::Reference) -> bool {
        let repo = repository_of(r);
        self.blocked.contains(&repo)
    }
}

/// A version as `opm` compares them (semver; a leading `v` and a missing patch taken).
pub fn version(s: &str) -> std::result::Result<semver::Version, String> {
    let t = s.trim().trim_start_matches('v');
    semver::Version::parse(t)
        .or_else(|_| semver::Version::parse(&format!("{t}.0")))
        .map_err(|e| format!("version {s:?} is not semver: {e}"))
}

/// `host/repository` of a full reference.
pub fn repository_of(r: &shipperd_model::Reference) -> String {
    format!(
        "{}/{}",
        r.host.as_deref().unwrap_or("docker.io"),
        r.repository
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_set_configuration_is_read_as_oc_mirror_reads_it() {
        let set = ImageSet::parse(
            r#"
kind: ImageSetConfiguration
apiVersion: mirror.openshift.io/v2alpha1
mirror:
  operators:
  - catalog: registry.example.com/redhat/redhat-operator-index:v4.16
    packages:
    - name: aws-load-balancer-operator
      channels:
      - name: stable-v1
        minVersion: 1.1.0
        maxVersion: 1.2.0
    - name: cluster-logging
  additionalImages:
  - name: registry.redhat.io/ubi8/ubi:latest
  - name: ubuntu
  blockedImages:
  - name: registry.redhat.io/ubi8/ubi-minimal
"#,
        )
        .unwrap();
        assert_eq!(set.images.len(), 2);
        assert_eq!(
            set.images[1],
            list::Wanted::Registry(
                list::full_reference("docker.io/library/ubuntu:latest").unwrap()
            )
        );
        assert_eq!(set.catalogs.len(), 1);
        let c = &set.catalogs[0];
        assert_eq!(
            c.packages[0].channels[0].min_version.as_deref(),
            Some("1.1.0")
        );
        assert!(c.packages[1].channels.is_empty());
        assert!(
            set.is_blocked(&list::full_reference("registry.redhat.io/ubi8/ubi-minimal:8").unwrap())
        );
        assert!(!set.is_blocked(&list::full_reference("registry.redhat.io/ubi8/ubi:8").unwrap()));

        let refused = |text: &str| ImageSet::parse(text).unwrap_err().to_string();
        assert!(
            refused("kind: ImageSetConfiguration\nmirror:\n  platform:\n    channels: []\n")
                .contains("mirror.platform")
        );
        assert!(refused("kind: Pod\n").contains("kind"));
        assert!(refused(
            "mirror:\n  operators:\n  - catalog: a.example/c:1\n    packages:\n    - name: p\n      minVersion: one\n"
        )
        .contains("package p"));
    }
}
