//! `RegistryTarget` and `ClusterRegistryTarget` resources become the targets file the
//! services follow (`shipperd_registry_targets::LiveTargets`). One writer (the leader)
//! renders the whole file from every target of every watched namespace and every
//! cluster target at once ([`render`]): a namespaced target is known as
//! `<namespace>/<name>` (only its own namespace's Bundles use it), a cluster target as
//! `<name>`; only a cluster target can be the default. Credentials and CAs are written
//! as files under `<data>/config/secrets/<namespace>/<name>/` (`_cluster/<name>` for a
//! cluster target; mode 0600); a deleted target's entry and files go with the next
//! render (deletions trigger one). Each target is checked as the services will
//! (`Targets::parse`); one that cannot be used gets `Ready=False` with the reason and
//! stays out; the others are not held back by it. The file may end with no target.
//!
//! What a tenant may send where: a Secret is read only from the target's own namespace
//! (the operator's, for a cluster target) and only when labelled
//! `shipperd.io/credentials: "true"`, so a target cannot send any other Secret of the
//! namespace to a host of its choosing; ShipperD's service-account token goes only to
//! OpenShift's internal registry (or a host `--service-account-token-host` lists), and
//! a namespaced target that uses it publishes only into its own project.
//!
//! A Secret that changes is written again, and the services read credentials at each
//! login: a rotated password reaches publish without a restart.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    runtime::controller::Action,
};

use shipperd_registry_targets::{TargetEntry, TargetsFile};

use crate::crd::{CaSource, ClusterRegistryTarget, RegistryTarget, RegistryTargetSpec};

/// OpenShift's internal registry, its service CA (injected into every namespace) and
/// the pod's service-account token.
const OPENSHIFT_REGISTRY: &str = "https://image-registry.openshift-image-registry.svc:5000";
const OPENSHIFT_REGISTRY_HOST: &str = "image-registry.openshift-image-registry.svc:5000";
/// The label a Secret needs before ShipperD reads it.
pub const CREDENTIALS_LABEL: &str = "shipperd.io/credentials";
/// The directory of cluster targets' files under the secrets directory (no namespace
/// can be called this).
const CLUSTER_DIR: &str = "_cluster";
const SERVICE_CA_CONFIGMAP: &str = "openshift-service-ca.crt";
const SERVICE_CA_KEY: &str = "service-ca.crt";
const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where the operator writes what the services read.
#[derive(Debug, Clone)]
pub struct Output {
    /// The targets file (`--targets` of unpack and publish).
    pub file: PathBuf,
    /// Where credentials and CAs are written.
    pub secrets: PathBuf,
}

impl Output {
    /// `<data>/config/targets.toml` and `<data>/config/secrets/`.
    pub fn under(data: &Path) -> Self {
        Output {
            file: data.join("config/targets.toml"),
            secrets: data.join("config/secrets"),
        }
    }
}

/// What reconciling targets works with.
pub struct TargetsContext {
    pub client: kube::Client,
    pub output: Output,
    /// The operator's namespace: where a cluster target's Secrets and ConfigMaps are.
    pub own_namespace: String,
    /// Only this namespace's `RegistryTarget`s (`None`: every namespace's).
    pub watch_namespace: Option<String>,
    /// Hosts (`host[:port]`) besides OpenShift's internal registry that may receive
    /// ShipperD's service-account token.
    pub service_account_token_hosts: Vec<String>,
    /// The service-account token the services read (the pod's).
    pub service_account_token: PathBuf,
    /// The namespace uploads through the ingest endpoint belong to: what `{namespace}`
    /// in a mapping's prefix is for them.
    pub upload_namespace: Option<String>,
    /// One render at a time: two would race on the file and prune each other's files.
    rendering: tokio::sync::Mutex<()>,
}

impl TargetsContext {
    pub fn new(client: kube::Client, output: Output, own_namespace: impl Into<String>) -> Self {
        TargetsContext {
            client,
            output,
            own_namespace: own_namespace.into(),
            watch_namespace: None,
            service_account_token_hosts: Vec::new(),
            service_account_token: PathBuf::from(SA_TOKEN),
            upload_namespace: None,
            rendering: tokio::sync::Mutex::new(()),
        }
    }
}

