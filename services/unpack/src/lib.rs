//! unpack: opens each received bundle in place, checks it, and lists its images.
//!
//! For every `bundle.received` it detects the container by magic bytes and opens it:
//! squashfs and plain tar in place, gzip/zstd/xz tar expanded once into the shared
//! content-addressed store. It finds the OCI layouts and registry storage trees inside,
//! walks every named image (multi-arch indexes and referrers included), checking every
//! manifest and the size of every blob (blob bytes are hashed once, as publish sends
//! them). What a differential bundle leaves out is planned as absent, for publish to
//! find in the registry. A bundle that fails a check ends `Failed` with a reason naming
//! the file, image or blob, and no job is published for it.
//! Otherwise each image's plan is saved beside the bundle, each image gets its own state
//! key, the summary its counts, one publish job per image goes out, then
//! `bundle.unpacked` (with counts: events never list a bundle's images).

mod inspect;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::Message;
use shipperd_bundle::{Guard, Limits};
use shipperd_bus::{
    EventKind, IncomingEvent,
    subjects::{EVENTS_STREAM, UNPACK_CONSUMER},
};
use shipperd_model::{
    BundleId, BundleSummary, Effect, Effects, ImagePhase, ImageState, Phase, Reference,
    state::Unpacked,
};
use shipperd_pipeline::{
    Attempt, Class, Classify, Done, GiveUp, Runtime, Service, ServiceConfig, Stage,
};
use shipperd_proto::v1;
use shipperd_registry_targets::{LiveTargets, Targets};
use shipperd_state::{Executor, StateStore};
use tokio_util::sync::CancellationToken;

pub use inspect::{Inventory, Options, inspect};
use shipperd_trust as trust;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    /// The bundle could not be read, or is not what a bundle must be.
    #[error(transparent)]
    Bundle(#[from] shipperd_bundle::Error),
    /// Its images cannot land in their target as mapped.
    #[error("{0}")]
    Target(String),
    /// The signature policy rejects an image (or cannot be read).
    #[error("{0}")]
    Policy(String),
    /// The target registry, where signatures were looked for, could not be read (its
    /// client retried already): the unpack is tried again.
    #[error("{0}")]
    Signatures(String),
    /// A bug: the reader panicked.
    #[error("internal error while reading the bundle (a bug; please report it): {0}")]
    Internal(String),
}

