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
use shipperd_model::{BundleId, BundleSummary, TargetName};

use super::{
    Context, Fetch, bundle_id,
    events::{check_projects, record_phase},
    fetch::{start_fetch, start_take},
    retry_after,
};
use crate::status::{bundle_status, pending_status};
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

/// Why a `Bundle` is refused: its reason and message.
type Refusal = (&'static str, String);

pub(crate) async fn apply(b: &Bundle, api: &Api<Bundle>, ctx: &Context) -> Result<Action, Error> {
    let seen = &Seen::of(b);
    let refused = |(reason, message): Refusal| async move {
        refuse(b, api, ctx, reason, &message, &seen.previous, seen.now).await
    };
    let (summary, next) = identify(b, ctx, seen).await?;
    let mut status = match next {
        Next::Refuse(r) => return refused(r).await,
        Next::Status(s) => *s,
        Next::Start => {
            let target = target_of(b).ok().flatten();
            if let Err(r) = start(b, ctx, seen, target.as_ref()).await? {
                return refused(r).await;
            }
            pending_status(
                BundlePhase::Fetching,
                None,
                seen.generation,
                &seen.previous,
                seen.now,
            )
        }
    };
    status.cluster_resources = b.status.as_ref().and_then(|s| s.cluster_resources.clone());
    // Cluster resources that could not be written do not hold the status back: a
    // Warning Event says why, and they are tried again later.
    let mut again = false;
    if let Some(s) = &summary
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
    write_status(b, api, ctx, summary.as_ref(), &status).await?;
    // Watch-driven: ShipperD's state changes and ended fetches reconcile again; only
    // cluster resources that could not be written are tried again on a timer.
    Ok(if again {
        Action::requeue(retry_after(2))
    } else {
        Action::await_change()
    })
}

/// What a reconcile does with a `Bundle`, decided from what is known of it.
#[derive(Debug, PartialEq)]
enum Next {
    /// Refused: a `Warning` Event and a `Failed` status with this reason and message.
    Refuse(Refusal),
    /// Its status is this.
    Status(Box<BundleStatus>),
    /// Its source must be fetched (or taken) first.
    Start,
}

/// The id of the bundle `b` stands for: from its status or source, or from a fetch of
/// this generation that ended (a path source without a sha256). A spec the schema
/// would have refused (an object older than it) is refused.
fn which(b: &Bundle, fetch: Option<&Fetch>) -> Result<Option<BundleId>, Refusal> {
    match bundle_id(b) {
        Err(e) => Err(("InvalidSpec", e.to_string())),
        Ok(Some(id)) => Ok(Some(id)),
        Ok(None) => Ok(match fetch {
            Some(Fetch::Done(id)) => Some(id.clone()),
            _ => None,
        }),
    }
}

/// What to do with `b`, knowing ShipperD's summary of its bundle (if it holds it),
/// whether its namespace may follow that bundle, and how this generation's fetch is
/// doing. A bundle another namespace brought in is refused (a Bundle cannot read, apply
/// or delete another namespace's); so is a target it may not name. Its status comes
/// from the summary when ShipperD holds the bundle; else it is the last status of one
/// that ended and is no longer kept (`--keep-status`: nothing is fetched again); else
/// its fetch's, the fetch started when none ran in this generation; else `Pending` (an
/// upload ShipperD does not know yet).
fn decide(
    b: &Bundle,
    seen: &Seen,
    summary: Option<&BundleSummary>,
    follows: bool,
    fetch: Option<&Fetch>,
) -> Next {
    let (generation, previous, now) = (seen.generation, &seen.previous, seen.now);
    let pending = |phase, why: Option<&str>| {
        Next::Status(Box::new(pending_status(
            phase, why, generation, previous, now,
        )))
    };
    if let Some(s) = summary
        && !follows
    {
        return Next::Refuse((
            "NotOwned",
            format!(
                "bundle {} was brought in by another namespace; a Bundle follows only a \
                 bundle its own namespace uploaded or fetched (fetch or upload it here)",
                s.id
            ),
        ));
    }
    if let Err(message) = target_of(b) {
        return Next::Refuse(("InvalidSpec", message));
    }
    let src = &b.spec.source;
    let ended = b.status.as_ref().filter(|st| {
        st.observed_generation == generation && st.phase.is_some_and(BundlePhase::is_terminal)
    });
    match summary {
        Some(s) => Next::Status(Box::new(bundle_status(s, generation, previous, now))),
        None if ended.is_some() => Next::Status(Box::new(ended.cloned().unwrap_or_default())),
        None if src.url.is_some() || src.path.is_some() => match fetch {
            Some(Fetch::Failed(why)) => pending(BundlePhase::Failed, Some(why)),
            Some(Fetch::Running) | Some(Fetch::Done(_)) => pending(BundlePhase::Fetching, None),
            None => Next::Start,
        },
        None => pending(BundlePhase::Pending, None),
    }
}

/// ShipperD's summary of `b`'s bundle, and what to do with `b`.
async fn identify(
    b: &Bundle,
    ctx: &Context,
    seen: &Seen,
) -> Result<(Option<BundleSummary>, Next), Error> {
    let fetch = ctx.fetch_state(&seen.uid);
    let id = match which(b, fetch.as_ref()) {
        Ok(id) => id,
        Err(r) => return Ok((None, Next::Refuse(r))),
    };
    let summary = match &id {
        Some(id) => ctx.state.summary(id).await?,
        None => None,
    };
    let follows = summary.as_ref().is_none_or(|s| ctx.may_follow(&seen.ns, s));
    let next = decide(b, seen, summary.as_ref(), follows, fetch.as_ref());
    Ok((summary, next))
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
    let status =
        crate::status::refused_status(reason, message, b.metadata.generation, previous, now);
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

#[cfg(test)]
mod tests {
    //! Each branch of the reconciler's decision, on fixtures (no API server, no NATS):
    //! what it refuses, what status it writes, when it starts a fetch.

    use super::*;
    use crate::crd::BundlePhase;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn bundle(spec: serde_json::Value) -> Bundle {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
            "metadata": { "name": "b", "namespace": "team-a", "uid": "u", "generation": 2 },
            "spec": spec,
        }))
        .unwrap()
    }

    fn url() -> serde_json::Value {
        serde_json::json!({ "source": { "url": { "url": "https://files.example/b.tar", "sha256": A } } })
    }

    fn upload() -> serde_json::Value {
        serde_json::json!({ "source": { "upload": { "name": "b.tar", "bundleId": A } } })
    }

    fn summary(phase: shipperd_model::Phase) -> BundleSummary {
        let mut s = BundleSummary::new(
            BundleId::parse(A).unwrap(),
            "b.tar".into(),
            10,
            "bundles/a/bundle".into(),
            None,
        );
        s.phase = phase;
        s
    }

    fn phase(next: &Next) -> Option<BundlePhase> {
        match next {
            Next::Status(s) => s.phase,
            _ => None,
        }
    }

    #[test]
    fn a_spec_the_schema_would_refuse_is_refused() {
        let mut spec = url();
        spec["source"]["url"]["sha256"] = "nope".into();
        let b = bundle(spec);
        assert!(matches!(which(&b, None), Err(("InvalidSpec", _))));
        // Two targets at once: the schema's one-of, got past it.
        let mut spec = upload();
        spec["target"] = "mine".into();
        spec["clusterTarget"] = "shared".into();
        let b = bundle(spec);
        let next = decide(&b, &Seen::of(&b), None, true, None);
        assert!(matches!(next, Next::Refuse(("InvalidSpec", _))), "{next:?}");
    }

    #[test]
    fn a_bundle_another_namespace_brought_in_is_refused() {
        let b = bundle(upload());
        let s = summary(shipperd_model::Phase::Published);
        let next = decide(&b, &Seen::of(&b), Some(&s), false, None);
        match next {
            Next::Refuse(("NotOwned", why)) => assert!(why.contains(A), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_held_bundle_s_status_comes_from_its_summary() {
        let b = bundle(upload());
        for (p, want) in [
            (shipperd_model::Phase::Received, BundlePhase::Received),
            (shipperd_model::Phase::Publishing, BundlePhase::Publishing),
            (shipperd_model::Phase::Published, BundlePhase::Published),
        ] {
            let next = decide(&b, &Seen::of(&b), Some(&summary(p)), true, None);
            assert_eq!(phase(&next), Some(want), "{p:?}: {next:?}");
        }
    }

    #[test]
    fn an_ended_bundle_no_longer_kept_keeps_its_last_status_and_fetches_nothing() {
        let mut b = bundle(url());
        b.status = Some(BundleStatus {
            phase: Some(BundlePhase::Published),
            observed_generation: Some(2),
            ..BundleStatus::default()
        });
        let next = decide(&b, &Seen::of(&b), None, true, None);
        assert_eq!(phase(&next), Some(BundlePhase::Published), "{next:?}");
        // An edit (a new generation) fetches again.
        b.metadata.generation = Some(3);
        assert_eq!(decide(&b, &Seen::of(&b), None, true, None), Next::Start);
    }

    #[test]
    fn a_source_not_held_is_fetched_once_per_generation() {
        let b = bundle(url());
        let seen = Seen::of(&b);
        assert_eq!(decide(&b, &seen, None, true, None), Next::Start);
        for f in [Fetch::Running, Fetch::Done(BundleId::parse(A).unwrap())] {
            let next = decide(&b, &seen, None, true, Some(&f));
            assert_eq!(phase(&next), Some(BundlePhase::Fetching), "{f:?}");
        }
        let failed = Fetch::Failed("503 from files.example".into());
        match decide(&b, &seen, None, true, Some(&failed)) {
            Next::Status(s) => {
                assert_eq!(s.phase, Some(BundlePhase::Failed));
                assert!(
                    s.conditions.iter().any(|c| c.message.contains("503")),
                    "{s:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_path_source_without_a_sha256_is_known_once_taken() {
        let b = bundle(serde_json::json!({ "source": { "path": { "path": "b.tar" } } }));
        assert_eq!(which(&b, None), Ok(None));
        assert_eq!(which(&b, Some(&Fetch::Running)), Ok(None));
        let done = Fetch::Done(BundleId::parse(A).unwrap());
        assert_eq!(which(&b, Some(&done)).unwrap().unwrap().as_str(), A);
    }

    #[test]
    fn an_upload_shipperd_does_not_know_yet_is_pending() {
        let b = bundle(upload());
        let next = decide(&b, &Seen::of(&b), None, true, None);
        assert_eq!(phase(&next), Some(BundlePhase::Pending), "{next:?}");
    }
}
