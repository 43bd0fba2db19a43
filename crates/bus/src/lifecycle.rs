//! The end of a bundle: whichever worker sees a bundle in a terminal phase that is not yet
//! announced emits `bundle.published` or `bundle.failed`, then marks it announced. The
//! event id is deterministic, so two workers racing here (or one retrying after a crash)
//! produce one stored event: JetStream drops the duplicate.

use shipperd_proto::v1;

use crate::{
    BundleRecord, Bus, EventKind, ImagePhase, Phase, Result, StateStore,
    event::{encode, event_id},
};

/// Announces `rec` if it is terminal and not yet announced.
pub async fn announce_if_done(bus: &Bus, state: &StateStore, rec: &BundleRecord) -> Result<()> {
    if !rec.phase.is_terminal() || rec.announced {
        return Ok(());
    }
    let refs = |phase: ImagePhase| -> Vec<v1::ImageRef> {
        rec.images
            .iter()
            .filter(|i| i.phase == phase)
            .map(BundleRecord::image_ref)
            .collect()
    };
    let (kind, body) = if rec.phase == Phase::Published {
        let body = v1::BundlePublished {
            bundle_id: rec.id.clone(),
            name: rec.name.clone(),
            images: refs(ImagePhase::Published),
        };
        (EventKind::BundlePublished, encode(&body))
    } else {
        let body = v1::BundleFailed {
            bundle_id: rec.id.clone(),
            name: rec.name.clone(),
            error: rec.error.clone().unwrap_or_default(),
            published: refs(ImagePhase::Published),
            failed: refs(ImagePhase::Failed),
        };
        (EventKind::BundleFailed, encode(&body))
    };
    let id = event_id(kind, &rec.id, None);
    bus.publish_event(kind, &id, &rec.id, body).await?;
    state
        .update(&rec.id, |r| (!r.announced).then(|| r.announced = true))
        .await?;
    tracing::info!(bundle_id = %rec.id, event = kind.type_name(), "bundle finished");
    Ok(())
}

/// Fails a bundle that has not finished yet (a broken bundle, found before any image was
/// published) and announces it.
pub async fn fail_bundle(bus: &Bus, state: &StateStore, id: &str, error: String) -> Result<()> {
    let updated = state
        .update(id, |r| {
            (!r.phase.is_terminal()).then(|| {
                r.phase = Phase::Failed;
                r.error = Some(error.clone());
            })
        })
        .await?;
    let rec = match updated {
        Some(((), rec)) => rec,
        None => match state.get(id).await? {
            Some((rec, _)) => rec,
            None => return Ok(()),
        },
    };
    announce_if_done(bus, state, &rec).await
}
