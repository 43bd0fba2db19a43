//! [`write`]: what a published bundle asks of the cluster, written: its generated
//! resources in a ConfigMap beside its `Bundle` always, and applied (its contribution
//! kept, then every contribution merged by [`Writer::converge`]) when the `Bundle` asks
//! for it and its target's policy lets it.

use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType, Recorder},
};
use shipperd_model::BundleSummary;

use super::{Policy, Sources, contribute, converge, policy, publish, resources};
use crate::crd::Bundle;

/// What cluster resources are written with: where they come from, one converge at a
/// time, and who records Events.
pub struct Writer<'a> {
    pub sources: Sources<'a>,
    /// One change to the cluster's resources at a time (a converge reads every
    /// contribution, then applies and prunes: two at once could prune each other's).
    pub converging: &'a tokio::sync::Mutex<()>,
    pub recorder: &'a Recorder,
}

/// What [`write`] came to.
#[derive(Default)]
pub struct Outcome {
    /// The ConfigMap holding the bundle's resources, once written.
    pub config_map: Option<String>,
    /// What to tell the `Bundle`: applied, not allowed, or failed.
    pub event: Option<KubeEvent>,
    /// Something could not be written (no right to, an API refusing a mirror set):
    /// try again later.
    pub again: bool,
}

impl Writer<'_> {
    /// Merges every contribution into the cluster's resources (one at a time), and
    /// tells each Bundle that lost something of it (a Warning Event
    /// `ClusterResourcesConflict` naming both).
    pub async fn converge(&self) -> Result<(), String> {
        let told = {
            let _one = self.converging.lock().await;
            converge(&self.sources).await?
        };
        for t in told {
            tracing::warn!(bundle = ?t.regarding.name, message = %t.message, "cluster resources not applied");
            let ev = event(
                EventType::Warning,
                "ClusterResourcesConflict",
                t.message.chars().take(1000).collect(),
            );
            if let Err(error) = self.recorder.publish(&ev, &t.regarding).await {
                tracing::warn!(%error, "cannot record an Event");
            }
        }
        Ok(())
    }
}

fn event(type_: EventType, reason: &str, note: String) -> KubeEvent {
    KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Apply".into(),
        secondary: None,
    }
}

/// Writes the cluster resources of `b`'s published bundle `s` (its namespace `ns`).
/// Applied only for a bundle published through a ClusterRegistryTarget that allows
/// it: a namespace never changes nodes.
pub async fn write(w: &Writer<'_>, b: &Bundle, api: &Api<Bundle>, s: &BundleSummary) -> Outcome {
    let ns = b.namespace().unwrap_or_default();
    let written = async {
        let src = &w.sources;
        let policy = policy(src.client, s.target.as_ref(), &ns, src.own)
            .await
            .map_err(|e| e.to_string())?;
        let tags = b.spec.tag_mirror_set;
        let (res, contribution) =
            resources(src.state, src.data, s, tags, tags && policy.tag_mirror_sets)
                .await
                .map_err(|e| e.to_string())?;
        let name = publish(src.client, b, &res)
            .await
            .map_err(|e| e.to_string())?;
        if b.spec.apply_cluster_resources && policy.apply {
            name_the_bundle(api, b, s).await?;
            contribute(
                src.client,
                src.own,
                b,
                s.order.unwrap_or_default(),
                &contribution,
            )
            .await
            .map_err(|e| e.to_string())?;
            w.converge().await?;
        }
        Ok::<_, String>((name, policy))
    }
    .await;
    match written {
        Ok((name, policy)) => Outcome {
            event: told(b, &name, &policy),
            config_map: Some(name),
            again: false,
        },
        Err(error) => {
            tracing::warn!(%error, "cannot write the bundle's cluster resources; will retry");
            Outcome {
                config_map: None,
                event: Some(event(
                    EventType::Warning,
                    "ClusterResourcesFailed",
                    error.chars().take(1000).collect(),
                )),
                again: true,
            }
        }
    }
}

/// The converge derives a contribution from its `Bundle`'s status: it must name its
/// bundle by then.
async fn name_the_bundle(api: &Api<Bundle>, b: &Bundle, s: &BundleSummary) -> Result<(), String> {
    let named = b.status.as_ref().and_then(|st| st.bundle_id.as_deref());
    if named == Some(s.id.as_str()) {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": { "bundleId": s.id } });
    api.patch_status(
        &b.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The Event of resources written to ConfigMap `name`: applied, or not allowed (and
/// why), or none when the `Bundle` did not ask for them to be applied.
fn told(b: &Bundle, name: &str, policy: &Policy) -> Option<KubeEvent> {
    let asked = b.spec.apply_cluster_resources;
    let refused = asked && (!policy.apply || (b.spec.tag_mirror_set && !policy.tag_mirror_sets));
    if refused {
        Some(event(
            EventType::Warning,
            "ClusterResourcesNotAllowed",
            format!(
                "not applied: {}; they are in ConfigMap {name} for an admin to apply",
                policy.why_not()
            ),
        ))
    } else {
        asked.then(|| {
            event(
                EventType::Normal,
                "ClusterResourcesApplied",
                format!("mirror sets and catalog sources from ConfigMap {name}"),
            )
        })
    }
}
