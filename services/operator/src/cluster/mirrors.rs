//! After bundles' images land, the cluster resources that make the cluster use them,
//! as oc-mirror v2 writes them (`internal/pkg/clusterresources/`), so that a site moving
//! between the two tools gets the same objects, not duplicates:
//!
//! - `ImageDigestMirrorSet`s `idms-<category>-0` and `ImageTagMirrorSet`s
//!   `itms-<category>-0`, one per category (`release`: OpenShift release payloads and
//!   their components; `operator`: the images of a bundle that carries an operator
//!   catalog; `generic`: the rest). An image named by digest (alone or with a tag), and
//!   any release image, goes to the IDMS; an image named by tag goes to the ITMS. A
//!   mirror is scoped to the source's namespace when the image landed under the same
//!   path (`quay.io/a/b/c` at `reg/x/a/b/c`: `quay.io/a/b` → `reg/x/a/b`), else to its
//!   repository. Catalog and graph images are in no mirror set.
//! - A `CatalogSource` `cs-<repository>-<tag, or 12 hex digits of the digest>` in
//!   `openshift-marketplace` for each operator catalog image (`sourceType: grpc`, the
//!   image as it landed).
//! - An `UpdateService` `update-service-oc-mirror` in `openshift-update-service` when a
//!   bundle carries the graph data image (`openshift/graph-image`) and a release.
//!
//! [`Gathered`] takes the images of every published bundle (oldest first: a later
//! bundle's catalog of the same name wins) and gives the one set of objects they need;
//! the operator applies it and removes what no published bundle needs any more
//! ([`crate::cluster`]). Everything is labelled `app.kubernetes.io/managed-by:
//! shipperd`. Images named without a registry host (registry storage trees keep none; a
//! bundle's tag-only names) have no source to mirror: they are left out, and said so.
//! - The ConfigMap `mirrored-release-signatures` in `openshift-config-managed` (label
//!   `release.openshift.io/verification-signatures`) with the release signatures the
//!   bundles carry (oc-mirror's `working-dir/signatures/`, which unpack keeps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
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

/// Generated resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterResources {
    pub digest_mirror_sets: Vec<MirrorSet>,
    pub tag_mirror_sets: Vec<MirrorSet>,
    pub catalog_sources: Vec<CatalogSource>,
    pub update_service: Option<UpdateService>,
    pub signatures: Option<SignatureConfigMap>,
    /// Images left out, and why.
    pub left_out: Vec<String>,
}

/// The ConfigMap of release signatures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureConfigMap {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Meta,
    pub binary_data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateService {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Meta,
    pub spec: UpdateServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateServiceSpec {
    pub replicas: u32,
    /// The release repository (no tag).
    pub releases: String,
    pub graph_data_image: String,
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
    /// As it landed: by tag when it was named by tag (as oc-mirror), else by digest.
    pub image: String,
}

impl ClusterResources {
    /// Every resource, as one YAML stream.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let mut doc = |v: &dyn erased::Yaml| {
            out.push_str("---\n");
            out.push_str(&v.yaml());
        };
        for m in self.digest_mirror_sets.iter().chain(&self.tag_mirror_sets) {
            doc(m);
        }
        for c in &self.catalog_sources {
            doc(c);
        }
        if let Some(u) = &self.update_service {
            doc(u);
        }
        if let Some(c) = &self.signatures {
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

/// oc-mirror's mirror categories, each its own IDMS and ITMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Release,
    Operator,
    Generic,
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Release => "release",
            Category::Operator => "operator",
            Category::Generic => "generic",
        }
    }
}

/// The repository of OpenShift's update graph data image, as oc-mirror builds it.
const GRAPH_IMAGE: &str = "openshift/graph-image";
/// Where OpenShift release payloads and their components come from.
const RELEASE_NAMESPACE: &str = "openshift-release-dev/";
const RELEASE_REPOSITORY: &str = "openshift-release-dev/ocp-release";

/// `source → mirrors` of one mirror set.
type MirrorMap = BTreeMap<String, Vec<String>>;

