//! `RegistryTarget` resources become the targets file the services follow
//! (`shipperd_registry_targets::LiveTargets`): each reconcile reads every
//! `RegistryTarget` of the namespace with the Secrets and ConfigMaps they name, writes
//! their credentials and CAs as files under `<data>/config/secrets/<namespace>/<name>/`
//! (mode 0600), checks each target as the services will (`Targets::parse`), and writes
//! the valid ones to the targets file (atomically, only when it changed). A target that
//! cannot be used gets `Ready=False` with the reason and stays out of the file; the
//! others are not held back by it. A Secret that changes is written again, and the
//! services read credentials at each login: a rotated password reaches publish without
//! a restart.

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

use crate::crd::{CaSource, RegistryTarget};

/// OpenShift's internal registry, its service CA (injected into every namespace) and
/// the pod's service-account token.
const OPENSHIFT_REGISTRY: &str = "https://image-registry.openshift-image-registry.svc:5000";
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

/// A TOML basic string (JSON's string escapes are TOML's).
pub(crate) fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// One target, resolved: its section of the targets file, and the files it needs.
struct Resolved {
    name: String,
    default: bool,
    section: String,
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

/// Resolves one `RegistryTarget` (reading the Secrets and ConfigMaps it names).
async fn resolve(
    ctx: &TargetsContext,
    rt: &RegistryTarget,
) -> Result<Result<Resolved, Problem>, Error> {
    let ns = rt.namespace().unwrap_or_default();
    let name = rt.name_any();
    let spec = &rt.spec;
    let dir = ctx.output.secrets.join(&ns).join(&name);
    let mut files = Vec::new();
    let mut lines = vec!["[[target]]".to_string(), format!("name = {}", lit(&name))];
    let url = match (&spec.url, spec.openshift_internal) {
        (Some(u), _) => u.clone(),
        (None, true) => OPENSHIFT_REGISTRY.to_string(),
        (None, false) => return Ok(Err(problem("InvalidSpec", "url is required"))),
    };
    lines.push(format!("url = {}", lit(&url)));
    if spec.insecure {
        lines.push("insecure = true".into());
    }
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
                lines.push(format!("ca_file = {}", lit(&p.display().to_string())));
                files.push((p, pem));
            }
            Err(p) => return Ok(Err(p)),
        }
    }
    let creds = spec.credentials.clone();
    let sa_token = creds.as_ref().and_then(|c| c.service_account_token) == Some(true)
        || (spec.openshift_internal && creds.is_none());
    if sa_token {
        lines.push(format!("auth.service_account_token = {}", lit(SA_TOKEN)));
    } else if let Some(secret) = creds.as_ref().and_then(|c| c.secret_name.clone()) {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(s) = api.get_opt(&secret).await? else {
            return Ok(Err(problem(
                "SecretNotFound",
                format!("Secret {secret} not found"),
            )));
        };
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
                lines.push(format!(
                    "auth.docker_config = {}",
                    lit(&p.display().to_string())
                ));
                files.push((p, cfg.clone()));
            }
            "kubernetes.io/basic-auth" => {
                let (Some(user), Some(pass)) = (data.get("username"), data.get("password")) else {
                    return Ok(Err(missing("username and password")));
                };
                let p = dir.join("password");
                lines.push(format!(
                    "auth = {{ username = {}, password_file = {} }}",
                    lit(&String::from_utf8_lossy(user)),
                    lit(&p.display().to_string())
                ));
                files.push((p, pass.clone()));
            }
            _ => {
                let Some(token) = data.get("token") else {
                    return Ok(Err(missing("token")));
                };
                let p = dir.join("token");
                lines.push(format!(
                    "auth.bearer_token_file = {}",
                    lit(&p.display().to_string())
                ));
                files.push((p, token.clone()));
            }
        }
    }
    let mapping = spec.mapping.clone().unwrap_or_default();
    let max_depth = mapping.max_depth.or(spec.openshift_internal.then_some(2));
    let mut m = Vec::new();
    if let Some(p) = &mapping.prefix {
        m.push(format!("prefix = {}", lit(p)));
    }
    if mapping.keep_host {
        m.push("keep_host = true".into());
    }
    if let Some(d) = max_depth {
        m.push(format!("max_depth = {d}"));
    }
    if !mapping.renames.is_empty() {
        let r: Vec<String> = mapping
            .renames
            .iter()
            .map(|r| format!("{{ from = {}, to = {} }}", lit(&r.from), lit(&r.to)))
            .collect();
        m.push(format!("rename = [{}]", r.join(", ")));
    }
    if !m.is_empty() {
        lines.push(format!("mapping = {{ {} }}", m.join(", ")));
    }
    if let Some(t) = &spec.transfer {
        let mut x = Vec::new();
        if let Some(c) = t.concurrency {
            x.push(format!("concurrency = {c}"));
        }
        if let Some(c) = t.chunk_threshold {
            x.push(format!("chunk_threshold = {c}"));
        }
        if let Some(r) = t.retries {
            x.push(format!("retries = {r}"));
        }
        if !x.is_empty() {
            lines.push(format!("transfer = {{ {} }}", x.join(", ")));
        }
    }
    Ok(Ok(Resolved {
        name,
        default: spec.default,
        section: lines.join("\n"),
        files,
    }))
}

/// Reconciles the `RegistryTarget`s of `rt`'s namespace into the targets file, and
/// `rt`'s status.
pub async fn reconcile(rt: Arc<RegistryTarget>, ctx: Arc<TargetsContext>) -> Result<Action, Error> {
    let ns = rt.namespace().unwrap_or_default();
    let api: Api<RegistryTarget> = Api::namespaced(ctx.client.clone(), &ns);
    let all = api.list(&ListParams::default()).await?.items;
    let mut sections = Vec::new();
    let mut default = None;
    let mut verdicts: BTreeMap<String, Result<(), Problem>> = BTreeMap::new();
    for t in &all {
        let verdict = match resolve(&ctx, t).await? {
            Err(p) => Err(p),
            Ok(r) => {
                for (p, bytes) in &r.files {
                    write_file(p, bytes)?;
                }
                // Checked as the services will read it (credentials readable too).
                let alone = format!("{}\n", r.section);
                match shipperd_registry_targets::Targets::parse(&alone, &ctx.output.secrets) {
                    Ok(_) => {
                        if r.default && default.is_none() {
                            default = Some(r.name.clone());
                        }
                        sections.push(r.section);
                        Ok(())
                    }
                    Err(e) => Err(problem("InvalidTarget", e.to_string())),
                }
            }
        };
        verdicts.insert(t.name_any(), verdict);
    }
    if !sections.is_empty() {
        let mut text = String::from(
            "# Written by shipperd operator from RegistryTarget resources; edits are replaced.\n",
        );
        if let Some(d) = &default {
            text.push_str(&format!("default = {}\n", lit(d)));
        }
        for s in &sections {
            text.push('\n');
            text.push_str(s);
            text.push('\n');
        }
        write_file(&ctx.output.file, text.as_bytes())?;
    }
    let mine = verdicts
        .remove(&rt.name_any())
        .unwrap_or_else(|| Err(problem("NotListed", "not found among the RegistryTargets")));
    let st = crate::status::ready_status(
        mine.map(|()| {
            format!(
                "written to {}; the services apply it within seconds",
                ctx.output.file.display()
            )
        })
        .map_err(|p| (p.reason, p.message)),
        rt.metadata.generation,
        rt.status.as_ref(),
    );
    if rt.status.as_ref() != Some(&st) {
        api.patch_status(
            &rt.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": st })),
        )
        .await?;
    }
    Ok(Action::await_change())
}
