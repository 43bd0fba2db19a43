//! How far an image's push has got: bytes the registry has of it, out of its total.
//! Uploads add bytes as they stream (and take them back when a request fails);
//! skipped and mounted blobs count whole. A reporter writes the figures into the
//! image's own state (never the bundle's summary: a progress tick costs the same
//! whatever the bundle's size) and sends `io.shipperd.image.progress`, at most once per
//! interval, and only for pushes that last longer than one interval.

use std::time::Duration;

use shipperd_bus::{Bus, EventKind, MessageId, Topic, event::encode};
use shipperd_model::{BundleSummary, ImageState};
use shipperd_proto::v1;
use shipperd_state::{StateStore, effects::image_ref};

pub use shipperd_registry::Progress;

/// Reports `progress` of one image every `every` until stopped.
pub(crate) struct Reporter {
    task: Option<tokio::task::JoinHandle<Option<u64>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Reporter {
    /// `revision` is the image key's revision as the job read it; the reporter writes
    /// only over its own writes, so a concurrent delivery's outcome is never undone.
    pub(crate) fn start(
        bus: Bus,
        state: StateStore,
        summary: BundleSummary,
        mut image: ImageState,
        revision: u64,
        progress: Progress,
        every: Duration,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut revision = Some(revision);
            let mut last = None;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return revision,
                    _ = tick.tick() => {}
                }
                let now = progress.get();
                if last == Some(now) {
                    continue;
                }
                last = Some(now);
                (image.bytes_done, image.bytes_total) = now;
                if let Some(rev) = revision {
                    revision = match state.update_image(&summary.id, &image, rev).await {
                        Ok(r) => r,
                        Err(error) => {
                            tracing::debug!(%error, "cannot record progress");
                            Some(rev)
                        }
                    };
                }
                if let Err(error) = report(&bus, &state, &summary, &image).await {
                    tracing::debug!(%error, "cannot report progress");
                }
            }
        });
        Reporter {
            task: Some(task),
            stop,
        }
    }

    /// Stops reporting; the image key's revision as this job last wrote it (`None`
    /// when another writer changed it meanwhile).
    pub(crate) async fn stop(mut self) -> Option<u64> {
        self.stop.cancel();
        let task = self.task.take()?;
        task.await.ok().flatten()
    }
}

async fn report(
    bus: &Bus,
    state: &StateStore,
    summary: &BundleSummary,
    image: &ImageState,
) -> shipperd_bus::Result<()> {
    // The bundle's figures as of now (one small read).
    let s = state
        .summary(&summary.id)
        .await?
        .unwrap_or_else(|| summary.clone());
    let body = v1::ImageProgress {
        bundle_id: s.id.to_string(),
        image: Some(image_ref(image)),
        bytes_done: image.bytes_done,
        bytes_total: image.bytes_total,
        bundle_bytes_done: s.bytes_done,
        bundle_bytes_total: s.bytes_total,
        images_done: s.counts.done(),
        images_total: s.counts.total,
    };
    let id = MessageId::new(
        &s.id,
        Topic::Progress {
            index: image.index,
            bytes: image.bytes_done,
        },
        s.generation,
    );
    bus.publish_event(EventKind::ImageProgress, &id, encode(&body))
        .await
        .map(|_| ())
}