/// What published bundles need of the cluster, gathered bundle by bundle (and kept, per
/// bundle, as JSON: see [`crate::cluster`]).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gathered {
    digest: BTreeMap<Category, MirrorMap>,
    tag: BTreeMap<Category, MirrorMap>,
    /// CatalogSource name → the catalog image as it landed.
    catalogs: BTreeMap<String, String>,
    /// The release repository as it landed, and the graph image.
    release: Option<String>,
    graph: Option<String>,
    /// Release signatures the bundles carry: the signed digest's hex → the signature
    /// (base64).
    #[serde(default)]
    signatures: BTreeMap<String, String>,
    /// Images left out, and why.
    #[serde(skip)]
    pub left_out: Vec<String>,
}

fn add_mirror(map: &mut MirrorMap, source: String, mirror: String) {
    let mirrors = map.entry(source).or_default();
    if !mirrors.contains(&mirror) {
        mirrors.push(mirror);
    }
}

/// oc-mirror's scope: the source's namespace when the image landed under the same path,
/// else its repository; (source, mirror).
fn scope(src_host: &str, src: &str, dst_host: &str, dst: &str) -> (String, String) {
    let same_path = dst == src || dst.ends_with(&format!("/{src}"));
    let ns = |host: &str, repo: &str| match repo.rsplit_once('/') {
        Some((ns, _)) => format!("{host}/{ns}"),
        None => host.to_string(),
    };
    if same_path {
        (ns(src_host, src), ns(dst_host, dst))
    } else {
        (format!("{src_host}/{src}"), format!("{dst_host}/{dst}"))
    }
}

impl Gathered {
    /// Adds the images of one bundle (`has_catalog`: it carries an operator catalog, so
    /// its other images, releases aside, are operators'; `with_tags`: its images named by
    /// tag go to ImageTagMirrorSets).
    pub fn add_bundle(
        &mut self,
        images: impl IntoIterator<Item = Landed>,
        has_catalog: bool,
        with_tags: bool,
    ) {
        for img in images {
            self.add(img, has_catalog, with_tags);
        }
    }

    fn add(&mut self, img: Landed, has_catalog: bool, with_tags: bool) {
        let (Some(src_host), Some(dst_host)) = (&img.source.host, &img.target.host) else {
            self.left_out.push(format!(
                "{}: named without a registry host, so there is no source to mirror",
                img.source
            ));
            return;
        };
        let (src, dst) = (&img.source.repository, &img.target.repository);
        let landed = match &img.source.tag {
            Some(t) => format!("{dst_host}/{dst}:{t}"),
            None => format!("{dst_host}/{dst}@{}", img.digest),
        };
        if img.catalog {
            let leaf = dst.rsplit('/').next().unwrap_or(dst);
            let suffix = match (&img.source.tag, &img.source.digest) {
                (Some(t), _) => slug(&t.chars().take(12).collect::<String>(), 12),
                (None, Some(d)) => d.hex().chars().take(12).collect(),
                (None, None) => String::new(),
            };
            let suffix = if suffix.is_empty() {
                "0".into()
            } else {
                suffix
            };
            let name = slug(&format!("cs-{leaf}-{suffix}"), 63);
            self.catalogs.insert(name, landed);
            return;
        }
        if src == GRAPH_IMAGE || src.ends_with(&format!("/{GRAPH_IMAGE}")) {
            self.graph = Some(landed);
            return;
        }
        let category = if src.starts_with(RELEASE_NAMESPACE) {
            Category::Release
        } else if has_catalog {
            Category::Operator
        } else {
            Category::Generic
        };
        if src == RELEASE_REPOSITORY {
            self.release = Some(format!("{dst_host}/{dst}"));
        }
        let (source, mirror) = scope(src_host, src, dst_host, dst);
        if img.source.digest.is_some() || category == Category::Release {
            add_mirror(
                self.digest.entry(category).or_default(),
                source.clone(),
                mirror.clone(),
            );
        }
        if with_tags && img.source.tag.is_some() {
            add_mirror(self.tag.entry(category).or_default(), source, mirror);
        }
    }

