//! A published bundle's cluster resources (see [`crate::cluster::mirrors`]), in two places:
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

pub mod mirrors;
mod write;

pub use write::{Outcome, Writer, write};

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use shipperd_model::{BundleId, BundleSummary, ImageState};
use shipperd_state::StateStore;

use self::mirrors::{ClusterResources, Gathered, Landed, Merged, Meta};
use crate::crd::{Bundle, ClusterRegistryTarget};

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
    /// The target allows applying, but not for the bundle's namespace: which.
    pub namespace_refused: Option<String>,
}

impl Policy {
    /// Why a bundle asking to apply was refused, in words.
    pub fn why_not(&self) -> String {
        match (&self.cluster_target, &self.namespace_refused) {
            (None, _) => "only a bundle published through a ClusterRegistryTarget that allows \
                          it applies cluster resources"
                .into(),
            (Some(t), Some(ns)) => format!(
                "ClusterRegistryTarget {t} lets only the namespaces its clusterResources lists \
                 (namespaces, namespaceSelector; none: the operator's own) apply cluster \
                 resources, not {ns}"
            ),
            (Some(t), None) if !self.apply => {
                format!("ClusterRegistryTarget {t} does not allow it (clusterResources.apply)")
            }
            (Some(t), None) => format!(
                "ClusterRegistryTarget {t} does not allow ImageTagMirrorSets \
                 (clusterResources.tagMirrorSets)"
            ),
        }
    }
}

