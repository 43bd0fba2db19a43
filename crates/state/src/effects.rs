//! The one executor of [`Effects`]: what a state transition asked for, sent. Every stage,
//! the janitor, retry and delete go through it, so each effect is built in one place:
//! its message, its de-duplication id ([`MessageId`]), its order.
//!
//! Every effect is idempotent: jobs and events carry ids JetStream de-duplicates, the
//! end of a bundle is announced once (noted in the summary), releasing blobs twice
//! releases nothing more. So a caller that fails half-way performs them all again.

use futures::TryStreamExt;
use shipperd_bundle::cas::Cas;
use shipperd_bus::{Bus, EventKind, Job, MessageId, Result, Topic, event::encode, subjects::*};
use shipperd_model::{
    BundleId, BundleSummary, Counts, DataDir, Effect, Effects, ImagePhase, ImageState, Phase,
};
use shipperd_proto::v1;
use tracing::Instrument as _;

use crate::StateStore;

/// Jobs built and sent at a time.
const DISPATCH_BATCH: usize = 1024;

/// Performs effects against the bus, the state store and the data directory.
#[derive(Clone)]
pub struct Executor {
    bus: Bus,
    store: StateStore,
    data: DataDir,
}

/// What performing some effects did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Publish jobs sent.
    pub dispatched: u64,
}

