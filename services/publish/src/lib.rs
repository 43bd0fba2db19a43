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
mod tags;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::Message;
use futures::StreamExt as _;
use shipperd_bundle::{Location, PlanBlobs, StoredPlan};
use shipperd_bus::{
    Bus,
    subjects::{
        BLOBS_BUCKET, COMMIT_CONSUMER, COMMIT_JOB_SUBJECT, JOBS_STREAM, PUBLISH_CONSUMER,
        PUBLISH_JOB_SUBJECT,
    },
};
use shipperd_model::{
    BlobCounts, BundleId, BundleSummary, ImageState, Outcome as ImageOutcome, Phase, PlanRef,
    Reference, TargetName,
};
use shipperd_pipeline::{
    Attempt, Class, Classify, Done, GiveUp, Runtime, Service, ServiceConfig, Settings, Stage,
};
use shipperd_proto::v1;
use shipperd_registry_targets::{LiveTargets, Targets};
use shipperd_state::{Executor, StateStore, finish};
use tokio_util::sync::CancellationToken;

pub use progress::Progress;
use shipperd_registry::{BlobOutcome, Registry, RegistryError};

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
    /// The image's tag is another owner's, or was set by something other than
    /// ShipperD (see [`tags`]): the image fails, and its bundle tags nothing.
    #[error("{0}")]
    TagOwned(String),
    /// A bug: something that cannot happen did.
    #[error("internal error (a bug; please report it): {0}")]
    Internal(String),
}

impl Error {
    fn registry(what: impl Into<String>) -> impl FnOnce(RegistryError) -> Self {
        let what = what.into();
        move |source| Error::Registry { what, source }
    }

