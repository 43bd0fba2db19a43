//! The janitor: a periodic sweep that makes sure every bundle ends and nothing is kept
//! forever. Every step is idempotent, so any number of ingest replicas may sweep at once.
//!
//! - a bundle stored but never recorded (a crash between the two) is recorded from its
//!   `meta.json` and announced; a bundle directory with neither record nor metadata is
//!   removed after a grace period;
//! - a bundle stuck in `Received` or `Unpacking` is announced again, one stuck in
//!   `Publishing` gets the jobs of its unfinished images again, once the stage's
//!   consumer has nothing queued or in hand (or the bundle has been stuck four times as
//!   long); claims a crash left are finished; an ended bundle not yet announced is;
//! - a bundle whose `DELETE` was cut short is deleted;
//! - finished bundles' stored files expire after `keep_finished`, unfinished multi-part
//!   uploads after `keep_uploads`.

use std::{sync::Arc, time::Duration};

/// How long a bundle put in place is left to the upload that placed it to record,
/// before a sweep records it (at most `stale_after`).
const RECORD_GRACE: Duration = Duration::from_secs(60);

use shipperd_bus::subjects::{EVENTS_STREAM, JOBS_STREAM, PUBLISH_CONSUMER, UNPACK_CONSUMER};
use shipperd_model::{BundleId, BundleSummary, Phase, age};
use shipperd_state::{dispatch, finish, lifecycle};
use tokio_util::sync::CancellationToken;

use crate::{Result, ops, store::Store};

/// What the janitor does, and how often.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between sweeps.
    pub every: Duration,
    /// A bundle in `Received`, `Unpacking` or `Publishing` not updated for this long is
    /// re-driven.
    pub stale_after: Duration,
    /// Stored files of a `Published` or `Failed` bundle are removed this long after it
    /// ended (its status stays).
    pub keep_finished: Duration,
    /// A multi-part upload not completed is removed this long after its last part.
    pub keep_uploads: Duration,
    /// A bundle directory without a record or metadata is removed after this long.
    pub orphan_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            every: Duration::from_secs(60),
            stale_after: Duration::from_secs(600),
            keep_finished: Duration::from_secs(24 * 3600),
            keep_uploads: Duration::from_secs(24 * 3600),
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

pub struct Janitor {
    store: Arc<Store>,
    settings: Settings,
}

/// How old a file or directory is (by its modification time).
async fn mtime_age(path: &std::path::Path) -> Option<Duration> {
    let m = tokio::fs::metadata(path).await.ok()?.modified().ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(m)
            .unwrap_or_default(),
    )
}

impl Janitor {
    pub fn new(store: Arc<Store>, settings: Settings) -> Self {
        Janitor { store, settings }
    }

