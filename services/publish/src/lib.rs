//! publish: pushes every image of a bundle, byte for byte, into its target registry.
//!
//! One job per image (from the `SHIPPERD_JOBS` work queue; replicas share the durable
//! consumer `publish`). A job names its image's plan, which unpack stored beside the
//! bundle: reading it is one small read, and the bundle's bytes are opened once per
//! process and shared by its jobs, so an image costs the same whatever the bundle's
//! size. For an image: if its tag already points at its digest, nothing more (Day-2).
//! Else blobs, several at once (skipped when the repository has them, mounted when
//! another repository of the registry has them, else streamed straight out of the
//! bundle and hashed on the way, in resumable chunks when large), then its manifests,
//! all by digest. What a differential bundle does not carry must be in the registry
//! already, else the image fails naming it. The outcome is counted exactly once in the
//! bundle's summary (see `shipperd-state`). When every image of the bundle is in the
//! registry, the worker that counted the last one sends the bundle's commit job, which
//! sets the tags (see [`commit`]): a bundle with any failed image (a corrupt or a
//! missing blob) tags nothing.
//!
//! Failures: 429, 5xx, timeouts and broken connections are retried (within a request,
//! then by redelivering the job with a growing delay, up to `max_deliver` attempts);
//! answers that retrying cannot fix (credentials refused, 400, 404, 413, a corrupt
//! blob) fail the image at once with the registry's own message.

mod bundles;
mod commit;
mod progress;
mod registry;
mod tags;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::{Message, consumer::DeliverPolicy};
use futures::{FutureExt as _, StreamExt as _};
use shipperd_bundle::{Location, PlanBlobs, StoredPlan, cas::Cas};
use shipperd_bus::{
    Bus, ConsumerSpec, EventKind,
    event::{encode, event_id},
    subjects::{BLOBS_BUCKET, JOBS_STREAM, PUBLISH_CONSUMER, PUBLISH_JOB_SUBJECT},
    worker::{self, Outcome},
};
use shipperd_model::{
    BlobCounts, BundleId, BundleSummary, DataDir, ImagePhase, ImageState, Outcome as ImageOutcome,
    Phase, PlanRef, TargetName,
};
use shipperd_proto::v1;
use shipperd_registry_targets::{LiveTargets, Targets};
use shipperd_state::{StateStore, dispatch::image_ref, finish, lifecycle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use progress::Progress;
pub use registry::{BlobOutcome, Registry, RegistryError, lease_key};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    #[error(transparent)]
    Bundle(#[from] shipperd_bundle::Error),
    #[error(transparent)]
    Target(#[from] shipperd_registry_targets::Error),
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: RegistryError,
    },
    /// A bug: something panicked.
    #[error("internal error (a bug; please report it): {0}")]
    Internal(String),
}

impl Error {
    fn registry(what: impl Into<String>) -> impl FnOnce(RegistryError) -> Self {
        let what = what.into();
        move |source| Error::Registry { what, source }
    }

    /// Could trying again later succeed? (The registry or NATS may recover; a broken
    /// bundle, an unknown target or a refusal will not.)
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Bus(e) => e.kind() != shipperd_bus::ErrorKind::Permanent,
            Error::Bundle(e) => e.kind() == shipperd_bundle::ErrorKind::Io,
            Error::Target(_) | Error::Internal(_) => false,
            Error::Registry { source, .. } => source.is_transient(),
        }
    }

    /// The failure without what is particular to one image, for grouping; a defect of
    /// the bundle (a corrupt or missing blob) names the image, for a person to act on.
    pub fn cause(&self, image: &shipperd_model::Reference) -> String {
        match self {
            Error::Registry {
                source: source @ (RegistryError::Changed(_) | RegistryError::Missing(_)),
                ..
            } => format!("image {image}: {}", source.cause()),
            Error::Registry { source, .. } => source.cause(),
            Error::Bundle(_) => "cannot read the stored bundle".into(),
            Error::Bus(_) => "NATS failed".into(),
            other => other.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the publish service.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub data_dir: DataDir,
    /// Where images go: named registries, their credentials, trust and path mapping.
    pub targets: Targets,
    /// The file `targets` came from: read again when it changes (the next image uses
    /// what it says; images under way finish with what they began with).
    pub targets_file: Option<std::path::PathBuf>,
    /// Images pushed at once by this replica.
    pub concurrency: usize,
    /// Attempts at one image before a registry error that may heal fails it.
    pub max_deliver: i64,
    /// First retry delay of a job; doubles per delivery, up to a minute.
    pub retry_base: Duration,
    /// Least time between two progress reports of one image.
    pub progress_interval: Duration,
}

impl Config {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<std::path::PathBuf>,
        targets: Targets,
    ) -> Self {
        Config {
            nats_url: nats_url.into(),
            data_dir: DataDir::new(data_dir.into()),
            targets,
            targets_file: None,
            concurrency: 16,
            max_deliver: 5,
            retry_base: Duration::from_secs(2),
            progress_interval: Duration::from_secs(2),
        }
    }
}