    /// The failure without what is particular to one image, for grouping; a defect of
    /// the bundle (a corrupt or missing blob) names the image, for a person to act on.
    pub fn cause(&self, image: &Reference) -> String {
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

/// Could trying again later succeed? The registry or NATS may recover; a broken bundle,
/// an unknown target or a refusal will not.
impl Classify for Error {
    fn class(&self) -> Class {
        let transient = match self {
            Error::Bus(e) => return e.class(),
            Error::Bundle(e) => e.kind() == shipperd_bundle::ErrorKind::Io,
            Error::Target(_) | Error::Internal(_) | Error::TagOwned(_) => false,
            Error::Registry { source, .. } => source.is_transient(),
        };
        if transient {
            Class::Transient
        } else {
            Class::Permanent
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the publish service.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS, the data directory, the targets, how the image stage runs: images pushed
    /// at once by this replica, attempts at one image before a registry error that may
    /// heal fails it (a worker that died counts), retry delays, the ack wait. The
    /// commit stage runs with the same attempts and delays, one bundle at a time.
    pub service: ServiceConfig,
    /// Tags set at once by a commit.
    pub tag_concurrency: usize,
    /// Least time between two progress reports of one image.
    pub progress_interval: Duration,
}

impl Config {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<std::path::PathBuf>,
        targets: Targets,
    ) -> Self {
        let mut service = ServiceConfig::new(nats_url, data_dir, targets);
        service.stage.concurrency = 32;
        Config {
            service,
            tag_concurrency: 64,
            progress_interval: Duration::from_secs(2),
        }
    }

    /// How the commit stage runs.
    fn commit_stage(&self) -> Settings {
        Settings {
            concurrency: 2,
            ..self.service.stage.clone()
        }
    }
}

struct Ctx {
    bus: Bus,
    state: StateStore,
    /// For events sent while a job runs (a commit's `image.published`, tag by tag).
    executor: Executor,
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

/// A started publish service: the image stage and the commit stage.
pub struct Publish {
    ctx: Arc<Ctx>,
    runtime: Runtime,
    images: async_nats::jetstream::consumer::PullConsumer,
    commits: async_nats::jetstream::consumer::PullConsumer,
}

impl Publish {
    pub async fn start(config: Config) -> Result<Self> {
        // ring is our one TLS provider; a no-op when the binary installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let service = Box::pin(Service::connect(&config.service, "shipperd-publish")).await?;
        let bus = service.bus;
        let images = bus
            .consumer(&config.service.stage.consumer(
                JOBS_STREAM,
                PUBLISH_CONSUMER,
                PUBLISH_JOB_SUBJECT.into(),
            ))
            .await?;
        let commits = bus
            .consumer(&config.commit_stage().consumer(
                JOBS_STREAM,
                COMMIT_CONSUMER,
                COMMIT_JOB_SUBJECT.into(),
            ))
            .await?;
        let blobs = bus.bucket(BLOBS_BUCKET).await?;
        let mut registries = HashMap::new();
        for t in config.service.targets.iter() {
            let r = Registry::new(t.clone(), blobs.clone())
                .map_err(Error::registry(format!("target {}", t.name)))?;
            registries.insert(t.name.clone(), Arc::new(r));
        }
        Ok(Publish {
            runtime: service.runtime,
            ctx: Arc::new(Ctx {
                bus,
                state: service.state,
                executor: service.executor,
                targets: service.targets,
                registries: std::sync::Mutex::new((0, registries)),
                blobs: blobs.clone(),
                bundles: bundles::Bundles::new(config.service.data_dir.clone()),
                tags: tags::Tags::new(blobs),
                config,
            }),
            images,
            commits,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let ctx = self.ctx;
        Service::follow_targets(&ctx.targets, &shutdown);
        let images = self.runtime.run(
            Arc::new(ImageStage(ctx.clone())),
            self.images,
            ctx.config.service.stage.clone(),
            shutdown.clone(),
        );
        let commits = self.runtime.run(
            Arc::new(commit::CommitStage(ctx.clone())),
            self.commits,
            ctx.config.commit_stage(),
            shutdown,
        );
        tokio::join!(images, commits);
        Ok(())
    }
}

/// Starts and runs the publish service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Publish::start(config).await?.serve(shutdown).await
}

/// A publish job: one image of one bundle, of one generation.
pub struct Job {
    id: BundleId,
    index: u32,
    generation: u32,
    plan: PlanRef,
    source: Reference,
    target: String,
}

/// The stage that pushes one image's content.
struct ImageStage(Arc<Ctx>);

impl Stage for ImageStage {
    type Job = Job;
    type Error = Error;
    const NAME: &'static str = "publish";

    fn decode(&self, msg: &Message) -> Option<Job> {
        let job: v1::PublishJob = prost::Message::decode(msg.payload.as_ref()).ok()?;
        let image = job.image?;
        Some(Job {
            id: BundleId::parse(&job.bundle_id).ok()?,
            index: image.index,
            generation: job.generation,
            plan: PlanRef {
                offset: job.plan_offset,
                len: job.plan_length,
            },
            source: Reference::parse(&image.source).ok()?,
            target: image.target,
        })
    }

    fn span(&self, job: &Job) -> tracing::Span {
        tracing::info_span!("publish", bundle_id = %job.id, image = %job.target)
    }

    async fn handle(&self, job: &Job, attempt: Attempt) -> Result<Done> {
        process(&self.0, job, attempt).await
    }

    async fn give_up(&self, job: &Job, why: GiveUp<Error>) -> Result<Done> {
        let outcome = match &why {
            GiveUp::Error {
                error, attempts, ..
            } => {
                let mut o = ImageOutcome::failed(error.to_string(), error.cause(&job.source));
                o.attempts = *attempts;
                o
            }
            GiveUp::Spent(spent) => {
                let mut o = ImageOutcome::failed(spent.to_string(), spent.cause());
                o.attempts = spent.record.started;
                o
            }
            GiveUp::Panic(_) => ImageOutcome::failed(why.reason(), why.reason()),
        };
        record(&self.0, job, outcome).await
    }
}

async fn process(ctx: &Ctx, job: &Job, attempt: Attempt) -> Result<Done> {
    let Some(s) = ctx.state.summary(&job.id).await? else {
        tracing::error!("job for an unknown bundle; dropping it");
        return Ok(Done::nothing());
    };
    let Some((img, revision)) = ctx.state.image(&job.id, job.index).await? else {
        tracing::error!(
            index = job.index,
            "job for an image the bundle does not have"
        );
        return Ok(Done::nothing());
    };
    if s.deleting || job.generation != s.generation {
        // Deleted, or a job of another generation (a retry started a new one, whose
        // own jobs went out): nothing to do.
        return Ok(Done::nothing());
    }
    if img.is_counted(s.generation) || s.claims.contains_key(&job.index) {
        // Done (or decided) by an earlier delivery: finish what it began, make sure
        // what follows went out (de-duplicated).
        return Ok(
            match finish::resume(&ctx.state, &job.id, job.index).await? {
                Some(f) => done(ctx, f),
                None => Done::nothing(),
            },
        );
    }
    if s.phase != Phase::Publishing {
        return Ok(Done::nothing());
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
    let pushed = push(ctx, &s, &img, job.plan, &progress).await;
    let revision = reporter.stop().await;
    match pushed {
        Ok(stats) => {
            let mut outcome =
                ImageOutcome::published(stats.bytes_total, stats.image_skipped, stats.blobs);
            outcome.attempts = attempt.number;
            record(ctx, job, outcome).await
        }
        Err(e) => {
            // What this attempt got to, for the status; over what this job last wrote
            // only: a concurrent delivery's outcome stands.
            let mut img = img;
            img.error = Some(e.to_string());
            img.attempts = attempt.number;
            img.bytes_done = progress.get().0;
            if let Some(rev) = revision
                && let Err(error) = ctx.state.update_image(&job.id, &img, rev).await
            {
                tracing::debug!(%error, "cannot note the failed attempt");
            }
            Err(e)
        }
    }
}

/// Counts the image's outcome (once, in the job's generation); what follows it.
async fn record(ctx: &Ctx, job: &Job, outcome: ImageOutcome) -> Result<Done> {
    let finished =
        finish::finish_image(&ctx.state, &job.id, job.index, job.generation, &outcome).await?;
    Ok(match finished {
        Some(f) => {
            let how = match (outcome.phase, outcome.skipped) {
                (shipperd_model::ImagePhase::Failed, _) => "failed",
                (_, true) => "skipped",
                _ => "published",
            };
            shipperd_telemetry::metrics::metrics()
                .images
                .get_or_create(&shipperd_telemetry::metrics::label("outcome", how))
                .inc();
            done(ctx, f)
        }
        None => Done::nothing(),
    })
}

/// What follows an image's recorded outcome (its event, the commit, the bundle's end);
/// an ended bundle's opened files are let go.
fn done(ctx: &Ctx, f: finish::Finished) -> Done {
    if f.summary.phase.is_terminal() {
        ctx.bundles.forget(&f.summary.id);
    }
    let effects = f.summary.after_image(&f.image);
    Done::then(f.summary, effects)
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

    // Whose is the tag? Another owner's, or one ShipperD did not set, fails the image
    // before anything is pushed (and so its bundle tags nothing).
    let held = match img.target.tag.as_deref() {
        Some(t) => Some((t, check_tag(ctx, reg, s, img, &repo, t).await?)),
        None => None,
    };
    // Day-2: a bundle set this tag to this digest before, and the registry still has
    // it. One request, and done.
    if let Some((t, held)) = &held
        && held.set_before(&img.digest)
    {
        let t = *t;
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
            // A span per blob, in the image's (and so the bundle's) trace.
            let span = tracing::info_span!("blob", digest = %blob.digest, size = blob.size);
            tracing::Instrument::instrument(
                async move {
                    reg.push_blob(&repo, &blob, absent, bundle, &progress)
                        .await
                        .map_err(Error::registry(format!("blob {} to {repo}", blob.digest)))
                },
                span,
            )
        })
        .buffer_unordered(reg.target().transfer.concurrency);
    futures::pin_mut!(blobs);
    while let Some(outcome) = blobs.next().await {
        let m = shipperd_telemetry::metrics::metrics();
        let how = match outcome? {
            BlobOutcome::Skipped => {
                stats.blobs.present += 1;
                "present"
            }
            BlobOutcome::Mounted => {
                stats.blobs.mounted += 1;
                "mounted"
            }
            BlobOutcome::Pushed(sent) => {
                stats.blobs.uploaded += 1;
                stats.blobs.uploaded_bytes += sent;
                m.bytes_pushed.inc_by(sent);
                "uploaded"
            }
        };
        m.blobs
            .get_or_create(&shipperd_telemetry::metrics::label("how", how))
            .inc();
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

/// May this image's bundle move its tag `repo:t`? Reads the tag's holder: another
/// owner's tag (or another source repository's) is refused unless the target lets an
/// admin take it over; a tag no bundle of ShipperD's holds but the registry has at
/// another digest is refused unless the target allows overwriting it (one `HEAD`).
async fn check_tag(
    ctx: &Ctx,
    reg: &Registry,
    s: &BundleSummary,
    img: &ImageState,
    repo: &str,
    t: &str,
) -> Result<tags::Tag> {
    // The owner must be known: a holder that cannot be read fails this attempt (tried
    // again later).
    let mut held = ctx.tags.read(reg, repo, t).await.read_ok()?;
    let name = format!("{repo}:{t}");
    let policy = reg.target().tags;
    if !held.held() && !policy.overwrite_unowned {
        let now = reg
            .tag_digest(repo, t)
            .await
            .map_err(Error::registry(format!("checking {name}")))?;
        if let Some(d) = now
            && d != img.digest
        {
            // A bundle claims a tag before it pushes it: read the holder again, as
            // another bundle may have claimed and pushed it since the first read.
            held = ctx.tags.read(reg, repo, t).await.read_ok()?;
            if !held.held() {
                return Err(Error::TagOwned(format!(
                    "tag {name} is in {} already (at {d}), set by something other than \
                     ShipperD: not moved (the target's tags.overwrite_unowned lets an \
                     admin move it)",
                    reg.host()
                )));
            }
        }
    }
    if held.held() {
        match held.judge(&tags::Claim::of(s, img), policy, &name) {
            tags::Verdict::Refused(why) => return Err(Error::TagOwned(why)),
            tags::Verdict::TakeOver(from) => tracing::warn!(
                tag = %name,
                from = %from,
                "this bundle will take the tag over (the target's tags.take_over)"
            ),
            tags::Verdict::Free => {}
        }
    }
    Ok(held)
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
