//! One reconcile of a live `Bundle`: which bundle it stands for, whether it may follow
//! it, its status (starting a fetch when it names one not held yet), the cluster
//! resources of a published bundle, Events, and the status patch.

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType},
    },
};
use shipperd_model::{BundleSummary, TargetName};

use super::{
    Context, Fetch, bundle_id,
    events::{check_projects, record_phase},
    fetch::{start_fetch, start_take},
    retry_after,
    status::{bundle_status, pending_status},
};
use crate::{
    crd::{Bundle, BundlePhase, BundleStatus},
    error::Error,
};

/// What a reconcile knows of a `Bundle` before writing its status.
struct Seen {
    generation: Option<i64>,
    previous: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    now: Timestamp,
    /// Fetches are per generation: editing a Bundle whose fetch failed tries again.
    uid: String,
    ns: String,
}

impl Seen {
    fn of(b: &Bundle) -> Self {
        let generation = b.metadata.generation;
        Seen {
            generation,
            previous: b
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
            now: Timestamp::now(),
            uid: format!(
                "{}/{}",
                b.uid().unwrap_or_default(),
                generation.unwrap_or(0)
            ),
            ns: b.namespace().unwrap_or_default(),
        }
    }
}

/// The bundle a `Bundle` stands for, as far as it is known, and where it goes.
struct Known {
    summary: Option<BundleSummary>,
    target: Option<TargetName>,
}

