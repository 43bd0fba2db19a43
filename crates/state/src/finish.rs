//! Recording how an image ended, exactly once whatever the redeliveries.
//!
//! 1. Claim: in one compare-and-set round, read the summary, read the image; if the
//!    image is not counted and no claim for it is held, count the outcome and hold a
//!    claim in the summary (the write is conditional on the summary's revision).
//! 2. Write the outcome to the image.
//! 3. Release the claim.
//!
//! A crash after 1 leaves the claim: whoever comes next for that image (a redelivered
//! job, the sweep, a retry) finds it and finishes 2 and 3 with the claimed outcome. A
//! duplicate that read the image before another's step 2 cannot count it again: its
//! write needs the summary unchanged since its own read, and the other's claim (step 1)
//! and release (step 3) both change the summary, while step 2 lies between them.

use shipperd_bus::Result;
use shipperd_model::{BundleId, BundleSummary, ImageState, Outcome, state::Claimed};

use crate::StateStore;

/// What [`finish_image`] did.
#[derive(Debug, Clone)]
pub struct Finished {
    pub summary: BundleSummary,
    pub image: ImageState,
    /// This call counted the outcome (else an earlier delivery had).
    pub counted: bool,
    /// This call moved the bundle to its terminal phase.
    pub ended: bool,
}

/// Records `outcome` for image `index` of bundle `id`, reached by a job of bundle
/// generation `generation`. `None` when there is nothing to record it in (the bundle or
/// image is gone, the bundle is not publishing, or a retry started a later generation:
/// a job of an earlier one counts in none).
pub async fn finish_image(
    store: &StateStore,
    id: &BundleId,
    index: u32,
    generation: u32,
    outcome: &Outcome,
) -> Result<Option<Finished>> {
    record(store, id, index, Some((generation, outcome))).await
}

/// Completes what an earlier delivery began for image `index`: a claim it left is
/// written to the image and released. Counts nothing new; `None` when the image has no
/// outcome yet.
pub async fn resume(store: &StateStore, id: &BundleId, index: u32) -> Result<Option<Finished>> {
    record(store, id, index, None).await
}

async fn record(
    store: &StateStore,
    id: &BundleId,
    index: u32,
    outcome: Option<(u32, &Outcome)>,
) -> Result<Option<Finished>> {
    for round in 0..crate::store::MAX_CAS_ATTEMPTS {
        let Some((mut s, rev)) = store.get(id).await? else {
            return Ok(None);
        };
        let Some((mut img, _)) = store.image(id, index).await? else {
            return Ok(None);
        };
        if img.is_counted(s.generation) {
            let summary = if s.claims.contains_key(&index) {
                release(store, id, index).await?.unwrap_or(s)
            } else {
                s
            };
            return Ok(Some(Finished {
                summary,
                image: img,
                counted: false,
                ended: false,
            }));
        }
        let (decided, counted, ended) = match (s.claims.get(&index), outcome) {
            (Some(held), _) => (held.clone(), false, false),
            (None, None) => return Ok(None),
            (None, Some((generation, _))) if generation != s.generation => return Ok(None),
            (None, Some((_, outcome))) => match s.claim(index, outcome) {
                Claimed::Counted { finished } => {
                    if !store.write(&mut s, rev).await? {
                        crate::store::backoff(round).await;
                        continue;
                    }
                    (outcome.clone(), true, finished)
                }
                Claimed::Held | Claimed::NotPublishing => return Ok(None),
            },
        };
        img.apply(&decided, s.generation);
        store.put_image(id, &img).await?;
        let summary = release(store, id, index).await?.unwrap_or(s);
        return Ok(Some(Finished {
            summary,
            image: img,
            counted,
            ended,
        }));
    }
    Err(shipperd_bus::Error::Conflict(id.to_string()))
}

/// Lets the claim on image `index` go; the summary as stored then.
async fn release(store: &StateStore, id: &BundleId, index: u32) -> Result<Option<BundleSummary>> {
    Ok(store
        .update(id, |s| s.release(index).then_some(()))
        .await?
        .map(|((), s)| s))
}

/// Finishes every claim a crash left in the summary: writes each claimed outcome to its
/// image and releases the claim. Returns how many it finished.
pub async fn settle_claims(store: &StateStore, id: &BundleId) -> Result<usize> {
    let Some(s) = store.summary(id).await? else {
        return Ok(0);
    };
    let mut done = 0;
    for (index, outcome) in &s.claims {
        if let Some((mut img, _)) = store.image(id, *index).await?
            && !img.is_counted(s.generation)
        {
            img.apply(outcome, s.generation);
            store.put_image(id, &img).await?;
        }
        release(store, id, *index).await?;
        done += 1;
    }
    Ok(done)
}
