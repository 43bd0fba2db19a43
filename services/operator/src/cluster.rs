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
    crd::Bundle,
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

/// Writes `res` to `b`'s ConfigMap (owned by `b`), and applies them when `b` asks.
/// Returns the ConfigMap's name.
pub async fn publish(
    client: &kube::Client,
    b: &Bundle,
    res: &ClusterResources,
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
    if b.spec.apply_cluster_resources {
        apply(client, res).await?;
    }
    Ok(name)
}

/// Applies every resource (server-side apply). Mirror sets are new objects per bundle:
/// none is edited in place.
async fn apply(client: &kube::Client, res: &ClusterResources) -> Result<(), kube::Error> {
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

/// `b`'s cluster resources, worked out now.
pub async fn resources(
    state: &StateStore,
    b: &Bundle,
    s: &BundleSummary,
) -> Result<ClusterResources, shipperd_bus::Error> {
    let images = landed(state, s).await?;
    Ok(cluster_resources(
        &s.name,
        s.id.as_str(),
        &images,
        b.spec.tag_mirror_set,
    ))
}
