//! The bundle's commit: once every image of a bundle is in the registry by digest, its
//! tags are set, and only then. So a bundle with any failed image (a corrupt blob, a
//! blob a differential bundle left out and the registry does not have) tags nothing:
//! what it leaves behind is untagged content, for the registry's garbage collection.
//!
//! One commit job per bundle (and generation, and re-drive), sent by the worker that
//! counted the last image. It goes through the images in index order,
//! [`COMMIT_BATCH`] at a time, setting up to `concurrency` tags at once; each tag is the
//! top manifest `PUT` again under the tag (the distribution protocol has no other way),
//! guarded so that a tag moves only forward (see [`crate::tags`]). After each batch the
//! summary's `tag_cursor` moves on, so a commit cut short resumes where it stopped (a
//! tag set twice is harmless: same bytes, same digest). `image.published` goes out as
//! each image's tag is set; then the bundle is `Published` and announced.
//!
//! A commit the registry keeps refusing (after `max_deliver` attempts, or at once for
//! an answer retrying cannot fix) fails the bundle; some tags may be set then. Its
//! images are all in the registry, so a retry runs the commit again, pushing nothing.

use std::time::Duration;

use async_nats::jetstream::Message;
use futures::{FutureExt as _, TryStreamExt as _};
use shipperd_bus::worker::{self, Outcome};
use shipperd_model::{BundleId, BundleSummary, ImagePhase, ImageState, Phase};
use shipperd_state::lifecycle;

use crate::{Ctx, Error, Registry, RegistryError, Result, announce_image, referrers_tags};

/// Images read, tagged and noted in the summary at a time.
const COMMIT_BATCH: u32 = 256;

/// Handles a commit job; how to settle it.
pub(crate) async fn commit(ctx: &Ctx, msg: &Message, id: &BundleId) -> Outcome {
    let work = std::panic::AssertUnwindSafe(try_commit(ctx, id)).catch_unwind();
    let result = match worker::with_progress(msg, Duration::from_secs(15), work).await {
        Ok(r) => r,
        Err(panic) => Err(Error::Internal(worker::panic_message(&*panic))),
    };
    let attempt = worker::delivered(msg);
    match result {
        Ok(()) => Outcome::Ack,
        Err(e) if e.is_transient() && attempt < ctx.config.max_deliver => {
            let n = attempt.clamp(1, 6) as u32;
            let delay = (ctx.config.retry_base * 2u32.pow(n - 1)).min(Duration::from_secs(60));
            tracing::warn!(error = %e, ?delay, attempt, "setting the tags failed; will retry");
            Outcome::Retry(delay)
        }
        Err(e) => {
            let error = format!(
                "setting the tags failed (every image is in the registry; a retry sets \
                 them again): {e}"
            );
            tracing::warn!(%error, "commit failed");
            match lifecycle::fail_bundle(&ctx.bus, &ctx.state, id, error).await {
                Ok(_) => Outcome::Term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the failed commit; will retry");
                    Outcome::Retry(ctx.config.retry_base)
                }
            }
        }
    }
}

async fn try_commit(ctx: &Ctx, id: &BundleId) -> Result<()> {
    let Some(s) = ctx.state.summary(id).await? else {
        return Ok(());
    };
    if s.deleting {
        return Ok(());
    }
    match s.phase {
        Phase::Tagging => {}
        p if p.is_terminal() => {
            return Ok(lifecycle::announce_if_done(&ctx.bus, &ctx.state, &s).await?);
        }
        // A commit of an earlier round (the bundle was retried and is publishing again).
        _ => return Ok(()),
    }
    let reg = &ctx.registry(s.target.as_ref())?;
    // Every image's content is in the registry: the commit reads only plans, so the
    // bundle's expanded blobs can go now (a retried commit needs none either).
    ctx.bundles.forget(id);
    crate::release_blobs(&ctx.config.data_dir, id).await;
    let generation = s.generation;
    let mut at = s.tag_cursor;
    let started = std::time::Instant::now();
    while at < s.counts.total {
        let end = at.saturating_add(COMMIT_BATCH).min(s.counts.total);
        ctx.state
            .images(id, at, end)
            .map_err(Error::from)
            .try_for_each_concurrent(ctx.config.concurrency, |img| tag(ctx, &s, reg, img))
            .await?;
        let noted = ctx
            .state
            .update(id, |r| r.tagged_through(end, generation).then_some(()))
            .await?;
        if noted.is_none() {
            // Retried, failed or deleted meanwhile: this commit is over.
            return Ok(());
        }
        at = end;
    }
    let Some(((), s)) = ctx
        .state
        .update(id, |r| r.tagged(generation).then_some(()))
        .await?
    else {
        return Ok(());
    };
    tracing::info!(
        images = s.counts.total,
        secs = started.elapsed().as_secs_f64(),
        "tags set"
    );
    lifecycle::announce_if_done(&ctx.bus, &ctx.state, &s).await?;
    Ok(())
}

/// Sets one image's tag (and its referrers' fallback tag), then sends `image.published`.
async fn tag(ctx: &Ctx, s: &BundleSummary, reg: &Registry, img: ImageState) -> Result<()> {
    // An outcome counted just before the bundle moved here may not be written to the
    // image yet: its claim says what it is.
    let img = s.view_of(&img);
    if img.phase_in(s.generation) != ImagePhase::Published {
        // Not in the registry: the bundle would not be committing (a bug, or a retry
        // raced this commit); set nothing.
        return Err(Error::Internal(format!(
            "image {} is not in the registry, yet its bundle is being tagged",
            img.source
        )));
    }
    if img.skipped {
        // Its tag was at this digest already; its event went out then.
        return Ok(());
    }
    let repo = &img.target.repository;
    let plan = ctx.bundles.plan_only(&s.id, img.plan).await?;
    if let Some(t) = img.target.tag.as_deref() {
        let top = plan.top().ok_or_else(|| {
            Error::Internal(format!("the plan of {} has no manifest", img.source))
        })?;
        let held = ctx.tags.read(reg, repo, t).await;
        if ctx.tags.may_move(held, s, &img.digest).await {
            let what = || format!("tagging {repo}:{t} ({})", img.digest);
            let (bytes, media_type) = if top.absent {
                // A differential bundle's top manifest: the registry has it (publishing
                // checked); tagging sends it again.
                reg.fetch_manifest(repo, &img.digest)
                    .await
                    .map_err(Error::registry(what()))?
                    .ok_or_else(|| Error::Registry {
                        what: what(),
                        source: RegistryError::Missing(format!(
                            "manifest {} is gone from {}/{repo}",
                            img.digest,
                            reg.host()
                        )),
                    })?
            } else {
                (top.bytes.clone().into(), top.desc.media_type.clone())
            };
            reg.push_manifest(repo, t, &bytes, &media_type)
                .await
                .map_err(Error::registry(what()))?;
        } else {
            tracing::info!(
                tag = t,
                image = %img.source,
                "a bundle received later holds this tag; not moved"
            );
        }
    }
    referrers_tags(reg, repo, &plan).await?;
    announce_image(ctx, s, &img).await
}
