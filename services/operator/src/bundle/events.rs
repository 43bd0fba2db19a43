//! What a `Bundle`'s reconcile tells people: Events when its phase moves on, and the
//! projects its images need checked once they are listed.

use kube::{
    Resource as _, ResourceExt as _,
    runtime::events::{Event as KubeEvent, EventType},
};
use shipperd_model::BundleSummary;

use super::Context;
use crate::crd::{Bundle, BundlePhase, BundleStatus};

/// Checks once per bundle generation that the OpenShift projects its images land in
/// exist (see [`crate::projects`]); says so in Events.
pub(crate) async fn check_projects(b: &Bundle, s: &BundleSummary, ctx: &Context) {
    let key = (b.uid().unwrap_or_default(), s.generation);
    if !ctx
        .projects_checked
        .lock()
        .expect("not poisoned")
        .insert(key.clone())
    {
        return;
    }
    let checked =
        match crate::projects::check(&ctx.client, &ctx.state, b, s, ctx.create_projects).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot check the bundle's projects; will again");
                ctx.projects_checked
                    .lock()
                    .expect("not poisoned")
                    .remove(&key);
                return;
            }
        };
    let mut events = Vec::new();
    if !checked.created.is_empty() {
        events.push(KubeEvent {
            type_: EventType::Normal,
            reason: "ProjectsCreated".into(),
            note: Some(format!("created {}", checked.created.join(", "))),
            action: "CreateProjects".into(),
            secondary: None,
        });
    }
    if !checked.missing.is_empty() {
        let list = checked.missing.join(", ");
        events.push(KubeEvent {
            type_: EventType::Warning,
            reason: "ProjectMissing".into(),
            note: Some(
                format!(
                    "the internal registry takes images only into existing projects; missing: \
                 {list}. Create them (oc new-project NAME) and retry the bundle, or let the \
                 operator create them (--create-projects)"
                )
                .chars()
                .take(1000)
                .collect(),
            ),
            action: "CheckProjects".into(),
            secondary: None,
        });
    }
    for ev in events {
        if let Err(error) = ctx.recorder.publish(&ev, &b.object_ref(&())).await {
            tracing::warn!(%error, "cannot record an Event");
        }
    }
}

/// Records a Kubernetes Event for the phase `status` reached.
pub(crate) async fn record_phase(b: &Bundle, status: &BundleStatus, ctx: &Context) {
    let Some(phase) = status.phase else {
        return;
    };
    let (type_, reason, note) = match phase {
        BundlePhase::Received => (
            EventType::Normal,
            "Received",
            "ShipperD stored the bundle".to_string(),
        ),
        BundlePhase::Publishing => (
            EventType::Normal,
            "Unpacked",
            format!(
                "{} images to publish",
                status.images.as_ref().map_or(0, |i| i.total)
            ),
        ),
        BundlePhase::Published => (
            EventType::Normal,
            "Published",
            format!(
                "{} images published",
                status.images.as_ref().map_or(0, |i| i.published)
            ),
        ),
        BundlePhase::Failed => (
            EventType::Warning,
            "Failed",
            status.error.clone().unwrap_or_default(),
        ),
        _ => return,
    };
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&ev, &b.object_ref(&())).await {
        tracing::warn!(%error, "cannot record an Event");
    }
}
