//! Typed access to the two state buckets: `shipperd-bundles` (one [`BundleSummary`] per
//! bundle, key `<id>`) and `shipperd-images` (one [`ImageState`] per image, key
//! `<id>.<index>`). Summaries change only by compare-and-set, so replicas never
//! overwrite each other; an image is written by the one job that holds it.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use serde::{Serialize, de::DeserializeOwned};
use shipperd_bus::{
    Bus, Error, Result,
    subjects::{BUNDLES_BUCKET, IMAGES_BUCKET},
};
use shipperd_model::{BundleId, BundleSummary, ImagePhase, ImageState, now_rfc3339};

/// Reads or writes of image keys in flight at once.
const IMAGE_IO: usize = 64;
/// How many compare-and-set races an update may lose before giving up.
pub(crate) const MAX_CAS_ATTEMPTS: usize = 64;
/// Image keys one page request may read (a filtered page stops there and says where
/// to go on).
const MAX_SCAN: u32 = 10_000;

#[derive(Clone)]
pub struct StateStore {
    bundles: kv::Store,
    images: kv::Store,
}

/// One page of a bundle's images.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub images: Vec<ImageState>,
    /// The index to ask for next (`offset=`), if any image is left to look at.
    pub next: Option<u32>,
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(Error::decode(what))
}

fn encode(v: &impl Serialize) -> bytes::Bytes {
    serde_json::to_vec(v)
        .expect("state records always serialize")
        .into()
}

/// One bundle summary as [`StateStore::follow`] sees it.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: BundleId,
    /// `None`: the bundle was deleted.
    pub summary: Option<BundleSummary>,
    /// Values still to come of what existed when the watch began (0 from then on).
    pub pending: u64,
}

/// The key of image `index` of bundle `id`.
pub fn image_key(id: &BundleId, index: u32) -> String {
    format!("{id}.{index}")
}

impl StateStore {
    pub async fn open(bus: &Bus) -> Result<Self> {
        Ok(StateStore {
            bundles: bus.bucket(BUNDLES_BUCKET).await?,
            images: bus.bucket(IMAGES_BUCKET).await?,
        })
    }