/// Does a list of names and a label selector select namespace `ns`? (Its labels are
/// read only when a selector must look at them.)
async fn selects(
    client: &kube::Client,
    ns: &str,
    names: &[String],
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Result<bool, kube::Error> {
    use kube::core::{Selector, SelectorExt as _};
    if names.iter().any(|n| n == ns) {
        return Ok(true);
    }
    let Some(selector) = selector else {
        return Ok(false);
    };
    let Ok(selector) = Selector::try_from(selector.clone()) else {
        tracing::warn!(
            namespace = ns,
            "a namespaceSelector that does not parse selects nothing"
        );
        return Ok(false);
    };
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    Ok(match api.get_opt(ns).await? {
        Some(n) => selector.matches(n.labels()),
        None => false,
    })
}

/// The `ClusterRegistryTarget` a bundle goes to: named, or the default one for
/// `None` (as the renderer picks it: the first by name marked default). `None` for a
/// namespace's target.
pub async fn cluster_target(
    client: &kube::Client,
    target: Option<&shipperd_model::TargetName>,
) -> Result<Option<ClusterRegistryTarget>, kube::Error> {
    if target.is_some_and(|t| t.namespace().is_some()) {
        return Ok(None);
    }
    let api: Api<ClusterRegistryTarget> = Api::all(client.clone());
    match target {
        Some(t) => api.get_opt(t.as_str()).await,
        None => {
            let mut all = api.list(&Default::default()).await?.items;
            all.sort_by_key(|t| t.name_any());
            Ok(all.into_iter().find(|t| t.spec.target.default))
        }
    }
}

/// May Bundles of namespace `ns` publish through cluster target `t`? Any namespace,
/// when it states no conditions.
pub async fn may_use(
    client: &kube::Client,
    t: &ClusterRegistryTarget,
    ns: &str,
) -> Result<bool, kube::Error> {
    if t.spec.conditions.is_empty() {
        return Ok(true);
    }
    for c in &t.spec.conditions {
        if selects(client, ns, &c.namespaces, c.namespace_selector.as_ref()).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The policy of the target a bundle of namespace `ns` was published through: a
/// namespaced target (`<namespace>/<name>`) allows nothing; a `ClusterRegistryTarget`
/// (named, or the default one for `None`) what its `clusterResources` says, for the
/// namespaces it lists (none listed: the operator's own, `own`, only).
pub async fn policy(
    client: &kube::Client,
    target: Option<&shipperd_model::TargetName>,
    ns: &str,
    own: &str,
) -> Result<Policy, kube::Error> {
    let Some(t) = cluster_target(client, target).await? else {
        return Ok(Policy::default());
    };
    let p = t.spec.cluster_resources.clone().unwrap_or_default();
    let listed =
        ns == own || selects(client, ns, &p.namespaces, p.namespace_selector.as_ref()).await?;
    Ok(Policy {
        cluster_target: Some(t.name_any()),
        apply: p.apply && listed,
        tag_mirror_sets: p.apply && listed && p.tag_mirror_sets,
        namespace_refused: (p.apply && !listed).then(|| ns.to_string()),
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
/// The key of a contribution's JSON (for people to read: [`converge`] derives every
/// contribution again from its `Bundle` and ShipperD's state).
const GATHERED: &str = "gathered.json";
/// A contribution's `Bundle` (`<namespace>/<name>`) and its uid.
const BUNDLE_ANNOTATION: &str = "shipperd.io/bundle";
const UID_ANNOTATION: &str = "shipperd.io/bundle-uid";

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
                BUNDLE_ANNOTATION: format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any()),
                UID_ANNOTATION: b.uid().unwrap_or_default(),
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

/// What [`converge`] reads: the cluster, ShipperD's state and data directory, the
/// upload namespace, and the contributions it derived before (by bundle id and whether
/// ImageTagMirrorSets apply; a bundle's images do not change once it is published).
pub struct Sources<'a> {
    pub client: &'a kube::Client,
    /// The operator's namespace, where contributions are kept.
    pub own: &'a str,
    pub uploads: Option<&'a str>,
    pub state: &'a StateStore,
    pub data: &'a shipperd_model::DataDir,
    pub cache: &'a std::sync::Mutex<HashMap<(BundleId, bool), Gathered>>,
}

/// Something a `Bundle` must be told (a Warning Event): what of its contribution was
/// not applied, and why.
#[derive(Debug, Clone)]
pub struct Told {
    pub regarding: ObjectReference,
    pub message: String,
}

/// A contribution admitted: its bundle's order, its `Bundle`, what it needs.
type Admitted = (u64, Bundle, Gathered);

/// Is the contribution `cm` one to apply? Its data is not read: the `Bundle` it names
/// must exist (the same uid), ask to apply, be published, own its bundle and be allowed
/// by its target's policy; what it needs is derived again from ShipperD's state. So a
/// ConfigMap made by hand, or edited, applies nothing of its own.
async fn admitted(src: &Sources<'_>, cm: &ConfigMap) -> Result<Option<Admitted>, String> {
    let name = cm.name_any();
    let skip = |why: &str| {
        tracing::warn!(configmap = %name, why, "a contribution that applies nothing");
        Ok(None)
    };
    let ann = cm.annotations();
    let Some((ns, bundle)) = ann.get(BUNDLE_ANNOTATION).and_then(|r| r.split_once('/')) else {
        return skip("it names no Bundle");
    };
    let api: Api<Bundle> = Api::namespaced(src.client.clone(), ns);
    let Some(b) = api.get_opt(bundle).await.map_err(|e| e.to_string())? else {
        return skip("its Bundle is gone");
    };
    if b.uid().as_deref() != ann.get(UID_ANNOTATION).map(String::as_str)
        || name != contribution_name(&b)
    {
        return skip("it is not its Bundle's");
    }
    if b.metadata.deletion_timestamp.is_some() || !b.spec.apply_cluster_resources {
        return skip("its Bundle is deleted, or does not ask to apply");
    }
    let Some(id) = b
        .status
        .as_ref()
        .and_then(|st| st.bundle_id.as_deref())
        .and_then(|i| BundleId::parse(i).ok())
    else {
        return skip("its Bundle has no bundle yet");
    };
    let Some(s) = src.state.summary(&id).await.map_err(|e| e.to_string())? else {
        return skip("its bundle is not known");
    };
    if s.phase != shipperd_model::Phase::Published
        || s.deleting
        || !follows(ns, s.owner.as_deref(), src.uploads)
    {
        return skip("its bundle is not published, or not its namespace's");
    }
    let policy = policy(src.client, s.target.as_ref(), ns, src.own)
        .await
        .map_err(|e| e.to_string())?;
    if !policy.apply {
        return skip("its target does not let its namespace apply");
    }
    let tags = b.spec.tag_mirror_set && policy.tag_mirror_sets;
    let key = (id, tags);
    let known = src
        .cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let g = match known {
        Some(g) => g,
        None => {
            let (_, g) = resources(src.state, src.data, &s, tags, tags)
                .await
                .map_err(|e| e.to_string())?;
            src.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, g.clone());
            g
        }
    };
    Ok(Some((s.order.unwrap_or_default(), b, g)))
}

/// Applies what every contribution needs, merged in the order their bundles were
/// received (a namespace's entries are never replaced by another's: see
/// [`Merged`]), and deletes our objects that none needs any more. An object of the
/// same name that ShipperD did not make is left as it is. Returns what the Bundles
/// that lost something must be told.
pub async fn converge(src: &Sources<'_>) -> Result<Vec<Told>, String> {
    let api: Api<ConfigMap> = Api::namespaced(src.client.clone(), src.own);
    let lp = kube::api::ListParams::default().labels(&format!("{CONTRIBUTION}=contribution"));
    let cms = api.list(&lp).await.map_err(|e| e.to_string())?.items;
    let mut entries = Vec::new();
    for cm in &cms {
        if let Some(e) = admitted(src, cm).await? {
            entries.push(e);
        }
    }
    entries.sort_by_key(|e| e.0);
    // Derived contributions of bundles no longer applying are forgotten.
    let applying: std::collections::HashSet<&str> = entries
        .iter()
        .filter_map(|(_, b, _)| b.status.as_ref()?.bundle_id.as_deref())
        .collect();
    src.cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(id, _), _| applying.contains(id.as_str()));
    let mut merged = Merged::default();
    let mut refs = HashMap::new();
    for (_, b, g) in entries {
        let (ns, name) = (b.namespace().unwrap_or_default(), b.name_any());
        let who = format!("{ns}/{name}");
        merged.add(&ns, &who, g);
        refs.insert(who, b.object_ref(&()));
    }
    let res = merged.all.resources();
    let (wanted, foreign) = apply_all(src.client, &res)
        .await
        .map_err(|e| e.to_string())?;
    prune(src.client, &wanted)
        .await
        .map_err(|e| e.to_string())?;
    let mut told: Vec<Told> = merged
        .conflicts
        .into_iter()
        .filter_map(|c| {
            Some(Told {
                regarding: refs.get(&c.bundle)?.clone(),
                message: c.message,
            })
        })
        .collect();
    // An object ShipperD did not make: every contributing Bundle hears of it.
    for message in foreign {
        told.extend(refs.values().map(|r| Told {
            regarding: r.clone(),
            message: message.clone(),
        }));
    }
    Ok(told)
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
        Some(crate::cluster::mirrors::SIGNATURES_NAMESPACE),
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

/// Applies every resource (server-side apply); what it applied, and the objects it left
/// alone (not made by ShipperD), in words.
async fn apply_all(
    client: &kube::Client,
    res: &ClusterResources,
) -> Result<(std::collections::BTreeSet<ObjectKey>, Vec<String>), kube::Error> {
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
    let mut foreign = Vec::new();
    for (v, meta) in objects {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let Some((g, ver, _, _)) = KINDS.iter().find(|(_, _, k, _)| *k == kind).copied() else {
            continue;
        };
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(g, ver, &kind));
        let ns = meta.namespace.clone().unwrap_or_default();
        let api = dynamic(client, &ar, &ns);
        // One of the same name that ShipperD did not make (an admin's, another tool's)
        // is left as it is.
        match api.get_opt(&meta.name).await {
            Ok(Some(o)) if !ours(&o) => {
                foreign.push(format!(
                    "{kind} {}{} exists and was not made by ShipperD: left as it is, \
                     and this bundle's share of it is not applied",
                    if ns.is_empty() {
                        String::new()
                    } else {
                        format!("{ns}/")
                    },
                    meta.name
                ));
                continue;
            }
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e),
        }
        api.patch(&meta.name, &pp, &Patch::Apply(&v)).await?;
        applied.insert((kind, ns, meta.name.clone()));
    }
    Ok((applied, foreign))
}

/// Was `o` made by ShipperD (it carries the label everything applied carries)?
fn ours(o: &DynamicObject) -> bool {
    let (k, v) = MANAGED_BY.split_once('=').expect("a label selector");
    o.labels().get(k).map(String::as_str) == Some(v)
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

/// Whether a `Bundle` of namespace `ns` may follow a bundle `owner` brought in (`None`:
/// the ingest endpoint or drop directory, which act for `uploads`).
pub(crate) fn follows(ns: &str, owner: Option<&str>, uploads: Option<&str>) -> bool {
    match owner {
        Some(owner) => owner == ns,
        None => uploads == Some(ns),
    }
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
            namespace_refused: None,
        };
        assert!(no_itms.why_not().contains("tagMirrorSets"));
        let tenant = Policy {
            cluster_target: Some("openshift-internal".into()),
            namespace_refused: Some("team-b".into()),
            ..Policy::default()
        };
        assert!(tenant.why_not().contains("not team-b"));
    }
}
