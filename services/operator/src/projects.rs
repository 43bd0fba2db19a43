//! OpenShift's internal registry takes images only into projects that exist. When a
//! `Bundle` goes to a `RegistryTarget` with `openshiftInternal`, the projects its images
//! land in (the first path component of each target repository) are checked once its
//! images are listed: a missing one is created (a `ProjectRequest`) when the operator is
//! allowed to (`--create-projects`), else a Warning Event names it and how to create it.

use std::collections::BTreeSet;

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};
use shipperd_model::BundleSummary;
use shipperd_state::StateStore;

use crate::crd::{Bundle, ClusterRegistryTarget, RegistryTarget};

/// What checking found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Checked {
    /// Projects created now.
    pub created: Vec<String>,
    /// Projects missing (and not created).
    pub missing: Vec<String>,
}

/// Checks (and, with `create`, creates) the projects `s`'s images land in, when `b`'s
/// target is OpenShift's internal registry. `None` when it is not.
pub async fn check(
    client: &kube::Client,
    state: &StateStore,
    b: &Bundle,
    s: &BundleSummary,
    create: bool,
) -> Result<Option<Checked>, crate::error::Error> {
    let ns = b.namespace().unwrap_or_default();
    let internal = match (&b.spec.target, &b.spec.cluster_target) {
        (Some(t), _) => {
            let targets: Api<RegistryTarget> = Api::namespaced(client.clone(), &ns);
            targets.get_opt(t).await?.map(|t| t.spec.openshift_internal)
        }
        (None, Some(t)) => {
            let targets: Api<ClusterRegistryTarget> = Api::all(client.clone());
            targets
                .get_opt(t)
                .await?
                .map(|t| t.spec.target.openshift_internal)
        }
        (None, None) => None,
    };
    if internal != Some(true) {
        return Ok(None);
    }
    // A namespace's own target lands only in its own project; creating projects is for
    // the admin's cluster targets.
    let create = create && b.spec.cluster_target.is_some();
    let projects: BTreeSet<String> = state
        .images(&s.id, 0, s.counts.total)
        .map_ok(|img| {
            img.target
                .repository
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .try_collect()
        .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let requests: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "project.openshift.io",
            "v1",
            "ProjectRequest",
        )),
    );
    let mut out = Checked::default();
    for p in projects {
        if namespaces.get_opt(&p).await?.is_some() {
            continue;
        }
        if create {
            let mut req = DynamicObject::new(
                &p,
                &ApiResource::from_gvk(&GroupVersionKind::gvk(
                    "project.openshift.io",
                    "v1",
                    "ProjectRequest",
                )),
            );
            req.data = serde_json::json!({
                "displayName": p,
                "description": format!("created by ShipperD for bundle {}", s.name),
            });
            match requests.create(&PostParams::default(), &req).await {
                Ok(_) => out.created.push(p),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            out.missing.push(p);
        }
    }
    Ok(Some(out))
}