/// Deliveries the server makes beyond `max_deliver`: room to record a failure after the
/// last attempt (the janitor re-drives an image the server gave up on).
const RECORD_SLACK: i64 = 10;

struct Ctx {
    bus: Bus,
    state: StateStore,
    /// One client per target, by name.
    /// The targets now, and a client per target built for them (dropped when they
    /// change).
    targets: LiveTargets,
    registries: std::sync::Mutex<(u64, HashMap<TargetName, Arc<Registry>>)>,
    blobs: async_nats::jetstream::kv::Store,
    /// Opened bundles, shared by their jobs.
    bundles: bundles::Bundles,
    /// Who holds each tag (see [`tags`]).
    tags: tags::Tags,
    config: Config,
}

impl Ctx {
    fn registry(&self, name: Option<&TargetName>) -> Result<Arc<Registry>> {
        let (targets, version) = self.targets.snapshot();
        let t = targets.get(name)?;
        let mut regs = self.registries.lock().expect("not poisoned");
        if regs.0 != version {
            regs.1.clear();
            regs.0 = version;
        }
        if let Some(r) = regs.1.get(&t.name) {
            return Ok(r.clone());
        }
        let r = Arc::new(
            Registry::new(t.clone(), self.blobs.clone())
                .map_err(Error::registry(format!("target {}", t.name)))?,
        );
        regs.1.insert(t.name.clone(), r.clone());
        Ok(r)
    }
}

/// Counts of what one image's push did.
#[derive(Debug, Default, Clone)]
struct Stats {
    blobs: BlobCounts,
    /// The tag was already at this digest: nothing pushed.
    image_skipped: bool,
    bytes_total: u64,
}

