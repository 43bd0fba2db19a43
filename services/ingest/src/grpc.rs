//! The gRPC API, `shipperd.v1.Bundles` (Get, List, Watch), served on the HTTP API's port
//! beside it: the same router, so the same authentication, TLS and connection bounds.
//! Watch follows the bundles bucket in NATS KV (no polling), and coalesces: a client
//! that reads slower than bundles change gets each bundle's latest status, so what a
//! watch holds is bounded by the number of bundles, never by their images.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt as _};
use shipperd_model::{BundleId, BundleSummary, Phase};
use shipperd_proto::v1::{
    self as pb,
    bundles_server::{Bundles, BundlesServer},
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::Error;
use shipperd_store::{Store, ops};

/// Watches open at once (each is a consumer on the NATS server); more are refused with
/// RESOURCE_EXHAUSTED.
pub const MAX_WATCHES: usize = 256;
/// Watches one identity (a token's user; everyone, when the API is open) may hold at
/// once: one token holder cannot take every slot.
pub const MAX_WATCHES_PER_CALLER: usize = 16;

/// The path prefix of the service's methods.
pub const PATH: &str = "/shipperd.v1.Bundles/";

pub struct Api {
    store: Arc<Store>,
    watches: Arc<Semaphore>,
    /// Watches open per identity.
    callers: Arc<Mutex<HashMap<String, usize>>>,
    /// The server stops: watches end (UNAVAILABLE; a client watches again elsewhere).
    shutdown: CancellationToken,
}

/// The service, ready to be routed.
pub fn service(store: Arc<Store>, shutdown: CancellationToken) -> BundlesServer<Api> {
    BundlesServer::new(Api {
        store,
        watches: Arc::new(Semaphore::new(MAX_WATCHES)),
        callers: Arc::default(),
        shutdown,
    })
}

/// One identity's open watch: counted while it lives.
struct CallerSlot {
    callers: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl CallerSlot {
    /// A slot for `who`, if it holds fewer than [`MAX_WATCHES_PER_CALLER`].
    fn take(callers: &Arc<Mutex<HashMap<String, usize>>>, who: &str) -> Option<Self> {
        let mut open = callers.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(who.to_string()).or_default();
        if *n >= MAX_WATCHES_PER_CALLER {
            return None;
        }
        *n += 1;
        Some(CallerSlot {
            callers: callers.clone(),
            who: who.to_string(),
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut open = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

fn status(e: Error) -> Status {
    match &e {
        Error::NotFound(_) => Status::not_found(e.to_string()),
        Error::BadRequest(_) => Status::invalid_argument(e.to_string()),
        Error::Forbidden(_) => Status::permission_denied(e.to_string()),
        e if e.is_transient() => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

pub fn phase(p: Phase) -> pb::BundlePhase {
    match p {
        Phase::Received => pb::BundlePhase::Received,
        Phase::Unpacking => pb::BundlePhase::Unpacking,
        Phase::Publishing => pb::BundlePhase::Publishing,
        Phase::Tagging => pb::BundlePhase::Tagging,
        Phase::Published => pb::BundlePhase::Published,
        Phase::Failed => pb::BundlePhase::Failed,
    }
}

/// A summary as the API shows it.
pub fn bundle(s: &BundleSummary) -> pb::Bundle {
    pb::Bundle {
        id: s.id.to_string(),
        name: s.name.clone(),
        size: s.size,
        phase: phase(s.phase).into(),
        error: s.error.clone().unwrap_or_default(),
        format: s.format.clone().unwrap_or_default(),
        target: s
            .target
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        images: Some(pb::ImageCounts {
            total: s.counts.total,
            published: s.counts.published,
            skipped: s.counts.skipped,
            failed: s.counts.failed,
        }),
        bytes_total: s.bytes_total,
        bytes_done: s.bytes_done,
        blobs: s.blobs,
        blob_bytes: s.blob_bytes,
        blob_sources: Some(pb::BlobSources {
            uploaded: s.blob_sources.uploaded,
            mounted: s.blob_sources.mounted,
            present: s.blob_sources.present,
            absent: s.blobs_absent,
        }),
        causes: s
            .causes
            .iter()
            .map(|c| pb::FailureCause {
                cause: c.cause.clone(),
                images: c.images,
            })
            .collect(),
        generation: s.generation,
        received_at: s.received_at.clone(),
        updated_at: s.updated_at.clone(),
        finished_at: s.finished_at.clone().unwrap_or_default(),
    }
}

fn bundle_id(s: &str) -> Result<BundleId, Status> {
    BundleId::from_checksum(s)
        .map_err(|_| Status::invalid_argument(format!("{s:?} is not a bundle id (64 hex digits)")))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Bundles for Api {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let id = bundle_id(&req.get_ref().id)?;
        match self.store.known(&id).await.map_err(status)? {
            Some(s) if !s.deleting => Ok(Response::new(pb::GetResponse {
                bundle: Some(bundle(&s)),
            })),
            _ => Err(Status::not_found(format!("no bundle with id {id}"))),
        }
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.get_ref();
        let limit = match r.limit {
            0 => ops::PAGE,
            n => n.min(ops::MAX_PAGE),
        };
        let bundles = ops::listed(&self.store).await.map_err(status)?;
        Ok(Response::new(pb::ListResponse {
            total: bundles.len() as u32,
            bundles: bundles
                .iter()
                .skip(r.offset as usize)
                .take(limit as usize)
                .map(bundle)
                .collect(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = req
            .extensions()
            .get::<shipperd_listener::auth::Caller>()
            .map_or(shipperd_model::ANONYMOUS, |c| c.0.as_str())
            .to_string();
        let slot = CallerSlot::take(&self.callers, &who).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{MAX_WATCHES_PER_CALLER} watches of {who} are open already; close one first"
            ))
        })?;
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_WATCHES} watches are open already; try again later"
            ))
        })?;
        let id = match req.get_ref().id.as_str() {
            "" => None,
            s => {
                let id = bundle_id(s)?;
                // One bundle: it must exist (its current status comes first).
                match self.store.known(&id).await.map_err(status)? {
                    Some(s) if !s.deleting => Some(id),
                    _ => return Err(Status::not_found(format!("no bundle with id {id}"))),
                }
            }
        };
        let (empty, changes) = self
            .store
            .state()
            .follow(id.as_ref())
            .await
            .map_err(|e| status(e.into()))?;
        let queue = Arc::new(Queue::default());
        if empty {
            queue.push(Key::Synced, Item::Synced);
        }
        let stop = self.shutdown.child_token();
        tokio::spawn(feed(changes, empty, queue.clone(), stop.clone()));
        let state = (queue, stop.drop_guard(), (permit, slot));
        let out = futures::stream::unfold(state, |state| async move {
            let item = state.0.next().await?;
            Some((item, state))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Reads the KV watch into `queue` (`synced`: the marker was sent) until the client goes (`stop`) or the watch ends.
async fn feed(
    changes: impl Stream<Item = shipperd_bus::Result<shipperd_state::Change>>,
    mut synced: bool,
    queue: Arc<Queue>,
    stop: CancellationToken,
) {
    let mut changes = std::pin::pin!(changes);
    loop {
        let change = tokio::select! {
            () = stop.cancelled() => {
                // The client went (nobody reads this), or the server stops.
                queue.push(Key::End, Item::End(Status::unavailable("the server is shutting down; watch again")));
                return;
            }
            c = changes.next() => c,
        };
        match change {
            Some(Ok(c)) => {
                let initial = !synced;
                let item = match c.summary {
                    Some(s) if !s.deleting => Some(Item::Status(Box::new(bundle(&s)))),
                    // A bundle deleted before the watch began is not news.
                    _ if initial => None,
                    _ => Some(Item::Deleted(c.id.to_string())),
                };
                if let Some(item) = item {
                    queue.push(Key::Bundle(c.id.to_string()), item);
                }
                if initial && c.pending == 0 {
                    synced = true;
                    queue.push(Key::Synced, Item::Synced);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "a watch of bundles broke");
                queue.push(
                    Key::End,
                    Item::End(Status::unavailable(format!("the watch broke: {e}"))),
                );
                return;
            }
            None => {
                queue.push(
                    Key::End,
                    Item::End(Status::unavailable("the watch ended; watch again")),
                );
                return;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Bundle(String),
    Synced,
    End,
}

enum Item {
    Status(Box<pb::Bundle>),
    Deleted(String),
    Synced,
    End(Status),
}

/// What a watch has to send: each bundle's latest news, in the order bundles first
/// changed since the client last read.
#[derive(Default)]
struct Queue {
    inner: Mutex<Pending>,
    ready: Notify,
}

#[derive(Default)]
struct Pending {
    order: VecDeque<Key>,
    latest: HashMap<Key, Item>,
    ended: bool,
}

impl Queue {
    fn push(&self, key: Key, item: Item) {
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if q.latest.insert(key.clone(), item).is_none() {
            q.order.push_back(key);
        }
        drop(q);
        self.ready.notify_one();
    }

    /// The next message; `None` after the end.
    async fn next(&self) -> Option<Result<pb::WatchResponse, Status>> {
        loop {
            {
                let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                if q.ended {
                    return None;
                }
                while let Some(key) = q.order.pop_front() {
                    let Some(item) = q.latest.remove(&key) else {
                        continue;
                    };
                    return Some(match item {
                        Item::Status(b) => Ok(pb::WatchResponse {
                            bundle: Some(*b),
                            ..Default::default()
                        }),
                        Item::Deleted(id) => Ok(pb::WatchResponse {
                            bundle: Some(pb::Bundle {
                                id,
                                ..Default::default()
                            }),
                            deleted: true,
                            ..Default::default()
                        }),
                        Item::Synced => Ok(pb::WatchResponse {
                            synced: true,
                            ..Default::default()
                        }),
                        Item::End(status) => {
                            q.ended = true;
                            Err(status)
                        }
                    });
                }
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(name: &str, phase: i32) -> Item {
        Item::Status(Box::new(pb::Bundle {
            id: name.into(),
            phase,
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn a_slow_reader_gets_each_bundles_latest_status_in_order() {
        let q = Queue::default();
        q.push(Key::Bundle("a".into()), status_of("a", 1));
        q.push(Key::Bundle("b".into()), status_of("b", 1));
        q.push(Key::Synced, Item::Synced);
        // a changes twice more before the reader looks: one message, the latest.
        q.push(Key::Bundle("a".into()), status_of("a", 3));
        q.push(Key::Bundle("a".into()), status_of("a", 5));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(q.next().await.unwrap().unwrap());
        }
        assert_eq!(got[0].bundle.as_ref().unwrap().id, "a");
        assert_eq!(got[0].bundle.as_ref().unwrap().phase, 5);
        assert_eq!(got[1].bundle.as_ref().unwrap().id, "b");
        assert!(got[2].synced);
        // Held: at most one entry per bundle, whatever the number of changes.
        for i in 0..10_000 {
            q.push(Key::Bundle("c".into()), status_of("c", i));
        }
        assert_eq!(q.inner.lock().unwrap().order.len(), 1);
        assert_eq!(
            q.next().await.unwrap().unwrap().bundle.unwrap().phase,
            9_999
        );
        // The end: an error, then nothing.
        q.push(Key::End, Item::End(Status::unavailable("gone")));
        assert_eq!(
            q.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(q.next().await.is_none());
    }
}
