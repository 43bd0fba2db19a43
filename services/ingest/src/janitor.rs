//! The janitor: a periodic sweep that makes sure every bundle ends and nothing is kept
//! forever. Every step is idempotent, so any number of ingest replicas may sweep at once.
//!
//! - a bundle stored but never recorded (a crash between the two) is recorded from its
//!   `meta.json` and announced; a bundle directory with neither record nor metadata is
//!   removed after a grace period;
//! - a bundle stuck in `Received`, `Unpacking`, `Publishing` or `Tagging` is sent on
//!   again (announced, its unfinished images' jobs, its commit: what its phase needs,
//!   through the same transition and executor as everything else), once the stage's
//!   consumer has nothing queued or in hand (or the bundle has been stuck four times as
//!   long), and never while its work is alive (the attempts ledger's heartbeat says
//!   so). Re-drives are counted; after `max_redrives` the bundle fails, saying so. A
//!   re-driven job shares its attempts with the job it repeats, so a bundle that kills
//!   its worker ends `Failed` however it is sent on. Claims a crash left are finished;
//!   an ended bundle not yet announced is;
//! - a bundle whose `DELETE` was cut short is deleted;
//! - finished bundles' stored files expire after `keep_finished`, their status after
//!   `keep_status`, unfinished multi-part uploads after `keep_uploads`.

use std::{sync::Arc, time::Duration};

/// How long a bundle put in place is left to the upload that placed it to record,
/// before a sweep records it (at most `stale_after`).
const RECORD_GRACE: Duration = Duration::from_secs(60);

use shipperd_bus::{
    MessageId,
    subjects::{COMMIT_CONSUMER, EVENTS_STREAM, JOBS_STREAM, PUBLISH_CONSUMER, UNPACK_CONSUMER},
};
use shipperd_model::{BundleId, BundleSummary, Phase, age};
use shipperd_pipeline::Ledger;
use shipperd_state::finish;
use tokio_util::sync::CancellationToken;

use crate::Result;
use shipperd_store::{Store, ops};

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
    /// The status of a `Published` or `Failed` bundle (its summary and image states) is
    /// removed this long after it ended, so sweeps and listings stay bounded by what is
    /// recent.
    pub keep_status: Duration,
    /// A bundle directory without a record or metadata is removed after this long.
    pub orphan_grace: Duration,
    /// Times a stalled bundle is sent on again before it fails.
    pub max_redrives: u32,
    /// A heartbeat younger than this says a stage is working on a bundle (half the
    /// stages' ack wait).
    pub alive_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            every: Duration::from_secs(60),
            stale_after: Duration::from_secs(600),
            keep_finished: Duration::from_secs(24 * 3600),
            keep_uploads: Duration::from_secs(24 * 3600),
            keep_status: Duration::from_secs(30 * 24 * 3600),
            orphan_grace: Duration::from_secs(3600),
            max_redrives: 5,
            alive_window: Duration::from_secs(30),
        }
    }
}

pub struct Janitor {
    store: Arc<Store>,
    settings: Settings,
    ledger: Ledger,
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
    pub async fn new(store: Arc<Store>, settings: Settings) -> Result<Self> {
        Ok(Janitor {
            ledger: Ledger::open(store.bus()).await?,
            store,
            settings,
        })
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
                () = shipperd_model::pause(self.settings.every) => {}
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
        crate::metrics::refresh(&self.store, &summaries).await;
        Ok(())
    }

    async fn tend(&self, s: &BundleSummary, backlog: &mut Backlog) -> Result<()> {
        let state = self.store.state();
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
                    self.store.executor().ended(s).await?;
                }
                let ended_before =
                    |d: Duration| s.finished_at.as_deref().is_some_and(|f| stale(f, d));
                if s.announced && ended_before(self.settings.keep_status) {
                    ops::forget(&self.store, &s.id).await?;
                } else if ended_before(self.settings.keep_finished) && s.expired_at.is_none() {
                    ops::expire(&self.store, &s.id).await?;
                }
            }
            Phase::Received | Phase::Unpacking if stuck => {
                let busy = backlog.of(&self.store, s.phase).await > 0;
                if (!busy || long_stuck) && !self.working(s).await? {
                    self.redrive(&s.id).await?;
                }
            }
            Phase::Publishing | Phase::Tagging if stuck => {
                let busy = backlog.of(&self.store, s.phase).await > 0;
                if (!busy || long_stuck) && !self.working(s).await? {
                    finish::settle_claims(state, &s.id).await?;
                    let recounted = s.phase == Phase::Publishing
                        && self.store.executor().recount(&s.id).await?;
                    if !recounted {
                        self.redrive(&s.id).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Is a stage working on `s` right now (its attempt's heartbeat is fresh)? The
    /// work of a `Received`/`Unpacking` bundle is its unpack, a `Tagging` one's its
    /// commit; a `Publishing` bundle's are its images', which the runtime keeps from
    /// running twice itself (a re-driven job finds its first copy alive and waits).
    async fn working(&self, s: &BundleSummary) -> Result<bool> {
        let Some(work) = MessageId::of_phase(s) else {
            return Ok(false);
        };
        Ok(self
            .ledger
            .get(&work.work())
            .await?
            .is_some_and(|(r, _)| r.alive(self.settings.alive_window)))
    }

    /// Sends a stalled bundle on again (counted; failed after `max_redrives`).
    async fn redrive(&self, id: &BundleId) -> Result<()> {
        let max = self.settings.max_redrives;
        if let Some((s, report)) = self
            .store
            .executor()
            .transition(id, |s| s.redrive(max))
            .await?
        {
            tracing::warn!(
                bundle_id = %s.id,
                phase = ?s.phase,
                redrives = s.redrives,
                images = report.dispatched,
                "bundle stalled; sent on again"
            );
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
struct Backlog(std::collections::HashMap<&'static str, u64>);

impl Backlog {
    /// Messages queued or in hand for the stage a bundle in `phase` waits on.
    async fn of(&mut self, store: &Store, phase: Phase) -> u64 {
        let (stream, consumer) = match phase {
            Phase::Received | Phase::Unpacking => (EVENTS_STREAM, UNPACK_CONSUMER),
            Phase::Tagging => (JOBS_STREAM, COMMIT_CONSUMER),
            _ => (JOBS_STREAM, PUBLISH_CONSUMER),
        };
        if let Some(n) = self.0.get(consumer) {
            return *n;
        }
        let n = match store.bus().consumer_backlog(stream, consumer).await {
            Ok(n) => n,
            Err(error) => {
                tracing::debug!(%error, consumer, "cannot read the consumer's backlog");
                u64::MAX
            }
        };
        self.0.insert(consumer, n);
        n
    }
}
