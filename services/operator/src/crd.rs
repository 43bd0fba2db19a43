//! The custom resources. Doc comments become the CRDs' field descriptions (what
//! `kubectl explain` shows), so they are written for the person editing the YAML.

// kube's `printcolumn(...)` arguments repeat (`type_ = "string"`), which clippy takes
// for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every ShipperD resource.
pub const GROUP: &str = "shipperd.io";
/// Their version.
pub const VERSION: &str = "v1alpha1";

#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[kube(
    group = "shipperd.io",
    version = "v1alpha1",
    kind = "Bundle",
    namespaced,
    status = "BundleStatus",
    shortname = "bdl",
    category = "shipperd",
    doc = "A bundle of container images (squashfs, or tar as Koffer, oc-mirror, Hauler and Zarf write) carried into the cluster, and where it is in ShipperD's pipeline.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Images", type_ = "string", json_path = ".status.imagesSummary"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("!(has(self.target) && has(self.clusterTarget))")
        .message("set at most one of target and clusterTarget"),
    validation = kube::core::Rule::new(
        "self.source == oldSelf.source && has(self.target) == has(oldSelf.target) && (!has(self.target) || self.target == oldSelf.target) && has(self.clusterTarget) == has(oldSelf.clusterTarget) && (!has(self.clusterTarget) || self.clusterTarget == oldSelf.clusterTarget)"
    )
    .message("source, target and clusterTarget cannot change: create another Bundle")
)]
/// What bundle this is and where its images go.
pub struct BundleSpec {
    /// Where the bundle's bytes come from: exactly one of `upload`, `url` and `path`.
    pub source: BundleSource,
    /// The `RegistryTarget` of this namespace the images go to. Neither this nor
    /// `clusterTarget`: the cluster's default target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub target: Option<String>,
    /// The `ClusterRegistryTarget` (set up by the cluster's admin) the images go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub cluster_target: Option<String>,
    /// Apply the generated ImageDigestMirrorSet (and, when asked for, ImageTagMirrorSet)
    /// and CatalogSources once the bundle is published. Only for a bundle published
    /// through a `ClusterRegistryTarget` whose `clusterResources.apply` allows it;
    /// otherwise (and when off) they are only written to a ConfigMap beside the Bundle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply_cluster_resources: bool,
    /// Also generate an ImageTagMirrorSet (applying one drains and reboots nodes; the
    /// `ClusterRegistryTarget` must allow `clusterResources.tagMirrorSets`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tag_mirror_set: bool,
}

/// Where a bundle's bytes come from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("[has(self.upload), has(self.url), has(self.path)].filter(x, x).size() == 1")
        .message("set exactly one of upload, url and path")
)]
pub struct BundleSource {
    /// The bundle arrived through ShipperD's ingest endpoint or drop directory; ShipperD
    /// created this object so that every bundle is visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSource>,
    /// ShipperD fetches the bundle from an http(s) URL into its store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
    /// A file already on ShipperD's shared volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathSource>,
}

/// A bundle that came in through the ingest endpoint or the drop directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadSource {
    /// The name it was uploaded or dropped under.
    pub name: String,
    /// The bundle id (the sha256 of its bytes).
    pub bundle_id: String,
}

/// A bundle fetched from an http(s) URL: streamed into the store, resumed with `Range`
/// after a broken connection, checked against `sha256` before anything is published.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// An http or https URL.
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("an http(s) URL"))]
    pub url: String,
    /// The sha256 of the bundle's bytes (64 hex digits), required: the bundle is
    /// refused when its bytes hash to anything else.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// A CA bundle (PEM) to trust for an https URL, beside the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSource>,
}

/// A file on ShipperD's shared volume, in its import directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathSource {
    /// Relative to the namespace's own directory of the operator's import directory
    /// (`<import-dir>/<namespace>/`; `--import-dir`, by default `<data>/import`): no
    /// `..`, no absolute path, no symbolic link on the way.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/]"))]
    pub path: String,
    /// The sha256 the file must have, when known (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// A key of a ConfigMap or a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// The object's name.
    pub name: String,
    /// The key within it.
    pub key: String,
}

/// PEM certificates to trust, from a ConfigMap (e.g. OpenShift's injected service CA)
/// or a Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)")
        .message("set exactly one of configMapKeyRef and secretKeyRef")
)]
pub struct CaSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