/// Whether a Secret may be read for credentials or signing.
pub fn labelled(s: &Secret) -> bool {
    s.labels().get(CREDENTIALS_LABEL).map(String::as_str) == Some("true")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a target cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

fn problem(reason: &'static str, message: impl Into<String>) -> Problem {
    Problem {
        reason,
        message: message.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` (0600) through a temp file and a rename, unless it holds
/// them already.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// One target, resolved: its entry in the targets file, and the files it needs.
struct Resolved {
    default: bool,
    entry: TargetEntry,
    files: Vec<(PathBuf, Vec<u8>)>,
}

pub(crate) async fn key_of(
    client: &kube::Client,
    ns: &str,
    src: &CaSource,
) -> Result<Result<Vec<u8>, Problem>, Error> {
    if let Some(r) = &src.config_map_key_ref {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        return Ok(match api.get_opt(&r.name).await? {
            None => Err(problem(
                "ConfigMapNotFound",
                format!("ConfigMap {} not found", r.name),
            )),
            Some(cm) => cm
                .data
                .and_then(|d| d.get(&r.key).cloned())
                .map(String::into_bytes)
                .ok_or_else(|| {
                    problem(
                        "KeyNotFound",
                        format!("ConfigMap {} has no key {}", r.name, r.key),
                    )
                }),
        });
    }
    if let Some(r) = &src.secret_key_ref {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        return Ok(match api.get_opt(&r.name).await? {
            None => Err(problem(
                "SecretNotFound",
                format!("Secret {} not found", r.name),
            )),
            Some(s) if !labelled(&s) => Err(unlabelled(&r.name)),
            Some(s) => s
                .data
                .and_then(|d| d.get(&r.key).cloned())
                .map(|b| b.0)
                .ok_or_else(|| {
                    problem(
                        "KeyNotFound",
                        format!("Secret {} has no key {}", r.name, r.key),
                    )
                }),
        });
    }
    Ok(Err(problem(
        "InvalidSpec",
        "ca names neither a ConfigMap nor a Secret",
    )))
}

pub(crate) fn unlabelled(name: &str) -> Problem {
    problem(
        "SecretNotLabelled",
        format!(
            "Secret {name} is not labelled {CREDENTIALS_LABEL}: \"true\"; label it to let \
             ShipperD use it"
        ),
    )
}

/// Which target: a namespaced one (`Some(namespace)`) or a cluster one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Which {
    pub namespace: Option<String>,
    pub name: String,
}

impl Which {
    /// Its name in the targets file.
    pub fn target_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    fn dir(&self, secrets: &Path) -> PathBuf {
        secrets
            .join(self.namespace.as_deref().unwrap_or(CLUSTER_DIR))
            .join(&self.name)
    }
}

/// The host (`host[:port]`) of a URL.
fn host_of(url: &str) -> Option<String> {
    shipperd_model::RegistryUrl::parse(url)
        .ok()
        .map(|u| u.host.to_ascii_lowercase())
}

/// Resolves one target (reading the Secrets and ConfigMaps it names from `ns`, its own
/// namespace or, for a cluster target, the operator's).
async fn resolve(
    ctx: &TargetsContext,
    which: &Which,
    spec: &RegistryTargetSpec,
) -> Result<Result<Resolved, Problem>, Error> {
    let ns = which
        .namespace
        .clone()
        .unwrap_or_else(|| ctx.own_namespace.clone());
    let name = which.target_name();
    let dir = which.dir(&ctx.output.secrets);
    let mut files = Vec::new();
    let url = match (&spec.url, spec.openshift_internal) {
        (Some(u), _) => u.clone(),
        (None, true) => OPENSHIFT_REGISTRY.to_string(),
        (None, false) => return Ok(Err(problem("InvalidSpec", "url is required"))),
    };
    let mut entry = TargetEntry::new(name, url.clone());
    entry.insecure = spec.insecure;
    let ca = match (&spec.ca, spec.openshift_internal) {
        (Some(ca), _) => Some(ca.clone()),
        (None, true) => Some(CaSource {
            config_map_key_ref: Some(crate::crd::KeyRef {
                name: SERVICE_CA_CONFIGMAP.into(),
                key: SERVICE_CA_KEY.into(),
            }),
            secret_key_ref: None,
        }),
        (None, false) => None,
    };
    if let Some(ca) = &ca {
        match key_of(&ctx.client, &ns, ca).await? {
            Ok(pem) => {
                let p = dir.join("ca.pem");
                entry.ca_file = Some(p.clone());
                files.push((p, pem));
            }
            Err(p) => return Ok(Err(p)),
        }
    }
    let creds = spec.credentials.clone();
    let sa_token = creds.as_ref().and_then(|c| c.service_account_token) == Some(true)
        || (spec.openshift_internal && creds.is_none());
    let mut mapping = spec.mapping.clone().unwrap_or_default();
    if sa_token {
        // ShipperD's own token goes only where the admin said it may.
        let host = host_of(&url).unwrap_or_default();
        let allowed = host == OPENSHIFT_REGISTRY_HOST
            || ctx
                .service_account_token_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&host));
        if !allowed {
            return Ok(Err(problem(
                "ServiceAccountTokenRefused",
                format!(
                    "ShipperD's service-account token goes only to OpenShift's internal \
                     registry ({OPENSHIFT_REGISTRY_HOST}) or a host the operator's \
                     --service-account-token-host lists, not to {host}"
                ),
            )));
        }
        // With ShipperD's rights, a namespace's target publishes only into its own
        // project.
        if let Some(own) = &which.namespace {
            match &mapping.prefix {
                Some(p) if p != own => {
                    return Ok(Err(problem(
                        "ProjectNotOwn",
                        format!(
                            "a RegistryTarget using ShipperD's service-account token publishes \
                             only into its own project: mapping.prefix must be {own:?} (or \
                             left out), not {p:?}"
                        ),
                    )));
                }
                _ => mapping.prefix = Some(own.clone()),
            }
        }
        entry.auth.service_account_token = Some(ctx.service_account_token.clone());
    } else if let Some(secret) = creds.as_ref().and_then(|c| c.secret_name.clone())
        && let Err(p) = from_secret(ctx, &ns, &secret, &dir, &mut entry, &mut files).await?
    {
        return Ok(Err(p));
    }
    settings(ctx, which, spec, &mapping, &mut entry);
    if let Some(text) = &spec.signature_policy {
        if let Err(m) = check_policy(text) {
            return Ok(Err(problem("InvalidPolicy", m)));
        }
        let p = dir.join("policy.json");
        entry.policies.push(p.clone());
        files.push((p, text.as_bytes().to_vec()));
    }
    Ok(Ok(Resolved {
        default: spec.default && which.namespace.is_none(),
        entry,
        files,
    }))
}

/// Whether a resource's `signaturePolicy` may be used: a `containers-policy.json` that
/// parses as skopeo reads it, whose keys are inline (a path would read the services'
/// own files) and parse.
fn check_policy(text: &str) -> Result<(), String> {
    let policy = shipperd_policy::Policy::from_json(text.as_bytes()).map_err(|e| e.to_string())?;
    if let Some(p) = policy.paths().first() {
        return Err(format!(
            "signaturePolicy names the file {p:?}: in a resource, give keys as keyData"
        ));
    }
    shipperd_policy::Verifier::new(&policy, "signaturePolicy")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What `spec` says of names, transfers and tags, into `entry` (`mapping` as resolved:
/// a project prefix forced for ShipperD's own token).
fn settings(
    ctx: &TargetsContext,
    which: &Which,
    spec: &RegistryTargetSpec,
    mapping: &crate::crd::MappingSpec,
    entry: &mut TargetEntry,
) {
    let mut m = shipperd_registry_targets::Mapping {
        keep_host: mapping.keep_host,
        max_depth: mapping
            .max_depth
            .or(spec.openshift_internal.then_some(2))
            .map(|d| d as usize),
        renames: mapping
            .renames
            .iter()
            .map(|r| shipperd_registry_targets::Rename {
                from: r.from.clone(),
                to: r.to.clone(),
            })
            .collect(),
        ..Default::default()
    };
    if let Some(p) = &mapping.prefix {
        m.prefix = p.clone();
        if p.contains(shipperd_registry_targets::NAMESPACE_PREFIX) {
            m.upload_namespace = ctx.upload_namespace.clone();
        }
    }
    entry.mapping = m;
    if let Some(t) = &spec.transfer {
        let x = &mut entry.transfer;
        x.concurrency = t.concurrency.map_or(x.concurrency, |c| c as usize);
        x.chunk_threshold = t.chunk_threshold.unwrap_or(x.chunk_threshold);
        x.retries = t.retries.unwrap_or(x.retries);
    }
    // The admin's overrides of tag ownership: a cluster target's only.
    if let Some(t) = spec.tags.as_ref().filter(|_| which.namespace.is_none()) {
        entry.tags = shipperd_registry_targets::TagPolicy {
            take_over: t.take_over,
            overwrite_unowned: t.overwrite_unowned,
        };
    }
}

/// The credentials in Secret `secret` of namespace `ns` (labelled for ShipperD), by
/// its type: a docker config, basic auth, or a bearer token; written under `dir` and
/// named in `entry`.
async fn from_secret(
    ctx: &TargetsContext,
    ns: &str,
    secret: &str,
    dir: &Path,
    entry: &mut TargetEntry,
    files: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<Result<(), Problem>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(s) = api.get_opt(secret).await? else {
        return Ok(Err(problem(
            "SecretNotFound",
            format!("Secret {secret} not found"),
        )));
    };
    if !labelled(&s) {
        return Ok(Err(unlabelled(secret)));
    }
    let data: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    let kind = s.type_.as_deref().unwrap_or("Opaque");
    let missing = |k: &str| {
        problem(
            "KeyNotFound",
            format!("Secret {secret} ({kind}) has no key {k}"),
        )
    };
    match kind {
        "kubernetes.io/dockerconfigjson" => {
            let Some(cfg) = data.get(".dockerconfigjson") else {
                return Ok(Err(missing(".dockerconfigjson")));
            };
            let p = dir.join("dockerconfig.json");
            entry.auth.docker_config = Some(p.clone());
            files.push((p, cfg.clone()));
        }
        "kubernetes.io/basic-auth" => {
            let (Some(user), Some(pass)) = (data.get("username"), data.get("password")) else {
                return Ok(Err(missing("username and password")));
            };
            let p = dir.join("password");
            entry.auth.username = Some(String::from_utf8_lossy(user).into_owned());
            entry.auth.password_file = Some(p.clone());
            files.push((p, pass.clone()));
        }
        _ => {
            let Some(token) = data.get("token") else {
                return Ok(Err(missing("token")));
            };
            let p = dir.join("token");
            entry.auth.bearer_token_file = Some(p.clone());
            files.push((p, token.clone()));
        }
    }
    Ok(Ok(()))
}

/// The outcome of one render: each target's verdict (a message when it is in the
/// file, else why not).
#[derive(Debug, Default)]
pub struct Rendered {
    pub verdicts: BTreeMap<Which, Result<String, Problem>>,
}

/// Renders every target into the targets file, writes the files they need, and removes
/// those of targets that are gone. The one writer of the file.
pub async fn render(ctx: &TargetsContext) -> Result<Rendered, Error> {
    let _one = ctx.rendering.lock().await;
    let namespaced: Api<RegistryTarget> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let cluster: Api<ClusterRegistryTarget> = Api::all(ctx.client.clone());
    // Cluster targets whose conditions leave the upload namespace out: uploads through
    // the ingest endpoint (which act for it) may not use them.
    let mut closed_to_uploads = std::collections::BTreeSet::new();
    let mut all: Vec<(Which, RegistryTargetSpec)> = namespaced
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|t| {
            let which = Which {
                namespace: Some(t.namespace().unwrap_or_default()),
                name: t.name_any(),
            };
            (which, t.spec)
        })
        .collect();
    let clusters = cluster.list(&ListParams::default()).await?.items;
    for t in &clusters {
        let open = match &ctx.upload_namespace {
            Some(ns) => crate::cluster::may_use(&ctx.client, t, ns).await?,
            None => t.spec.conditions.is_empty(),
        };
        if !open {
            closed_to_uploads.insert(t.name_any());
        }
    }
    all.extend(clusters.into_iter().map(|t| {
        let which = Which {
            namespace: None,
            name: t.name_any(),
        };
        (which, t.spec.target)
    }));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut file = TargetsFile::default();
    let mut rendered = Rendered::default();
    // The cluster targets' policies by registry host (cluster targets sort first): they
    // bind every namespace's target of that registry too.
    let mut cluster_policies: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for (which, spec) in &all {
        let verdict = match resolve(ctx, which, spec).await? {
            Err(p) => Err(p),
            Ok(mut r) => {
                if which.namespace.is_none() && closed_to_uploads.contains(&which.name) {
                    r.entry.uploads = false;
                }
                let host = host_of(&r.entry.url).unwrap_or_default();
                if which.namespace.is_none() {
                    cluster_policies
                        .entry(host)
                        .or_default()
                        .extend(r.entry.policies.iter().cloned());
                } else if let Some(binding) = cluster_policies.get(&host) {
                    let own = std::mem::take(&mut r.entry.policies);
                    r.entry.policies = binding.iter().cloned().chain(own).collect();
                }
                for (p, bytes) in &r.files {
                    write_file(p, bytes)?;
                }
                // Checked as the services will read it (credentials readable too).
                let alone = TargetsFile {
                    default: None,
                    target: vec![r.entry.clone()],
                };
                match shipperd_registry_targets::Targets::from_file(alone, &ctx.output.secrets) {
                    Ok(_) => {
                        if r.default && file.default.is_none() {
                            file.default = Some(r.entry.name.clone());
                        }
                        let mut msg = format!(
                            "written to {} as {}; the services apply it within seconds",
                            ctx.output.file.display(),
                            r.entry.name
                        );
                        if spec.default && which.namespace.is_some() {
                            msg.push_str(
                                " (default is ignored: only a ClusterRegistryTarget can be the \
                                 default)",
                            );
                        }
                        file.target.push(r.entry);
                        Ok(msg)
                    }
                    Err(e) => Err(problem("InvalidTarget", e.to_string())),
                }
            }
        };
        rendered.verdicts.insert(which.clone(), verdict);
    }
    let mut text = String::from(
        "# Written by shipperd operator from RegistryTarget and ClusterRegistryTarget \
         resources; edits are replaced.\n",
    );
    if file.default.is_none() {
        text.push_str(
            "# No ClusterRegistryTarget is the default: bundles that name no target fail.\n",
        );
        file.default = Some(String::new());
    }
    text.push_str(&file.to_toml());
    write_file(&ctx.output.file, text.as_bytes())?;
    prune(&ctx.output.secrets, &all);
    Ok(rendered)
}

/// Removes the credential files of targets that no longer exist.
fn prune(secrets: &Path, all: &[(Which, RegistryTargetSpec)]) {
    let keep: std::collections::BTreeSet<PathBuf> =
        all.iter().map(|(w, _)| w.dir(secrets)).collect();
    let Ok(namespaces) = std::fs::read_dir(secrets) else {
        return;
    };
    for ns in namespaces.flatten() {
        let Ok(names) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for t in names.flatten() {
            let path = t.path();
            if !keep.contains(&path) {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(dir = %path.display(), "removed the files of a deleted target")
                    }
                    Err(error) => {
                        tracing::warn!(%error, dir = %path.display(), "cannot remove a deleted target's files")
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(ns.path());
    }
}

fn verdict_of(rendered: &mut Rendered, which: &Which) -> Result<String, (&'static str, String)> {
    rendered
        .verdicts
        .remove(which)
        .unwrap_or_else(|| Err(problem("NotListed", "not found among the targets")))
        .map_err(|p| (p.reason, p.message))
}

/// Renders the targets file, and `rt`'s status.
pub async fn reconcile(rt: Arc<RegistryTarget>, ctx: Arc<TargetsContext>) -> Result<Action, Error> {
    let ns = rt.namespace().unwrap_or_default();
    let which = Which {
        namespace: Some(ns.clone()),
        name: rt.name_any(),
    };
    let api: Api<RegistryTarget> = Api::namespaced(ctx.client.clone(), &ns);
    let status = rt.status.as_ref();
    settle(&ctx, &api, &which, rt.metadata.generation, status).await
}

/// Renders the targets file, and `t`'s status.
pub async fn reconcile_cluster(
    t: Arc<ClusterRegistryTarget>,
    ctx: Arc<TargetsContext>,
) -> Result<Action, Error> {
    let which = Which {
        namespace: None,
        name: t.name_any(),
    };
    let api: Api<ClusterRegistryTarget> = Api::all(ctx.client.clone());
    let status = t.status.as_ref();
    settle(&ctx, &api, &which, t.metadata.generation, status).await
}

/// Renders the targets file and writes the verdict on `which` to its status (through
/// `api`), when it changed.
async fn settle<K>(
    ctx: &TargetsContext,
    api: &Api<K>,
    which: &Which,
    generation: Option<i64>,
    before: Option<&crate::crd::TargetStatus>,
) -> Result<Action, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut rendered = render(ctx).await?;
    let st = crate::status::ready_status(verdict_of(&mut rendered, which), generation, before);
    if before != Some(&st) {
        api.patch_status(
            &which.name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": st })),
        )
        .await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// Targets are rendered again this often, to pick up a renewed CA from a ConfigMap
/// (ConfigMaps are not watched: that would mean every ConfigMap of the cluster).
pub const RESYNC: std::time::Duration = std::time::Duration::from_secs(15 * 60);