impl Classify for Error {
    fn class(&self) -> Class {
        match self {
            Error::Bus(e) => e.class(),
            Error::Bundle(e) if e.kind() == shipperd_bundle::ErrorKind::Io => Class::Transient,
            Error::Signatures(_) => Class::Transient,
            Error::Bundle(_) | Error::Target(_) | Error::Policy(_) | Error::Internal(_) => {
                Class::Permanent
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the unpack service.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, the data directory, the targets, how the stage runs: bundles opened at
    /// once by this replica, attempts at one bundle (a read error that may heal, a
    /// worker that died) before it fails, retry delays, the ack wait.
    pub service: ServiceConfig,
    /// Bounds on what one bundle may hold.
    pub limits: Limits,
    /// Gzip-compress a legacy `docker save` archive's layers (`--compress-layers`).
    pub compress_layers: bool,
    /// The site-wide signature policy (`--policy`, a `containers-policy.json`): every
    /// image must satisfy it, and its target's policy, before anything is published.
    pub policy: Option<std::path::PathBuf>,
}

impl Config {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<std::path::PathBuf>,
        targets: Targets,
    ) -> Self {
        Config {
            service: ServiceConfig::new(nats_url, data_dir, targets),
            limits: Limits::default(),
            compress_layers: false,
            policy: None,
        }
    }
}

/// The unpack stage.
struct Unpacker {
    state: StateStore,
    /// Fails a bundle given up on.
    executor: Executor,
    /// The targets now (following `config.targets_file`).
    targets: LiveTargets,
    config: Config,
}

/// A started unpack service: connected, its consumer declared.
pub struct Unpack {
    stage: Arc<Unpacker>,
    runtime: Runtime,
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

impl Unpack {
    pub async fn start(config: Config) -> Result<Self> {
        let service = Box::pin(Service::connect(&config.service, "shipperd-unpack")).await?;
        let consumer = service
            .bus
            .consumer(&config.service.stage.consumer(
                EVENTS_STREAM,
                UNPACK_CONSUMER,
                EventKind::BundleReceived.subject(),
            ))
            .await?;
        Ok(Unpack {
            runtime: service.runtime,
            stage: Arc::new(Unpacker {
                state: service.state,
                executor: service.executor,
                targets: service.targets,
                config,
            }),
            consumer,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        Service::follow_targets(&self.stage.targets, &shutdown);
        let settings = self.stage.config.service.stage.clone();
        self.runtime
            .run(self.stage, self.consumer, settings, shutdown)
            .await;
        Ok(())
    }
}

/// Starts and runs the unpack service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Unpack::start(config).await?.serve(shutdown).await
}

/// A `bundle.received` to act on.
pub struct Job {
    id: BundleId,
    name: String,
}

impl Stage for Unpacker {
    type Job = Job;
    type Error = Error;
    const NAME: &'static str = "unpack";

    fn decode(&self, msg: &Message) -> Option<Job> {
        let event = IncomingEvent::parse(msg.headers.as_ref(), msg.payload.clone())
            .and_then(|e| e.decode::<v1::BundleReceived>())
            .ok()?;
        Some(Job {
            id: BundleId::parse(&event.bundle_id).ok()?,
            name: event.name,
        })
    }

    fn span(&self, job: &Job) -> tracing::Span {
        tracing::info_span!("unpack", bundle_id = %job.id, name = %job.name)
    }

    async fn handle(&self, job: &Job, attempt: Attempt) -> Result<Done> {
        self.unpack(&job.id, attempt).await
    }

    async fn give_up(&self, job: &Job, why: GiveUp<Error>) -> Result<Done> {
        let error = match &why {
            GiveUp::Error {
                error,
                attempts,
                spent: true,
            } => format!("unpack gave up after {attempts} attempts: {error}"),
            other => other.reason(),
        };
        tracing::warn!(%error, "bundle rejected");
        // Only a bundle not yet listed is unpack's to fail: past that, its images' jobs
        // decide (a redelivery that could not send them again is the janitor's to
        // repeat).
        self.executor
            .fail(
                &job.id,
                |s| matches!(s.phase, Phase::Received | Phase::Unpacking),
                error,
            )
            .await?;
        Ok(Done::nothing())
    }
}

impl Unpacker {
    async fn unpack(&self, id: &BundleId, attempt: Attempt) -> Result<Done> {
        let Some(s) = self.state.summary(id).await? else {
            tracing::error!("bundle.received for an unknown bundle; dropping it");
            return Ok(Done::nothing());
        };
        if s.deleting {
            return Ok(Done::nothing());
        }
        match s.phase {
            Phase::Received | Phase::Unpacking => {}
            // Redelivered after the images were stored: make sure their jobs and the
            // event went out (both are de-duplicated by id).
            Phase::Publishing => {
                return Ok(Done::then(
                    s,
                    Effects::of([Effect::Dispatch, Effect::Unpacked]),
                ));
            }
            Phase::Tagging | Phase::Published | Phase::Failed => {
                let effects = s.follow_up();
                return Ok(Done::then(s, effects));
            }
        }
        // The order bundles arrived in: the stream sequence of their first bundle.received.
        self.state
            .update(id, |r| {
                r.start_unpacking(attempt.stream_sequence).then_some(())
            })
            .await?;

        let (data, rel, name, limits, bundle) = (
            self.config.service.data_dir.clone(),
            s.path.clone(),
            s.name.clone(),
            self.config.limits.clone(),
            id.clone(),
        );
        let compress = self.config.compress_layers;
        let policies = self.policies(&s)?;
        let reading = policies.clone();
        // A DELETE meanwhile calls the reading off at its next check.
        let guard = Guard::default();
        let watching = tokio::spawn(watch_deleted(self.state.clone(), id.clone(), guard.clone()));
        let reader = guard.clone();
        let read = tokio::task::spawn_blocking(move || {
            let options = inspect::Options {
                limits,
                compress_layers: compress,
                policies: reading,
            };
            inspect(&data, &bundle, &rel, &name, &options, &reader)
        })
        .await;
        watching.abort();
        if guard.stopped() || !self.wanted(id).await? {
            // Deleted while it was read: let go of what the reading wrote.
            self.discard(id).await;
            return Ok(Done::nothing());
        }
        let mut inventory = read.map_err(|join| {
            Error::Internal(
                join.try_into_panic()
                    .map(|p| shipperd_model::panic_message(&*p))
                    .unwrap_or_else(|_| "the reader was cancelled".into()),
            )
        })??;
        let mut found = std::mem::take(&mut inventory.images);
        let verdicts: Vec<Option<trust::Verdict>> =
            found.iter_mut().map(|i| i.verdict.take()).collect();
        let (target, mut images) = target_images(
            &self.targets.get(),
            &s,
            found,
            inventory.made_for.as_deref(),
        )?;
        let verification = match &policies {
            Some(p) => Some(self.verify(p, &target, &mut images, verdicts).await?),
            None => None,
        };
        tracing::info!(
            images = images.len(),
            blobs = inventory.blob_count,
            absent = inventory.absent,
            bytes = inventory.blob_bytes,
            referrers = inventory.referrers,
            "bundle checked"
        );
        self.state.put_pending_images(id, &images).await?;
        let unpacked = Unpacked {
            format: inventory.format.to_string(),
            images: images.len() as u32,
            blobs: inventory.blob_count,
            blob_bytes: inventory.blob_bytes,
            absent: inventory.absent,
            bytes_total: images.iter().map(|i| i.bytes_total).sum(),
            target: Some(target),
            verification,
        };
        match self
            .state
            .update_if_known(id, |r| r.unpacked(&unpacked))
            .await?
        {
            Some((effects, s)) => Ok(Done::then(s, effects).with_pending(images)),
            None => {
                if !self.wanted(id).await? {
                    self.discard(id).await;
                }
                // Deleted, or sent on by another unpack, meanwhile.
                Ok(Done::nothing())
            }
        }
    }

    /// The policies' answers for the images (looking in the target registry for the
    /// signatures of those the bundle's own did not get accepted): the images carry
    /// their trust, and the bundle its counts; a rejected image fails the bundle.
    async fn verify(
        &self,
        policies: &trust::Policies,
        target: &shipperd_model::TargetName,
        images: &mut [ImageState],
        verdicts: Vec<Option<trust::Verdict>>,
    ) -> Result<shipperd_model::state::Verification> {
        let mut verdicts: Vec<trust::Verdict> = verdicts
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    Error::Internal("an image was not checked against the policy".into())
                })
            })
            .collect::<Result<_>>()?;
        let named: Vec<(Reference, shipperd_model::Digest)> = images
            .iter()
            .map(|i| (i.source.clone(), i.digest.clone()))
            .collect();
        if verdicts.iter().any(Result::is_err)
            && let Ok(t) = self.targets.get().get(Some(target))
        {
            let registry = shipperd_registry::Registry::reader(t.clone())
                .map_err(|e| Error::Signatures(format!("the target registry: {e}")))?;
            let targets: Vec<Reference> = images.iter().map(|i| i.target.clone()).collect();
            trust::recheck_in_registry(policies, &registry, &named, &targets, &mut verdicts)
                .await
                .map_err(Error::Signatures)?;
        }
        trust::count_metrics(&verdicts);
        if let Some(why) = trust::rejection(&named, &verdicts) {
            tracing::warn!(error = %why, "bundle rejected by the signature policy");
            return Err(Error::Policy(why));
        }
        let verification = policies.verification(&verdicts);
        for (img, v) in images.iter_mut().zip(verdicts) {
            img.trust = v.ok();
        }
        Ok(verification)
    }

