//! The `Bundle` reconciler: turns a `Bundle` into ShipperD work and mirrors ShipperD's
//! state into its status.
//!
//! - A finalizer (`shipperd.io/cleanup`) is added first; deleting the `Bundle` then
//!   deletes its stored file and state in ShipperD (its images in the registry stay).
//! - A `url` source ShipperD does not hold yet is fetched (`Store::fetch`: resumed,
//!   checked against the `sha256`) in a task of its own; the status says `Fetching`,
//!   and `Failed` with reason `FetchFailed` if it gives up. An `upload` source is
//!   ShipperD's already.
//! - Once ShipperD holds the bundle, the status is written from its summary (see
//!   [`crate::status`]) when it changed, and a Kubernetes Event is recorded when the
//!   phase moves on (`Received`, `Unpacked`, `Published`, `Failed`).

mod adopt;
mod apply;
mod cleanup;
mod events;
mod fetch;

pub use adopt::{adopt, upload_object_name};
use apply::apply;
use cleanup::cleanup;
pub use fetch::confined;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder},
        finalizer::{Event, finalizer},
        reflector::ObjectRef,
    },
};
use shipperd_model::{BundleId, BundleSummary};
use shipperd_state::StateStore;
use shipperd_store::{FetchSettings, Store};

use crate::metrics::counted;
use crate::{cluster::follows, crd::Bundle, error::Error};

/// The finalizer that lets ShipperD clean up a deleted `Bundle`.
pub const FINALIZER: &str = "shipperd.io/cleanup";

/// How soon an unfinished `Bundle` is looked at again.
pub(crate) const REQUEUE: Duration = Duration::from_secs(5);

/// How a fetch started by this operator is doing.
#[derive(Debug, Clone, PartialEq)]
enum Fetch {
    Running,
    Failed(String),
    /// Stored, as this bundle id.
    Done(BundleId),
}

/// What the reconciler works with.
pub struct Context {
    pub client: kube::Client,
    pub store: Arc<Store>,
    pub state: StateStore,
    pub recorder: Recorder,
    pub fetch: FetchSettings,
    /// Fetches started here, by `Bundle` uid and generation.
    fetches: Arc<Mutex<HashMap<String, Fetch>>>,
    /// Create the OpenShift projects a bundle's images land in when missing.
    pub create_projects: bool,
    /// Bundles whose projects were checked, by uid and bundle generation.
    projects_checked: Mutex<std::collections::HashSet<(String, u32)>>,
    /// The namespace whose Bundles follow bundles that came in through the ingest
    /// endpoint or the drop directory (they belong to no other namespace).
    pub upload_namespace: Option<String>,
    /// Where `path` sources are taken from (none may reach outside it).
    pub import_dir: PathBuf,
    /// Reconciles asked for when a fetch ends (no polling).
    wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<Bundle>>,
    pub(crate) woken: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Bundle>>>>,
    /// Failed reconciles in a row, by object: the next try waits longer.
    failures: Mutex<HashMap<String, u32>>,
    /// The operator's namespace: where bundles' contributions to the cluster's
    /// resources are kept (see [`crate::cluster`]).
    pub own_namespace: String,
    /// One change to the cluster's resources at a time (a converge reads every
    /// contribution, then applies and prunes: two at once could prune each other's).
    converging: tokio::sync::Mutex<()>,
    /// Contributions derived from ShipperD's state (see [`crate::cluster::converge`]).
    contributions: std::sync::Mutex<HashMap<(BundleId, bool), crate::cluster::mirrors::Gathered>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Arc<Store>,
        state: StateStore,
        fetch: FetchSettings,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), "shipperd-operator".into());
        let import_dir = store.data().root().join("import");
        let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
        Context {
            client,
            store,
            state,
            recorder,
            fetch,
            fetches: Arc::default(),
            create_projects: false,
            projects_checked: Mutex::default(),
            upload_namespace: None,
            import_dir,
            wake,
            woken: Mutex::new(Some(woken)),
            failures: Mutex::default(),
            own_namespace: "default".into(),
            converging: tokio::sync::Mutex::new(()),
            contributions: std::sync::Mutex::default(),
        }
    }

    /// What cluster resources are written with (see [`crate::cluster::write`]).
    fn cluster(&self) -> crate::cluster::Writer<'_> {
        crate::cluster::Writer {
            sources: crate::cluster::Sources {
                client: &self.client,
                own: &self.own_namespace,
                uploads: self.upload_namespace.as_deref(),
                state: &self.state,
                data: self.store.data(),
                cache: &self.contributions,
            },
            converging: &self.converging,
            recorder: &self.recorder,
        }
    }

    /// Merges every contribution into the cluster's resources (see
    /// [`crate::cluster::Writer::converge`]).
    async fn converge(&self) -> Result<(), String> {
        self.cluster().converge().await
    }

    /// Whether Bundles of namespace `ns` may follow, apply and delete bundle `s`: the
    /// namespace that brought it in, or, for a bundle that came through the ingest
    /// endpoint or the drop directory, the upload namespace.
    pub fn may_follow(&self, ns: &str, s: &BundleSummary) -> bool {
        follows(ns, s.owner.as_deref(), self.upload_namespace.as_deref())
    }

    fn fetch_state(&self, uid: &str) -> Option<Fetch> {
        self.fetches.lock().expect("not poisoned").get(uid).cloned()
    }

    fn set_fetch(&self, uid: &str, f: Fetch) {
        self.fetches
            .lock()
            .expect("not poisoned")
            .insert(uid.to_string(), f);
    }
}

