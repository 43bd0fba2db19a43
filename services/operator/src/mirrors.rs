//! After a bundle's images land, the cluster resources that make the cluster use them:
//! an `ImageDigestMirrorSet` (config.openshift.io/v1) mapping each source repository,
//! or a whole namespace when every repository of it landed side by side, to where it
//! landed; an `ImageTagMirrorSet` only when asked (applying one drains and reboots
//! nodes); a `CatalogSource` for each operator catalog image.
//!
//! Mirror sets are named after the bundle (its name and id), so each bundle gets new
//! ones: an existing mirror set is never edited in place (editing one reboots nodes).
//! A CatalogSource is named after the catalog and its tag, so a newer bundle of the
//! same catalog moves it to the new digest. Everything is labelled
//! `app.kubernetes.io/managed-by: shipperd` and `shipperd.io/bundle: <short id>`.
//! Images named without a registry host (registry storage trees keep none; a bundle's
//! tag-only names) have no source to mirror: they are left out, and said so.

use std::collections::BTreeMap;

use serde::Serialize;
use shipperd_model::{Digest, Reference};

/// The label an operator catalog (file-based catalog) image carries in its config.
pub const CATALOG_LABEL: &str = "operators.operatorframework.io.index.configs.v1";
/// Where OLM looks for cluster-wide CatalogSources.
pub const MARKETPLACE: &str = "openshift-marketplace";

/// One image of a published bundle: where it came from, where it landed.
#[derive(Debug, Clone)]
pub struct Landed {
    pub source: Reference,
    pub target: Reference,
    pub digest: Digest,
    /// Its config carries [`CATALOG_LABEL`].
    pub catalog: bool,
}

/// The generated resources of one bundle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterResources {
    pub digest_mirror_set: Option<MirrorSet>,
    pub tag_mirror_set: Option<MirrorSet>,
    pub catalog_sources: Vec<CatalogSource>,
    /// Images left out, and why.
    pub left_out: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// `ImageDigestMirrorSet` or `ImageTagMirrorSet`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSet {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Meta,
    pub spec: BTreeMap<&'static str, Vec<Mirror>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    pub source: String,
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogSource {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Meta,
    pub spec: CatalogSourceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogSourceSpec {
    pub source_type: &'static str,
    /// By digest: what was published, whatever the tag does later.
    pub image: String,
    pub display_name: String,
    pub publisher: &'static str,
}

impl ClusterResources {
    /// Every resource, as one YAML stream.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let mut doc = |v: &dyn erased::Yaml| {
            out.push_str("---\n");
            out.push_str(&v.yaml());
        };
        if let Some(m) = &self.digest_mirror_set {
            doc(m);
        }
        if let Some(m) = &self.tag_mirror_set {
            doc(m);
        }
        for c in &self.catalog_sources {
            doc(c);
        }
        out
    }
}

mod erased {
    pub trait Yaml {
        fn yaml(&self) -> String;
    }
    impl<T: serde::Serialize> Yaml for T {
        fn yaml(&self) -> String {
            serde_yaml::to_string(self).expect("a resource serialises")
        }
    }
}

