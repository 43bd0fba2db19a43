//! The operator's wiring: connected to NATS and the API server, its three controllers
//! (`Bundle`s, registry targets, webhook targets) run while this replica leads (or
//! always, without leader election), and the adoption of uploads.

use std::{path::PathBuf, sync::Arc};

use kube::{
    Api, ResourceExt as _,
    runtime::{controller::Action, reflector::ObjectRef},
};
use shipperd_model::BundleId;
use shipperd_state::StateStore;
use shipperd_store::{FetchSettings, Store};

use crate::bundle::{Context, REQUEUE, adopt, bundle_id, error_policy, reconcile};
use crate::metrics::counted;
use crate::{crd::Bundle, error::Error};

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
pub(crate) async fn control_targets(
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
pub(crate) fn deletions<K>(api: Api<K>) -> futures::stream::BoxStream<'static, ()>
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
pub(crate) async fn on_deletions<F, Fut>(
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
pub(crate) fn names_secret(spec: &crate::crd::RegistryTargetSpec, name: &str) -> bool {
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
pub(crate) async fn control_webhooks(
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
pub(crate) async fn control(
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