    /// Whether nothing is needed.
    pub fn is_empty(&self) -> bool {
        self.digest.values().all(BTreeMap::is_empty)
            && self.tag.values().all(BTreeMap::is_empty)
            && self.catalogs.is_empty()
            && self.graph.is_none()
            && self.signatures.is_empty()
    }

    /// Adds release signatures: files `<tag>-sha256-<hex>` (as oc-mirror's
    /// `working-dir/signatures/`).
    pub fn add_signatures<'a>(&mut self, files: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        use base64::Engine as _;
        for (name, bytes) in files {
            if let Some((_, hex)) = name.rsplit_once("-sha256-") {
                self.signatures.insert(
                    hex.to_string(),
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                );
            }
        }
    }

    /// The objects, labelled.
    pub fn resources(&self) -> ClusterResources {
        let meta = |name: String, namespace: Option<&str>| Meta {
            name,
            namespace: namespace.map(str::to_string),
            labels: BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "shipperd".to_string(),
            )]),
            annotations: BTreeMap::from([("createdBy".to_string(), "shipperd".to_string())]),
        };
        let sets = |maps: &BTreeMap<Category, MirrorMap>, kind: &'static str, prefix: &str, key| {
            maps.iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(c, m)| MirrorSet {
                    api_version: "config.openshift.io/v1",
                    kind,
                    metadata: meta(format!("{prefix}-{}-0", c.name()), None),
                    spec: BTreeMap::from([(
                        key,
                        m.iter()
                            .map(|(source, mirrors)| Mirror {
                                source: source.clone(),
                                mirrors: mirrors.clone(),
                            })
                            .collect(),
                    )]),
                })
                .collect::<Vec<_>>()
        };
        ClusterResources {
            digest_mirror_sets: sets(
                &self.digest,
                "ImageDigestMirrorSet",
                "idms",
                "imageDigestMirrors",
            ),
            tag_mirror_sets: sets(&self.tag, "ImageTagMirrorSet", "itms", "imageTagMirrors"),
            catalog_sources: self
                .catalogs
                .iter()
                .map(|(name, image)| CatalogSource {
                    api_version: "operators.coreos.com/v1alpha1",
                    kind: "CatalogSource",
                    metadata: meta(name.clone(), Some(MARKETPLACE)),
                    spec: CatalogSourceSpec {
                        source_type: "grpc",
                        image: image.clone(),
                    },
                })
                .collect(),
            update_service: match (&self.graph, &self.release) {
                (Some(graph), Some(release)) => Some(UpdateService {
                    api_version: "updateservice.operator.openshift.io/v1",
                    kind: "UpdateService",
                    metadata: meta(UPDATE_SERVICE.into(), Some(UPDATE_SERVICE_NAMESPACE)),
                    spec: UpdateServiceSpec {
                        replicas: 2,
                        releases: release.clone(),
                        graph_data_image: graph.clone(),
                    },
                }),
                _ => None,
            },
            signatures: (!self.signatures.is_empty()).then(|| SignatureConfigMap {
                api_version: "v1",
                kind: "ConfigMap",
                metadata: Meta {
                    labels: BTreeMap::from([
                        (SIGNATURES_LABEL.to_string(), String::new()),
                        (
                            "app.kubernetes.io/managed-by".to_string(),
                            "shipperd".to_string(),
                        ),
                    ]),
                    ..meta(SIGNATURES_CONFIGMAP.into(), Some(SIGNATURES_NAMESPACE))
                },
                // oc-mirror's keys: `sha256-<hex>-<n>`, n from 1.
                binary_data: self
                    .signatures
                    .iter()
                    .zip(1..)
                    .map(|((hex, sig), n)| (format!("sha256-{hex}-{n}"), sig.clone()))
                    .collect(),
            }),
            left_out: self.left_out.clone(),
        }
    }
}

/// A bundle's contribution that did not go in whole, and why: another namespace's
/// bundle (or something ShipperD did not make) holds what it asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The bundle that lost (`<namespace>/<name>`).
    pub bundle: String,
    pub message: String,
}