/// A DNS label from `s` (lowercase alphanumerics and `-`, at most `max` long, alphanumeric
/// at both ends).
fn slug(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(max).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn repo_of(r: &Reference) -> Option<String> {
    r.host.as_ref().map(|h| format!("{h}/{}", r.repository))
}

/// Splits `a/b/c` into (`a/b`, `c`).
fn parent(repo: &str) -> Option<(&str, &str)> {
    repo.rsplit_once('/')
}

/// The resources for bundle `name` (id `id`) whose images landed as `images`; an
/// `ImageTagMirrorSet` too when `with_tags`.
pub fn cluster_resources(
    name: &str,
    id: &str,
    images: &[Landed],
    with_tags: bool,
) -> ClusterResources {
    let short = &id[..id.len().min(12)];
    let base = format!("shipperd-{}-{short}", slug(name, 40));
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "shipperd".to_string(),
        ),
        ("shipperd.io/bundle".to_string(), short.to_string()),
    ]);
    let annotations = BTreeMap::from([
        ("shipperd.io/bundle-id".to_string(), id.to_string()),
        ("shipperd.io/bundle-name".to_string(), name.to_string()),
    ]);
    let mut out = ClusterResources::default();

    // Source repository → where it landed (one each: the mapping is a function).
    let mut repos: BTreeMap<String, String> = BTreeMap::new();
    for img in images {
        match (repo_of(&img.source), repo_of(&img.target)) {
            (Some(src), Some(dst)) => {
                repos.insert(src, dst);
            }
            _ => out.left_out.push(format!(
                "{}: named without a registry host, so there is no source to mirror",
                img.source
            )),
        }
    }
    // A namespace whose repositories (two or more) all landed side by side under one
    // namespace is mirrored as a whole.
    let mut by_parent: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (src, dst) in &repos {
        if let Some((ns, leaf)) = parent(src) {
            by_parent.entry(ns).or_default().push((leaf, dst));
        }
    }
    let mut mirrors: BTreeMap<String, String> = BTreeMap::new();
    let mut collapsed: Vec<&str> = Vec::new();
    for (ns, members) in &by_parent {
        let targets: Vec<Option<&str>> = members
            .iter()
            .map(|(leaf, dst)| parent(dst).and_then(|(dns, dleaf)| (dleaf == *leaf).then_some(dns)))
            .collect();
        let same = targets[0].is_some() && targets.iter().all(|t| *t == targets[0]);
        // A namespace that is only a host (`quay.io`) is never mirrored whole.
        if members.len() >= 2 && same && ns.contains('/') {
            mirrors.insert(ns.to_string(), targets[0].unwrap_or_default().to_string());
            collapsed.push(ns);
        }
    }
    for (src, dst) in &repos {
        let whole = parent(src).is_some_and(|(ns, _)| collapsed.contains(&ns));
        if !whole {
            mirrors.insert(src.clone(), dst.clone());
        }
    }
    let list: Vec<Mirror> = mirrors
        .into_iter()
        .map(|(source, to)| Mirror {
            source,
            mirrors: vec![to],
        })
        .collect();
    if !list.is_empty() {
        let set = |kind: &'static str, key: &'static str| MirrorSet {
            api_version: "config.openshift.io/v1",
            kind,
            metadata: Meta {
                name: base.clone(),
                namespace: None,
                labels: labels.clone(),
                annotations: annotations.clone(),
            },
            spec: BTreeMap::from([(key, list.clone())]),
        };
        out.digest_mirror_set = Some(set("ImageDigestMirrorSet", "imageDigestMirrors"));
        if with_tags {
            out.tag_mirror_set = Some(set("ImageTagMirrorSet", "imageTagMirrors"));
        }
    }

    for img in images.iter().filter(|i| i.catalog) {
        let Some(dst) = repo_of(&img.target) else {
            continue;
        };
        let leaf = img.source.repository.rsplit('/').next().unwrap_or_default();
        let tag = img.source.tag.as_deref().unwrap_or("");
        out.catalog_sources.push(CatalogSource {
            api_version: "operators.coreos.com/v1alpha1",
            kind: "CatalogSource",
            metadata: Meta {
                name: format!("shipperd-{}", slug(&format!("{leaf}-{tag}"), 53)),
                namespace: Some(MARKETPLACE.into()),
                labels: labels.clone(),
                annotations: annotations.clone(),
            },
            spec: CatalogSourceSpec {
                source_type: "grpc",
                image: format!("{dst}@{}", img.digest),
                display_name: img.source.to_string(),
                publisher: "ShipperD",
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_dns_labels() {
        assert_eq!(
            slug("Mirror_Seq2--000000.tar", 40),
            "mirror-seq2-000000-tar"
        );
        assert_eq!(slug("--a--", 40), "a");
        assert_eq!(slug("abc-def", 4), "abc");
    }
}
