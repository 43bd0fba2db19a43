//! A published bundle's cluster resources (see [`crate::mirrors`]): worked out from its
//! images (where each came from and landed; whether it is an operator catalog, which
//! unpack noted from its config's labels), written to a ConfigMap the `Bundle` owns and
//! names in its status, and applied (server-side apply) when the `Bundle` asks.

use std::collections::BTreeMap;

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use shipperd_model::{BundleSummary, ImageState};
use shipperd_state::StateStore;

use crate::{
    crd::{Bundle, ClusterRegistryTarget},
    mirrors::{ClusterResources, Landed, cluster_resources},
};

/// The field manager of everything the operator applies.
const MANAGER: &str = "shipperd-operator";
/// The ConfigMap key holding the resources.
pub const KEY: &str = "cluster-resources.yaml";

/// The images of published bundle `s`, as landed (unpack noted which are catalogs).
pub async fn landed(
    state: &StateStore,
    s: &BundleSummary,
) -> Result<Vec<Landed>, shipperd_bus::Error> {
    let images: Vec<ImageState> = state.images(&s.id, 0, s.counts.total).try_collect().await?;
    Ok(images
        .into_iter()
        .map(|img| Landed {
            catalog: img.catalog,
            source: img.source,
            target: img.target,
            digest: img.digest,
        })
        .collect())
}

/// The name of the ConfigMap holding `b`'s cluster resources.
pub fn configmap_name(b: &Bundle) -> String {
    format!("{}-cluster-resources", b.name_any())
}

/// What a bundle's target lets it apply to the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// The `ClusterRegistryTarget` it went through (`None`: a namespaced target, or
    /// no cluster target is the default).
    pub cluster_target: Option<String>,
    /// ImageDigestMirrorSets and CatalogSources.
    pub apply: bool,
    /// ImageTagMirrorSets too.
    pub tag_mirror_sets: bool,
}

impl Policy {
    /// Why a bundle asking to apply was refused, in words.
    pub fn why_not(&self) -> String {
        match &self.cluster_target {
            None => "only a bundle published through a ClusterRegistryTarget that allows it \
                     applies cluster resources"
                .into(),
            Some(t) if !self.apply => {
                format!("ClusterRegistryTarget {t} does not allow it (clusterResources.apply)")
            }
            Some(t) => format!(
                "ClusterRegistryTarget {t} does not allow ImageTagMirrorSets \
                 (clusterResources.tagMirrorSets)"
            ),
        }
    }
}

/// The policy of the target a bundle was published through: a namespaced target
/// (`<namespace>/<name>`) allows nothing; a `ClusterRegistryTarget` (named, or the
/// default one for `None`) what its `clusterResources` says.
pub async fn policy(
    client: &kube::Client,
    target: Option<&shipperd_model::TargetName>,
) -> Result<Policy, kube::Error> {
    if target.is_some_and(|t| t.namespace().is_some()) {
        return Ok(Policy::default());
    }
    let api: Api<ClusterRegistryTarget> = Api::all(client.clone());
    let t = match target {
        Some(t) => api.get_opt(t.as_str()).await?,
        None => {
            // The default, as the renderer picks it: the first by name marked default.
            let mut all = api.list(&Default::default()).await?.items;
            all.sort_by_key(|t| t.name_any());
            all.into_iter().find(|t| t.spec.target.default)
        }
    };
    Ok(match t {
        None => Policy::default(),
        Some(t) => {
            let p = t.spec.cluster_resources.clone().unwrap_or_default();
            Policy {
                cluster_target: Some(t.name_any()),
                apply: p.apply,
                tag_mirror_sets: p.apply && p.tag_mirror_sets,
            }
        }
    })
}

/// Writes `res` to `b`'s ConfigMap (owned by `b`), and applies them when `apply` (the
/// bundle asks, and its target allows it), the ImageTagMirrorSet only with `itms`.
/// Returns the ConfigMap's name.
pub async fn publish(
    client: &kube::Client,
    b: &Bundle,
    res: &ClusterResources,
    apply: bool,
    itms: bool,
) -> Result<String, kube::Error> {
    let ns = b.namespace().unwrap_or_default();
    let name = configmap_name(b);
    let owner = b.controller_owner_ref(&());
    let mut cm = ConfigMap {
        data: Some(BTreeMap::from([(KEY.to_string(), res.to_yaml())])),
        ..ConfigMap::default()
    };
    cm.metadata.name = Some(name.clone());
    cm.metadata.namespace = Some(ns.clone());
    cm.metadata.owner_references = owner.map(|o| vec![o]);
    let mut v = serde_json::to_value(&cm).expect("a ConfigMap serialises");
    v["apiVersion"] = "v1".into();
    v["kind"] = "ConfigMap".into();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&v),
    )
    .await?;
    if apply {
        let mut res = res.clone();
        if !itms {
            res.tag_mirror_set = None;
        }
        apply_all(client, &res).await?;
    }
    Ok(name)
}

/// Applies every resource (server-side apply). Mirror sets are new objects per bundle:
/// none is edited in place.
async fn apply_all(client: &kube::Client, res: &ClusterResources) -> Result<(), kube::Error> {
    let gvk = |g: &str, v: &str, k: &str| ApiResource::from_gvk(&GroupVersionKind::gvk(g, v, k));
    let pp = PatchParams::apply(MANAGER).force();
    for set in [&res.digest_mirror_set, &res.tag_mirror_set]
        .into_iter()
        .flatten()
    {
        let ar = gvk("config.openshift.io", "v1", set.kind);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let v = serde_json::to_value(set).expect("a mirror set serialises");
        api.patch(&set.metadata.name, &pp, &Patch::Apply(&v))
            .await?;
    }
    for cs in &res.catalog_sources {
        let ar = gvk("operators.coreos.com", "v1alpha1", "CatalogSource");
        let ns = cs.metadata.namespace.clone().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let v = serde_json::to_value(cs).expect("a CatalogSource serialises");
        api.patch(&cs.metadata.name, &pp, &Patch::Apply(&v)).await?;
    }
    Ok(())
}

/// The cluster resources of bundle `s`, worked out now (with an ImageTagMirrorSet
/// when `tag_mirror_set`).
pub async fn resources(
    state: &StateStore,
    s: &BundleSummary,
    tag_mirror_set: bool,
) -> Result<ClusterResources, shipperd_bus::Error> {
    let images = landed(state, s).await?;
    Ok(cluster_resources(
        &s.name,
        s.id.as_str(),
        &images,
        tag_mirror_set,
    ))
}