/// Every applying bundle's contribution, merged in the order the bundles were received.
/// Each entry (a source's mirrors, a CatalogSource, the release, the graph image, a
/// release signature) belongs to the namespace whose bundle brought it first: a later
/// bundle of the same namespace may change it (its own Day-2 update), another
/// namespace's may add to mirrors only what is there already, and replaces nothing.
#[derive(Debug, Default)]
pub struct Merged {
    pub all: Gathered,
    /// Entry → (owning namespace, the bundle that set it).
    owners: BTreeMap<String, (String, String)>,
    pub conflicts: Vec<Conflict>,
}

impl Merged {
    /// May `bundle` (of namespace `owner`) set entry `key` (`what`, for people)? `same`:
    /// what it would set is there already.
    fn claim(&mut self, key: String, owner: &str, bundle: &str, same: bool, what: String) -> bool {
        match self.owners.get(&key) {
            Some((o, _)) if o != owner && !same => {
                let (_, holder) = &self.owners[&key];
                self.conflicts.push(Conflict {
                    bundle: bundle.to_string(),
                    message: format!(
                        "{what} is Bundle {holder}'s (namespace {o}); Bundle {bundle}'s is not \
                         applied: another namespace's cluster resources are never replaced"
                    ),
                });
                false
            }
            Some((o, _)) if o != owner => true,
            _ => {
                self.owners
                    .insert(key, (owner.to_string(), bundle.to_string()));
                true
            }
        }
    }

    /// The mirrors of `source` merged so far, whatever the kind and category.
    fn mirrors_of(&self, source: &str) -> Vec<&String> {
        self.all
            .digest
            .values()
            .chain(self.all.tag.values())
            .filter_map(|m| m.get(source))
            .flatten()
            .collect()
    }

    /// Adds the contribution of `bundle`, of namespace `owner`, received after those
    /// added before.
    pub fn add(&mut self, owner: &str, bundle: &str, later: Gathered) {
        for (tags, theirs) in [(false, later.digest), (true, later.tag)] {
            for (c, map) in theirs {
                for (source, mirrors) in map {
                    let there = self.mirrors_of(&source);
                    let same = mirrors.iter().all(|m| there.contains(&m));
                    let what = format!("the mirror of {source}");
                    if self.claim(format!("mirror:{source}"), owner, bundle, same, what) {
                        let to = if tags {
                            &mut self.all.tag
                        } else {
                            &mut self.all.digest
                        };
                        let to = to.entry(c).or_default();
                        for m in mirrors {
                            add_mirror(to, source.clone(), m);
                        }
                    }
                }
            }
        }
        for (name, image) in later.catalogs {
            let same = self.all.catalogs.get(&name) == Some(&image);
            let what = format!("CatalogSource {name} ({image})");
            if self.claim(format!("catalog:{name}"), owner, bundle, same, what) {
                self.all.catalogs.insert(name, image);
            }
        }
        if let Some(r) = later.release {
            let same = self.all.release.as_ref() == Some(&r);
            if self.claim(
                "release".into(),
                owner,
                bundle,
                same,
                format!("the release ({r})"),
            ) {
                self.all.release = Some(r);
            }
        }
        if let Some(g) = later.graph {
            let same = self.all.graph.as_ref() == Some(&g);
            let what = format!("the UpdateService's graph image ({g})");
            if self.claim("graph".into(), owner, bundle, same, what) {
                self.all.graph = Some(g);
            }
        }
        for (hex, sig) in later.signatures {
            let same = self.all.signatures.get(&hex) == Some(&sig);
            let what = format!("the release signature of sha256:{hex}");
            if self.claim(format!("signature:{hex}"), owner, bundle, same, what) {
                self.all.signatures.insert(hex, sig);
            }
        }
        self.all.left_out.extend(later.left_out);
    }
}

/// Where OpenShift reads mirrored release signatures, as oc-mirror writes them.
pub const SIGNATURES_CONFIGMAP: &str = "mirrored-release-signatures";
pub const SIGNATURES_NAMESPACE: &str = "openshift-config-managed";
pub const SIGNATURES_LABEL: &str = "release.openshift.io/verification-signatures";

