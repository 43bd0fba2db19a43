//! `WebhookTarget` resources become the webhooks file notify follows: each target's
//! signing secret is written as a file of its own (0600) under
//! `<data>/config/webhooks/<namespace>/<name>/secret`, and the valid targets go to the
//! file (atomically, when it changed). One that cannot be used (a URL that is not
//! http(s), a missing Secret or key) gets `Ready=False` with the reason and stays out.
//! URLs are shown without credentials or query in status and logs.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    runtime::controller::Action,
};

use crate::{
    crd::WebhookTarget,
    targets::{Error, lit, write_file},
};

/// What reconciling webhooks works with.
pub struct WebhooksContext {
    pub client: kube::Client,
    /// The webhooks file (notify's `--webhooks-file`).
    pub file: PathBuf,
    /// Where signing secrets are written.
    pub secrets: PathBuf,
}

/// Reconciles the `WebhookTarget`s of `wt`'s namespace into the webhooks file, and
/// `wt`'s status.
pub async fn reconcile(wt: Arc<WebhookTarget>, ctx: Arc<WebhooksContext>) -> Result<Action, Error> {
    let ns = wt.namespace().unwrap_or_default();
    let api: Api<WebhookTarget> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut text = String::from(
        "# Written by shipperd operator from WebhookTarget resources; edits are replaced.\n",
    );
    let mut verdicts: BTreeMap<String, Result<(), (&'static str, String)>> = BTreeMap::new();
    for t in api.list(&ListParams::default()).await?.items {
        let name = t.name_any();
        let spec = &t.spec;
        let verdict = if !(spec.url.starts_with("https://") || spec.url.starts_with("http://")) {
            Err(("InvalidURL", "url must be an http(s) URL".to_string()))
        } else {
            let r = &spec.signing_secret;
            match secrets.get_opt(&r.name).await? {
                None => Err(("SecretNotFound", format!("Secret {} not found", r.name))),
                Some(s) => match s.data.and_then(|d| d.get(&r.key).cloned()) {
                    None => Err((
                        "KeyNotFound",
                        format!("Secret {} has no key {}", r.name, r.key),
                    )),
                    Some(secret) => {
                        let path = ctx.secrets.join(&ns).join(&name).join("secret");
                        write_file(&path, &secret.0)?;
                        text.push_str(&format!(
                            "\n[[webhook]]\nurl = {}\nsecret_file = {}\ntypes = [{}]\n",
                            lit(&spec.url),
                            lit(&path.display().to_string()),
                            spec.types
                                .iter()
                                .map(|t| lit(t))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                        Ok(())
                    }
                },
            }
        };
        verdicts.insert(name, verdict);
    }
    write_file(&ctx.file, text.as_bytes())?;
    let mine = verdicts
        .remove(&wt.name_any())
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
        api.patch_status(
            &wt.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": st })),
        )
        .await?;
    }
    Ok(Action::await_change())
}
