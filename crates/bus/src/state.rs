//! The bundle record: one JSON document per bundle in the `shipperd-bundles` KV bucket,
//! keyed by bundle id, changed only by compare-and-set so replicas never overwrite each
//! other. It is also the status document of `GET /v1/bundles/{id}`.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, event::now_rfc3339};

/// Where a bundle is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Received,
    Unpacking,
    Publishing,
    Published,
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Published | Phase::Failed)
    }
}

/// Where one image of a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImagePhase {
    Pending,
    Published,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub index: u32,
    pub source: String,
    pub target: String,
    pub digest: String,
    pub media_type: String,
    /// Size of the top manifest in bytes.
    #[serde(default)]
    pub size: u64,
    pub phase: ImagePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the image's blobs and manifests (known once publishing starts).
    #[serde(default)]
    pub bytes_total: u64,
    /// Of those, how many the registry has (uploaded, mounted or already there).
    #[serde(default)]
    pub bytes_done: u64,
    /// The tag already pointed at this digest: nothing was pushed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// sha256 of the bundle's bytes, lowercase hex.
    pub id: String,
    /// The name it was uploaded or dropped under.
    pub name: String,
    pub size: u64,
    /// Path of the stored bundle, relative to the data directory.
    pub path: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The registry target it goes to (`None`: the default target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Sums of the images' `bytes_total` and `bytes_done`.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    pub received_at: String,
    pub updated_at: String,
    /// When unpack handed the images to publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_at: Option<String>,
    /// When the last image finished (Published or Failed after publishing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub images: Vec<ImageRecord>,
    /// Set once the terminal event (bundle.published / bundle.failed) is stored on the
    /// bus, so a redelivered job does not announce the bundle again.
    #[serde(default)]
    pub announced: bool,
}

impl BundleRecord {
    pub fn new(id: String, name: String, size: u64, path: String) -> Self {
        let now = now_rfc3339();
        BundleRecord {
            id,
            name,
            size,
            path,
            phase: Phase::Received,
            error: None,
            format: None,
            target: None,
            bytes_total: 0,
            bytes_done: 0,
            received_at: now.clone(),
            updated_at: now,
            unpacked_at: None,
            finished_at: None,
            images: Vec::new(),
            announced: false,
        }
    }

    /// Records the outcome of one image. When it was the last image still pending, the
    /// bundle moves to its terminal phase; returns whether this call made that move.
    pub fn finish_image(&mut self, index: u32, error: Option<String>) -> bool {
        let was_terminal = self.phase.is_terminal();
        if let Some(img) = self.images.iter_mut().find(|i| i.index == index) {
            img.phase = if error.is_some() {
                ImagePhase::Failed
            } else {
                ImagePhase::Published
            };
            img.error = error;
        }
        if !was_terminal && self.images.iter().all(|i| i.phase != ImagePhase::Pending) {
            self.finished_at = Some(now_rfc3339());
            let failed = self
                .images
                .iter()
                .filter(|i| i.phase == ImagePhase::Failed)
                .count();
            if failed == 0 {
                self.phase = Phase::Published;
            } else {
                self.phase = Phase::Failed;
                self.error = Some(format!(
                    "{failed} of {} images failed to publish",
                    self.images.len()
                ));
            }
            return true;
        }
        false
    }

    /// The image as it travels in events and jobs.
    pub fn image_ref(img: &ImageRecord) -> shipperd_proto::v1::ImageRef {
        shipperd_proto::v1::ImageRef {
            index: img.index,
            source: img.source.clone(),
            target: img.target.clone(),
            digest: img.digest.clone(),
            media_type: img.media_type.clone(),
            size: img.size,
        }
    }

    pub fn image(&self, index: u32) -> Option<&ImageRecord> {
        self.images.iter().find(|i| i.index == index)
    }

    /// Records how far one image's push got, and the bundle's sums.
    pub fn set_progress(&mut self, index: u32, done: u64, total: u64) {
        if let Some(img) = self.images.iter_mut().find(|i| i.index == index) {
            img.bytes_total = total;
            img.bytes_done = done.min(total);
        }
        self.bytes_total = self.images.iter().map(|i| i.bytes_total).sum();
        self.bytes_done = self.images.iter().map(|i| i.bytes_done).sum();
    }
}