/// Reconciles one `Bundle`.
pub async fn reconcile(b: Arc<Bundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted("Bundle", reconcile_bundle(b, ctx)).await
}

pub(crate) async fn reconcile_bundle(b: Arc<Bundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = b
        .namespace()
        .ok_or_else(|| Error::Invalid("a Bundle is namespaced".into()))?;
    let api: Api<Bundle> = Api::namespaced(ctx.client.clone(), &ns);
    let b_uid = b.uid().unwrap_or_default();
    let seen = b.clone();
    let r = finalizer(&api, FINALIZER, b, |event| async {
        match event {
            Event::Apply(b) => apply(&b, &api, &ctx).await,
            Event::Cleanup(b) => cleanup(&b, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &r {
        Ok(_) => {
            ctx.failures.lock().expect("not poisoned").remove(&b_uid);
        }
        Err(error) => report(&seen, &api, &ctx, error).await,
    }
    r
}

/// An error that reached the reconciler, shown where the user looks: a `Reconciled`
/// condition (`False`, reason `ReconcileError`, until a reconcile succeeds and writes
/// the status again without it) and a Warning Event. Best effort: the API may be what
/// fails.
pub(crate) async fn report(b: &Bundle, api: &Api<Bundle>, ctx: &Context, error: &Error) {
    let message: String = error.to_string().chars().take(1000).collect();
    let mut status = b.status.clone().unwrap_or_default();
    status.conditions.retain(|c| c.type_ != RECONCILED);
    status
        .conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: RECONCILED.into(),
            status: "False".into(),
            reason: "ReconcileError".into(),
            message: message.clone(),
            observed_generation: b.metadata.generation,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ),
        });
    if let Err(e) = api
        .patch_status(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await
    {
        tracing::debug!(error = %e, "cannot show the reconcile error in the status");
    }
    let ev = KubeEvent {
        type_: EventType::Warning,
        reason: "ReconcileError".into(),
        note: Some(message),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &b.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot record an Event");
    }
}

/// The condition an error of the reconciler is shown in.
pub const RECONCILED: &str = "Reconciled";

/// What to do after an error: look again later, a little later each time the same
/// object fails (5 s doubling to 5 min, with jitter); a success resets it.
pub fn error_policy(b: Arc<Bundle>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().expect("not poisoned");
        let n = f.entry(b.uid().unwrap_or_default()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let wait = retry_after(n);
    shipperd_telemetry::metrics::metrics()
        .reconcile_errors
        .get_or_create(&shipperd_telemetry::metrics::labels(
            ("kind", "Bundle"),
            ("error", error.metric_label()),
        ))
        .inc();
    tracing::warn!(%error, failures = n, retry_in = ?wait, "reconciling a Bundle failed");
    Action::requeue(wait)
}

/// The waits after failed reconciles: 5 s doubling to 150 s, plus up to as much again
/// at random (so at most 5 minutes).
pub(crate) const RETRY: shipperd_model::Backoff =
    shipperd_model::Backoff::new(REQUEUE, Duration::from_secs(150));

/// The wait after the `n`th failure in a row.
pub fn retry_after(n: u32) -> Duration {
    RETRY.delay(n)
}

pub(crate) fn parse_id(s: &str) -> Result<BundleId, Error> {
    BundleId::parse(s).map_err(|e| Error::Invalid(format!("bundle id {s:?}: {e}")))
}

/// The id of the bundle a `Bundle` stands for, when it can be known yet.
pub(crate) fn bundle_id(b: &Bundle) -> Result<Option<BundleId>, Error> {
    if let Some(id) = b.status.as_ref().and_then(|s| s.bundle_id.as_deref()) {
        return parse_id(id).map(Some);
    }
    let src = &b.spec.source;
    if let Some(u) = &src.upload {
        return parse_id(&u.bundle_id).map(Some);
    }
    if let Some(u) = &src.url {
        return parse_id(&u.sha256).map(Some);
    }
    if let Some(p) = &src.path {
        return p.sha256.as_deref().map(parse_id).transpose();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bundle::apply::target_of, crd::BundleStatus};

    /// A `Bundle` of namespace `ns` with `spec` (its source a URL unless given).
    fn bundle(ns: &str, mut spec: serde_json::Value) -> Bundle {
        if spec.get("source").is_none() {
            spec["source"] = serde_json::json!({ "url": {
                "url": "https://files.example/b.tar", "sha256": "a".repeat(64) } });
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
            "metadata": { "name": "b", "namespace": ns, "uid": "u", "generation": 1 },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_bundle_names_its_namespaces_target_or_a_cluster_one() {
        let t = |spec| target_of(&bundle("team-a", spec)).map(|t| t.map(|t| t.to_string()));
        assert_eq!(
            t(serde_json::json!({ "target": "mirror" })),
            Ok(Some("team-a/mirror".into()))
        );
        assert_eq!(
            t(serde_json::json!({ "clusterTarget": "shared" })),
            Ok(Some("shared".into()))
        );
        assert_eq!(t(serde_json::json!({})), Ok(None));
        // What the schema refuses, should an object get past it.
        assert!(t(serde_json::json!({ "target": "a", "clusterTarget": "b" })).is_err());
        assert!(
            t(serde_json::json!({ "target": "../x" }))
                .unwrap_err()
                .contains("spec.target")
        );
        assert!(
            t(serde_json::json!({ "clusterTarget": "a/b" })).is_err(),
            "no namespace through a cluster target"
        );
    }

    #[test]
    fn a_bundle_follows_only_what_its_namespace_brought_in() {
        assert!(follows("team-a", Some("team-a"), Some("shipperd")));
        assert!(!follows("team-b", Some("team-a"), Some("shipperd")));
        // An upload belongs to the upload namespace, and to no other.
        assert!(follows("shipperd", None, Some("shipperd")));
        assert!(!follows("team-a", None, Some("shipperd")));
        assert!(!follows("team-a", None, None));
    }

    #[test]
    fn bundle_ids_come_from_the_status_then_the_source() {
        let b = bundle("ns", serde_json::json!({}));
        assert_eq!(bundle_id(&b).unwrap().unwrap().as_str(), "a".repeat(64));
        let mut known = b.clone();
        known.status = Some(BundleStatus {
            bundle_id: Some("b".repeat(64)),
            ..BundleStatus::default()
        });
        assert_eq!(bundle_id(&known).unwrap().unwrap().as_str(), "b".repeat(64));
        let path = bundle(
            "ns",
            serde_json::json!({ "source": { "path": { "path": "x.tar" } } }),
        );
        assert!(
            bundle_id(&path).unwrap().is_none(),
            "known once it is taken"
        );
        let bad = bundle(
            "ns",
            serde_json::json!({ "source": { "url": { "url": "https://x/b.tar", "sha256": "nope" } } }),
        );
        assert!(matches!(bundle_id(&bad), Err(Error::Invalid(_))));
    }

    #[test]
    fn failed_reconciles_wait_longer_each_time_up_to_five_minutes() {
        let secs = |n| retry_after(n).as_secs_f64();
        assert!((5.0..=10.0).contains(&secs(1)), "{}", secs(1));
        assert!((10.0..=20.0).contains(&secs(2)));
        assert!((150.0..=300.0).contains(&secs(20)));
        assert!(secs(u32::MAX) <= 300.0);
    }

    #[test]
    fn path_sources_stay_in_the_namespaces_import_directory() {
        let root = tempfile::tempdir().unwrap();
        let import = root.path().join("import");
        let mine = import.join("team-a");
        std::fs::create_dir_all(mine.join("sub")).unwrap();
        std::fs::create_dir_all(import.join("team-b")).unwrap();
        std::fs::write(mine.join("sub/b.tar"), b"x").unwrap();
        std::fs::write(mine.join("top.tar"), b"y").unwrap();
        std::fs::write(import.join("team-b/theirs.tar"), b"z").unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), mine.join("link")).unwrap();
        std::os::unix::fs::symlink(root.path(), mine.join("up")).unwrap();
        std::os::unix::fs::symlink(import.join("team-b"), import.join("team-c")).unwrap();
        for (ok, leaf) in [("sub/b.tar", "b.tar"), ("top.tar", "top.tar")] {
            let o = confined(&import, "team-a", ok).unwrap();
            assert_eq!(o.leaf, leaf);
            assert!(
                o.shown.ends_with(&format!("import/team-a/{ok}")),
                "{}",
                o.shown
            );
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut &o.file, &mut bytes).unwrap();
            assert_eq!(bytes.len(), 1);
        }
        for (ns, bad, why) in [
            ("team-a", "../secret", "without `..`"),
            ("team-a", "../team-b/theirs.tar", "without `..`"),
            ("team-a", "/etc/passwd", "without `..`"),
            ("team-a", "", "without `..`"),
            ("team-a", "link", "symbolic link"),
            ("team-a", "up/secret", "symbolic link"),
            ("team-a", "sub", "not a regular file"),
            (
                "team-a",
                "missing.tar",
                "not in the import directory of namespace team-a",
            ),
            // Another namespace's staged file is not there for this one.
            ("team-a", "theirs.tar", "not in the import directory"),
            // A namespace directory that is a link leads nowhere.
            ("team-c", "theirs.tar", "symbolic link"),
            ("team-d", "x.tar", "not in the import directory"),
        ] {
            let e = confined(&import, ns, bad).err().expect("refused");
            assert!(e.contains(why), "{ns} {bad}: {e}");
        }
    }
}
