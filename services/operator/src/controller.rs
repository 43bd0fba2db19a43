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
use shipperd_model::{BundleId, BundleSummary, TargetName};
use shipperd_state::StateStore;
use shipperd_store::{FetchSettings, FetchSource, Store};

pub use crate::error::Error;
use crate::{
    cluster::follows,
    crd::{Bundle, BundlePhase, BundleStatus},
    status::{bundle_status, pending_status},
};

/// The finalizer that lets ShipperD clean up a deleted `Bundle`.
pub const FINALIZER: &str = "shipperd.io/cleanup";
/// How soon an unfinished `Bundle` is looked at again.
const REQUEUE: Duration = Duration::from_secs(5);

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
    woken: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Bundle>>>>,
    /// Failed reconciles in a row, by object: the next try waits longer.
    failures: Mutex<HashMap<String, u32>>,
    /// The operator's namespace: where bundles' contributions to the cluster's
    /// resources are kept (see [`crate::cluster`]).
    pub own_namespace: String,
    /// One change to the cluster's resources at a time (a converge reads every
    /// contribution, then applies and prunes: two at once could prune each other's).
    converging: tokio::sync::Mutex<()>,
    /// Contributions derived from ShipperD's state (see [`crate::cluster::converge`]).
    contributions: std::sync::Mutex<HashMap<(BundleId, bool), crate::mirrors::Gathered>>,
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

    /// Merges every contribution into the cluster's resources (one at a time), and tells
    /// each Bundle that lost something of it (a Warning Event `ClusterResourcesConflict`
    /// naming both).
    async fn converge(&self) -> Result<(), String> {
        let told = {
            let _one = self.converging.lock().await;
            crate::cluster::converge(&crate::cluster::Sources {
                client: &self.client,
                own: &self.own_namespace,
                uploads: self.upload_namespace.as_deref(),
                state: &self.state,
                data: self.store.data(),
                cache: &self.contributions,
            })
            .await?
        };
        for t in told {
            tracing::warn!(bundle = ?t.regarding.name, message = %t.message, "cluster resources not applied");
            let ev = KubeEvent {
                type_: EventType::Warning,
                reason: "ClusterResourcesConflict".into(),
                note: Some(t.message.chars().take(1000).collect()),
                action: "Apply".into(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&ev, &t.regarding).await {
                tracing::warn!(%error, "cannot record an Event");
            }
        }
        Ok(())
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

/// Settings of the operator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where NATS is and how to log in (servers, credentials, TLS, replicas).
    pub nats: shipperd_bus::NatsConfig,
    pub data_dir: shipperd_model::DataDir,
    /// Watch `Bundle`s in this namespace only (default: every namespace).
    pub namespace: Option<String>,
    /// The largest bundle fetched.
    pub max_bundle_bytes: u64,
    pub fetch: FetchSettings,
    /// Act only while holding this Lease (namespace, settings): several replicas, one
    /// acting.
    pub leader: Option<(String, crate::leader::Settings)>,
    /// Where `Bundle` objects are created for bundles that arrive through the ingest
    /// endpoint or the drop directory (`None`: none are).
    pub upload_namespace: Option<String>,
    /// Where `RegistryTarget`s are written for the services (their `--targets`).
    pub targets_output: crate::targets::Output,
    /// Where `WebhookTarget`s are written for notify (its `--webhooks-file`).
    pub webhooks_output: PathBuf,
    /// Create missing OpenShift projects for the internal registry.
    pub create_projects: bool,
    /// Where `path` sources are taken from.
    pub import_dir: Option<PathBuf>,
    /// The operator's namespace (a cluster target's Secrets and ConfigMaps are there).
    pub own_namespace: String,
    /// Hosts besides OpenShift's internal registry that may get ShipperD's
    /// service-account token.
    pub service_account_token_hosts: Vec<String>,
}

/// Runs the `Bundle` controller until `shutdown`: while this replica holds the leader
/// lease when `config.leader` is set, else at once. A `Bundle` is reconciled when it
/// changes and when ShipperD's summary of its bundle changes (a watch of the
/// `shipperd-bundles` bucket), not by polling every bundle.
pub async fn run(
    config: Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    let client = kube::Client::try_default().await?;
    let bus = shipperd_bus::Bus::connect_with(&config.nats, "shipperd-operator").await?;
    bus.ensure_topology().await?;
    let store = Store::attach(bus.clone(), &config.data_dir, config.max_bundle_bytes).await?;
    let state = StateStore::open(&bus).await?;
    let mut ctx = Context::new(client.clone(), Arc::new(store), state, config.fetch.clone());
    ctx.create_projects = config.create_projects;
    ctx.upload_namespace = config.upload_namespace.clone();
    ctx.own_namespace = config.own_namespace.clone();
    if let Some(dir) = &config.import_dir {
        ctx.import_dir = dir.clone();
    }
    let ctx = Arc::new(ctx);
    let mut targets = crate::targets::TargetsContext::new(
        client.clone(),
        config.targets_output.clone(),
        config.own_namespace.clone(),
    );
    targets.watch_namespace = config.namespace.clone();
    targets.service_account_token_hosts = config.service_account_token_hosts.clone();
    targets.upload_namespace = config.upload_namespace.clone();
    let targets = Arc::new(targets);
    let webhooks = Arc::new(crate::webhooks::WebhooksContext {
        client: client.clone(),
        file: config.webhooks_output.clone(),
        secrets: config.data_dir.root().join("config/webhooks"),
        watch_namespace: config.namespace.clone(),
        upload_namespace: config.upload_namespace.clone(),
    });
    match &config.leader {
        Some((namespace, settings)) => {
            let leases = Api::namespaced(client.clone(), namespace);
            let elector = crate::leader::Elector::new(leases, settings.clone());
            let (namespace, uploads) = (config.namespace.clone(), config.upload_namespace.clone());
            elector
                .run(shutdown, move |lead| {
                    let (client, ctx, targets) = (client.clone(), ctx.clone(), targets.clone());
                    let webhooks = webhooks.clone();
                    let (namespace, uploads) = (namespace.clone(), uploads.clone());
                    async move {
                        let t = control_targets(targets, namespace.clone(), lead.clone());
                        let w = control_webhooks(webhooks, namespace.clone(), lead.clone());
                        let b = control(client, ctx, namespace, uploads, lead);
                        if let (_, _, Err(error)) = tokio::join!(t, w, b) {
                            tracing::error!(%error, "the controller stopped");
                        }
                    }
                })
                .await;
            Ok(())
        }
        None => {
            let (namespace, uploads) = (config.namespace.clone(), config.upload_namespace.clone());
            let t = control_targets(targets, namespace.clone(), shutdown.clone());
            let w = control_webhooks(webhooks, namespace.clone(), shutdown.clone());
            let b = control(client, ctx, namespace, uploads, shutdown.clone());
            let all = async { tokio::join!(t, w, b).2 };
            // Told to stop, the controllers get a grace period; one stuck on NATS or
            // the API server is not waited for longer.
            let grace = async {
                shutdown.cancelled().await;
                shipperd_model::deadline(crate::leader::WORK_GRACE).await;
            };
            tokio::select! {
                r = all => r,
                () = grace => {
                    tracing::warn!("the controllers did not stop in time; leaving them");
                    Ok(())
                }
            }
        }
    }
}

/// The `RegistryTarget` and `ClusterRegistryTarget` controllers, until `stop`: each
/// reconcile renders the whole targets file (one writer: this, the leader). Reconciled
/// when a target changes, when a labelled Secret it names changes (credentials
/// rotated), every [`crate::targets::RESYNC`] (a renewed CA), and the file is rendered
/// again when a target is deleted.
async fn control_targets(
    ctx: Arc<crate::targets::TargetsContext>,
    namespace: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::{Controller, watcher};

    use crate::crd::{ClusterRegistryTarget, RegistryTarget};

    let client = ctx.client.clone();
    let labelled = || {
        watcher::Config::default().labels(&format!("{}=true", crate::targets::CREDENTIALS_LABEL))
    };
    let (targets, secrets): (Api<RegistryTarget>, Api<Secret>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let own_secrets: Api<Secret> = Api::namespaced(client.clone(), &ctx.own_namespace);
    let cluster: Api<ClusterRegistryTarget> = Api::all(client.clone());

    let namespaced = Controller::new(targets.clone(), watcher::Config::default());
    let targets_deleted = targets;
    let cache = namespaced.store();
    let namespaced = namespaced
        .watches(secrets, labelled(), move |s: Secret| {
            // The targets of the Secret's namespace that name it.
            let name = s.name_any();
            cache
                .state()
                .into_iter()
                .filter(|t| t.namespace() == s.namespace() && names_secret(&t.spec, &name))
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            |o, c| counted("RegistryTarget", crate::targets::reconcile(o, c)),
            |_t, error, _ctx| {
                tracing::warn!(%error, "reconciling a RegistryTarget failed");
                Action::requeue(REQUEUE)
            },
            ctx.clone(),
        )
        .for_each(|_| async {});

    let clustered = Controller::new(cluster.clone(), watcher::Config::default());
    let cache = clustered.store();
    let clustered = clustered
        .watches(own_secrets, labelled(), move |s: Secret| {
            let name = s.name_any();
            cache
                .state()
                .into_iter()
                .filter(|t| names_secret(&t.spec.target, &name))
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            |o, c| {
                counted(
                    "ClusterRegistryTarget",
                    crate::targets::reconcile_cluster(o, c),
                )
            },
            |_t, error, _ctx| {
                tracing::warn!(%error, "reconciling a ClusterRegistryTarget failed");
                Action::requeue(REQUEUE)
            },
            ctx.clone(),
        )
        .for_each(|_| async {});

    // A deleted target reconciles nothing: render the file again without it.
    let ctx2 = ctx.clone();
    let deleted = on_deletions(
        futures::stream::select(deletions(targets_deleted), deletions(cluster)),
        stop,
        move || {
            let ctx = ctx2.clone();
            async move { crate::targets::render(&ctx).await.map(drop) }
        },
    );
    tokio::join!(namespaced, clustered, deleted);
}

/// A tick each time an object `api` lists is deleted.
fn deletions<K>(api: Api<K>) -> futures::stream::BoxStream<'static, ()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    use futures::StreamExt as _;
    use kube::runtime::watcher;
    watcher(api, watcher::Config::default())
        .filter_map(|e| async move { matches!(e, Ok(watcher::Event::Delete(_))).then_some(()) })
        .boxed()
}

/// Renders a file again (`render`) after each deletion, until `stop`.
async fn on_deletions<F, Fut>(
    mut events: impl futures::Stream<Item = ()> + Unpin,
    stop: tokio_util::sync::CancellationToken,
    render: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::targets::Error>>,
{
    use futures::StreamExt as _;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            e = events.next() => {
                if e.is_none() {
                    break;
                }
                if let Err(error) = render().await {
                    tracing::warn!(%error, "rendering a file again after a deletion failed");
                }
            }
        }
    }
}

/// Whether a target names Secret `name` (credentials, or its CA).
fn names_secret(spec: &crate::crd::RegistryTargetSpec, name: &str) -> bool {
    spec.credentials
        .as_ref()
        .and_then(|c| c.secret_name.as_deref())
        == Some(name)
        || spec
            .ca
            .as_ref()
            .and_then(|c| c.secret_key_ref.as_ref())
            .is_some_and(|r| r.name == name)
}

/// The `WebhookTarget` controller, until `stop` (and when a Secret of its namespace
/// changes: a rotated signing secret).
async fn control_webhooks(
    ctx: Arc<crate::webhooks::WebhooksContext>,
    namespace: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::{Controller, watcher};

    use crate::crd::WebhookTarget;

    let client = ctx.client.clone();
    let (hooks, secrets): (Api<WebhookTarget>, Api<Secret>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(hooks.clone(), watcher::Config::default());
    let cache = controller.store();
    let labelled =
        watcher::Config::default().labels(&format!("{}=true", crate::targets::CREDENTIALS_LABEL));
    let controlled = controller
        .watches(secrets, labelled, move |s: Secret| {
            // The webhooks of the Secret's namespace signing with it.
            let name = s.name_any();
            cache
                .state()
                .into_iter()
                .filter(|w| w.namespace() == s.namespace() && w.spec.signing_secret.name == name)
                .map(|w| ObjectRef::from_obj(&*w))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            |o, c| counted("WebhookTarget", crate::webhooks::reconcile(o, c)),
            |_w, error, _ctx| {
                tracing::warn!(%error, "reconciling a WebhookTarget failed");
                Action::requeue(REQUEUE)
            },
            ctx.clone(),
        )
        .for_each(|_| async {});
    // A deleted webhook reconciles nothing: render the file again without it.
    let deleted = on_deletions(deletions(hooks), stop, move || {
        let ctx = ctx.clone();
        async move { crate::webhooks::render(&ctx).await.map(drop) }
    });
    tokio::join!(controlled, deleted);
}

/// The controller, until `stop`.
async fn control(
    client: kube::Client,
    ctx: Arc<Context>,
    namespace: Option<String>,
    uploads: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    use futures::StreamExt as _;
    use kube::runtime::{Controller, watcher};

    let bundles: Api<Bundle> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let adopt_in: Option<Api<Bundle>> = uploads.map(|ns| Api::namespaced(client, &ns));
    if let Some(api) = &adopt_in {
        // Bundles that arrived while no operator ran, and no Bundle stands for.
        let known: std::collections::HashSet<BundleId> = bundles
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter_map(|b| bundle_id(b).ok().flatten())
            .collect();
        for s in ctx.state.list().await? {
            if !known.contains(&s.id)
                && let Err(error) = adopt(api, &s).await
            {
                tracing::warn!(%error, bundle_id = %s.id, "cannot create a Bundle for an upload");
            }
        }
    }
    let controller = Controller::new(bundles, watcher::Config::default());
    let cache = controller.store();
    let state = ctx.state.clone();
    // Fetches that ended ask for their Bundle's reconcile.
    let woken = ctx.woken.lock().expect("not poisoned").take();
    let woken = futures::stream::unfold(woken, |rx| async move {
        let mut rx = rx?;
        let r = rx.recv().await?;
        Some((r, Some(rx)))
    });
    let changed = ctx
        .state
        .changes()
        .await?
        .then(move |id| {
            let (cache, state, adopt_in) = (cache.clone(), state.clone(), adopt_in.clone());
            async move {
                let refs: Vec<ObjectRef<Bundle>> = cache
                    .state()
                    .into_iter()
                    .filter(|b| bundle_id(b).ok().flatten().as_ref() == Some(&id))
                    .map(|b| ObjectRef::from_obj(&*b))
                    .collect();
                if refs.is_empty()
                    && let Some(api) = &adopt_in
                    && let Ok(Some(s)) = state.summary(&id).await
                    && let Err(error) = adopt(api, &s).await
                {
                    tracing::warn!(%error, bundle_id = %id, "cannot create a Bundle for an upload");
                }
                futures::stream::iter(refs)
            }
        })
        .flatten();
    tracing::info!(?namespace, "reconciling Bundles");
    controller
        .reconcile_on(futures::stream::select(changed.boxed(), woken.boxed()))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(error) = r {
                tracing::debug!(%error, "reconcile");
            }
        })
        .await;
    Ok(())
}

/// Counts a reconcile of `kind` (`shipperd_operator_reconciles_total{kind, result}`).
fn count(kind: &'static str, ok: bool) {
    shipperd_telemetry::metrics::metrics()
        .reconciles
        .get_or_create(&shipperd_telemetry::metrics::labels(
            ("kind", kind),
            ("result", if ok { "ok" } else { "error" }),
        ))
        .inc();
}

/// A reconcile of `kind`, counted when it ends.
async fn counted<T, E>(
    kind: &'static str,
    reconcile: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let r = reconcile.await;
    count(kind, r.is_ok());
    r
}

/// The name of the `Bundle` made for an uploaded bundle: its file name and short id.
pub fn upload_object_name(s: &BundleSummary) -> String {
    let mut name: String = s
        .name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').chars().take(40).collect();
    let name = name.trim_end_matches('-');
    let short = &s.id.as_str()[..12];
    if name.is_empty() {
        format!("upload-{short}")
    } else {
        format!("{name}-{short}")
    }
}

/// Creates the `Bundle` of a bundle that arrived through ingest (an `upload` source),
/// unless it is there already. Whether it created one.
pub async fn adopt(api: &Api<Bundle>, s: &BundleSummary) -> Result<bool, Error> {
    if s.deleting || s.owner.is_some() {
        // Being deleted, or brought in by a namespace's Bundle, which stands for it.
        return Ok(false);
    }
    let (target, cluster_target) = match &s.target {
        Some(t) if t.namespace().is_some() => (Some(t.name().to_string()), None),
        Some(t) => (None, Some(t.to_string())),
        None => (None, None),
    };
    let mut b = Bundle::new(
        &upload_object_name(s),
        crate::crd::BundleSpec {
            source: crate::crd::BundleSource {
                upload: Some(crate::crd::UploadSource {
                    name: s.name.clone(),
                    bundle_id: s.id.to_string(),
                }),
                url: None,
                path: None,
            },
            target,
            cluster_target,
            apply_cluster_resources: false,
            tag_mirror_set: false,
        },
    );
    b.metadata.labels = Some(
        [(
            "shipperd.io/bundle".to_string(),
            s.id.as_str()[..12].to_string(),
        )]
        .into(),
    );
    match api.create(&kube::api::PostParams::default(), &b).await {
        Ok(_) => {
            tracing::info!(bundle_id = %s.id, name = %b.name_any(), "Bundle created for an upload");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reconciles one `Bundle`.
pub async fn reconcile(b: Arc<Bundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted("Bundle", reconcile_bundle(b, ctx)).await
}

async fn reconcile_bundle(b: Arc<Bundle>, ctx: Arc<Context>) -> Result<Action, Error> {
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
async fn report(b: &Bundle, api: &Api<Bundle>, ctx: &Context, error: &Error) {
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
const RETRY: shipperd_model::Backoff =
    shipperd_model::Backoff::new(REQUEUE, Duration::from_secs(150));

/// The wait after the `n`th failure in a row.
pub fn retry_after(n: u32) -> Duration {
    RETRY.delay(n)
}

fn parse_id(s: &str) -> Result<BundleId, Error> {
    BundleId::parse(s).map_err(|e| Error::Invalid(format!("bundle id {s:?}: {e}")))
}

/// The id of the bundle a `Bundle` stands for, when it can be known yet.
fn bundle_id(b: &Bundle) -> Result<Option<BundleId>, Error> {
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

async fn apply(b: &Bundle, api: &Api<Bundle>, ctx: &Context) -> Result<Action, Error> {
    let generation = b.metadata.generation;
    let previous = b
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let now = Timestamp::now();
    // Fetches are per generation: editing a Bundle whose fetch failed tries again.
    let uid = format!(
        "{}/{}",
        b.uid().unwrap_or_default(),
        generation.unwrap_or(0)
    );
    let id = match bundle_id(b) {
        Err(Error::Invalid(message)) => {
            // A spec the schema would have refused (an object older than it).
            return refuse(b, api, ctx, "InvalidSpec", &message, &previous, now).await;
        }
        Err(e) => return Err(e),
        Ok(Some(id)) => Some(id),
        // A path source without a sha256: known once it is stored.
        Ok(None) => match ctx.fetch_state(&uid) {
            Some(Fetch::Done(id)) => Some(id),
            _ => None,
        },
    };
    let summary = match &id {
        Some(id) => ctx.state.summary(id).await?,
        None => None,
    };
    let ns = b.namespace().unwrap_or_default();
    // A Bundle follows only a bundle its own namespace brought in: it cannot read,
    // apply or delete another namespace's.
    if let Some(s) = &summary
        && !ctx.may_follow(&ns, s)
    {
        let message = format!(
            "bundle {} was brought in by another namespace; a Bundle follows only a bundle \
             its own namespace uploaded or fetched (fetch or upload it here)",
            s.id
        );
        return refuse(b, api, ctx, "NotOwned", &message, &previous, now).await;
    }
    let target = match target_of(b) {
        Ok(t) => t,
        Err(message) => {
            return refuse(b, api, ctx, "InvalidSpec", &message, &previous, now).await;
        }
    };
    let src = &b.spec.source;
    // A bundle that ended in this generation and whose status ShipperD no longer keeps
    // (`--keep-status`): its last status stands; nothing is fetched again.
    let ended = b.status.as_ref().filter(|st| {
        st.observed_generation == generation && st.phase.is_some_and(BundlePhase::is_terminal)
    });
    let status = match &summary {
        Some(s) => bundle_status(s, generation, &previous, now),
        None if ended.is_some() => ended.cloned().unwrap_or_default(),
        None if src.url.is_some() || src.path.is_some() => match ctx.fetch_state(&uid) {
            Some(Fetch::Failed(why)) => {
                pending_status(BundlePhase::Failed, Some(&why), generation, &previous, now)
            }
            Some(Fetch::Running) | Some(Fetch::Done(_)) => {
                pending_status(BundlePhase::Fetching, None, generation, &previous, now)
            }
            None => {
                // A shared target serves only the namespaces its conditions select.
                if let Some(t) =
                    crate::cluster::cluster_target(&ctx.client, target.as_ref()).await?
                    && !crate::cluster::may_use(&ctx.client, &t, &ns).await?
                {
                    let message = format!(
                        "ClusterRegistryTarget {} does not serve namespace {ns} (its \
                         spec.conditions select the namespaces it serves)",
                        t.name_any()
                    );
                    return refuse(b, api, ctx, "TargetNotAllowed", &message, &previous, now).await;
                }
                match (&src.url, &src.path) {
                    (Some(url), _) => start_fetch(b, url, target.as_ref(), &uid, ctx).await?,
                    (None, Some(path)) => start_take(b, path, target.as_ref(), &uid, ctx)?,
                    (None, None) => {}
                }
                pending_status(BundlePhase::Fetching, None, generation, &previous, now)
            }
        },
        None => pending_status(BundlePhase::Pending, None, generation, &previous, now),
    };
    let mut status = status;
    status.cluster_resources = b.status.as_ref().and_then(|s| s.cluster_resources.clone());
    // Cluster resources that could not be written (no right to, an API refusing a
    // mirror set) do not hold the status back: a Warning Event says why, and they are
    // tried again later.
    let mut again = false;
    if let Some(s) = &summary
        && s.phase == shipperd_model::Phase::Published
        && status.cluster_resources.is_none()
    {
        // Cluster resources are applied only for a bundle published through a
        // ClusterRegistryTarget that allows it: a namespace never changes nodes.
        let written =
            match crate::cluster::policy(&ctx.client, s.target.as_ref(), &ns, &ctx.own_namespace)
                .await
            {
                Ok(policy) => {
                    let apply = b.spec.apply_cluster_resources && policy.apply;
                    let tags = b.spec.tag_mirror_set;
                    let data = ctx.store.data();
                    match crate::cluster::resources(
                        &ctx.state,
                        data,
                        s,
                        tags,
                        tags && policy.tag_mirror_sets,
                    )
                    .await
                    {
                        Ok((res, contribution)) => {
                            let client = &ctx.client;
                            let own = &ctx.own_namespace;
                            let order = s.order.unwrap_or_default();
                            async {
                                let name = crate::cluster::publish(client, b, &res)
                                    .await
                                    .map_err(|e| e.to_string())?;
                                if apply {
                                    // The converge derives the contribution from the
                                    // Bundle's status: it must name its bundle by now.
                                    let named =
                                        b.status.as_ref().and_then(|st| st.bundle_id.as_deref());
                                    if named != Some(s.id.as_str()) {
                                        let patch =
                                            serde_json::json!({ "status": { "bundleId": s.id } });
                                        api.patch_status(
                                            &b.name_any(),
                                            &PatchParams::default(),
                                            &Patch::Merge(&patch),
                                        )
                                        .await
                                        .map_err(|e| e.to_string())?;
                                    }
                                    crate::cluster::contribute(
                                        client,
                                        own,
                                        b,
                                        order,
                                        &contribution,
                                    )
                                    .await
                                    .map_err(|e| e.to_string())?;
                                    ctx.converge().await?;
                                }
                                Ok::<_, String>(name)
                            }
                            .await
                            .map(|name| (name, policy))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
        let ev = match &written {
            Ok((name, policy)) => {
                status.cluster_resources = Some(name.clone());
                let refused = (b.spec.apply_cluster_resources && !policy.apply)
                    || (b.spec.apply_cluster_resources
                        && b.spec.tag_mirror_set
                        && !policy.tag_mirror_sets);
                if refused {
                    Some(KubeEvent {
                        type_: EventType::Warning,
                        reason: "ClusterResourcesNotAllowed".into(),
                        note: Some(format!(
                            "not applied: {}; they are in ConfigMap {name} for an admin to apply",
                            policy.why_not()
                        )),
                        action: "Apply".into(),
                        secondary: None,
                    })
                } else {
                    b.spec.apply_cluster_resources.then(|| KubeEvent {
                        type_: EventType::Normal,
                        reason: "ClusterResourcesApplied".into(),
                        note: Some(format!(
                            "mirror sets and catalog sources from ConfigMap {name}"
                        )),
                        action: "Apply".into(),
                        secondary: None,
                    })
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot write the bundle's cluster resources; will retry");
                again = true;
                Some(KubeEvent {
                    type_: EventType::Warning,
                    reason: "ClusterResourcesFailed".into(),
                    note: Some(error.chars().take(1000).collect()),
                    action: "Apply".into(),
                    secondary: None,
                })
            }
        };
        if let Some(ev) = ev
            && let Err(error) = ctx.recorder.publish(&ev, &b.object_ref(&())).await
        {
            tracing::warn!(%error, "cannot record an Event");
        }
    }
    if let Some(s) = &summary
        && s.unpacked_at.is_some()
    {
        check_projects(b, s, ctx).await;
    }
    let old_phase = b.status.as_ref().and_then(|s| s.phase);
    if old_phase != status.phase {
        record_phase(b, &status, ctx).await;
    }
    if b.status.as_ref() != Some(&status) {
        let patch = serde_json::json!({ "status": status });
        api.patch_status(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    // Watch-driven: ShipperD's state changes and ended fetches reconcile again; only
    // cluster resources that could not be written are tried again on a timer.
    Ok(if again {
        Action::requeue(retry_after(2))
    } else {
        Action::await_change()
    })
}

/// The registry target `b` names: its namespace's `RegistryTarget`
/// (`<namespace>/<name>`), a `ClusterRegistryTarget` (`<name>`), or the default.
fn target_of(b: &Bundle) -> Result<Option<TargetName>, String> {
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
async fn refuse(
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

/// Starts fetching a `url` source in a task of its own.
async fn start_fetch(
    b: &Bundle,
    url: &crate::crd::UrlSource,
    target: Option<&TargetName>,
    uid: &str,
    ctx: &Context,
) -> Result<(), Error> {
    // The CA to trust for an https URL, from its ConfigMap or Secret.
    let ca_pem = match &url.ca {
        None => None,
        Some(ca) => {
            let ns = b.namespace().unwrap_or_default();
            match crate::targets::key_of(&ctx.client, &ns, ca)
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?
            {
                Ok(pem) => Some(pem),
                Err(p) => {
                    ctx.set_fetch(uid, Fetch::Failed(format!("the URL's CA: {}", p.message)));
                    return Ok(());
                }
            }
        }
    };
    let source = FetchSource {
        url: url.url.clone(),
        sha256: parse_id(&url.sha256)?,
        ca_pem,
        owner: b.namespace(),
    };
    let target = target.cloned();
    let name = b.name_any();
    ctx.set_fetch(uid, Fetch::Running);
    let (store, settings, uid) = (ctx.store.clone(), ctx.fetch.clone(), uid.to_string());
    let done = ctx.fetches.clone();
    let (wake, me) = (ctx.wake.clone(), ObjectRef::from_obj(b));
    tokio::spawn(async move {
        let outcome = store
            .fetch(&name, &source, target.as_ref(), &settings)
            .await;
        let state = match outcome {
            Ok(a) => Fetch::Done(a.summary.id),
            Err(e) => {
                tracing::warn!(bundle = %name, error = %e, "fetching the bundle failed");
                Fetch::Failed(e.to_string())
            }
        };
        done.lock().expect("not poisoned").insert(uid, state);
        let _ = wake.send(me);
    });
    Ok(())
}

/// Takes a `path` source (a file in the import directory) into the store, in a task of
/// its own: hashed in place, then moved in (as the drop directory does). The path is
/// relative to the import directory; `..`, absolute paths and symbolic links anywhere
/// on the way are refused (the file is opened beneath the directory with no link
/// followed), and a wrong `sha256` does not tell the file's real one.
fn start_take(
    b: &Bundle,
    src: &crate::crd::PathSource,
    target: Option<&TargetName>,
    uid: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = b.namespace().unwrap_or_default();
    let file = match confined(&ctx.import_dir, &ns, &src.path) {
        Ok(file) => file,
        Err(why) => {
            ctx.set_fetch(uid, Fetch::Failed(why));
            return Ok(());
        }
    };
    let expected = src.sha256.as_deref().map(parse_id).transpose()?;
    let name = b.name_any();
    let origin = shipperd_store::Origin {
        target: target.cloned(),
        owner: b.namespace(),
        uploader: None,
    };
    ctx.set_fetch(uid, Fetch::Running);
    let (store, uid, done) = (ctx.store.clone(), uid.to_string(), ctx.fetches.clone());
    let (wake, me) = (ctx.wake.clone(), ObjectRef::from_obj(b));
    tokio::spawn(async move {
        let state = match store
            .receive_opened(&name, file, expected.as_ref(), &origin)
            .await
        {
            Ok(a) => Fetch::Done(a.summary.id),
            Err(shipperd_store::Error::ChecksumMismatch { .. }) => {
                Fetch::Failed("the file's sha256 is not the one given; it was not taken".into())
            }
            Err(e) => {
                tracing::warn!(bundle = %name, error = %e, "taking the bundle's file failed");
                Fetch::Failed(e.to_string())
            }
        };
        done.lock().expect("not poisoned").insert(uid, state);
        let _ = wake.send(me);
    });
    Ok(())
}

/// `rel` under `dir/<ns>` (a namespace takes only what was staged for it), when it
/// stays there: relative, no `..`, and no symbolic link on the way, a regular file;
/// opened once, by descriptor (its directory with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, then the file in it the same way), so what is read and moved
/// is what was checked. Else why not, in words for the status.
pub fn confined(
    dir: &std::path::Path,
    ns: &str,
    rel: &str,
) -> Result<shipperd_store::Opened, String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let p = std::path::Path::new(rel);
    let plain = !rel.is_empty()
        && !p.is_absolute()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(format!(
            "path {rel:?} must be relative to the import directory, without `..`"
        ));
    }
    let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let why = |e: rustix::io::Errno| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => format!(
            "path {rel:?} goes through a symbolic link; links are not followed in the import \
             directory"
        ),
        rustix::io::Errno::NOENT => format!(
            "path {rel:?} is not in the import directory of namespace {ns} ({}/{ns})",
            dir.display()
        ),
        e => format!("path {rel:?} cannot be opened: {e}"),
    };
    let base = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "the import directory {} cannot be opened: {e}",
            dir.display()
        )
    })?;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mine = rustix::fs::openat2(&base, ns, dir_flags, Mode::empty(), beneath).map_err(why)?;
    let (parent, leaf) = match (p.parent(), p.file_name()) {
        (Some(up), Some(leaf)) if !up.as_os_str().is_empty() => (
            rustix::fs::openat2(&mine, up, dir_flags, Mode::empty(), beneath).map_err(why)?,
            leaf,
        ),
        (_, Some(leaf)) => (mine, leaf),
        _ => return Err(format!("path {rel:?} names no file")),
    };
    let f = rustix::fs::openat2(
        &parent,
        leaf,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
        beneath,
    )
    .map_err(why)?;
    let st = rustix::fs::fstat(&f).map_err(|e| format!("path {rel:?}: {e}"))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!("path {rel:?} is not a regular file"));
    }
    Ok(shipperd_store::Opened {
        file: std::fs::File::from(f),
        dir: parent,
        leaf: leaf.to_owned(),
        shown: format!("{}/{ns}/{rel}", dir.display()),
    })
}

/// Checks once per bundle generation that the OpenShift projects its images land in
/// exist (see [`crate::projects`]); says so in Events.
async fn check_projects(b: &Bundle, s: &BundleSummary, ctx: &Context) {
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
async fn record_phase(b: &Bundle, status: &BundleStatus, ctx: &Context) {
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

/// A deleted `Bundle`: its stored file and state go (its images stay in the registry),
/// and what it needed of the cluster, unless another published bundle needs it too.
async fn cleanup(b: &Bundle, ctx: &Context) -> Result<Action, Error> {
    if crate::cluster::withdraw(&ctx.client, &ctx.own_namespace, b).await? {
        ctx.converge().await.map_err(Error::Converge)?;
    }
    let uid = format!("{}/", b.uid().unwrap_or_default());
    ctx.fetches
        .lock()
        .expect("not poisoned")
        .retain(|k, _| !k.starts_with(&uid));
    let ns = b.namespace().unwrap_or_default();
    if let Some(url) = &b.spec.source.url
        && let Ok(id) = parse_id(&url.sha256)
    {
        // What an unfinished fetch of it left on the volume.
        ctx.store.forget_fetch(&id).await;
    }
    if let Some(id) = bundle_id(b)?
        && let Some(s) = ctx.state.summary(&id).await?
        // Never another namespace's bundle.
        && ctx.may_follow(&ns, &s)
    {
        match shipperd_store::ops::delete(&ctx.store, &id, true).await {
            Ok(()) | Err(shipperd_store::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

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