/// The UpdateService's name and namespace, as oc-mirror's.
pub const UPDATE_SERVICE: &str = "update-service-oc-mirror";
pub const UPDATE_SERVICE_NAMESPACE: &str = "openshift-update-service";

/// The resources of one bundle alone (what its ConfigMap shows); ImageTagMirrorSets only
/// `with_tags`.
pub fn cluster_resources(images: &[Landed], with_tags: bool) -> ClusterResources {
    let mut g = Gathered::default();
    let has_catalog = images.iter().any(|i| i.catalog);
    g.add_bundle(images.iter().cloned(), has_catalog, with_tags);
    g.resources()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn landed(source: &str, target: &str, catalog: bool) -> Landed {
        Landed {
            source: Reference::parse(source).unwrap(),
            target: Reference::parse(target).unwrap(),
            digest: Digest::parse(&format!("sha256:{}", "c".repeat(64))).unwrap(),
            catalog,
        }
    }

    fn gathered(images: &[Landed]) -> Gathered {
        let mut g = Gathered::default();
        g.add_bundle(
            images.iter().cloned(),
            images.iter().any(|i| i.catalog),
            true,
        );
        g
    }

    #[test]
    fn another_namespaces_cluster_resources_are_never_replaced() {
        let reg = "image-registry.openshift-image-registry.svc:5000";
        let a = gathered(&[
            landed(
                "registry.redhat.io/redhat/redhat-operator-index:v4.16",
                &format!("{reg}/team-a/redhat-operator-index:v4.16"),
                true,
            ),
            landed("quay.io/org/app:1", &format!("{reg}/team-a/app:1"), false),
        ]);
        // team-b: a catalog named like team-a's, and another mirror for its source.
        let b = gathered(&[
            landed(
                "evil.example/x/redhat-operator-index:v4.16",
                &format!("{reg}/team-b/redhat-operator-index:v4.16"),
                true,
            ),
            landed("quay.io/org/app:1", &format!("{reg}/team-b/app:1"), false),
            landed(
                "quay.io/team-b/tool:1",
                &format!("{reg}/team-b/tool:1"),
                false,
            ),
        ]);
        let mut m = Merged::default();
        m.add("team-a", "team-a/a1", a.clone());
        m.add("team-b", "team-b/b1", b);
        let res = m.all.resources();
        let cs = &res.catalog_sources;
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].metadata.name, "cs-redhat-operator-index-v4-16");
        assert!(cs[0].spec.image.contains("/team-a/"), "{cs:?}");
        let messages: Vec<&str> = m.conflicts.iter().map(|c| c.message.as_str()).collect();
        assert_eq!(m.conflicts.len(), 2, "{messages:#?}");
        assert!(m.conflicts.iter().all(|c| c.bundle == "team-b/b1"));
        assert!(
            messages[1].starts_with("CatalogSource cs-redhat-operator-index-v4-16")
                && messages[1].contains("Bundle team-a/a1's (namespace team-a)"),
            "{messages:#?}"
        );
        assert!(
            messages[0].starts_with("the mirror of quay.io/org/app is Bundle team-a/a1's"),
            "{messages:#?}"
        );
        // team-b's own source is mirrored; team-a's keeps its one mirror.
        let itms = &res.tag_mirror_sets;
        let yaml = serde_json::to_string(itms).unwrap();
        assert!(yaml.contains("quay.io/team-b"), "{yaml}");
        assert!(!yaml.contains("team-b/app"), "{yaml}");
        // team-a's own later bundle may change what team-a set.
        let a2 = gathered(&[landed(
            "registry.redhat.io/redhat/redhat-operator-index:v4.16",
            &format!("{reg}/team-a-next/redhat-operator-index:v4.16"),
            true,
        )]);
        m.add("team-a", "team-a/a2", a2);
        let cs = m.all.resources().catalog_sources;
        assert_eq!(cs.len(), 1);
        assert!(cs[0].spec.image.contains("/team-a-next/"), "{cs:?}");
        assert_eq!(m.conflicts.len(), 2);
        // The same again from another namespace is no conflict.
        m.add("team-c", "team-c/c1", a);
        assert_eq!(m.conflicts.len(), 2 + 1, "only the catalog differs now");
    }

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
