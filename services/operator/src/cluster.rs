//! A published bundle's cluster resources (see [`crate::mirrors`]), in two places:
//!
//! - beside the `Bundle`: a ConfigMap it owns (`<bundle>-cluster-resources`) shows what
//!   the bundle alone would need, for the namespace's users and an admin to read;
//! - cluster-wide, only for a bundle published through a `ClusterRegistryTarget` that
//!   allows it ([`policy`]): its contribution (what it needs, as JSON) is kept in a
//!   ConfigMap of the operator's own namespace (`shipperd-cluster-<uid>`, which no
//!   tenant can edit), and [`converge`] merges every contribution (in the order the
//!   bundles were received) into the one set of objects, named as oc-mirror v2 names
//!   them, applies it (server-side apply) and deletes the objects of ours that no
//!   contribution needs any more. A deleted `Bundle` takes its contribution with it;
//!   a mirror another published bundle still needs stays.

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
    mirrors::{ClusterResources, Gathered, Landed, Meta},
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

/// Writes `res` to `b`'s ConfigMap (owned by `b`). Returns the ConfigMap's name.
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
    Ok(name)
}

/// The label of contributions.
const CONTRIBUTION: &str = "shipperd.io/cluster-resources";
/// The label of every cluster object the operator applies.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=shipperd";
/// The key of a contribution's JSON.
const GATHERED: &str = "gathered.json";

fn contribution_name(b: &Bundle) -> String {
    format!("shipperd-cluster-{}", b.uid().unwrap_or_default())
}

/// Keeps what bundle `b` (received `order`-th) needs cluster-wide, in the operator's
/// namespace `own`.
pub async fn contribute(
    client: &kube::Client,
    own: &str,
    b: &Bundle,
    order: u64,
    gathered: &Gathered,
) -> Result<(), kube::Error> {
    let name = contribution_name(b);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": own,
            "labels": { CONTRIBUTION: "contribution", "app.kubernetes.io/managed-by": "shipperd" },
            "annotations": {
                "shipperd.io/bundle": format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any()),
                "shipperd.io/order": format!("{order:020}"),
            },
        },
        "data": { GATHERED: serde_json::to_string(gathered).expect("gathered serialises") },
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), own);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await?;
    Ok(())
}

/// Forgets what bundle `b` needed cluster-wide (it is deleted); whether it had a say.
pub async fn withdraw(client: &kube::Client, own: &str, b: &Bundle) -> Result<bool, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), own);
    match api.delete(&contribution_name(b), &Default::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Applies what every contribution needs, merged in the order their bundles were
/// received, and deletes our objects that none needs any more.
pub async fn converge(client: &kube::Client, own: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), own);
    let lp = kube::api::ListParams::default().labels(&format!("{CONTRIBUTION}=contribution"));
    let mut cms = api.list(&lp).await?.items;
    cms.sort_by_key(|c| {
        c.annotations()
            .get("shipperd.io/order")
            .cloned()
            .unwrap_or_default()
    });
    let mut all = Gathered::default();
    for cm in &cms {
        match cm
            .data
            .as_ref()
            .and_then(|d| d.get(GATHERED))
            .map(|j| serde_json::from_str::<Gathered>(j))
        {
            Some(Ok(g)) => all.merge(g),
            _ => tracing::warn!(configmap = %cm.name_any(), "an unreadable contribution; left out"),
        }
    }
    let wanted = apply_all(client, &all.resources()).await?;
    prune(client, &wanted).await
}

/// The kinds the operator applies: (group, version, kind, the only namespace it uses
/// them in, if one).
const KINDS: [(&str, &str, &str, Option<&str>); 5] = [
    ("config.openshift.io", "v1", "ImageDigestMirrorSet", None),
    ("config.openshift.io", "v1", "ImageTagMirrorSet", None),
    ("operators.coreos.com", "v1alpha1", "CatalogSource", None),
    (
        "updateservice.operator.openshift.io",
        "v1",
        "UpdateService",
        None,
    ),
    // Only the signatures' ConfigMap: contributions are ConfigMaps too, elsewhere.
    (
        "",
        "v1",
        "ConfigMap",
        Some(crate::mirrors::SIGNATURES_NAMESPACE),
    ),
];

/// (kind, namespace, name) of an object.
type ObjectKey = (String, String, String);

fn dynamic(client: &kube::Client, ar: &ApiResource, ns: &str) -> Api<DynamicObject> {
    if ns.is_empty() {
        Api::all_with(client.clone(), ar)
    } else {
        Api::namespaced_with(client.clone(), ns, ar)
    }
}

