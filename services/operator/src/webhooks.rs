//! `WebhookTarget` resources become the webhooks file notify follows. One writer (the
//! leader) renders the whole file from the targets of every watched namespace
//! ([`render`]); each target's signing secret is written as a file of its own (0600)
//! under `<data>/config/webhooks/<namespace>/<name>/secret`, and a deleted target's
//! entry and file go with the next render (deletions trigger one). One that cannot be
//! used (a URL that is not http(s), a missing or unlabelled Secret, a missing key) gets
//! `Ready=False` with the reason and stays out. URLs are shown as `scheme://host` in
//! status and logs (a URL's path may be its secret). Each webhook is written with its
//! namespace: notify sends it only events of bundles that namespace brought in.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    runtime::controller::Action,
};
use shipperd_model::webhooks::{WebhookSpec, WebhooksFile};

use crate::{
    crd::WebhookTarget,
    targets::{Error, labelled, unlabelled, write_file},
};

/// What reconciling webhooks works with.
pub struct WebhooksContext {
    pub client: kube::Client,
    /// The webhooks file (notify's `--webhooks-file`).
    pub file: PathBuf,
    /// Where signing secrets are written.
    pub secrets: PathBuf,
    /// Only this namespace's targets (`None`: every namespace's).
    pub watch_namespace: Option<String>,
    /// The namespace bundles of the ingest endpoint and drop directory belong to.
    pub upload_namespace: Option<String>,
}

/// One render of the webhooks file at a time (reconciles run side by side; two renders
/// would race on the file and prune each other's secrets).
static RENDERING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Verdict = Result<(), (&'static str, String)>;

/// Renders every `WebhookTarget` into the webhooks file; each one's verdict by
/// (namespace, name).
pub async fn render(ctx: &WebhooksContext) -> Result<BTreeMap<(String, String), Verdict>, Error> {
    let _one = RENDERING.lock().await;
    let api: Api<WebhookTarget> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let mut all = api.list(&ListParams::default()).await?.items;
    all.sort_by_key(|t| (t.namespace(), t.name_any()));
    let mut file = WebhooksFile {
        upload_namespace: ctx.upload_namespace.clone(),
        webhook: Vec::new(),
    };
    let mut verdicts = BTreeMap::new();
    let mut keep = std::collections::BTreeSet::new();
    for t in &all {
        let (ns, name) = (t.namespace().unwrap_or_default(), t.name_any());
        let dir = ctx.secrets.join(&ns).join(&name);
        keep.insert(dir.clone());
        let spec = &t.spec;
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let verdict = if !(spec.url.starts_with("https://") || spec.url.starts_with("http://")) {
            Err(("InvalidURL", "url must be an http(s) URL".to_string()))
        } else {
            let r = &spec.signing_secret;
            match secrets.get_opt(&r.name).await? {
                None => Err(("SecretNotFound", format!("Secret {} not found", r.name))),
                Some(s) if !labelled(&s) => {
                    let p = unlabelled(&r.name);
                    Err((p.reason, p.message))
                }
                Some(s) => match s.data.and_then(|d| d.get(&r.key).cloned()) {
                    None => Err((
                        "KeyNotFound",
                        format!("Secret {} has no key {}", r.name, r.key),
                    )),
                    Some(secret) => {
                        let path = dir.join("secret");
                        write_file(&path, &secret.0)?;
                        file.webhook.push(WebhookSpec {
                            namespace: Some(ns.clone()),
                            url: spec.url.clone(),
                            secret_file: Some(path),
                            types: spec.types.clone(),
                        });
                        Ok(())
                    }
                },
            }
        };
        verdicts.insert((ns, name), verdict);
    }
    let text = format!(
        "# Written by shipperd operator from WebhookTarget resources; edits are replaced.\n\
         # Each webhook hears only of the bundles its namespace brought in.\n{}",
        toml::to_string(&file).expect("a webhooks file serialises")
    );
    write_file(&ctx.file, text.as_bytes())?;
    prune(&ctx.secrets, &keep);
    Ok(verdicts)
}

/// Removes the secret files of targets that no longer exist.
fn prune(secrets: &std::path::Path, keep: &std::collections::BTreeSet<PathBuf>) {
    let Ok(namespaces) = std::fs::read_dir(secrets) else {
        return;
    };
    for ns in namespaces.flatten() {
        for t in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            if !keep.contains(&t.path())
                && let Err(error) = std::fs::remove_dir_all(t.path())
            {
                tracing::warn!(%error, dir = %t.path().display(), "cannot remove a deleted webhook's files");
            }
        }
        let _ = std::fs::remove_dir(ns.path());
    }
}

/// Renders the webhooks file, and `wt`'s status.
pub async fn reconcile(wt: Arc<WebhookTarget>, ctx: Arc<WebhooksContext>) -> Result<Action, Error> {
    let ns = wt.namespace().unwrap_or_default();
    let mut verdicts = render(&ctx).await?;
    let mine = verdicts
        .remove(&(ns.clone(), wt.name_any()))
        .unwrap_or_else(|| Err(("NotListed", "not found among the WebhookTargets".into())));
    let st = crate::status::ready_status(
        mine.map(|()| {
            format!(
                "{} gets events; written to {}",
                shipperd_model::url_origin(&wt.spec.url),
                ctx.file.display()
            )
        }),
        wt.metadata.generation,
        wt.status.as_ref(),
    );
    if wt.status.as_ref() != Some(&st) {
        let api: Api<WebhookTarget> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &wt.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": st })),
        )
        .await?;
    }
    Ok(Action::await_change())
}
