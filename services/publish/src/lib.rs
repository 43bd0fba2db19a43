//! publish: pushes every image of a bundle, byte for byte, into its target registry.
//!
//! One job per image (from the `SHIPPERD_JOBS` work queue; replicas share the durable
//! consumer `publish`). For an image: if its tag already points at its digest, nothing
//! more (Day-2). Else blobs, several at once (skipped when the repository has them,
//! mounted when another repository of the registry has them, else streamed straight
//! out of the bundle, in resumable chunks when large), then manifests children-first,
//! the index by digest, and the tag last: an image that fails part-way is never
//! tagged. The outcome goes into the bundle's record by compare-and-set; the worker
//! that finishes the last image announces the bundle.

mod progress;
mod registry;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{Message, consumer::DeliverPolicy};
use futures::StreamExt as _;
use shipperd_bundle::{Catalog, Descriptor, Limits, Reference, Walker, cas::Cas};
use shipperd_bus::{
    BundleRecord, Bus, ConsumerSpec, EventKind, ImagePhase, ImageRecord, StateStore,
    event::{encode, event_id},
    lifecycle,
    subjects::{BLOBS_BUCKET, JOBS_STREAM, PUBLISH_CONSUMER, PUBLISH_JOB_SUBJECT},
    worker::{self, Outcome},
};
use shipperd_proto::v1;
use shipperd_target::Targets;
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
    Target(#[from] shipperd_target::Error),
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: RegistryError,
    },
}

impl Error {
    fn registry(what: impl Into<String>) -> impl FnOnce(RegistryError) -> Self {
        let what = what.into();
        move |source| Error::Registry { what, source }
    }

    /// Could trying again later succeed? (The registry or NATS may recover; a broken
    /// bundle or an unknown target will not.)
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Bus(e) => e.kind() != shipperd_bus::ErrorKind::Permanent,
            Error::Bundle(e) => e.kind() == shipperd_bundle::ErrorKind::Io,
            Error::Target(_) => false,
            Error::Registry { source, .. } => source.is_transient(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the publish service.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub data_dir: PathBuf,
    /// Where images go: named registries, their credentials, trust and path mapping.
    pub targets: Targets,
    /// Images pushed at once by this replica.
    pub concurrency: usize,
    /// Deliveries of one image job before a registry error fails the image.
    pub max_deliver: i64,
    /// First retry delay of a job; doubles per delivery, up to a minute.
    pub retry_base: Duration,
    /// Largest manifest read from a bundle (as unpack's limit).
    pub max_manifest_bytes: u64,
    /// Least time between two progress reports of one image.
    pub progress_interval: Duration,
}

impl Config {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        targets: Targets,
    ) -> Self {
        Config {
            nats_url: nats_url.into(),
            data_dir: data_dir.into(),
            targets,
            concurrency: 16,
            max_deliver: 5,
            retry_base: Duration::from_secs(2),
            max_manifest_bytes: Limits::default().max_manifest_bytes,
            progress_interval: Duration::from_secs(2),
        }
    }
}

struct Ctx {
    bus: Bus,
    state: StateStore,
    /// One client per target, by name.
    registries: HashMap<String, Arc<Registry>>,
    config: Config,
}

impl Ctx {
    fn registry(&self, name: &str) -> Result<&Arc<Registry>> {
        let t = self.config.targets.get(Some(name))?;
        Ok(&self.registries[&t.name])
    }
}

