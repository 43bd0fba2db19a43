//! Who holds a tag: a tag moves only to the image of a bundle received later than the
//! one that set it, so a late redelivery of an old bundle's job never moves a tag back
//! to an older digest.
//!
//! The `shipperd-blobs` bucket keeps, per registry and tag, the order (see
//! `BundleSummary::order`), bundle and digest of the last image tagged there; the key
//! is claimed by compare-and-set before the tag is pushed. When the bucket cannot be
//! used the tag is pushed anyway (publishing does not stop on a bookkeeping failure).
//! Two bundles tagging the same tag at the very same moment may still race at the
//! registry; the guard is for the late redelivery, which comes long after.

use async_nats::jetstream::kv::{self, Operation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shipperd_model::{BundleId, BundleSummary, Digest};

use crate::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    order: u64,
    bundle: BundleId,
    digest: Digest,
}

pub(crate) struct Tags {
    kv: kv::Store,
}

const MAX_ROUNDS: usize = 16;

/// A tag's holder as last read: `None` when nothing holds it, `Err` when the holders
/// cannot be read.
type Read = Result<Option<kv::Entry>, ()>;

/// One tag of one registry, and its holder as read when its image began.
pub(crate) struct Tag {
    key: String,
    read: Read,
}

impl Tag {
    /// Did a bundle point this tag at `digest` before (so the registry may have it
    /// already, worth one request to find out)? `false` when nothing says so, or the
    /// holders cannot be read.
    pub(crate) fn set_before(&self, digest: &Digest) -> bool {
        match &self.read {
            Ok(Some(e)) => {
                serde_json::from_slice::<Holder>(&e.value).is_ok_and(|h| h.digest == *digest)
            }
            _ => false,
        }
    }
}

impl Tags {
    pub(crate) fn new(kv: kv::Store) -> Self {
        Tags { kv }
    }

    async fn entry(&self, key: &str) -> Read {
        match self.kv.entry(key).await {
            Ok(e) => Ok(e.filter(|e| e.operation == Operation::Put)),
            Err(error) => {
                tracing::debug!(%error, "tag holders unavailable");
                Err(())
            }
        }
    }

    /// `repo:tag` at `reg`, with its holder.
    pub(crate) async fn read(&self, reg: &Registry, repo: &str, tag: &str) -> Tag {
        let key = tag_key(reg.host(), repo, tag);
        let read = self.entry(&key).await;
        Tag { key, read }
    }

    /// May bundle `s` point `tag` at `digest`? Claims the tag when so (starting from the
    /// holder `tag` was read with; reading again only when another writer came first).
    pub(crate) async fn may_move(&self, tag: Tag, s: &BundleSummary, digest: &Digest) -> bool {
        let Some(order) = s.order else {
            return true;
        };
        let Tag { key, mut read } = tag;
        let mine = Holder {
            order,
            bundle: s.id.clone(),
            digest: digest.clone(),
        };
        let value: bytes::Bytes = serde_json::to_vec(&mine)
            .expect("a holder serialises")
            .into();
        for _ in 0..MAX_ROUNDS {
            let Ok(entry) = read else {
                // Publishing does not stop on a bookkeeping failure.
                return true;
            };
            let written = match entry {
                None => match self.kv.create(&key, value.clone()).await {
                    Ok(_) => return true,
                    Err(e) if shipperd_bus::lost_race(&e) => {
                        read = self.entry(&key).await;
                        continue;
                    }
                    Err(_) => return true,
                },
                Some(e) => {
                    let holder: Option<Holder> = serde_json::from_slice(&e.value).ok();
                    match holder {
                        Some(h) if h == mine => return true,
                        Some(h) if h.order > order && h.digest != *digest => {
                            tracing::info!(
                                holder = %h.bundle,
                                "the tag belongs to a bundle received later; not moving it"
                            );
                            return false;
                        }
                        _ => self.kv.update(&key, value.clone(), e.revision).await,
                    }
                }
            };
            match written {
                Ok(_) => return true,
                Err(e) if shipperd_bus::lost_race(&e) => {
                    read = self.entry(&key).await;
                }
                Err(_) => return true,
            }
        }
        true
    }
}

/// The bucket key of `repo:tag` at registry `host`.
fn tag_key(host: &str, repo: &str, tag: &str) -> String {
    let h = Sha256::digest(format!("{host}/{repo}:{tag}").as_bytes());
    format!("tag.{}", hex::encode(&h[..16]))
}
