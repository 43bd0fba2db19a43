//! How far an image's push has got: bytes the registry has of it, out of its total.
//! Uploads add bytes as they stream (and take them back when a request fails);
//! skipped and mounted blobs count whole. A reporter writes the figures into the
//! bundle's record and sends `io.shipperd.image.progress`, at most once per interval,
//! and only for pushes that last longer than one interval.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

use shipperd_bus::{
    BundleRecord, Bus, EventKind, ImagePhase, StateStore,
    event::{encode, event_id},
};
use shipperd_proto::v1;

#[derive(Debug, Clone, Default)]
pub struct Progress {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl Progress {
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        let _ = self
            .done
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(n))
            });
    }

    /// `(done, total)`.
    pub fn get(&self) -> (u64, u64) {
        let total = self.total.load(Ordering::Relaxed);
        (self.done.load(Ordering::Relaxed).min(total), total)
    }
}

/// Reports `progress` of image `index` every `every` until dropped.
pub(crate) struct Reporter {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reporter {
    pub(crate) fn start(
        bus: Bus,
        state: StateStore,
        bundle_id: String,
        image: v1::ImageRef,
        progress: Progress,
        every: Duration,
    ) -> Self {
        let task = tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = progress.get();
                if last == Some(now) {
                    continue;
                }
                last = Some(now);
                if let Err(error) = report(&bus, &state, &bundle_id, &image, now).await {
                    tracing::debug!(%error, "cannot report progress");
                }
            }
        });
        Reporter { task }
    }
}

async fn report(
    bus: &Bus,
    state: &StateStore,
    bundle_id: &str,
    image: &v1::ImageRef,
    (done, total): (u64, u64),
) -> shipperd_bus::Result<()> {
    let index = image.index;
    let updated = state
        .update(bundle_id, |r| {
            (r.image(index)?.phase == ImagePhase::Pending)
                .then(|| r.set_progress(index, done, total))
        })
        .await?;
    let Some(((), rec)) = updated else {
        return Ok(());
    };
    let body = progress_event(&rec, image, done, total);
    let id = format!(
        "{}.{done}",
        event_id(EventKind::ImageProgress, bundle_id, Some(index))
    );
    bus.publish_event(EventKind::ImageProgress, &id, bundle_id, encode(&body))
        .await
}

fn progress_event(
    rec: &BundleRecord,
    image: &v1::ImageRef,
    done: u64,
    total: u64,
) -> v1::ImageProgress {
    v1::ImageProgress {
        bundle_id: rec.id.clone(),
        image: Some(image.clone()),
        bytes_done: done,
        bytes_total: total,
        bundle_bytes_done: rec.bytes_done,
        bundle_bytes_total: rec.bytes_total,
        images_done: rec
            .images
            .iter()
            .filter(|i| i.phase != ImagePhase::Pending)
            .count() as u32,
        images_total: rec.images.len() as u32,
    }
}
