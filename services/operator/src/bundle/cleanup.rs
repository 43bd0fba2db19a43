//! A deleted `Bundle`: its bundle's files and state go (only the namespace's own), its
//! cluster resources are withdrawn.

use kube::{ResourceExt as _, runtime::controller::Action};

use super::{Context, bundle_id, parse_id};
use crate::{crd::Bundle, error::Error};

/// A deleted `Bundle`: its stored file and state go (its images stay in the registry),
/// and what it needed of the cluster, unless another published bundle needs it too.
pub(crate) async fn cleanup(b: &Bundle, ctx: &Context) -> Result<Action, Error> {
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
