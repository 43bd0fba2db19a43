//! A published bundle's cluster resources (see [`crate::mirrors`]): worked out from its
//! images (where each came from and landed; whether it is an operator catalog, from its
//! config's labels, read from the stored bundle), written to a ConfigMap the `Bundle`
//! owns and names in its status, and applied (server-side apply) when the `Bundle` asks.

use std::collections::BTreeMap;

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use shipperd_bundle::{BlobStore, Catalog, Location, ManifestDoc, read_plan};
use shipperd_model::{BundleSummary, DataDir, ImageState};
use shipperd_state::StateStore;

use crate::{
    crd::Bundle,
    mirrors::{CATALOG_LABEL, ClusterResources, Landed, cluster_resources},
};

/// The field manager of everything the operator applies.
const MANAGER: &str = "shipperd-operator";
/// The ConfigMap key holding the resources.
pub const KEY: &str = "cluster-resources.yaml";

/// Does the image's config (its first platform's, for an index) carry the catalog
/// label? Read from the stored bundle; `false` when it cannot be read (expired files, a
/// config the bundle left out).
fn is_catalog(data: &DataDir, s: &BundleSummary, img: &ImageState, store: &BlobStore) -> bool {
    let Ok(plan) = read_plan(&data.plans(&s.id), img.plan) else {
        return false;
    };
    let config = plan.manifests.iter().rev().find_map(|m| {
        if m.absent {
            return None;
        }
        ManifestDoc::parse("manifest", &m.bytes)
            .ok()
            .and_then(|d| d.config)
    });
    let Some(config) = config else {
        return false;
    };
    let Some(blob) = plan.blobs.iter().find(|b| b.desc.digest == config.digest) else {
        return false;
    };
    if blob.at == Location::Absent || blob.desc.size > 1 << 20 {
        return false;
    }
    let Ok(mut r) = store.read(&blob.at, blob.desc.size, blob.desc.digest.hex()) else {
        return false;
    };
    let mut bytes = Vec::new();
    if std::io::Read::read_to_end(&mut r, &mut bytes).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v["config"]["Labels"].get(CATALOG_LABEL).is_some())
}

/// The images of published bundle `s`, as landed.
pub async fn landed(
    state: &StateStore,
    data: &DataDir,
    s: &BundleSummary,
) -> Result<Vec<Landed>, shipperd_bus::Error> {
    let images: Vec<ImageState> = state.images(&s.id, 0, s.counts.total).try_collect().await?;
    let (data, s) = (data.clone(), s.clone());
    let found = tokio::task::spawn_blocking(move || {
        let store = Catalog::load(&data, &s.id).and_then(|c| c.open(&data)).ok();
        images
            .into_iter()
            .map(|img| Landed {
                catalog: store
                    .as_ref()
                    .is_some_and(|st| is_catalog(&data, &s, &img, st)),
                source: img.source,
                target: img.target,
                digest: img.digest,
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    Ok(found)
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
    data: &DataDir,
    b: &Bundle,
    s: &BundleSummary,
) -> Result<ClusterResources, shipperd_bus::Error> {
    let images = landed(state, data, s).await?;
    Ok(cluster_resources(
        &s.name,
        s.id.as_str(),
        &images,
        b.spec.tag_mirror_set,
    ))
}
