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
    },
};
use shipperd_ingest::{FetchSettings, FetchSource, Store};
use shipperd_model::{BundleId, BundleSummary, TargetName};
use shipperd_state::StateStore;

use crate::{
    crd::{Bundle, BundleStatus},
    status::{bundle_status, pending_status},
};

/// The finalizer that lets ShipperD clean up a deleted `Bundle`.
pub const FINALIZER: &str = "shipperd.io/cleanup";
/// How soon an unfinished `Bundle` is looked at again.
const REQUEUE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    #[error(transparent)]
    Ingest(#[from] shipperd_ingest::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Invalid(String),
}

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
}

impl Context {
    pub fn new(
        client: kube::Client,
        store: Arc<Store>,
        state: StateStore,
        fetch: FetchSettings,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), "shipperd-operator".into());
        Context {
            client,
            store,
            state,
            recorder,
            fetch,
            fetches: Arc::default(),
            create_projects: false,
            projects_checked: Mutex::default(),
        }
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
    pub nats_url: String,
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
    let bus = shipperd_bus::Bus::connect(&config.nats_url, "shipperd-operator").await?;
    bus.ensure_topology().await?;
    let store = Store::attach(bus.clone(), &config.data_dir, config.max_bundle_bytes).await?;
    let state = StateStore::open(&bus).await?;
    let mut ctx = Context::new(client.clone(), Arc::new(store), state, config.fetch.clone());
    ctx.create_projects = config.create_projects;
    let ctx = Arc::new(ctx);
    let targets = Arc::new(crate::targets::TargetsContext {
        client: client.clone(),
        output: config.targets_output.clone(),
    });
    let webhooks = Arc::new(crate::webhooks::WebhooksContext {
        client: client.clone(),
        file: config.webhooks_output.clone(),
        secrets: config.data_dir.root().join("config/webhooks"),
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
            let b = control(client, ctx, namespace, uploads, shutdown);
            tokio::join!(t, w, b).2
        }
    }
}

