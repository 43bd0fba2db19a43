//! Handing images to publish: one job per image on `shipperd.jobs.publish`, with a
//! de-duplication id per image and generation (and per sweep that re-drives it), so a
//! repeated dispatch within JetStream's window stores each job once. Once every image is
//! in the registry, one commit job per bundle sets the tags.

use futures::TryStreamExt;
use shipperd_bus::{Bus, Job, Result, event::encode, subjects::PUBLISH_JOB_SUBJECT};
use shipperd_model::{BundleSummary, ImageState};
use shipperd_proto::v1;

use crate::StateStore;

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
pub fn job(s: &BundleSummary, img: &ImageState) -> Job {
    let body = v1::PublishJob {
        bundle_id: s.id.to_string(),
        bundle_path: s.path.clone(),
        image: Some(image_ref(img)),
        target: s.target.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        plan_offset: img.plan.offset,
        plan_length: img.plan.len,
        generation: s.generation,
        commit: false,
    };
    Job {
        subject: PUBLISH_JOB_SUBJECT,
        msg_id: format!("{}.publish.{}{}", s.id, img.index, s.resend_suffix()),
        body: encode(&body),
    }
}

/// Sends the commit job of `s` (a bundle in `Tagging`): set every tag. De-duplicated per
/// generation and re-drive.
pub async fn commit(bus: &Bus, s: &BundleSummary) -> Result<()> {
    let body = v1::PublishJob {
        bundle_id: s.id.to_string(),
        bundle_path: s.path.clone(),
        target: s.target.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        generation: s.generation,
        commit: true,
        ..Default::default()
    };
    let job = Job {
        subject: PUBLISH_JOB_SUBJECT,
        msg_id: format!("{}.commit{}", s.id, s.resend_suffix()),
        body: encode(&body),
    };
    bus.publish_jobs(vec![job]).await?;
    Ok(())
}

/// Sends the jobs of `images` (built a thousand at a time).
pub async fn dispatch(bus: &Bus, s: &BundleSummary, images: &[ImageState]) -> Result<u64> {
    let mut sent = 0;
    for chunk in images.chunks(1024) {
        let jobs: Vec<Job> = chunk.iter().map(|img| job(s, img)).collect();
        sent += bus.publish_jobs(jobs).await?;
    }
    Ok(sent)
}

/// Reads every image of `s` and sends the jobs of those its generation has not
/// counted. Returns how many went out.
pub async fn dispatch_uncounted(bus: &Bus, store: &StateStore, s: &BundleSummary) -> Result<u64> {
    let mut sent = 0;
    let mut batch = Vec::new();
    let mut images = store.images(&s.id, 0, s.counts.total);
    while let Some(img) = images.try_next().await? {
        if !img.is_counted(s.generation) && !s.claims.contains_key(&img.index) {
            batch.push(img);
        }
        if batch.len() >= 1024 {
            sent += dispatch(bus, s, &batch).await?;
            batch.clear();
        }
    }
    sent += dispatch(bus, s, &batch).await?;
    Ok(sent)
}