    /// Sweeps at start (a restart picks up what a crash left) and then every
    /// `settings.every`, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "janitor sweep failed; will try again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.every) => {}
            }
        }
    }

    /// One sweep over uploads, bundles and the bundle directories.
    pub async fn sweep(&self) -> Result<()> {
        self.expire_uploads().await;
        let summaries = self.store.state().list().await?;
        let mut backlog = Backlog::default();
        for s in &summaries {
            if let Err(error) = self.tend(s, &mut backlog).await {
                tracing::warn!(%error, bundle_id = %s.id, "janitor could not tend a bundle");
            }
        }
        let known: std::collections::HashSet<&BundleId> = summaries.iter().map(|s| &s.id).collect();
        self.orphans(&known).await;
        Ok(())
    }

    async fn tend(&self, s: &BundleSummary, backlog: &mut Backlog) -> Result<()> {
        let state = self.store.state();
        let bus = self.store.bus();
        if s.deleting {
            return ops::delete(&self.store, &s.id, true).await;
        }
        if !s.claims.is_empty() && stale(&s.updated_at, Duration::from_secs(30)) {
            finish::settle_claims(state, &s.id).await?;
        }
        let stuck = stale(&s.updated_at, self.settings.stale_after);
        let long_stuck = stale(&s.updated_at, self.settings.stale_after * 4);
        match s.phase {
            Phase::Published | Phase::Failed => {
                if !s.announced {
                    lifecycle::announce_if_done(bus, state, s).await?;
                }
                let expired = s
                    .finished_at
                    .as_deref()
                    .is_some_and(|f| stale(f, self.settings.keep_finished));
                if expired && s.expired_at.is_none() {
                    ops::expire(&self.store, &s.id).await?;
                }
            }
            Phase::Received | Phase::Unpacking if stuck => {
                let busy = backlog.unpack(&self.store).await? > 0;
                if !busy || long_stuck {
                    self.redrive_unpack(&s.id).await?;
                }
            }
            Phase::Publishing | Phase::Tagging if stuck => {
                let busy = backlog.publish(&self.store).await? > 0;
                if !busy || long_stuck {
                    self.redrive_publish(&s.id).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Announces a bundle stuck before publishing again.
    async fn redrive_unpack(&self, id: &BundleId) -> Result<()> {
        let updated = self
            .store
            .state()
            .update(id, |r| (!r.phase.is_terminal()).then(|| r.redrives += 1))
            .await?;
        if let Some(((), s)) = updated {
            tracing::warn!(bundle_id = %s.id, phase = ?s.phase, "bundle stalled; announcing it again");
            self.store.announce(&s).await?;
        }
        Ok(())
    }

    /// Sends the jobs of a stuck publishing bundle's unfinished images again, or the
    /// commit job of a stuck one setting its tags.
    async fn redrive_publish(&self, id: &BundleId) -> Result<()> {
        let state = self.store.state();
        finish::settle_claims(state, id).await?;
        let updated = state
            .update(id, |r| {
                matches!(r.phase, Phase::Publishing | Phase::Tagging).then(|| r.redrives += 1)
            })
            .await?;
        match updated {
            Some(((), s)) if s.phase == Phase::Tagging => {
                dispatch::commit(self.store.bus(), &s).await?;
                tracing::warn!(bundle_id = %s.id, "bundle stalled setting its tags; committing again");
            }
            Some(((), s)) => {
                let sent = dispatch::dispatch_uncounted(self.store.bus(), state, &s).await?;
                tracing::warn!(bundle_id = %s.id, images = sent, "bundle stalled; its unfinished images go to publish again");
            }
            None => {}
        }
        Ok(())
    }

    /// Multi-part uploads left unfinished for longer than `keep_uploads`.
    async fn expire_uploads(&self) {
        let dir = self.store.data().uploads();
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
            return;
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let path = e.path();
            // A part arriving touches the directory (a new file in it).
            if mtime_age(&path)
                .await
                .is_some_and(|a| a > self.settings.keep_uploads)
            {
                tracing::info!(upload = %path.display(), "unfinished multi-part upload expired");
                let _ = tokio::fs::remove_dir_all(&path).await;
            }
        }
    }

    /// Bundle directories without a summary: recorded from their metadata when the
    /// bundle is whole (and was not put in place a moment ago: its upload records it),
    /// else removed after the grace period.
    async fn orphans(&self, known: &std::collections::HashSet<&BundleId>) {
        let dir = self.store.data().bundles();
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
            return;
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let Ok(id) = BundleId::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            if known.contains(&id) {
                continue;
            }
            // It may have been recorded since the list was read.
            if let Ok(Some(_)) = self.store.known(&id).await {
                continue;
            }
            let meta = self.store.read_meta(&id).await;
            let whole = match &meta {
                Some(m) => match self.store.data().resolve(&id, &m.path) {
                    Some(p) => tokio::fs::try_exists(&p).await.unwrap_or(false),
                    None => false,
                },
                None => false,
            };
            // Just put in place, its upload is about to record it: leave it a moment.
            let settled = match meta
                .as_ref()
                .and_then(|m| self.store.data().resolve(&id, &m.path))
            {
                Some(p) => mtime_age(&p)
                    .await
                    .is_some_and(|a| a > self.settings.stale_after.min(RECORD_GRACE)),
                None => false,
            };
            match meta {
                Some(_) if whole && !settled => {}
                Some(m) if whole => match self.store.record(&id, &m).await {
                    Ok(_) => {
                        tracing::warn!(bundle_id = %id, name = %m.name, "recorded a bundle stored before a crash")
                    }
                    Err(error) => {
                        tracing::warn!(%error, bundle_id = %id, "cannot record a stored bundle yet")
                    }
                },
                _ => {
                    if mtime_age(&e.path())
                        .await
                        .is_some_and(|a| a > self.settings.orphan_grace)
                    {
                        tracing::warn!(bundle_id = %id, "removing a bundle directory nothing records");
                        let _ = tokio::fs::remove_dir_all(e.path()).await;
                    }
                }
            }
        }
    }
}

/// Was `rfc3339` longer ago than `d`? (An unreadable time is not stale.)
fn stale(rfc3339: &str, d: Duration) -> bool {
    age(rfc3339).is_some_and(|a| a > d)
}

/// The stages' consumers' backlogs, read at most once per sweep. A consumer that cannot
/// be read (its service never started) counts as busy: announcing again would not help.
#[derive(Default)]
struct Backlog {
    unpack: Option<u64>,
    publish: Option<u64>,
}

async fn backlog(store: &Store, stream: &str, consumer: &str) -> u64 {
    match store.bus().consumer_backlog(stream, consumer).await {
        Ok(n) => n,
        Err(error) => {
            tracing::debug!(%error, consumer, "cannot read the consumer's backlog");
            u64::MAX
        }
    }
}

impl Backlog {
    async fn unpack(&mut self, store: &Store) -> Result<u64> {
        if self.unpack.is_none() {
            self.unpack = Some(backlog(store, EVENTS_STREAM, UNPACK_CONSUMER).await);
        }
        Ok(self.unpack.unwrap_or_default())
    }

    async fn publish(&mut self, store: &Store) -> Result<u64> {
        if self.publish.is_none() {
            self.publish = Some(backlog(store, JOBS_STREAM, PUBLISH_CONSUMER).await);
        }
        Ok(self.publish.unwrap_or_default())
    }
}