impl Executor {
    pub fn new(bus: Bus, store: StateStore, data: DataDir) -> Self {
        Executor { bus, store, data }
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Performs `effects` for bundle `s` (as stored after the transition), in order.
    pub async fn perform(&self, s: &BundleSummary, effects: &Effects) -> Result<Report> {
        self.perform_with(s, effects, None).await
    }

    /// [`Executor::perform`] with the bundle's pending images in hand (unpack has just
    /// listed them): a dispatch sends their jobs without reading them back.
    pub async fn perform_with(
        &self,
        s: &BundleSummary,
        effects: &Effects,
        pending: Option<&[ImageState]>,
    ) -> Result<Report> {
        let mut report = Report::default();
        for effect in effects.iter() {
            match effect {
                Effect::Announce => self.announce(s).await?,
                Effect::Dispatch => {
                    report.dispatched += match pending {
                        Some(images) => self.dispatch(s, images).await?,
                        None => self.dispatch_uncounted(s).await?,
                    }
                }
                Effect::Commit => self.commit(s).await?,
                Effect::Unpacked => self.unpacked(s).await?,
                Effect::ImageEnded(img) => self.image_ended(s, img, None).await?,
                Effect::Ended => self.ended(s).await?,
                Effect::ReleaseBlobs => release_blobs(&self.data, &s.id).await,
            }
        }
        Ok(report)
    }

    /// Applies `change` to the summary (compare-and-set) and performs the effects it
    /// returns. `None` when `change` declined (or the bundle is gone).
    pub async fn transition(
        &self,
        id: &BundleId,
        change: impl FnMut(&mut BundleSummary) -> Option<Effects>,
    ) -> Result<Option<(BundleSummary, Report)>> {
        let Some((effects, s)) = self.store.update_if_known(id, change).await? else {
            return Ok(None);
        };
        let report = self.perform(&s, &effects).await?;
        Ok(Some((s, report)))
    }

    /// Fails a bundle that has not ended, with `error`, when `may` says so of it as
    /// stored (a stage fails only a bundle still in its hands), and announces it; one
    /// that ended already has what follows its end done either way. What a stage's
    /// `give_up` does. Returns the summary as stored (`None` when the bundle is not
    /// known).
    pub async fn fail(
        &self,
        id: &BundleId,
        may: impl Fn(&BundleSummary) -> bool,
        error: String,
    ) -> Result<Option<BundleSummary>> {
        if let Some((s, _)) = self
            .transition(id, |s| may(s).then(|| s.fail(error.clone())).flatten())
            .await?
        {
            return Ok(Some(s));
        }
        // Ended already (or gone): make sure what follows its end was done (announced,
        // its expanded blobs let go), as a crash may have cut it short.
        let Some(s) = self.store.summary(id).await? else {
            return Ok(None);
        };
        if s.phase.is_terminal() {
            self.perform(&s, &s.follow_up()).await?;
        }
        Ok(Some(s))
    }

    /// `bundle.received` of `s`'s generation (and re-drive).
    async fn announce(&self, s: &BundleSummary) -> Result<()> {
        let body = v1::BundleReceived {
            bundle_id: s.id.to_string(),
            name: s.name.clone(),
            size: s.size,
            path: s.path.clone(),
            generation: s.generation,
        };
        let id = MessageId::unpack(s);
        // The bundle's trace starts here (a child of the upload's request, when one
        // sent a `traceparent`); every stage after it continues it from the headers.
        let span = tracing::info_span!("bundle.received", bundle_id = %s.id);
        self.bus
            .publish_event(EventKind::BundleReceived, &id, encode(&body))
            .instrument(span)
            .await?;
        Ok(())
    }

    /// Sends the jobs of `images`, [`DISPATCH_BATCH`] at a time.
    async fn dispatch(&self, s: &BundleSummary, images: &[ImageState]) -> Result<u64> {
        let mut sent = 0;
        for chunk in images.chunks(DISPATCH_BATCH) {
            let jobs: Vec<Job> = chunk.iter().map(|img| job(s, img)).collect();
            sent += self.bus.publish_jobs(jobs).await?;
        }
        Ok(sent)
    }

    /// Reads every image of `s` and sends the jobs of those its generation has not
    /// counted (nor claimed).
    async fn dispatch_uncounted(&self, s: &BundleSummary) -> Result<u64> {
        let mut sent = 0;
        let mut batch = Vec::new();
        let mut images = self.store.images(&s.id, 0, s.counts.total);
        while let Some(img) = images.try_next().await? {
            if !img.is_counted(s.generation) && !s.claims.contains_key(&img.index) {
                batch.push(img);
            }
            if batch.len() >= DISPATCH_BATCH {
                sent += self.dispatch(s, &batch).await?;
                batch.clear();
            }
        }
        sent += self.dispatch(s, &batch).await?;
        Ok(sent)
    }

    /// Counts the images of a publishing bundle from their own states and sets the
    /// summary's counts to that when they differ ([`BundleSummary::recount`]), moving
    /// it on if every image has ended. Reads every image: for a stalled bundle only.
    /// Whether the summary changed.
    pub async fn recount(&self, id: &BundleId) -> Result<bool> {
        let Some(s) = self.store.summary(id).await? else {
            return Ok(false);
        };
        let mut tally = Counts {
            total: s.counts.total,
            ..Default::default()
        };
        let mut images = self.store.images(&s.id, 0, s.counts.total);
        while let Some(img) = images.try_next().await? {
            if !img.is_counted(s.generation) {
                continue;
            }
            match img.phase {
                ImagePhase::Published => {
                    tally.published += 1;
                    tally.skipped += u32::from(img.skipped);
                }
                ImagePhase::Failed => tally.failed += 1,
                ImagePhase::Pending => {}
            }
        }
        let generation = s.generation;
        let changed = self
            .transition(id, |s| {
                if s.generation != generation {
                    return None;
                }
                s.recount(tally)
            })
            .await?;
        if let Some((s, _)) = &changed {
            tracing::warn!(bundle_id = %s.id, counts = ?s.counts, phase = ?s.phase,
                "the bundle's counts disagreed with its images' states; recounted");
        }
        Ok(changed.is_some())
    }

    /// The commit job of `s` (in `Tagging`): set every tag.
    async fn commit(&self, s: &BundleSummary) -> Result<()> {
        let body = v1::PublishJob {
            bundle_id: s.id.to_string(),
            bundle_path: s.path.clone(),
            target: target_name(s),
            generation: s.generation,
            commit: true,
            ..Default::default()
        };
        let job = Job {
            subject: COMMIT_JOB_SUBJECT,
            msg_id: MessageId::commit(s),
            body: encode(&body),
        };
        self.bus.publish_jobs([job]).await?;
        Ok(())
    }

    async fn unpacked(&self, s: &BundleSummary) -> Result<()> {
        let body = v1::BundleUnpacked {
            bundle_id: s.id.to_string(),
            name: s.name.clone(),
            format: s.format.clone().unwrap_or_default(),
            blob_count: s.blobs,
            blob_bytes: s.blob_bytes,
            image_count: s.counts.total,
            bytes_total: s.bytes_total,
            blobs_absent: s.blobs_absent,
            verification: verification(s),
        };
        let id = MessageId::event(EventKind::BundleUnpacked, &s.id, s.generation);
        self.bus
            .publish_event(EventKind::BundleUnpacked, &id, encode(&body))
            .await?;
        Ok(())
    }

    /// `image.published` or `image.failed` for `img` (nothing for a pending one); with
    /// whose its tag was, when it was taken over from another owner.
    pub async fn image_ended(
        &self,
        s: &BundleSummary,
        img: &ImageState,
        tag_taken_from: Option<&str>,
    ) -> Result<()> {
        let image = Some(image_ref(img));
        let (kind, body) = match img.phase {
            ImagePhase::Pending => return Ok(()),
            ImagePhase::Published => {
                let b = &img.blobs;
                let body = v1::ImagePublished {
                    bundle_id: s.id.to_string(),
                    image,
                    blobs_pushed: b.uploaded as u32,
                    blobs_mounted: b.mounted as u32,
                    blobs_skipped: b.present as u32,
                    bytes_pushed: b.uploaded_bytes,
                    skipped: img.skipped,
                    target_name: target_name(s),
                    tag_taken_from: tag_taken_from.unwrap_or_default().to_string(),
                };
                (EventKind::ImagePublished, encode(&body))
            }
            ImagePhase::Failed => {
                let body = v1::ImageFailed {
                    bundle_id: s.id.to_string(),
                    image,
                    error: img.error.clone().unwrap_or_default(),
                };
                (EventKind::ImageFailed, encode(&body))
            }
        };
        let id = MessageId::image_event(kind, &s.id, img.index, img.generation);
        self.bus.publish_event(kind, &id, body).await?;
        Ok(())
    }

    /// Announces `s`'s end (`bundle.published` or `bundle.failed`) if it has ended and
    /// that is not yet noted, then notes it. The event's id is per generation, so two
    /// workers racing here store one event.
    pub async fn ended(&self, s: &BundleSummary) -> Result<()> {
        if !s.phase.is_terminal() || s.announced {
            return Ok(());
        }
        let (kind, body) = if s.phase == Phase::Published {
            let body = v1::BundlePublished {
                bundle_id: s.id.to_string(),
                name: s.name.clone(),
                images: Some(counts(&s.counts)),
                target_name: target_name(s),
                blobs: Some(v1::BlobSources {
                    uploaded: s.blob_sources.uploaded,
                    mounted: s.blob_sources.mounted,
                    present: s.blob_sources.present,
                    absent: s.blobs_absent,
                }),
                verification: verification(s),
            };
            (EventKind::BundlePublished, encode(&body))
        } else {
            let body = v1::BundleFailed {
                bundle_id: s.id.to_string(),
                name: s.name.clone(),
                error: s.error.clone().unwrap_or_default(),
                images: Some(counts(&s.counts)),
                causes: s
                    .causes
                    .iter()
                    .map(|c| v1::FailureCause {
                        cause: c.cause.clone(),
                        images: c.images,
                    })
                    .collect(),
            };
            (EventKind::BundleFailed, encode(&body))
        };
        let id = MessageId::event(kind, &s.id, s.generation);
        self.bus.publish_event(kind, &id, body).await?;
        let generation = s.generation;
        self.store
            .update_if_known(&s.id, |r| {
                (!r.announced && r.generation == generation && r.phase.is_terminal())
                    .then(|| r.announced = true)
            })
            .await?;
        tracing::info!(bundle_id = %s.id, event = kind.type_name(), "bundle finished");
        Ok(())
    }
}

/// Lets go of the blobs a bundle claimed in the content-addressed store, and deletes
/// those no other bundle needs.
pub async fn release_blobs(data: &DataDir, id: &BundleId) {
    let cas = Cas::new(data);
    let id = id.to_string();
    let _ = tokio::task::spawn_blocking(move || cas.finish(&id)).await;
}

fn target_name(s: &BundleSummary) -> String {
    s.target.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

pub fn counts(c: &Counts) -> v1::ImageCounts {
    v1::ImageCounts {
        total: c.total,
        published: c.published,
        skipped: c.skipped,
        failed: c.failed,
    }
}

/// The image as it travels in events and jobs.
pub fn image_ref(img: &ImageState) -> v1::ImageRef {
    v1::ImageRef {
        index: img.index,
        source: img.source.to_string(),
        target: img.target.to_string(),
        digest: img.digest.to_string(),
        media_type: img.media_type.clone(),
        size: img.size,
    }
}

/// The publish job of one image of `s`.
fn job(s: &BundleSummary, img: &ImageState) -> Job {
    let body = v1::PublishJob {
        bundle_id: s.id.to_string(),
        bundle_path: s.path.clone(),
        image: Some(image_ref(img)),
        target: target_name(s),
        plan_offset: img.plan.offset,
        plan_length: img.plan.len,
        generation: s.generation,
        commit: false,
    };
    Job {
        subject: PUBLISH_JOB_SUBJECT,
        msg_id: MessageId::new(&s.id, Topic::Publish(img.index), s.generation).redrive(s.redrives),
        body: encode(&body),
    }
}

/// The event form of what the signature policy said.
fn verification(s: &BundleSummary) -> Option<v1::Verification> {
    s.verification.as_ref().map(|v| v1::Verification {
        policies: v.policies.clone(),
        signed: v.signed,
        unsigned: v.unsigned,
        keys: v.keys.clone(),
    })
}
