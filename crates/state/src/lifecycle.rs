//! The end of a bundle: whichever worker sees a bundle in a terminal phase that is not yet
//! announced emits `bundle.published` or `bundle.failed`, then marks it announced. The
//! event id is deterministic (per generation), so two workers racing here (or one
//! retrying after a crash) produce one stored event: JetStream drops the duplicate.

use shipperd_bus::{
    Bus, EventKind, Result,
    event::{encode, event_id},
};
use shipperd_model::{BundleId, BundleSummary, Counts, Phase};
use shipperd_proto::v1;

use crate::StateStore;

pub fn counts(c: &Counts) -> v1::ImageCounts {
    v1::ImageCounts {
        total: c.total,
        published: c.published,
        skipped: c.skipped,
        failed: c.failed,
    }
}

/// The id of a bundle-level event of `s`'s current generation.
pub fn bundle_event_id(kind: EventKind, s: &BundleSummary) -> String {
    format!("{}{}", event_id(kind, &s.id, None), s.generation_suffix())
}

/// Announces `s` if it is terminal and not yet announced.
pub async fn announce_if_done(bus: &Bus, store: &StateStore, s: &BundleSummary) -> Result<()> {
    if !s.phase.is_terminal() || s.announced {
        return Ok(());
    }
    let (kind, body) = if s.phase == Phase::Published {
        let body = v1::BundlePublished {
            bundle_id: s.id.to_string(),
            name: s.name.clone(),
            images: Some(counts(&s.counts)),
            target_name: s.target.as_ref().map(|t| t.to_string()).unwrap_or_default(),
            blobs: Some(v1::BlobSources {
                uploaded: s.blob_sources.uploaded,
                mounted: s.blob_sources.mounted,
                present: s.blob_sources.present,
                absent: s.blobs_absent,
            }),
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
    bus.publish_event(kind, &bundle_event_id(kind, s), &s.id, body)
        .await?;
    let generation = s.generation;
    store
        .update(&s.id, |r| {
            (!r.announced && r.generation == generation && r.phase.is_terminal())
                .then(|| r.announced = true)
        })
        .await?;
    tracing::info!(bundle_id = %s.id, event = kind.type_name(), "bundle finished");
    Ok(())
}

/// Fails a bundle that has not ended (a broken bundle, found before any image was
/// published) and announces it. Returns the summary as stored.
pub async fn fail_bundle(
    bus: &Bus,
    store: &StateStore,
    id: &BundleId,
    error: String,
) -> Result<Option<BundleSummary>> {
    let updated = store
        .update(id, |s| s.fail(error.clone()).then_some(()))
        .await?;
    let s = match updated {
        Some(((), s)) => s,
        None => match store.summary(id).await? {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    announce_if_done(bus, store, &s).await?;
    Ok(Some(s))
}