/// Deletes the objects of ours (labelled) that are not in `wanted`. A kind the cluster
/// does not have is skipped.
async fn prune(
    client: &kube::Client,
    wanted: &std::collections::BTreeSet<ObjectKey>,
) -> Result<(), kube::Error> {
    for (g, v, k, only) in KINDS {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(g, v, k));
        let lp = kube::api::ListParams::default().labels(MANAGED_BY);
        let items = match dynamic(client, &ar, only.unwrap_or_default())
            .list(&lp)
            .await
        {
            Ok(l) => l.items,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e),
        };
        for o in items {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            if wanted.contains(&(k.to_string(), ns.clone(), name.clone())) {
                continue;
            }
            match dynamic(client, &ar, &ns)
                .delete(&name, &Default::default())
                .await
            {
                Ok(_) => tracing::info!(kind = k, %name, "removed: no published bundle needs it"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Applies every resource (server-side apply); what it applied.
async fn apply_all(
    client: &kube::Client,
    res: &ClusterResources,
) -> Result<std::collections::BTreeSet<ObjectKey>, kube::Error> {
    let pp = PatchParams::apply(MANAGER).force();
    let mut objects: Vec<(serde_json::Value, &Meta)> = Vec::new();
    for set in res.digest_mirror_sets.iter().chain(&res.tag_mirror_sets) {
        objects.push((
            serde_json::to_value(set).expect("serialises"),
            &set.metadata,
        ));
    }
    for cs in &res.catalog_sources {
        objects.push((serde_json::to_value(cs).expect("serialises"), &cs.metadata));
    }
    if let Some(u) = &res.update_service {
        objects.push((serde_json::to_value(u).expect("serialises"), &u.metadata));
    }
    if let Some(c) = &res.signatures {
        objects.push((serde_json::to_value(c).expect("serialises"), &c.metadata));
    }
    let mut applied = std::collections::BTreeSet::new();
    for (v, meta) in objects {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let Some((g, ver, _, _)) = KINDS.iter().find(|(_, _, k, _)| *k == kind).copied() else {
            continue;
        };
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(g, ver, &kind));
        let ns = meta.namespace.clone().unwrap_or_default();
        dynamic(client, &ar, &ns)
            .patch(&meta.name, &pp, &Patch::Apply(&v))
            .await?;
        applied.insert((kind, ns, meta.name.clone()));
    }
    Ok(applied)
}

/// What bundle `s` needs: its own resources (with ImageTagMirrorSets when `shown_tags`,
/// for its ConfigMap), and its contribution to the cluster's (with them only when
/// `applied_tags`).
pub async fn resources(
    state: &StateStore,
    data: &shipperd_model::DataDir,
    s: &BundleSummary,
    shown_tags: bool,
    applied_tags: bool,
) -> Result<(ClusterResources, Gathered), shipperd_bus::Error> {
    let images = landed(state, s).await?;
    let has_catalog = images.iter().any(|i| i.catalog);
    let signatures = signatures(data, &s.id);
    let files = signatures.iter().map(|(n, b)| (n.as_str(), b.as_slice()));
    let mut contribution = Gathered::default();
    contribution.add_bundle(images.iter().cloned(), has_catalog, applied_tags);
    contribution.add_signatures(files.clone());
    let mut alone = Gathered::default();
    alone.add_bundle(images.iter().cloned(), has_catalog, shown_tags);
    alone.add_signatures(files);
    Ok((alone.resources(), contribution))
}

/// The release signatures unpack took out of bundle `id` (file name, bytes).
fn signatures(
    data: &shipperd_model::DataDir,
    id: &shipperd_model::BundleId,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(data.signatures(id))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let bytes = std::fs::read(e.path()).ok()?;
            Some((name, bytes))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::Policy;

    #[test]
    fn a_refusal_says_what_would_allow_it() {
        let none = Policy::default();
        assert!(
            none.why_not()
                .contains("ClusterRegistryTarget that allows it")
        );
        let closed = Policy {
            cluster_target: Some("shared".into()),
            ..Policy::default()
        };
        assert!(
            closed
                .why_not()
                .contains("shared does not allow it (clusterResources.apply)")
        );
        let no_itms = Policy {
            cluster_target: Some("shared".into()),
            apply: true,
            tag_mirror_sets: false,
        };
        assert!(no_itms.why_not().contains("tagMirrorSets"));
    }
}
