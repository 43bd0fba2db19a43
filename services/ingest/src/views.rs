//! The JSON documents of the API: a bundle's status (its summary, without the fields
//! only the pipeline needs) and its images as the bundle's current generation sees them.

use serde_json::{Value, json};
use shipperd_model::{BundleSummary, ImagePhase, ImageState, Phase};

/// Fields of a summary that are the pipeline's bookkeeping, not status.
const INTERNAL: [&str; 5] = ["claims", "announced", "order", "redrives", "deleting"];

/// A bundle's status document.
pub fn summary(s: &BundleSummary) -> Value {
    let mut v = serde_json::to_value(s).expect("a summary serialises");
    if let Some(m) = v.as_object_mut() {
        for k in INTERNAL {
            m.remove(k);
        }
        m.insert(
            "counts".into(),
            json!({
                "total": s.counts.total,
                "published": s.counts.published,
                "skipped": s.counts.skipped,
                "failed": s.counts.failed,
                "pending": s.counts.pending(),
            }),
        );
    }
    v
}

/// One image, in the phase its bundle's current generation gives it (an image that
/// failed before a retry is pending again), with an outcome the summary has counted but
/// not yet written to the image.
pub fn image(s: &BundleSummary, img: &ImageState) -> Value {
    let img = &s.view_of(img);
    let mut v = serde_json::to_value(img).expect("an image serialises");
    if let Some(m) = v.as_object_mut() {
        m.remove("plan");
        let phase = img.phase_in(s.generation);
        m.insert(
            "phase".into(),
            serde_json::to_value(phase).expect("a phase serialises"),
        );
        // Content in the registry is tagged once every image of the bundle is (the
        // bundle's commit); an image whose tag was there already needed none.
        let tagged = phase == ImagePhase::Published
            && (img.skipped
                || s.phase == Phase::Published
                || (s.phase == Phase::Tagging && img.index < s.tag_cursor));
        m.insert("tagged".into(), tagged.into());
        if !img.is_counted(s.generation) {
            // An earlier generation's failure: keep it as the last error.
            if let Some(e) = m.remove("error") {
                m.insert("last_error".into(), e);
            }
        }
    }
    v
}