/// Typed access to the bundles bucket.
#[derive(Clone)]
pub struct StateStore {
    kv: kv::Store,
}

/// How many compare-and-set races an update may lose before giving up.
const MAX_CAS_ATTEMPTS: usize = 64;

impl StateStore {
    pub fn new(kv: kv::Store) -> Self {
        StateStore { kv }
    }

    fn decode(bytes: &[u8]) -> Result<BundleRecord> {
        serde_json::from_slice(bytes).map_err(|e| Error::Decode {
            what: "bundle record",
            reason: e.to_string(),
        })
    }

    fn encode(rec: &BundleRecord) -> bytes::Bytes {
        serde_json::to_vec(rec)
            .expect("a bundle record always serializes")
            .into()
    }

    /// The record and its revision, if the bundle is known.
    pub async fn get(&self, id: &str) -> Result<Option<(BundleRecord, u64)>> {
        match self.kv.entry(id).await.map_err(Error::nats)? {
            Some(e) if e.operation == Operation::Put => {
                Ok(Some((Self::decode(&e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Stores a new record; `false` if a record with that id exists already.
    pub async fn create(&self, rec: &BundleRecord) -> Result<bool> {
        match self.kv.create(&rec.id, Self::encode(rec)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::nats(e)),
        }
    }

    /// Every record, in no particular order.
    pub async fn list(&self) -> Result<Vec<BundleRecord>> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(Error::nats)?
            .try_collect()
            .await
            .map_err(Error::nats)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some((rec, _)) = self.get(&k).await? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Reads, changes and writes back a record with compare-and-set, retrying when another
    /// writer got there first. `change` returns `None` to leave the record as it is.
    /// Returns what `change` returned and the record as stored.
    pub async fn update<T>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut BundleRecord) -> Option<T>,
    ) -> Result<Option<(T, BundleRecord)>> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let (mut rec, revision) = self
                .get(id)
                .await?
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            let Some(out) = change(&mut rec) else {
                return Ok(None);
            };
            rec.updated_at = now_rfc3339();
            match self.kv.update(id, Self::encode(&rec), revision).await {
                Ok(_) => return Ok(Some((out, rec))),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    // Lost a race: back off a little (more each time) and re-read.
                    let ms = 1 + (attempt as u64).min(20) * 5;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(Error::nats(e)),
            }
        }
        Err(Error::Conflict(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u32) -> BundleRecord {
        let mut r = BundleRecord::new("id".into(), "b".into(), 1, "p".into());
        r.phase = Phase::Publishing;
        r.images = (0..n)
            .map(|index| ImageRecord {
                index,
                source: format!("s{index}"),
                target: format!("t{index}"),
                digest: "sha256:00".into(),
                media_type: "m".into(),
                size: 1,
                phase: ImagePhase::Pending,
                error: None,
                bytes_total: 0,
                bytes_done: 0,
                skipped: false,
            })
            .collect();
        r
    }

    #[test]
    fn progress_sums_over_images() {
        let mut r = rec(2);
        r.set_progress(0, 5, 10);
        r.set_progress(1, 30, 20);
        assert_eq!((r.bytes_done, r.bytes_total), (25, 30));
        assert_eq!(r.images[1].bytes_done, 20);
    }

    #[test]
    fn last_image_finishes_bundle_once() {
        let mut r = rec(2);
        assert!(!r.finish_image(0, None));
        assert_eq!(r.phase, Phase::Publishing);
        assert!(r.finish_image(1, None));
        assert_eq!(r.phase, Phase::Published);
        // A redelivered job finishing the same image again does not finish the bundle again.
        assert!(!r.finish_image(1, None));
    }

    #[test]
    fn a_failed_image_fails_the_bundle() {
        let mut r = rec(2);
        assert!(!r.finish_image(1, Some("boom".into())));
        assert!(r.finish_image(0, None));
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.image(1).unwrap().phase, ImagePhase::Failed);
        assert!(r.error.as_deref().unwrap().contains("1 of 2"));
    }
}