/// A started publish service.
pub struct Publish {
    ctx: Arc<Ctx>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

impl Publish {
    pub async fn start(config: Config) -> Result<Self> {
        // ring is our one TLS provider; a no-op when the binary installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bus = Bus::connect(&config.nats_url, "shipperd-publish").await?;
        bus.ensure_topology().await?;
        let consumer = bus
            .consumer(&ConsumerSpec {
                stream: JOBS_STREAM,
                durable: PUBLISH_CONSUMER.into(),
                filter: PUBLISH_JOB_SUBJECT.into(),
                ack_wait: Duration::from_secs(60),
                max_deliver: config.max_deliver + RECORD_SLACK,
                max_ack_pending: 4096,
                deliver_policy: DeliverPolicy::All,
            })
            .await?;
        let blobs = bus.bucket(BLOBS_BUCKET).await?;
        let mut registries = HashMap::new();
        for t in config.targets.iter() {
            let r = Registry::new(t.clone(), blobs.clone())
                .map_err(Error::registry(format!("target {}", t.name)))?;
            registries.insert(t.name.clone(), Arc::new(r));
        }
        let state = StateStore::open(&bus).await?;
        Ok(Publish {
            ctx: Arc::new(Ctx {
                bus,
                state,
                targets: LiveTargets::new(config.targets.clone(), config.targets_file.clone()),
                registries: std::sync::Mutex::new((0, registries)),
                blobs: blobs.clone(),
                bundles: bundles::Bundles::new(config.data_dir.clone()),
                tags: tags::Tags::new(blobs),
                config,
            }),
            consumer,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let ctx = self.ctx.clone();
        tokio::spawn(
            ctx.targets
                .clone()
                .follow(Duration::from_secs(2), shutdown.clone().cancelled_owned()),
        );
        worker::run(
            "publish",
            self.consumer,
            ctx.config.concurrency,
            Duration::from_secs(30),
            shutdown,
            move |msg| {
                let ctx = ctx.clone();
                async move { handle(&ctx, msg).await }
            },
        )
        .await;
        Ok(())
    }
}

/// Starts and runs the publish service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Publish::start(config).await?.serve(shutdown).await
}

/// A job we can act on.
struct Job {
    id: BundleId,
    index: u32,
    plan: PlanRef,
    target: String,
}

enum Work {
    /// Push one image's content.
    Image(Job),
    /// Set the tags of a bundle whose images are all in the registry.
    Commit(BundleId),
}

fn decode_job(b: &[u8]) -> Option<Work> {
    let job: v1::PublishJob = prost::Message::decode(b).ok()?;
    let id = BundleId::parse(&job.bundle_id).ok()?;
    if job.commit {
        return Some(Work::Commit(id));
    }
    Some(Work::Image(Job {
        id,
        index: job.image.as_ref()?.index,
        plan: PlanRef {
            offset: job.plan_offset,
            len: job.plan_length,
        },
        target: job.image?.target,
    }))
}

async fn handle(ctx: &Ctx, msg: Message) {
    let job = match decode_job(&msg.payload) {
        Some(Work::Image(job)) => job,
        Some(Work::Commit(id)) => {
            let span = tracing::info_span!("commit", bundle_id = %id);
            shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
            let outcome = commit::commit(ctx, &msg, &id).instrument(span).await;
            return worker::settle(&msg, outcome).await;
        }
        None => {
            tracing::error!("undecodable publish job; dropping it");
            return worker::settle(&msg, Outcome::Term).await;
        }
    };
    let span = tracing::info_span!("publish", bundle_id = %job.id, image = %job.target);
    shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
    let outcome = async {
        let work = std::panic::AssertUnwindSafe(process(ctx, &msg, &job)).catch_unwind();
        let result = match work.await {
            Ok(r) => r,
            Err(panic) => {
                let e = Error::Internal(worker::panic_message(&*panic));
                tracing::error!(error = %e, "publishing an image panicked");
                let cause = e.to_string();
                record(ctx, &job, ImageOutcome::failed(e.to_string(), cause)).await
            }
        };
        match result {
            Ok(o) => o,
            Err(error) => {
                tracing::warn!(%error, "cannot record the image's outcome; will retry");
                Outcome::Retry(ctx.config.retry_base)
            }
        }
    }
    .instrument(span)
    .await;
    worker::settle(&msg, outcome).await;
}

async fn process(ctx: &Ctx, msg: &Message, job: &Job) -> Result<Outcome> {
    let Some(s) = ctx.state.summary(&job.id).await? else {
        tracing::error!("job for an unknown bundle; dropping it");
        return Ok(Outcome::Term);
    };
    let Some((img, revision)) = ctx.state.image(&job.id, job.index).await? else {
        tracing::error!(
            index = job.index,
            "job for an image the bundle does not have"
        );
        return Ok(Outcome::Term);
    };
    if s.deleting {
        return Ok(Outcome::Term);
    }
    if img.is_counted(s.generation) || s.claims.contains_key(&job.index) {
        // Done (or decided) by an earlier delivery: finish what it began, make sure its
        // events went out (de-duplicated).
        if let Some(f) = finish::resume(&ctx.state, &job.id, job.index).await? {
            announce(ctx, &f.summary, &f.image).await?;
        }
        return Ok(Outcome::Ack);
    }
    if s.phase != Phase::Publishing {
        // A job of an earlier round (the bundle is being unpacked again).
        return Ok(Outcome::Ack);
    }
    let attempt = worker::delivered(msg);
    if attempt > ctx.config.max_deliver {
        // The last attempt could not record its outcome: record it now.
        let last = img.error.clone().unwrap_or_else(|| "unknown error".into());
        let cause = format!("gave up after {} attempts", ctx.config.max_deliver);
        let error = format!("{cause}: {last}");
        return record(ctx, job, ImageOutcome::failed(error, cause)).await;
    }
    let progress = Progress::default();
    let reporter = progress::Reporter::start(
        ctx.bus.clone(),
        ctx.state.clone(),
        s.clone(),
        img.clone(),
        revision,
        progress.clone(),
        ctx.config.progress_interval,
    );
    let pushed = worker::with_progress(
        msg,
        Duration::from_secs(15),
        push(ctx, &s, &img, job.plan, &progress),
    )
    .await;
    let revision = reporter.stop().await;
    let tried = |mut o: ImageOutcome| {
        o.attempts = attempt as u32;
        o
    };
    match pushed {
        Ok(stats) => {
            let outcome =
                ImageOutcome::published(stats.bytes_total, stats.image_skipped, stats.blobs);
            record(ctx, job, tried(outcome)).await
        }
        Err(e) if e.is_transient() && attempt < ctx.config.max_deliver => {
            let n = attempt.clamp(1, 6) as u32;
            let delay = (ctx.config.retry_base * 2u32.pow(n - 1)).min(Duration::from_secs(60));
            tracing::warn!(error = %e, ?delay, attempt, "image push failed; will retry");
            let mut img = img;
            img.error = Some(e.to_string());
            img.attempts = attempt as u32;
            img.bytes_done = progress.get().0;
            // Only over what this job last wrote: a concurrent delivery's outcome stands.
            if let Some(rev) = revision
                && let Err(error) = ctx.state.update_image(&job.id, &img, rev).await
            {
                tracing::debug!(%error, "cannot note the failed attempt");
            }
            Ok(Outcome::Retry(delay))
        }
        Err(e) => {
            tracing::warn!(error = %e, attempt, "image failed");
            let outcome = ImageOutcome::failed(e.to_string(), e.cause(&img.source));
            record(ctx, job, tried(outcome)).await
        }
    }
}

/// Counts the image's outcome (once), announces it, and the bundle if this ended it.
async fn record(ctx: &Ctx, job: &Job, outcome: ImageOutcome) -> Result<Outcome> {
    let Some(f) = finish::finish_image(&ctx.state, &job.id, job.index, &outcome).await? else {
        return Ok(Outcome::Ack);
    };
    announce(ctx, &f.summary, &f.image).await?;
    Ok(Outcome::Ack)
}

/// Sends the image's event (a failure now; a pushed image's once its tag is set, by the
/// commit, unless its tag was there already), then: the commit job when every image of
/// the bundle is in the registry, or the bundle's event when it has ended (a published
/// bundle's blobs in the shared store are let go).
async fn announce(ctx: &Ctx, s: &BundleSummary, img: &ImageState) -> Result<()> {
    if img.phase == ImagePhase::Failed || img.skipped {
        announce_image(ctx, s, img).await?;
    }
    if s.phase == Phase::Tagging {
        shipperd_state::dispatch::commit(&ctx.bus, s).await?;
    }
    if s.phase.is_terminal() {
        lifecycle::announce_if_done(&ctx.bus, &ctx.state, s).await?;
        ctx.bundles.forget(&s.id);
        if s.phase == Phase::Published {
            release_blobs(&ctx.config.data_dir, &s.id).await;
        }
    }
    Ok(())
}

/// Lets go of the blobs a published bundle claimed in the content-addressed store, and
/// deletes those no other bundle needs. (A failed bundle keeps them for a retry, until
/// its files expire or it is deleted.)
async fn release_blobs(data: &DataDir, id: &BundleId) {
    let cas = Cas::new(data);
    let id = id.to_string();
    let _ = tokio::task::spawn_blocking(move || cas.finish(&id)).await;
}

/// `image.published` or `image.failed` for `img`.
async fn announce_image(ctx: &Ctx, s: &BundleSummary, img: &ImageState) -> Result<()> {
    let image = Some(image_ref(img));
    let (kind, body) = match img.phase {
        ImagePhase::Pending => return Ok(()),
        ImagePhase::Published => {
            let b = &img.blobs;
            let body = v1::ImagePublished {
                bundle_id: s.id.to_string(),
                image,
                blobs_pushed: b.uploaded as u32,
                blobs_mounted: b.mounted as u32,
                blobs_skipped: b.present as u32,
                bytes_pushed: b.uploaded_bytes,
                skipped: img.skipped,
                target_name: ctx
                    .targets
                    .get()
                    .get(s.target.as_ref())
                    .map(|t| t.name.to_string())
                    .unwrap_or_default(),
            };
            (EventKind::ImagePublished, encode(&body))
        }
        ImagePhase::Failed => {
            let body = v1::ImageFailed {
                bundle_id: s.id.to_string(),
                image,
                error: img.error.clone().unwrap_or_default(),
            };
            (EventKind::ImageFailed, encode(&body))
        }
    };
    let id = format!(
        "{}{}",
        event_id(kind, &s.id, Some(img.index)),
        shipperd_model::state::generation_suffix(img.generation)
    );
    ctx.bus.publish_event(kind, &id, &s.id, body).await?;
    Ok(())
}

/// Reads the image's plan and pushes it.
async fn push(
    ctx: &Ctx,
    s: &BundleSummary,
    img: &ImageState,
    at: PlanRef,
    progress: &Progress,
) -> Result<Stats> {
    let (store, plan) = ctx.bundles.plan(&s.id, at).await?;
    let blobs: Arc<dyn shipperd_bundle::BlobSource> = Arc::new(PlanBlobs::new(store, &plan));
    push_image(ctx, s, img, &plan, blobs, progress).await
}

/// Pushes one image's content: blobs, then its manifests (children first), all by
/// digest; its tag is set by the bundle's commit. Or nothing when the tag is already at
/// the image's digest (Day-2).
async fn push_image(
    ctx: &Ctx,
    s: &BundleSummary,
    img: &ImageState,
    plan: &StoredPlan,
    bundle: Arc<dyn shipperd_bundle::BlobSource>,
    progress: &Progress,
) -> Result<Stats> {
    let reg = &ctx.registry(s.target.as_ref())?;
    let repo = img.target.repository.clone();
    let total = plan.bytes_total();
    progress.set_total(total);
    let mut stats = Stats {
        bytes_total: total,
        ..Stats::default()
    };
    if plan.manifests.is_empty() {
        return Err(Error::Internal(format!(
            "the plan of {} has no manifest",
            img.source
        )));
    }

    // Day-2: a bundle set this tag to this digest before, and the registry still has
    // it. One request, and done. (A tag nothing of ours ever set costs no request: the
    // image is pushed, and blobs the repository has are found on the way.)
    if let Some(t) = img.target.tag.as_deref()
        && ctx.tags.read(reg, &repo, t).await.set_before(&img.digest)
    {
        let now = reg
            .tag_digest(&repo, t)
            .await
            .map_err(Error::registry(format!("checking {repo}:{t}")))?;
        if now.as_ref() == Some(&img.digest) {
            push_referrers(reg, &repo, plan).await?;
            referrers_tags(reg, &repo, plan).await?;
            progress.add(total);
            stats.image_skipped = true;
            stats.blobs.present = plan.blobs.len() as u64;
            tracing::info!("tag already at this digest; skipped");
            return Ok(stats);
        }
    }

    let wanted: Vec<(shipperd_bundle::Descriptor, bool)> = plan
        .blobs
        .iter()
        .map(|b| (b.desc.clone(), b.at == Location::Absent))
        .collect();
    let blobs = futures::stream::iter(wanted)
        .map(|(blob, absent)| {
            let (bundle, repo, reg, progress) =
                (bundle.clone(), repo.clone(), reg.clone(), progress.clone());
            async move {
                reg.push_blob(&repo, &blob, absent, bundle, &progress)
                    .await
                    .map_err(Error::registry(format!("blob {} to {repo}", blob.digest)))
            }
        })
        .buffer_unordered(reg.target().transfer.concurrency);
    futures::pin_mut!(blobs);
    while let Some(outcome) = blobs.next().await {
        match outcome? {
            BlobOutcome::Skipped => stats.blobs.present += 1,
            BlobOutcome::Mounted => stats.blobs.mounted += 1,
            BlobOutcome::Pushed(sent) => {
                stats.blobs.uploaded += 1;
                stats.blobs.uploaded_bytes += sent;
            }
        }
    }
    // Manifests by digest, children before their index; nothing is tagged yet. One the
    // bundle leaves out must be in the repository already (and so, what it lists).
    for m in &plan.manifests {
        let digest = &m.desc.digest;
        if m.absent {
            let there = reg
                .manifest_exists(&repo, digest)
                .await
                .map_err(Error::registry(format!(
                    "checking manifest {digest} in {repo}"
                )))?;
            if !there {
                return Err(Error::Registry {
                    what: format!("manifest {digest} of {}", img.source),
                    source: RegistryError::Missing(format!(
                        "manifest {digest} is not in the bundle, and {}/{repo} does not have it",
                        reg.host()
                    )),
                });
            }
        } else {
            reg.push_manifest(&repo, digest.as_str(), &m.bytes, &m.desc.media_type)
                .await
                .map_err(Error::registry(format!("manifest {digest} to {repo}")))?;
        }
        progress.add(m.bytes.len() as u64);
    }
    push_referrers(reg, &repo, plan).await?;
    tracing::info!(
        uploaded = stats.blobs.uploaded,
        mounted = stats.blobs.mounted,
        present = stats.blobs.present,
        bytes = stats.blobs.uploaded_bytes,
        referrers = plan.referrers.len(),
        absent = plan.absent(),
        "image content in the registry"
    );
    Ok(stats)
}

/// Pushes the image's referrers by digest (their blobs went up with the image's).
async fn push_referrers(reg: &Registry, repo: &str, plan: &StoredPlan) -> Result<()> {
    for r in &plan.referrers {
        reg.push_manifest(repo, r.desc.digest.as_str(), &r.bytes, &r.desc.media_type)
            .await
            .map_err(Error::registry(format!(
                "referrer {} to {repo}",
                r.desc.digest
            )))?;
    }
    Ok(())
}

/// Where the registry has no referrers API, lists the image's referrers under the
/// fallback tag `sha256-<subject hex>` (OCI distribution spec 1.1, "referrers tag
/// schema"): a tag, so set with the image's own.
async fn referrers_tags(reg: &Registry, repo: &str, plan: &StoredPlan) -> Result<()> {
    let mut by_subject: std::collections::BTreeMap<
        &shipperd_model::Digest,
        Vec<shipperd_bundle::Descriptor>,
    > = Default::default();
    for r in &plan.referrers {
        if let Some(s) = &r.subject {
            by_subject.entry(s).or_default().push(r.desc.clone());
        }
    }
    for (subject, referrers) in by_subject {
        reg.update_referrers_tag(repo, subject, &referrers)
            .await
            .map_err(Error::registry(format!("referrers of {subject} in {repo}")))?;
    }
    Ok(())
}