    /// The summary and its revision, if the bundle is known.
    pub async fn get(&self, id: &BundleId) -> Result<Option<(BundleSummary, u64)>> {
        match self
            .bundles
            .entry(id.as_str())
            .await
            .map_err(Error::nats("reading a bundle summary"))?
        {
            Some(e) if e.operation == Operation::Put => {
                Ok(Some((decode("bundle summary", &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn summary(&self, id: &BundleId) -> Result<Option<BundleSummary>> {
        Ok(self.get(id).await?.map(|(s, _)| s))
    }

    /// Stores a new summary; `false` if one with that id exists already.
    pub async fn create(&self, s: &BundleSummary) -> Result<bool> {
        match self.bundles.create(s.id.as_str(), encode(s)).await {
            Ok(_) => Ok(true),
            Err(e) if shipperd_bus::lost_race(&e) => Ok(false),
            Err(e) => Err(Error::nats("creating a bundle summary")(e)),
        }
    }

    /// Reads, changes and writes back a summary with compare-and-set, retrying when
    /// another writer got there first. `change` returns `None` to leave it as it is.
    /// Returns what `change` returned and the summary as stored.
    pub async fn update<T>(
        &self,
        id: &BundleId,
        mut change: impl FnMut(&mut BundleSummary) -> Option<T>,
    ) -> Result<Option<(T, BundleSummary)>> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let (mut s, revision) = self
                .get(id)
                .await?
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            let Some(out) = change(&mut s) else {
                return Ok(None);
            };
            match self.write(&mut s, revision).await? {
                true => return Ok(Some((out, s))),
                false => backoff(attempt).await,
            }
        }
        Err(Error::Conflict(id.to_string()))
    }

    /// [`StateStore::update`] of a bundle that may be gone (deleted meanwhile): `None`
    /// then, as when `change` declines.
    pub async fn update_if_known<T>(
        &self,
        id: &BundleId,
        change: impl FnMut(&mut BundleSummary) -> Option<T>,
    ) -> Result<Option<(T, BundleSummary)>> {
        match self.update(id, change).await {
            Err(Error::NotFound(_)) => Ok(None),
            other => other,
        }
    }

    /// Writes `s` if the stored summary is still at `revision`; `false` if it is not.
    pub async fn write(&self, s: &mut BundleSummary, revision: u64) -> Result<bool> {
        s.updated_at = now_rfc3339();
        match self
            .bundles
            .update(s.id.as_str(), encode(s), revision)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if shipperd_bus::lost_race(&e) => Ok(false),
            Err(e) => Err(Error::nats("writing a bundle summary")(e)),
        }
    }

    /// Every bundle id.
    pub async fn ids(&self) -> Result<Vec<BundleId>> {
        let keys: Vec<String> = self
            .bundles
            .keys()
            .await
            .map_err(Error::nats("listing bundles"))?
            .try_collect()
            .await
            .map_err(Error::nats("listing bundles"))?;
        Ok(keys
            .iter()
            .filter_map(|k| BundleId::parse(k).ok())
            .collect())
    }

    /// The ids of bundles whose summary changes from now on (a stream that ends when
    /// the watch does).
    pub async fn changes(&self) -> Result<impl futures::Stream<Item = BundleId> + use<>> {
        let watch = self
            .bundles
            .watch_all()
            .await
            .map_err(Error::nats("watching bundles"))?;
        Ok(watch.filter_map(|e| async move { e.ok().and_then(|e| BundleId::parse(&e.key).ok()) }))
    }

    /// The summaries as they are (each bundle's latest; `pending` counts down to 0 on
    /// the last of them), then every change as it happens: of bundle `id`, or of every
    /// bundle. Also says whether there was nothing to send first (no bundle at all; for
    /// one bundle, the caller reads it first).
    pub async fn follow(
        &self,
        id: Option<&BundleId>,
    ) -> Result<(bool, impl futures::Stream<Item = Result<Change>> + use<>)> {
        let empty = match id {
            Some(_) => false,
            None => {
                // Asked of the server (the store's own status is what it was at open).
                let mut stream = self.bundles.stream.clone();
                stream
                    .info()
                    .await
                    .map_err(Error::nats("reading the bundles bucket's status"))?
                    .state
                    .messages
                    == 0
            }
        };
        let watch = self
            .bundles
            .watch_with_history(id.map_or(">", BundleId::as_str))
            .await
            .map_err(Error::nats("watching bundles"))?;
        let changes = watch.filter_map(|e| async move {
            let e = match e {
                Ok(e) => e,
                Err(e) => return Some(Err(Error::nats("watching bundles")(e))),
            };
            let id = BundleId::parse(&e.key).ok()?;
            let summary = match e.operation {
                Operation::Put => match decode::<BundleSummary>("bundle summary", &e.value) {
                    Ok(s) => Some(s),
                    Err(error) => {
                        tracing::warn!(%error, bundle_id = %id, "a bundle summary that does not decode is left out");
                        return None;
                    }
                },
                Operation::Delete | Operation::Purge => None,
            };
            Some(Ok(Change {
                id,
                summary,
                pending: e.delta,
            }))
        });
        Ok((empty, changes))
    }

    /// Every summary, in no particular order.
    pub async fn list(&self) -> Result<Vec<BundleSummary>> {
        let ids = self.ids().await?;
        let store = self.clone();
        let found: Vec<Option<BundleSummary>> = futures::stream::iter(ids)
            .map(move |id| {
                let store = store.clone();
                async move { store.summary(&id).await }
            })
            .buffer_unordered(IMAGE_IO)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Image `index` of bundle `id`, with its revision.
    pub async fn image(&self, id: &BundleId, index: u32) -> Result<Option<(ImageState, u64)>> {
        match self
            .images
            .entry(image_key(id, index))
            .await
            .map_err(Error::nats("reading an image state"))?
        {
            Some(e) if e.operation == Operation::Put => {
                Ok(Some((decode("image state", &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn put_image(&self, id: &BundleId, img: &ImageState) -> Result<()> {
        self.images
            .put(image_key(id, img.index), encode(img))
            .await
            .map_err(Error::nats("writing an image state"))?;
        Ok(())
    }

    /// Writes `img` if its key is still at `revision`; its new revision, or `None` when
    /// another write came first (which then stands).
    pub async fn update_image(
        &self,
        id: &BundleId,
        img: &ImageState,
        revision: u64,
    ) -> Result<Option<u64>> {
        match self
            .images
            .update(image_key(id, img.index), encode(img), revision)
            .await
        {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if shipperd_bus::lost_race(&e) => Ok(None),
            Err(e) => Err(Error::nats("writing an image state")(e)),
        }
    }

    /// Writes the pending images of a bundle being unpacked, [`IMAGE_IO`] at a time,
    /// never over an image that has an outcome: a second unpack of the same bundle (a
    /// re-announced one) may finish after publishing began.
    pub async fn put_pending_images(&self, id: &BundleId, images: &[ImageState]) -> Result<()> {
        for chunk in images.chunks(IMAGE_IO) {
            futures::future::try_join_all(chunk.iter().map(|img| self.put_pending(id, img)))
                .await?;
        }
        Ok(())
    }

    async fn put_pending(&self, id: &BundleId, img: &ImageState) -> Result<()> {
        let key = image_key(id, img.index);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            // The usual case: a new key.
            match self.images.create(&key, encode(img)).await {
                Ok(_) => return Ok(()),
                Err(e) if shipperd_bus::lost_race(&e) => {}
                Err(e) => return Err(Error::nats("writing an image state")(e)),
            }
            let Some((old, revision)) = self.image(id, img.index).await? else {
                continue;
            };
            if old.phase != ImagePhase::Pending && old.generation >= img.generation {
                return Ok(());
            }
            if self.update_image(id, img, revision).await?.is_some() {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(Error::Conflict(key))
    }

    /// Images `from..to` of bundle `id` in index order (missing ones left out), read
    /// [`IMAGE_IO`] at a time.
    pub fn images(
        &self,
        id: &BundleId,
        from: u32,
        to: u32,
    ) -> BoxStream<'static, Result<ImageState>> {
        let (store, id) = (self.clone(), id.clone());
        futures::stream::iter(from..to)
            .map(move |i| {
                let (store, id) = (store.clone(), id.clone());
                async move { store.image(&id, i).await }
            })
            .buffered(IMAGE_IO)
            .try_filter_map(|found| async move { Ok(found.map(|(img, _)| img)) })
            .boxed()
    }

    /// Up to `limit` images of bundle `s` from index `offset` on, only those in
    /// `phase` (as the bundle's current generation sees them) when given.
    pub async fn page(
        &self,
        s: &BundleSummary,
        phase: Option<ImagePhase>,
        offset: u32,
        limit: u32,
    ) -> Result<Page> {
        let total = s.counts.total;
        if limit == 0 {
            return Ok(Page {
                images: Vec::new(),
                next: (offset < total).then_some(offset),
            });
        }
        let limit = limit as usize;
        let mut page = Page::default();
        let mut at = offset.min(total);
        while at < total && page.images.len() < limit && at - offset < MAX_SCAN {
            // Unfiltered, a page reads exactly what it returns; filtered, it reads ahead
            // in batches and stops after MAX_SCAN keys.
            let want = (limit - page.images.len()) as u32;
            let batch = if phase.is_none() {
                want
            } else {
                want.max(IMAGE_IO as u32)
            };
            let end = at.saturating_add(batch).min(total);
            let images: Vec<ImageState> = self.images(&s.id, at, end).try_collect().await?;
            for img in images {
                if page.images.len() == limit {
                    break;
                }
                at = img.index + 1;
                if phase.is_none_or(|p| s.phase_of(&img) == p) {
                    page.images.push(img);
                }
            }
            if page.images.len() < limit {
                at = end;
            }
        }
        page.next = (at < total).then_some(at);
        Ok(page)
    }

    /// Removes the bundle's state: every image key (one purge of the stream's subjects),
    /// then the summary.
    pub async fn remove(&self, id: &BundleId) -> Result<()> {
        let filter = format!("{}{id}.>", self.images.prefix);
        self.images
            .stream
            .purge()
            .filter(filter)
            .await
            .map_err(Error::nats("removing image states"))?;
        self.bundles
            .purge(id.as_str())
            .await
            .map_err(Error::nats("removing a bundle summary"))?;
        Ok(())
    }
}

/// The short wait after losing a compare-and-set race, before reading again: 1 ms
/// doubling to 50 ms, jittered (so racing writers spread out).
const CAS: shipperd_model::Backoff =
    shipperd_model::Backoff::new(Duration::from_millis(1), Duration::from_millis(50));

/// After losing compare-and-set race `attempt` (0 = the first): wait, then re-read.
pub(crate) async fn backoff(attempt: usize) {
    CAS.retry(attempt as u32 + 1).wait().await;
}