/// Where a bundle is in ShipperD's pipeline.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum BundlePhase {
    /// Not in ShipperD's store yet (an upload source ShipperD does not know).
    Pending,
    /// Its URL is being fetched, or its path taken.
    Fetching,
    Received,
    Unpacking,
    Publishing,
    Tagging,
    Published,
    Failed,
}

impl BundlePhase {
    /// Published or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, BundlePhase::Published | BundlePhase::Failed)
    }
}

impl From<shipperd_model::Phase> for BundlePhase {
    fn from(p: shipperd_model::Phase) -> Self {
        use shipperd_model::Phase as P;
        match p {
            P::Received => BundlePhase::Received,
            P::Unpacking => BundlePhase::Unpacking,
            P::Publishing => BundlePhase::Publishing,
            P::Tagging => BundlePhase::Tagging,
            P::Published => BundlePhase::Published,
            P::Failed => BundlePhase::Failed,
        }
    }
}

/// Where a bundle is, as ShipperD's state says.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleStatus {
    /// `Pending` (not yet in ShipperD's store), `Fetching`, `Received`, `Unpacking`,
    /// `Publishing`, `Tagging`, `Published` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BundlePhase>,
    /// The bundle id (the sha256 of its bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    /// Its images and how they ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageCounts>,
    /// `published/total` (with failures), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_summary: Option<String>,
    /// Bytes of its images in the registry so far, and in all.
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// `bytesDone` as a percentage of `bytesTotal`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `Ready` (published) and `Failed`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The ConfigMap holding the generated ImageDigestMirrorSet (ImageTagMirrorSet when
    /// asked) and CatalogSources, once published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_resources: Option<String>,
}

/// How many images a bundle has, and how they ended.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageCounts {
    pub total: u32,
    /// In the registry (skipped ones included).
    pub published: u32,
    /// Of the published, those whose tag already pointed at their digest (Day-2).
    pub skipped: u32,
    pub failed: u32,
}

#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "shipperd.io",
    version = "v1alpha1",
    kind = "RegistryTarget",
    namespaced,
    status = "TargetStatus",
    shortname = "rt",
    category = "shipperd",
    doc = "A registry ShipperD publishes images to.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// A registry images go to: its URL, how image names map into it, credentials, trust
/// and transfer settings.
pub struct RegistryTargetSpec {
    /// The registry's base URL, e.g.
    /// `https://image-registry.openshift-image-registry.svc:5000`. Empty with
    /// `openshiftInternal`: that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// OpenShift's internal registry: its service URL, ShipperD's service-account
    /// token, the service CA, and `<project>/<name>` paths unless `mapping` says
    /// otherwise (on a namespaced `RegistryTarget`, the project is its namespace).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub openshift_internal: bool,
    /// Plain http, or https without verifying the certificate (for tests only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Bundles that name no target go here. Only a `ClusterRegistryTarget` can be the
    /// default (the first by name, when several say so); a `RegistryTarget`'s is
    /// ignored. No default: bundles that name no target fail, saying so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// How an image's name becomes its name in this registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<MappingSpec>,
    /// How to log in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsSpec>,
    /// PEM certificates to trust for this registry, beside the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSource>,
    /// Transfer settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferSpec>,
    /// Who may move a tag ShipperD set (its owner's, from its source repository), and
    /// tags it did not set. Only a `ClusterRegistryTarget`'s is read (the admin's
    /// override); a `RegistryTarget`'s is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagsSpec>,
    /// A signature policy (a `containers-policy.json`, as JSON text) every image must
    /// satisfy to land through this target, besides the site's `--policy`. Keys are
    /// given inline (`keyData`), never as paths. A `ClusterRegistryTarget`'s applies
    /// also to every `RegistryTarget` of the same registry host: a namespace can add
    /// requirements, never weaken the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub signature_policy: Option<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "shipperd.io",
    version = "v1alpha1",
    kind = "ClusterRegistryTarget",
    status = "TargetStatus",
    shortname = "crt",
    category = "shipperd",
    doc = "A registry ShipperD publishes images to, set up by the cluster's admin for Bundles of every namespace; the only kind of target whose bundles may change cluster configuration (mirror sets, CatalogSources).",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// A registry for Bundles of every namespace (`spec.clusterTarget`): the fields of a
/// `RegistryTarget` (Secrets and ConfigMaps it names are read from the operator's own
/// namespace), and what its bundles may do to the cluster.
pub struct ClusterRegistryTargetSpec {
    #[serde(flatten)]
    pub target: RegistryTargetSpec,
    /// Which namespaces' Bundles may publish through this target: any namespace a
    /// condition selects (by name, or by its labels). None: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<NamespaceCondition>,
    /// What bundles published through this target may apply cluster-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_resources: Option<ClusterResourcesPolicy>,
}

/// Namespaces, by name or by their labels (as external-secrets' `ClusterSecretStore`
/// conditions select them).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceCondition {
    /// These namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces whose labels this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Which cluster resources a `ClusterRegistryTarget`'s bundles may apply.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterResourcesPolicy {
    /// Bundles that ask (`applyClusterResources`) get their ImageDigestMirrorSet and
    /// CatalogSources applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply: bool,
    /// Also ImageTagMirrorSets, for bundles that ask (`tagMirrorSet`): applying one
    /// drains and reboots every node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tag_mirror_sets: bool,
    /// The namespaces whose Bundles may apply them. Neither this nor
    /// `namespaceSelector`: the operator's own namespace only (a tenant's Bundle through
    /// a shared target applies nothing unless the admin lists its namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces whose labels this selects may apply them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// How an image `[host/]repo:tag` lands: `<registry>/<prefix>/[host/]repo:tag`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MappingSpec {
    /// A path put before every repository. `{namespace}` in it is the namespace the
    /// bundle belongs to (the Bundle's; the upload namespace for uploads): a shared
    /// target lands each tenant's images in its own project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Keep the source registry's host as the first path component.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_host: bool,
    /// At most this many path components (deeper paths are joined with `-` at the
    /// end); OpenShift's internal registry takes two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_depth: Option<u32>,
    /// Repository prefixes renamed, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renames: Vec<RenameSpec>,
}

