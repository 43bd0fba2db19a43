//! Upload leases: one publish replica uploads a blob to a registry, the others wait.
//!
//! Within a process the per-digest lock already makes a shared layer go up once. Across
//! replicas, the uploader first creates the key `lease.<registry>.<hex>` in the
//! `shipperd-blobs` bucket (a create fails when the key exists) and renews it while the
//! bytes move. Another replica needing the same blob finds the key and waits; when the
//! lease is gone the blob is in the registry, and the waiter mounts it (or finds it
//! already there). A lease whose revision has not changed for `lease_timeout` (its
//! holder died mid-upload) is taken over. Staleness is judged on the waiter's own clock
//! by watching the revision, so clocks need not agree. When the bucket cannot be used
//! the blob is uploaded without a lease: bytes may be sent twice, nothing is lost.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;

use super::Registry;

/// How often a waiter looks at the lease.
const POLL: Duration = Duration::from_millis(200);
/// The longest a waiter waits for one lease, however alive its holder looks.
const WAIT_MAX: Duration = Duration::from_secs(3600);

pub(crate) enum Lease {
    /// Ours: upload, then [`Held::release`].
    Held(Box<Held>),
    /// Another replica held it and let go: its upload ended; look again.
    Released,
    /// No lease to be had (bucket trouble, or waited too long): upload anyway.
    Unavailable,
}

pub(crate) struct Held {
    key: String,
    kv: kv::Store,
    renew: tokio::task::JoinHandle<()>,
    revision: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Dropped without `release` (the job was cancelled): no more renewals, so the lease
/// goes stale and another replica takes it over.
impl Drop for Held {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

impl Held {
    /// Lets waiters go (after the blob's location was recorded, so they can mount it).
    pub(crate) async fn release(self) {
        self.renew.abort();
        let rev = self.revision.load(std::sync::atomic::Ordering::Relaxed);
        // Only our own revision: a replica that took the lease over keeps it.
        if let Err(error) = self.kv.delete_expect_revision(&self.key, Some(rev)).await {
            tracing::debug!(%error, key = %self.key, "lease not released (taken over?)");
        }
    }
}

impl Registry {
    /// Takes the lease on uploading `digest` to this registry, waiting while another
    /// replica holds it.
    pub(crate) async fn lease(&self, digest: &shipperd_model::Digest) -> Lease {
        let Some(blobs) = &self.blobs else {
            // Nobody to share with.
            return Lease::Unavailable;
        };
        let key = super::lease_key(&self.target.url.host, digest);
        let stale = self.target.transfer.lease_timeout;
        let started = Instant::now();
        // The holder's revision and when we first saw it.
        let mut seen: Option<(u64, Instant)> = None;
        let mut refused = 0;
        while started.elapsed() < WAIT_MAX {
            let entry = match blobs.entry(&key).await {
                Ok(e) => e.filter(|e| e.operation == Operation::Put),
                Err(error) => {
                    tracing::debug!(%error, "lease bucket unavailable; uploading without one");
                    return Lease::Unavailable;
                }
            };
            let Some(entry) = entry else {
                if seen.is_some() {
                    // The holder let go: its upload ended, for better or worse.
                    return Lease::Released;
                }
                match blobs.create(&key, self.holder_value()).await {
                    Ok(rev) => {
                        tracing::debug!(key, rev, "upload lease taken");
                        return Lease::Held(self.hold(blobs, key, rev));
                    }
                    // Another replica was quicker (then we wait on it), or the bucket
                    // refuses writes (then, after a few tries, we go without).
                    Err(error) if shipperd_bus::lost_race(&error) => {
                        tracing::debug!(key, "upload lease taken by another replica first");
                    }
                    Err(error) => {
                        tracing::debug!(key, %error, "upload lease not created");
                        refused += 1;
                        if refused >= 3 {
                            return Lease::Unavailable;
                        }
                    }
                }
                shipperd_model::pause(POLL).await;
                continue;
            };
            let now = Instant::now();
            match seen {
                Some((rev, since)) if rev == entry.revision => {
                    if now.duration_since(since) >= stale {
                        tracing::info!(key, holder = %String::from_utf8_lossy(&entry.value),
                            "upload lease not renewed; taking it over");
                        match blobs
                            .update(&key, self.holder_value(), entry.revision)
                            .await
                        {
                            Ok(rev) => return Lease::Held(self.hold(blobs, key, rev)),
                            // Somebody else was quicker: wait on them.
                            Err(_) => seen = None,
                        }
                    }
                }
                _ => seen = Some((entry.revision, now)),
            }
            shipperd_model::pause(POLL).await;
        }
        Lease::Unavailable
    }

    fn holder_value(&self) -> Bytes {
        Bytes::from(self.holder.clone())
    }

    /// Renews the lease every quarter of `lease_timeout` until released.
    fn hold(&self, blobs: &kv::Store, key: String, rev: u64) -> Box<Held> {
        let revision = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rev));
        let every = self.target.transfer.lease_timeout / 4;
        let (kv, k, value, r) = (
            blobs.clone(),
            key.clone(),
            self.holder_value(),
            revision.clone(),
        );
        // Ends when aborted by `release`, or when the lease is no longer ours.
        let renew = tokio::spawn(async move {
            loop {
                shipperd_model::pause(every).await;
                let last = r.load(std::sync::atomic::Ordering::Relaxed);
                match kv.update(&k, value.clone(), last).await {
                    Ok(rev) => r.store(rev, std::sync::atomic::Ordering::Relaxed),
                    Err(error) => {
                        tracing::warn!(%error, key = %k, "upload lease lost; another replica may upload this blob too");
                        return;
                    }
                }
            }
        });
        Box::new(Held {
            key,
            kv: blobs.clone(),
            renew,
            revision,
        })
    }
}
