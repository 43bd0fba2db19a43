//! Operations on a stored bundle: retry a failed one, delete one, let a finished one's
//! files expire. Each is safe to repeat and to run on several replicas at once; the
//! janitor finishes what a crash cut short (a summary marked `deleting`, a claim left).

use shipperd_model::{BundleId, BundleSummary, Phase, now_rfc3339};
use shipperd_state::finish;

use crate::{Error, Result, store::Store};

/// Images in a bundle's status document, and in a page unless `limit` says otherwise.
pub const PAGE: u32 = 100;
/// Most images or bundles one page may ask for.
pub const MAX_PAGE: u32 = 1000;

/// Every bundle not being deleted, newest first.
pub async fn listed(store: &Store) -> Result<Vec<BundleSummary>> {
    let mut bundles = store.state().list().await?;
    bundles.retain(|s| !s.deleting);
    bundles.sort_by(|a, b| b.received_at.cmp(&a.received_at));
    Ok(bundles)
}

/// What a retry set going.
#[derive(Debug, Clone)]
pub struct Retried {
    pub summary: BundleSummary,
    /// Images handed to publish again (0 when the bundle is unpacked again).
    pub images: u64,
}

/// Re-drives a `Failed` bundle: unpacked again when it failed before listing its
/// images, else its images that are not published go to publish again (a new
/// generation, in which earlier failures no longer count).
pub async fn retry(store: &Store, id: &BundleId) -> Result<Retried> {
    let s = store
        .known(id)
        .await?
        .ok_or_else(|| Error::NotFound(id.to_string()))?;
    if s.phase != Phase::Failed || s.deleting {
        return Err(Error::Conflict(format!(
            "only a Failed bundle can be retried; {id} is {:?}",
            s.phase
        )));
    }
    if s.expired_at.is_some() || !stored(store, &s).await {
        return Err(Error::Gone(format!(
            "the stored bundle {id} has expired; upload it again, then retry"
        )));
    }
    finish::settle_claims(store.state(), id).await?;
    let Some((s, report)) = store.executor().transition(id, |s| s.retry()).await? else {
        return Err(Error::Conflict(format!(
            "{id} changed meanwhile; try again"
        )));
    };
    let images = report.dispatched;
    tracing::info!(bundle_id = %id, generation = s.generation, images, "bundle retried");
    Ok(Retried { summary: s, images })
}

/// Are the bundle's stored files there?
async fn stored(store: &Store, s: &BundleSummary) -> bool {
    match store.data().resolve(&s.id, &s.path) {
        Some(p) => tokio::fs::try_exists(p).await.unwrap_or(false),
        None => false,
    }
}

/// Deletes a bundle: its stored files, its claim on the blob store, its state. Images
/// in the registry stay. A bundle being unpacked or published is refused unless
/// `force`; the phase is checked in the same compare-and-set that marks it `deleting`,
/// so a bundle cannot start unpacking between the two. Its workers see the mark at
/// their next check and stop, letting go of what they wrote.
pub async fn delete(store: &Store, id: &BundleId, force: bool) -> Result<()> {
    let mut busy = None;
    let marked = store
        .state()
        .update_if_known(id, |s| {
            busy = None;
            if s.deleting {
                // Marked already: finish the delete.
                return Some(());
            }
            if !force
                && matches!(
                    s.phase,
                    Phase::Unpacking | Phase::Publishing | Phase::Tagging
                )
            {
                busy = Some(s.phase);
                return None;
            }
            s.deleting = true;
            Some(())
        })
        .await?;
    if let Some(phase) = busy {
        return Err(Error::Conflict(format!(
            "{id} is {phase:?}; wait for it to end, or delete with ?force=true"
        )));
    }
    if marked.is_none() {
        return Err(Error::NotFound(id.to_string()));
    }
    remove_files(store, id).await?;
    store.state().remove(id).await?;
    tracing::info!(bundle_id = %id, "bundle deleted");
    Ok(())
}

/// Removes `bundles/<id>/` and lets go of the bundle's blobs in the shared store.
pub async fn remove_files(store: &Store, id: &BundleId) -> Result<()> {
    let dir = store.data().bundle_dir(id);
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&dir, e)),
        _ => {}
    }
    shipperd_state::effects::release_blobs(store.data(), id).await;
    Ok(())
}

/// Removes a finished bundle's stored files and its status (`--keep-status` after it
/// ended): it is as if it had never been received.
pub async fn forget(store: &Store, id: &BundleId) -> Result<()> {
    remove_files(store, id).await?;
    store.state().remove(id).await?;
    tracing::info!(bundle_id = %id, "finished bundle's status removed");
    Ok(())
}

/// Removes a finished bundle's stored files, keeping its status.
pub async fn expire(store: &Store, id: &BundleId) -> Result<()> {
    remove_files(store, id).await?;
    store
        .state()
        .update(id, |s| {
            (s.phase.is_terminal() && s.expired_at.is_none())
                .then(|| s.expired_at = Some(now_rfc3339()))
        })
        .await?;
    tracing::info!(bundle_id = %id, "stored bundle expired");
    Ok(())
}