/// One rename of a repository prefix.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct RenameSpec {
    pub from: String,
    pub to: String,
}

/// How to log in to a registry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("has(self.secretName) != (has(self.serviceAccountToken) && self.serviceAccountToken)")
        .message("set exactly one of secretName and serviceAccountToken")
)]
pub struct CredentialsSpec {
    /// A Secret in this namespace (the operator's, for a `ClusterRegistryTarget`)
    /// labelled `shipperd.io/credentials: "true"` (so that no other Secret can be sent
    /// to a registry): `kubernetes.io/dockerconfigjson` (the entry for this registry's
    /// host), `kubernetes.io/basic-auth`, or a bearer token under the key `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Log in with ShipperD's own service-account token: only to OpenShift's internal
    /// registry (or a host the operator's `--service-account-token-host` lists). On a
    /// namespaced `RegistryTarget` the images then land only in its own project: the
    /// mapping's prefix is the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<bool>,
}

/// The admin's overrides of tag ownership: by default a bundle moves only tags its own
/// owner (namespace, or uploading user) set from the same source repository, and no tag
/// that something other than ShipperD set.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TagsSpec {
    /// Bundles may move tags other owners set (each move logged and named in the
    /// `image.published` event).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub take_over: bool,
    /// Bundles may move tags something other than ShipperD set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite_unowned: bool,
}

/// Transfer settings; each defaults to ShipperD's.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferSpec {
    /// Large blobs uploaded at once (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: Option<u32>,
    /// Blobs larger than this (bytes) go up in chunks (default 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_threshold: Option<u64>,
    /// Tries of one request before its image's job is retried later (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub retries: Option<u32>,
}

/// Whether a target resource could be used, and why not.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// `Ready`: applied to the running services; `False` with the reason when the
    /// object (or a Secret or ConfigMap it names) cannot be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "shipperd.io",
    version = "v1alpha1",
    kind = "WebhookTarget",
    namespaced,
    status = "TargetStatus",
    shortname = "wht",
    category = "shipperd",
    doc = "A webhook ShipperD posts its events to.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// Where ShipperD's events go: a URL, which event types, signed with which secret
/// (Standard Webhooks).
pub struct WebhookTargetSpec {
    /// An http(s) URL. Shown without credentials or query in status and logs.
    pub url: String,
    /// Event types to send (e.g. `io.shipperd.bundle.published`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// The signing secret (`whsec_<base64>` or raw bytes).
    pub signing_secret: KeyRef,
}