    /// The signature policies for the bundle: the site-wide one, then its target's,
    /// read now (an edit applies to the next bundle).
    fn policies(&self, s: &BundleSummary) -> Result<Option<Arc<trust::Policies>>> {
        let mut paths: Vec<std::path::PathBuf> = self.config.policy.iter().cloned().collect();
        if let Ok(target) = self.targets.get().get(s.target.as_ref()) {
            paths.extend(target.policies.iter().cloned());
        }
        trust::Policies::load(&paths)
            .map(|p| p.map(Arc::new))
            .map_err(|e| Error::Policy(format!("the signature policy cannot be used: {e}")))
    }

    /// Is the bundle still there, and not being deleted?
    async fn wanted(&self, id: &BundleId) -> Result<bool> {
        Ok(self.state.summary(id).await?.is_some_and(|s| !s.deleting))
    }

    /// Lets go of what reading a deleted bundle wrote: its claim on the blob store (and
    /// the blobs no other bundle needs), its plans and catalog.
    async fn discard(&self, id: &BundleId) {
        tracing::info!(
            "the bundle was deleted while it was read; letting go of what the reading wrote"
        );
        shipperd_state::effects::release_blobs(&self.config.service.data_dir, id).await;
        let dir = self.config.service.data_dir.bundle_dir(id);
        if let Err(error) = tokio::fs::remove_dir_all(&dir).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, dir = %dir.display(), "cannot remove a deleted bundle's directory");
        }
    }
}