/// The `RegistryTarget` controller, until `stop`: reconciled when a target changes, and
/// when a Secret or ConfigMap of its namespace does (credentials rotated, a CA renewed).
async fn control_targets(
    ctx: Arc<crate::targets::TargetsContext>,
    namespace: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::runtime::{Controller, reflector::ObjectRef, watcher};

    use crate::crd::RegistryTarget;

    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = ctx.client.clone();
    let controller = Controller::new(
        api::<RegistryTarget>(&client, &namespace),
        watcher::Config::default(),
    );
    let cache = controller.store();
    let in_ns = move |ns: Option<String>| -> Vec<ObjectRef<RegistryTarget>> {
        // Any one target of the namespace: a reconcile writes them all.
        cache
            .state()
            .into_iter()
            .filter(|t| t.namespace() == ns)
            .take(1)
            .map(|t| ObjectRef::from_obj(&*t))
            .collect()
    };
    let for_cm = in_ns.clone();
    controller
        .watches(
            api::<Secret>(&client, &namespace),
            watcher::Config::default(),
            move |s: Secret| in_ns(s.namespace()),
        )
        .watches(
            api::<ConfigMap>(&client, &namespace),
            watcher::Config::default(),
            move |c: ConfigMap| for_cm(c.namespace()),
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            crate::targets::reconcile,
            |_t, error, _ctx| {
                tracing::warn!(%error, "reconciling a RegistryTarget failed");
                Action::requeue(REQUEUE)
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
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
    use kube::runtime::{Controller, reflector::ObjectRef, watcher};

    use crate::crd::WebhookTarget;

    let client = ctx.client.clone();
    let (hooks, secrets): (Api<WebhookTarget>, Api<Secret>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(hooks, watcher::Config::default());
    let cache = controller.store();
    controller
        .watches(secrets, watcher::Config::default(), move |s: Secret| {
            // Any one webhook of the namespace: a reconcile writes them all.
            cache
                .state()
                .into_iter()
                .filter(|w| w.namespace() == s.namespace())
                .take(1)
                .map(|w| ObjectRef::from_obj(&*w))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            crate::webhooks::reconcile,
            |_w, error, _ctx| {
                tracing::warn!(%error, "reconciling a WebhookTarget failed");
                Action::requeue(REQUEUE)
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
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
    use kube::runtime::{Controller, reflector::ObjectRef, watcher};

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
        .reconcile_on(changed)
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
    if s.deleting {
        return Ok(false);
    }
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
            target: s.target.as_ref().map(|t| t.to_string()),
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
    let ns = b
        .namespace()
        .ok_or_else(|| Error::Invalid("a Bundle is namespaced".into()))?;
    let api: Api<Bundle> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, b, |event| async {
        match event {
            Event::Apply(b) => apply(&b, &api, &ctx).await,
            Event::Cleanup(b) => cleanup(&b, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What to do after an error: look again later.
pub fn error_policy(_b: Arc<Bundle>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconciling a Bundle failed");
    Action::requeue(REQUEUE)
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
    let id = match bundle_id(b)? {
        Some(id) => Some(id),
        // A path source without a sha256: known once it is stored.
        None => match ctx.fetch_state(&uid) {
            Some(Fetch::Done(id)) => Some(id),
            _ => None,
        },
    };
    let summary = match &id {
        Some(id) => ctx.state.summary(id).await?,
        None => None,
    };
    let src = &b.spec.source;
    // A bundle that ended in this generation and whose status ShipperD no longer keeps
    // (`--keep-status`): its last status stands; nothing is fetched again.
    let ended = b.status.as_ref().filter(|st| {
        st.observed_generation == generation
            && matches!(st.phase.as_deref(), Some("Published" | "Failed"))
    });
    let status = match &summary {
        Some(s) => bundle_status(s, generation, &previous, now),
        None if ended.is_some() => ended.cloned().unwrap_or_default(),
        None if src.url.is_some() || src.path.is_some() => match ctx.fetch_state(&uid) {
            Some(Fetch::Failed(why)) => {
                pending_status("Failed", Some(&why), generation, &previous, now)
            }
            Some(Fetch::Running) | Some(Fetch::Done(_)) => {
                pending_status("Fetching", None, generation, &previous, now)
            }
            None => {
                match (&src.url, &src.path) {
                    (Some(url), _) => start_fetch(b, url, &uid, ctx).await?,
                    (None, Some(path)) => start_take(b, path, &uid, ctx)?,
                    (None, None) => {}
                }
                pending_status("Fetching", None, generation, &previous, now)
            }
        },
        None => pending_status("Pending", None, generation, &previous, now),
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
        let written = match crate::cluster::resources(&ctx.state, b, s).await {
            Ok(res) => crate::cluster::publish(&ctx.client, b, &res)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let ev = match &written {
            Ok(name) => {
                status.cluster_resources = Some(name.clone());
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
    let old_phase = b.status.as_ref().and_then(|s| s.phase.clone());
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
    Ok(match status.phase.as_deref() {
        Some("Published") | Some("Failed") if !again => Action::await_change(),
        _ => Action::requeue(REQUEUE),
    })
}

/// Starts fetching a `url` source in a task of its own.
async fn start_fetch(
    b: &Bundle,
    url: &crate::crd::UrlSource,
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
    };
    let target = b
        .spec
        .target
        .as_deref()
        .map(TargetName::parse)
        .transpose()
        .map_err(|e| Error::Invalid(format!("spec.target: {e}")))?;
    let name = b.name_any();
    ctx.set_fetch(uid, Fetch::Running);
    let (store, settings, uid) = (ctx.store.clone(), ctx.fetch.clone(), uid.to_string());
    let done = ctx.fetches.clone();
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
    });
    Ok(())
}

/// Takes a `path` source (a file on the shared volume, relative to the data directory)
/// into the store, in a task of its own: hashed in place, then moved in (as the drop
/// directory does).
fn start_take(
    b: &Bundle,
    src: &crate::crd::PathSource,
    uid: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let rel = std::path::Path::new(&src.path);
    let confined = !rel.is_absolute()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !confined {
        ctx.set_fetch(
            uid,
            Fetch::Failed(format!(
                "path {:?} must be relative to the data directory, without `..`",
                src.path
            )),
        );
        return Ok(());
    }
    let file = ctx.store.data().root().join(rel);
    let expected = src.sha256.as_deref().map(parse_id).transpose()?;
    let name = b.name_any();
    ctx.set_fetch(uid, Fetch::Running);
    let (store, uid, done) = (ctx.store.clone(), uid.to_string(), ctx.fetches.clone());
    tokio::spawn(async move {
        let state = match store.receive_file(&name, &file, expected.as_ref()).await {
            Ok(a) => Fetch::Done(a.summary.id),
            Err(e) => {
                tracing::warn!(bundle = %name, error = %e, "taking the bundle's file failed");
                Fetch::Failed(e.to_string())
            }
        };
        done.lock().expect("not poisoned").insert(uid, state);
    });
    Ok(())
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
    let phase = status.phase.as_deref().unwrap_or_default();
    let (type_, reason, note) = match phase {
        "Received" => (
            EventType::Normal,
            "Received",
            "ShipperD stored the bundle".to_string(),
        ),
        "Publishing" => (
            EventType::Normal,
            "Unpacked",
            format!(
                "{} images to publish",
                status.images.as_ref().map_or(0, |i| i.total)
            ),
        ),
        "Published" => (
            EventType::Normal,
            "Published",
            format!(
                "{} images published",
                status.images.as_ref().map_or(0, |i| i.published)
            ),
        ),
        "Failed" => (
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

/// A deleted `Bundle`: its stored file and state go (its images stay in the registry).
async fn cleanup(b: &Bundle, ctx: &Context) -> Result<Action, Error> {
    let uid = format!("{}/", b.uid().unwrap_or_default());
    ctx.fetches
        .lock()
        .expect("not poisoned")
        .retain(|k, _| !k.starts_with(&uid));
    if let Some(id) = bundle_id(b)?
        && ctx.state.summary(&id).await?.is_some()
    {
        match shipperd_ingest::delete_bundle(&ctx.store, &id, true).await {
            Ok(()) | Err(shipperd_ingest::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}
