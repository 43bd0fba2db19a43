//! The bundle's commit: once every image of a bundle is in the registry by digest, its
//! tags are set, and only then. So a bundle with any failed image (a corrupt blob, a
//! blob a differential bundle left out and the registry does not have) tags nothing:
//! what it leaves behind is untagged content, for the registry's garbage collection.
//!
//! One commit job per bundle (and generation, and re-drive), sent by the worker that
//! counted the last image. It streams the images in index order (their keys read
//! ahead), setting up to `tag_concurrency` tags at once with no pause between batches;
//! each tag is the top manifest `PUT` again under the tag (the distribution protocol has
//! no other way), guarded so that a tag moves only forward (see [`crate::tags`]). Every
//! [`COMMIT_BATCH`] images the summary's `tag_cursor` (every image below it tagged)
//! moves on, so a commit cut short resumes where it stopped (a tag set twice is
//! harmless: same bytes, same digest). `image.published` goes out as
//! each image's tag is set; then the bundle is `Published` and announced.
//!
//! The commit is a stage of its own on the runtime (consumer `commit`). A commit the
//! registry keeps refusing (after the stage's attempts, or at once for an answer
//! retrying cannot fix) fails the bundle; some tags may be set then. Its
//! images are all in the registry, so a retry runs the commit again, pushing nothing.

use async_nats::jetstream::Message;
use futures::{TryFutureExt as _, TryStreamExt as _};
use shipperd_model::{BundleId, BundleSummary, ImagePhase, ImageState, Phase};
use shipperd_pipeline::{Attempt, Done, GiveUp, Stage};
use shipperd_proto::v1;
use std::sync::Arc;

use crate::{
    Ctx, Error, Registry, RegistryError, Result, referrers_tags,
    tags::{Claim, Move},
};

/// Images tagged between two notes of the cursor in the summary.
const COMMIT_BATCH: u32 = 256;

/// A commit job: set the tags of one bundle's generation.
pub(crate) struct Job {
    id: BundleId,
    generation: u32,
}

/// The stage that sets a bundle's tags.
pub(crate) struct CommitStage(pub(crate) Arc<Ctx>);

impl Stage for CommitStage {
    type Job = Job;
    type Error = Error;
    const NAME: &'static str = "commit";

    fn decode(&self, msg: &Message) -> Option<Job> {
        let job: v1::PublishJob = prost::Message::decode(msg.payload.as_ref()).ok()?;
        Some(Job {
            id: BundleId::parse(&job.bundle_id).ok()?,
            generation: job.generation,
        })
    }

    fn span(&self, job: &Job) -> tracing::Span {
        tracing::info_span!("commit", bundle_id = %job.id)
    }

    async fn handle(&self, job: &Job, _: Attempt) -> Result<Done> {
        commit(&self.0, job).await
    }

    async fn give_up(&self, job: &Job, why: GiveUp<Error>) -> Result<Done> {
        let error = format!(
            "setting the tags failed (every image is in the registry; a retry sets them \
             again): {}",
            why.reason()
        );
        let generation = job.generation;
        self.0
            .executor
            .fail(
                &job.id,
                |s| s.generation == generation && s.phase == Phase::Tagging,
                error,
            )
            .await?;
        Ok(Done::nothing())
    }
}

async fn commit(ctx: &Ctx, job: &Job) -> Result<Done> {
    let id = &job.id;
    let Some(s) = ctx.state.summary(id).await? else {
        return Ok(Done::nothing());
    };
    if s.deleting || s.generation != job.generation {
        // Deleted, or a commit of an earlier round (the bundle was retried since).
        return Ok(Done::nothing());
    }
    match s.phase {
        Phase::Tagging => {}
        p if p.is_terminal() => {
            let effects = s.follow_up();
            return Ok(Done::then(s, effects));
        }
        _ => return Ok(Done::nothing()),
    }
    let reg = &ctx.registry(s.target.as_ref())?;
    // Every image's content is in the registry: the commit reads only plans, so the
    // bundle's expanded blobs can go now (a retried commit needs none either).
    ctx.bundles.forget(id);
    shipperd_state::effects::release_blobs(&ctx.config.service.data_dir, id).await;
    let generation = s.generation;
    let started = std::time::Instant::now();
    // One stream of the images from the cursor on: keys read ahead, tags set
    // `tag_concurrency` at a time with no pause between batches; the cursor (every image
    // below it tagged) is noted as it passes each COMMIT_BATCH.
    let mut cursor = s.tag_cursor;
    let mut noted = cursor;
    let mut done = std::collections::BTreeSet::new();
    let tags = ctx
        .state
        .images(id, cursor, s.counts.total)
        .map_err(Error::from)
        .map_ok(|img| {
            let index = img.index;
            tag(ctx, &s, reg, img).map_ok(move |()| index)
        })
        .try_buffer_unordered(ctx.config.tag_concurrency.max(1));
    futures::pin_mut!(tags);
    while let Some(index) = tags.try_next().await? {
        done.insert(index);
        while done.remove(&cursor) {
            cursor += 1;
        }
        if cursor >= noted.saturating_add(COMMIT_BATCH) {
            noted = cursor;
            let kept = ctx
                .state
                .update_if_known(id, |r| r.tagged_through(cursor, generation).then_some(()))
                .await?;
            if kept.is_none() {
                // Retried, failed or deleted meanwhile: this commit is over.
                return Ok(Done::nothing());
            }
        }
    }
    let Some((effects, s)) = ctx
        .state
        .update_if_known(id, |r| r.tagged(generation))
        .await?
    else {
        return Ok(Done::nothing());
    };
    tracing::info!(
        images = s.counts.total,
        secs = started.elapsed().as_secs_f64(),
        "tags set"
    );
    Ok(Done::then(s, effects))
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
    let mut taken_from = None;
    if let Some(t) = img.target.tag.as_deref() {
        let top = plan.top().ok_or_else(|| {
            Error::Internal(format!("the plan of {} has no manifest", img.source))
        })?;
        let held = ctx.tags.read(reg, repo, t).await;
        let claim = Claim::of(s, &img);
        let name = format!("{repo}:{t}");
        match ctx
            .tags
            .may_move(held, s, &img.digest, &claim, reg.target().tags, &name)
            .await?
        {
            Move::Push { taken_from: from } => {
                if let Some(from) = &from {
                    tracing::warn!(
                        tag = %name,
                        from = %from,
                        to = %claim.owner,
                        source = %claim.source,
                        "tag taken over from another owner (the target's tags.take_over)"
                    );
                }
                taken_from = from;
                let what = || format!("tagging {name} ({})", img.digest);
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
            }
            Move::Keep => {
                tracing::info!(
                    tag = t,
                    image = %img.source,
                    "a bundle received later holds this tag; not moved"
                );
            }
            // Taken by another owner's bundle since this one was published (two
            // committing side by side): this one loses, and fails saying so.
            Move::Refused(why) => return Err(Error::TagOwned(why)),
        }
    }
    referrers_tags(reg, repo, &plan).await?;
    Ok(ctx
        .executor
        .image_ended(s, &img, taken_from.as_deref())
        .await?)
}