/// How often a bundle being read is looked at, in case it was deleted.
const DELETED_POLL: Duration = Duration::from_secs(1);

/// Stops `guard` once the bundle is deleted (or gone).
async fn watch_deleted(state: StateStore, id: BundleId, guard: Guard) {
    loop {
        shipperd_model::pause(DELETED_POLL).await;
        if let Ok(s) = state.summary(&id).await
            && s.is_none_or(|s| s.deleting)
        {
            guard.stop();
            return;
        }
    }
}

/// Where each image of the bundle lands in its target, as pending image states.
/// Refuses an unknown target, a name the mapping cannot make, and two different images
/// landing on one tag (which path flattening can cause).
/// A differential bundle made against another registry's inventory (`made_for`) is
/// refused: what it leaves out is not known to be here.
fn target_images(
    targets: &Targets,
    s: &BundleSummary,
    found: Vec<inspect::InventoryImage>,
    made_for: Option<&str>,
) -> Result<(shipperd_model::TargetName, Vec<ImageState>)> {
    let target = targets.get(s.target.as_ref()).map_err(|e| {
        let known: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        Error::Target(format!("{e} (targets: {})", known.join(", ")))
    })?;
    if let Some(made_for) = made_for
        && !made_for.eq_ignore_ascii_case(&target.url.host)
    {
        return Err(Error::Target(format!(
            "this bundle was made against the inventory of registry {made_for} and leaves out              what that registry holds; target {} is {}: make the bundle again against its              inventory (shipperd inventory --target {}), or without --have",
            target.name, target.url.host, target.name
        )));
    }
    if s.owner.is_none() && !target.uploads {
        return Err(Error::Target(format!(
            "target {} does not serve uploads (its conditions leave the upload namespace \
             out): name another target",
            target.name
        )));
    }
    // Where each image landed, by the hash of its target reference: a few bytes per
    // image (a catalog holds tens of thousands), the images themselves compared on a
    // hit.
    let hash = |r: &Reference| {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        r.hash(&mut h);
        h.finish()
    };
    let mut landed: std::collections::HashMap<u64, Vec<u32>> = Default::default();
    let mut images: Vec<ImageState> = Vec::with_capacity(found.len());
    for (i, img) in found.into_iter().enumerate() {
        let mapped = target
            .mapping
            .map_in(&img.source, &target.url.host, s.owner.as_deref())
            .map_err(|e| Error::Target(format!("target {}: {e}", target.name)))?;
        let same_place = landed.entry(hash(&mapped)).or_default();
        if let Some(other) = same_place
            .iter()
            .map(|j| &images[*j as usize])
            .find(|o| o.target == mapped && o.digest != img.digest)
        {
            return Err(Error::Target(format!(
                "{} and {} would both land at {mapped} (target {}'s path mapping); \
                 change the mapping or the bundle",
                other.source, img.source, target.name
            )));
        }
        same_place.push(i as u32);
        images.push(ImageState {
            index: i as u32,
            source: img.source,
            target: mapped,
            digest: img.digest,
            media_type: img.media_type,
            size: img.size,
            phase: ImagePhase::Pending,
            error: None,
            bytes_total: img.bytes,
            bytes_done: 0,
            skipped: false,
            attempts: 0,
            generation: s.generation,
            plan: img.plan,
            blobs: Default::default(),
            catalog: img.catalog,
            trust: None,
        });
    }
    Ok((target.name.clone(), images))
}