/// Counts of what one image's push did.
#[derive(Debug, Default, Clone)]
struct Stats {
    pushed: u32,
    mounted: u32,
    skipped: u32,
    bytes: u64,
    /// The tag was already at this digest: nothing pushed.
    image_skipped: bool,
    target: String,
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
                max_deliver: config.max_deliver,
                max_ack_pending: 1024,
                deliver_policy: DeliverPolicy::All,
            })
            .await?;
        let blobs = bus.kv(BLOBS_BUCKET, 1).await?;
        let mut registries = HashMap::new();
        for t in config.targets.iter() {
            let r = Registry::new(t.clone(), blobs.clone())
                .map_err(Error::registry(format!("target {}", t.name)))?;
            registries.insert(t.name.clone(), Arc::new(r));
        }
        let state = bus.state().await?;
        Ok(Publish {
            ctx: Arc::new(Ctx {
                bus,
                state,
                registries,
                config,
            }),
            consumer,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let ctx = self.ctx.clone();
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

async fn handle(ctx: &Ctx, msg: Message) {
    let job = match decode_job(&msg.payload) {
        Some(j) => j,
        None => {
            tracing::error!("undecodable publish job; dropping it");
            return worker::settle(&msg, Outcome::Term).await;
        }
    };
    let image = job.image.clone().unwrap_or_default();
    let span = tracing::info_span!("publish", bundle_id = %job.bundle_id, image = %image.target);
    shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
    let outcome = async {
        match process(ctx, &msg, &job, &image).await {
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

/// A job we can act on: it decodes and names an image.
fn decode_job(b: &[u8]) -> Option<v1::PublishJob> {
    prost::Message::decode(b)
        .ok()
        .filter(|j: &v1::PublishJob| j.image.is_some())
}

async fn process(
    ctx: &Ctx,
    msg: &Message,
    job: &v1::PublishJob,
    image: &v1::ImageRef,
) -> Result<Outcome> {
    let Some((rec, _)) = ctx.state.get(&job.bundle_id).await? else {
        tracing::error!("job for an unknown bundle; dropping it");
        return Ok(Outcome::Term);
    };
    match rec.image(image.index) {
        None => {
            tracing::error!(
                index = image.index,
                "job for an image the bundle does not list"
            );
            return Ok(Outcome::Term);
        }
        Some(img) if img.phase != ImagePhase::Pending => {
            // Done by an earlier delivery: make sure its events went out (de-duplicated).
            announce_image(ctx, &rec, img, None).await?;
            lifecycle::announce_if_done(&ctx.bus, &ctx.state, &rec).await?;
            return Ok(Outcome::Ack);
        }
        Some(_) => {}
    }
    let progress = Progress::default();
    let reporter = progress::Reporter::start(
        ctx.bus.clone(),
        ctx.state.clone(),
        job.bundle_id.clone(),
        image.clone(),
        progress.clone(),
        ctx.config.progress_interval,
    );
    let pushed = worker::with_progress(
        msg,
        Duration::from_secs(15),
        push_image(ctx, job, image, &progress),
    )
    .await;
    drop(reporter);
    let (error, stats) = match pushed {
        Ok(stats) => (None, Some(stats)),
        Err(e) if e.is_transient() && worker::delivered(msg) < ctx.config.max_deliver => {
            let n = worker::delivered(msg).clamp(1, 6) as u32;
            let delay = (ctx.config.retry_base * 2u32.pow(n - 1)).min(Duration::from_secs(60));
            tracing::warn!(error = %e, ?delay, "image push failed; will retry");
            return Ok(Outcome::Retry(delay));
        }
        Err(e) => {
            tracing::warn!(error = %e, "image failed");
            (Some(e.to_string()), None)
        }
    };
    let index = image.index;
    let (done, total) = progress.get();
    let updated = ctx
        .state
        .update(&job.bundle_id, |r| {
            (r.image(index)?.phase == ImagePhase::Pending).then(|| {
                if let Some(s) = &stats {
                    r.set_progress(index, s.bytes_total, s.bytes_total);
                } else {
                    r.set_progress(index, done, total);
                }
                if let Some(img) = r.images.iter_mut().find(|i| i.index == index) {
                    img.skipped = stats.as_ref().is_some_and(|s| s.image_skipped);
                }
                r.finish_image(index, error.clone())
            })
        })
        .await?;
    let rec = match updated {
        Some((_, rec)) => rec,
        None => ctx
            .state
            .get(&job.bundle_id)
            .await?
            .map(|(r, _)| r)
            .unwrap_or(rec),
    };
    if let Some(img) = rec.image(index) {
        announce_image(ctx, &rec, img, stats).await?;
    }
    lifecycle::announce_if_done(&ctx.bus, &ctx.state, &rec).await?;
    if let Some((done, _)) = ctx.state.get(&job.bundle_id).await?
        && done.phase.is_terminal()
    {
        release_blobs(&ctx.config.data_dir, &job.bundle_id).await;
    }
    Ok(Outcome::Ack)
}

/// Lets go of the blobs a finished bundle claimed in the content-addressed store, and
/// deletes those no other bundle needs.
pub(crate) async fn release_blobs(data_dir: &std::path::Path, bundle_id: &str) {
    let cas = Cas::new(data_dir);
    let id = bundle_id.to_string();
    let _ = tokio::task::spawn_blocking(move || cas.finish(&id)).await;
}

async fn announce_image(
    ctx: &Ctx,
    rec: &BundleRecord,
    img: &ImageRecord,
    stats: Option<Stats>,
) -> Result<()> {
    let image = Some(BundleRecord::image_ref(img));
    let (kind, body) = match img.phase {
        ImagePhase::Pending => return Ok(()),
        ImagePhase::Published => {
            let s = stats.unwrap_or_default();
            let body = v1::ImagePublished {
                bundle_id: rec.id.clone(),
                image,
                blobs_pushed: s.pushed,
                blobs_mounted: s.mounted,
                blobs_skipped: s.skipped,
                bytes_pushed: s.bytes,
                skipped: s.image_skipped || img.skipped,
                target_name: s.target,
            };
            (EventKind::ImagePublished, encode(&body))
        }
        ImagePhase::Failed => {
            let body = v1::ImageFailed {
                bundle_id: rec.id.clone(),
                image,
                error: img.error.clone().unwrap_or_default(),
            };
            (EventKind::ImageFailed, encode(&body))
        }
    };
    let id = event_id(kind, &rec.id, Some(img.index));
    ctx.bus.publish_event(kind, &id, &rec.id, body).await?;
    Ok(())
}

/// Pushes one image: blobs, then manifests children-first, then the tag; or nothing
/// when the tag is already at the image's digest.
async fn push_image(
    ctx: &Ctx,
    job: &v1::PublishJob,
    image: &v1::ImageRef,
    progress: &Progress,
) -> Result<Stats> {
    let reg = ctx.registry(&job.target)?;
    let target = Reference::parse(&image.target)?;
    let repo = target.repository.clone();
    let top = Descriptor {
        media_type: image.media_type.clone(),
        digest: image.digest.clone(),
        size: image.size,
        ..Default::default()
    };
    let data_dir = ctx.config.data_dir.clone();
    let path = data_dir.join(&job.bundle_path);
    let source = image.source.clone();
    let limits = Limits {
        max_manifest_bytes: ctx.config.max_manifest_bytes,
        ..Limits::default()
    };
    let (bundle, plan) = tokio::task::spawn_blocking(move || -> Result<_> {
        let blobs = Arc::new(Catalog::load(&Catalog::path_for(&path))?.open(&data_dir)?);
        let referrers = |d: &str| blobs.referrers(d).to_vec();
        let plan = Walker::new(blobs.as_ref(), &limits).plan(&source, &top, &referrers)?;
        Ok((blobs, plan))
    })
    .await
    .expect("opening a bundle does not panic")?;
    let manifest_bytes: u64 = plan
        .manifests
        .iter()
        .map(|(_, b)| b.len() as u64)
        .sum::<u64>()
        + plan
            .referrers
            .iter()
            .map(|(_, _, b)| b.len() as u64)
            .sum::<u64>();
    let total = plan.blobs.iter().map(|b| b.size).sum::<u64>() + manifest_bytes;
    progress.set_total(total);
    let mut stats = Stats {
        target: reg.target().name.clone(),
        bytes_total: total,
        ..Stats::default()
    };

    // Day-2: the tag already points at this image. One request, and done.
    if let Some(tag) = target.tag.as_deref() {
        let now = reg
            .tag_digest(&repo, tag)
            .await
            .map_err(Error::registry(format!("checking {repo}:{tag}")))?;
        if now.as_deref() == Some(image.digest.as_str()) {
            push_referrers(reg, &repo, &plan).await?;
            progress.add(total);
            stats.image_skipped = true;
            stats.skipped = plan.blobs.len() as u32;
            tracing::info!("tag already at this digest; skipped");
            return Ok(stats);
        }
    }

    let blobs = futures::stream::iter(plan.blobs.clone())
        .map(|blob| {
            let (bundle, repo, reg, progress) =
                (bundle.clone(), repo.clone(), reg.clone(), progress.clone());
            async move {
                reg.push_blob(&repo, &blob, bundle, &progress)
                    .await
                    .map_err(Error::registry(format!("blob {} to {repo}", blob.digest)))
            }
        })
        .buffer_unordered(reg.target().transfer.concurrency);
    futures::pin_mut!(blobs);
    while let Some(outcome) = blobs.next().await {
        match outcome? {
            BlobOutcome::Skipped => stats.skipped += 1,
            BlobOutcome::Mounted => stats.mounted += 1,
            BlobOutcome::Pushed(sent) => {
                stats.pushed += 1;
                stats.bytes += sent;
            }
        }
    }
    // Children before their index; everything by digest, so nothing is tagged yet.
    for (desc, bytes) in &plan.manifests {
        reg.push_manifest(&repo, &desc.digest, bytes, &desc.media_type)
            .await
            .map_err(Error::registry(format!(
                "manifest {} to {repo}",
                desc.digest
            )))?;
        progress.add(bytes.len() as u64);
    }
    if let (Some(tag), Some((desc, bytes))) = (target.tag.as_deref(), plan.manifests.last()) {
        reg.push_manifest(&repo, tag, bytes, &desc.media_type)
            .await
            .map_err(Error::registry(format!("tag {repo}:{tag}")))?;
    }
    push_referrers(reg, &repo, &plan).await?;
    tracing::info!(
        pushed = stats.pushed,
        mounted = stats.mounted,
        skipped = stats.skipped,
        bytes = stats.bytes,
        referrers = plan.referrers.len(),
        "image published"
    );
    Ok(stats)
}

/// Pushes the image's referrers by digest (their blobs went up with the image's), then,
/// where the registry has no referrers API, lists them under the fallback tag
/// `sha256-<subject hex>` (OCI distribution spec 1.1, "referrers tag schema").
async fn push_referrers(
    reg: &Registry,
    repo: &str,
    plan: &shipperd_bundle::ImagePlan,
) -> Result<()> {
    if plan.referrers.is_empty() {
        return Ok(());
    }
    let mut by_subject: std::collections::BTreeMap<&str, Vec<Descriptor>> = Default::default();
    for (subject, desc, bytes) in &plan.referrers {
        reg.push_manifest(repo, &desc.digest, bytes, &desc.media_type)
            .await
            .map_err(Error::registry(format!(
                "referrer {} to {repo}",
                desc.digest
            )))?;
        if let Some(s) = subject {
            by_subject.entry(s.as_str()).or_default().push(desc.clone());
        }
    }
    for (subject, referrers) in by_subject {
        reg.update_referrers_tag(repo, subject, &referrers)
            .await
            .map_err(Error::registry(format!("referrers of {subject} in {repo}")))?;
    }
    Ok(())
}