/// Why a `Bundle` is refused: its reason and message.
type Refusal = (&'static str, String);

pub(crate) async fn apply(b: &Bundle, api: &Api<Bundle>, ctx: &Context) -> Result<Action, Error> {
    let seen = &Seen::of(b);
    let refused = |(reason, message): Refusal| async move {
        refuse(b, api, ctx, reason, &message, &seen.previous, seen.now).await
    };
    let known = match identify(b, ctx, seen).await? {
        Ok(k) => k,
        Err(r) => return refused(r).await,
    };
    let mut status = match status_of(b, ctx, seen, &known).await? {
        Ok(s) => s,
        Err(r) => return refused(r).await,
    };
    status.cluster_resources = b.status.as_ref().and_then(|s| s.cluster_resources.clone());
    // Cluster resources that could not be written do not hold the status back: a
    // Warning Event says why, and they are tried again later.
    let mut again = false;
    if let Some(s) = &known.summary
        && s.phase == shipperd_model::Phase::Published
        && status.cluster_resources.is_none()
    {
        let outcome = crate::cluster::write(&ctx.cluster(), b, api, s).await;
        again = outcome.again;
        status.cluster_resources = outcome.config_map;
        if let Some(ev) = outcome.event
            && let Err(error) = ctx.recorder.publish(&ev, &b.object_ref(&())).await
        {
            tracing::warn!(%error, "cannot record an Event");
        }
    }
    write_status(b, api, ctx, known.summary.as_ref(), &status).await?;
    // Watch-driven: ShipperD's state changes and ended fetches reconcile again; only
    // cluster resources that could not be written are tried again on a timer.
    Ok(if again {
        Action::requeue(retry_after(2))
    } else {
        Action::await_change()
    })
}

/// Which bundle `b` stands for (its id, from its status or source, or from a fetch of
/// this generation that ended), ShipperD's summary of it, and its target. Refused: a
/// spec the schema would have refused (an object older than it), and a bundle another
/// namespace brought in (a Bundle cannot read, apply or delete another namespace's).
async fn identify(b: &Bundle, ctx: &Context, seen: &Seen) -> Result<Result<Known, Refusal>, Error> {
    let id = match bundle_id(b) {
        Err(Error::Invalid(message)) => return Ok(Err(("InvalidSpec", message))),
        Err(e) => return Err(e),
        Ok(Some(id)) => Some(id),
        // A path source without a sha256: known once it is stored.
        Ok(None) => match ctx.fetch_state(&seen.uid) {
            Some(Fetch::Done(id)) => Some(id),
            _ => None,
        },
    };
    let summary = match &id {
        Some(id) => ctx.state.summary(id).await?,
        None => None,
    };
    if let Some(s) = &summary
        && !ctx.may_follow(&seen.ns, s)
    {
        let message = format!(
            "bundle {} was brought in by another namespace; a Bundle follows only a bundle \
             its own namespace uploaded or fetched (fetch or upload it here)",
            s.id
        );
        return Ok(Err(("NotOwned", message)));
    }
    Ok(match target_of(b) {
        Ok(target) => Ok(Known { summary, target }),
        Err(message) => Err(("InvalidSpec", message)),
    })
}

/// `b`'s status now: from ShipperD's summary when it holds the bundle; else the last
/// status of one that ended and is no longer kept (`--keep-status`: nothing is fetched
/// again); else its fetch's, starting the fetch when none ran in this generation;
/// else `Pending` (an upload ShipperD does not know yet).
async fn status_of(
    b: &Bundle,
    ctx: &Context,
    seen: &Seen,
    known: &Known,
) -> Result<Result<BundleStatus, Refusal>, Error> {
    let (generation, previous, now) = (seen.generation, &seen.previous, seen.now);
    let pending = |phase, why: Option<&str>| pending_status(phase, why, generation, previous, now);
    let src = &b.spec.source;
    let ended = b.status.as_ref().filter(|st| {
        st.observed_generation == generation && st.phase.is_some_and(BundlePhase::is_terminal)
    });
    Ok(Ok(match &known.summary {
        Some(s) => bundle_status(s, generation, previous, now),
        None if ended.is_some() => ended.cloned().unwrap_or_default(),
        None if src.url.is_some() || src.path.is_some() => match ctx.fetch_state(&seen.uid) {
            Some(Fetch::Failed(why)) => pending(BundlePhase::Failed, Some(&why)),
            Some(Fetch::Running) | Some(Fetch::Done(_)) => pending(BundlePhase::Fetching, None),
            None => {
                if let Err(r) = start(b, ctx, seen, known.target.as_ref()).await? {
                    return Ok(Err(r));
                }
                pending(BundlePhase::Fetching, None)
            }
        },
        None => pending(BundlePhase::Pending, None),
    }))
}

/// Starts fetching (or taking) `b`'s source, unless its cluster target does not serve
/// its namespace (a shared target serves only the namespaces its conditions select).
async fn start(
    b: &Bundle,
    ctx: &Context,
    seen: &Seen,
    target: Option<&TargetName>,
) -> Result<Result<(), Refusal>, Error> {
    let ns = &seen.ns;
    if let Some(t) = crate::cluster::cluster_target(&ctx.client, target).await?
        && !crate::cluster::may_use(&ctx.client, &t, ns).await?
    {
        let message = format!(
            "ClusterRegistryTarget {} does not serve namespace {ns} (its spec.conditions \
             select the namespaces it serves)",
            t.name_any()
        );
        return Ok(Err(("TargetNotAllowed", message)));
    }
    let src = &b.spec.source;
    match (&src.url, &src.path) {
        (Some(url), _) => start_fetch(b, url, target, &seen.uid, ctx).await?,
        (None, Some(path)) => start_take(b, path, target, &seen.uid, ctx)?,
        (None, None) => {}
    }
    Ok(Ok(()))
}

/// Checks the projects a listed bundle's images need, records an Event when the phase
/// moved on, and patches the status when it changed.
async fn write_status(
    b: &Bundle,
    api: &Api<Bundle>,
    ctx: &Context,
    summary: Option<&BundleSummary>,
    status: &BundleStatus,
) -> Result<(), Error> {
    if let Some(s) = summary
        && s.unpacked_at.is_some()
    {
        check_projects(b, s, ctx).await;
    }
    if b.status.as_ref().and_then(|s| s.phase) != status.phase {
        record_phase(b, status, ctx).await;
    }
    if b.status.as_ref() != Some(status) {
        let patch = serde_json::json!({ "status": status });
        api.patch_status(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

/// The registry target `b` names: its namespace's `RegistryTarget`
/// (`<namespace>/<name>`), a `ClusterRegistryTarget` (`<name>`), or the default.
pub(crate) fn target_of(b: &Bundle) -> Result<Option<TargetName>, String> {
    let ns = b.namespace().unwrap_or_default();
    match (&b.spec.target, &b.spec.cluster_target) {
        (Some(_), Some(_)) => Err("set at most one of target and clusterTarget".into()),
        (Some(t), None) => TargetName::namespaced(&ns, t)
            .map(Some)
            .map_err(|e| format!("spec.target: {e}")),
        (None, Some(t)) => match TargetName::parse(t) {
            // `<namespace>/<name>` is a namespace's target: never through this field.
            Ok(name) if name.namespace().is_some() => Err(format!(
                "spec.clusterTarget: {t:?} names a namespace's target; a ClusterRegistryTarget \
                 has a plain name"
            )),
            Ok(name) => Ok(Some(name)),
            Err(e) => Err(format!("spec.clusterTarget: {e}")),
        },
        (None, None) => Ok(None),
    }
}

/// Writes a refusal to `b`'s status (and an Event when it is new); nothing else is done
/// for `b`.
pub(crate) async fn refuse(
    b: &Bundle,
    api: &Api<Bundle>,
    ctx: &Context,
    reason: &str,
    message: &str,
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    now: Timestamp,
) -> Result<Action, Error> {
    let status = crate::bundle::status::refused_status(
        reason,
        message,
        b.metadata.generation,
        previous,
        now,
    );
    if b.status.as_ref().and_then(|s| s.error.as_deref()) != Some(message) {
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&ev, &b.object_ref(&())).await {
            tracing::warn!(%error, "cannot record an Event");
        }
    }
    if b.status.as_ref() != Some(&status) {
        api.patch_status(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await?;
    }
    Ok(Action::await_change())
}
