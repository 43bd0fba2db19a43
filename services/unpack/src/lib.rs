//! unpack: opens each received bundle in place, checks it, and lists its images.
//!
//! For every `bundle.received` it detects the container by magic bytes and opens it:
//! squashfs and plain tar in place, gzip/zstd/xz tar expanded once into the shared
//! content-addressed store. It finds the OCI layouts and registry storage trees inside,
//! walks every named image (multi-arch indexes and referrers included) and checks that
//! every blob is present with the right size and sha256. A bundle that fails a check ends
//! `Failed` with a reason naming the file, image or blob, and no job is published for it.
//! Otherwise the bundle's catalog (where each blob lives) is saved beside it, the record
//! gets its inventory, one publish job per image goes out, then `bundle.unpacked`.

mod inspect;

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{Message, consumer::DeliverPolicy};
use shipperd_bundle::{Limits, cas::Cas};
use shipperd_bus::{
    BundleRecord, Bus, ConsumerSpec, EventKind, ImagePhase, ImageRecord, IncomingEvent, Phase,
    StateStore,
    event::{encode, event_id},
    lifecycle,
    subjects::{EVENTS_STREAM, PUBLISH_JOB_SUBJECT, UNPACK_CONSUMER},
    worker::{self, Outcome},
};
use shipperd_proto::v1;
use shipperd_target::Targets;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use inspect::{Inventory, inspect};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    #[error("invalid registry: {0}")]
    Registry(#[from] shipperd_bundle::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the unpack service.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub data_dir: PathBuf,
    /// Where images land: each bundle's target (or the default one) maps its images'
    /// names.
    pub targets: Targets,
    /// Bundles opened at once by this replica.
    pub concurrency: usize,
    /// Deliveries of one bundle before a read error fails it.
    pub max_deliver: i64,
    /// Bounds on what one bundle may hold.
    pub limits: Limits,
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
            concurrency: 2,
            max_deliver: 5,
            limits: Limits::default(),
        }
    }
}

struct Ctx {
    bus: Bus,
    state: StateStore,
    config: Config,
}

/// A started unpack service: connected, its consumer declared.
pub struct Unpack {
    ctx: Arc<Ctx>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

impl Unpack {
    pub async fn start(config: Config) -> Result<Self> {
        let bus = Bus::connect(&config.nats_url, "shipperd-unpack").await?;
        bus.ensure_topology().await?;
        let consumer = bus
            .consumer(&ConsumerSpec {
                stream: EVENTS_STREAM,
                durable: UNPACK_CONSUMER.into(),
                filter: EventKind::BundleReceived.subject(),
                ack_wait: Duration::from_secs(60),
                max_deliver: config.max_deliver,
                max_ack_pending: 256,
                deliver_policy: DeliverPolicy::All,
            })
            .await?;
        let state = bus.state().await?;
        Ok(Unpack {
            ctx: Arc::new(Ctx { bus, state, config }),
            consumer,
        })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let ctx = self.ctx.clone();
        worker::run(
            "unpack",
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

/// Starts and runs the unpack service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Unpack::start(config).await?.serve(shutdown).await
}

async fn handle(ctx: &Ctx, msg: Message) {
    let event = match IncomingEvent::parse(msg.headers.as_ref(), msg.payload.clone())
        .and_then(|e| e.decode::<v1::BundleReceived>())
    {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(%error, "undecodable bundle.received; dropping it");
            return worker::settle(&msg, Outcome::Term).await;
        }
    };
    let span = tracing::info_span!("unpack", bundle_id = %event.bundle_id, name = %event.name);
    shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
    let outcome = worker::with_progress(&msg, Duration::from_secs(15), unpack(ctx, &msg, &event))
        .instrument(span)
        .await;
    worker::settle(&msg, outcome).await;
}

async fn unpack(ctx: &Ctx, msg: &Message, event: &v1::BundleReceived) -> Outcome {
    match try_unpack(ctx, msg, event).await {
        Ok(o) => o,
        Err(error) => {
            tracing::warn!(%error, "unpack step failed; will retry");
            Outcome::Retry(Duration::from_secs(2))
        }
    }
}

async fn try_unpack(ctx: &Ctx, msg: &Message, event: &v1::BundleReceived) -> Result<Outcome> {
    let id = &event.bundle_id;
    let Some((rec, _)) = ctx.state.get(id).await? else {
        tracing::error!("bundle.received for an unknown bundle; dropping it");
        return Ok(Outcome::Term);
    };
    match rec.phase {
        Phase::Received | Phase::Unpacking => {}
        Phase::Publishing => {
            // Redelivered after the inventory was stored: make sure the jobs and the event
            // went out (both are de-duplicated by id).
            dispatch(ctx, &rec).await?;
            return Ok(Outcome::Ack);
        }
        Phase::Published | Phase::Failed => {
            lifecycle::announce_if_done(&ctx.bus, &ctx.state, &rec).await?;
            return Ok(Outcome::Ack);
        }
    }
    ctx.state
        .update(id, |r| {
            matches!(r.phase, Phase::Received).then(|| r.phase = Phase::Unpacking)
        })
        .await?;

    let (data_dir, rel, name, limits) = (
        ctx.config.data_dir.clone(),
        rec.path.clone(),
        rec.name.clone(),
        ctx.config.limits.clone(),
    );
    let bundle_id = id.clone();
    let inspected =
        tokio::task::spawn_blocking(move || inspect(&data_dir, &rel, &name, &bundle_id, &limits))
            .await
            .expect("inspect does not panic");
    let inventory = match inspected {
        Ok(inv) => inv,
        Err(error)
            if error.kind() == shipperd_bundle::ErrorKind::Io
                && worker::delivered(msg) < ctx.config.max_deliver =>
        {
            tracing::warn!(%error, "cannot read the bundle; will retry");
            return Ok(Outcome::Retry(Duration::from_secs(5)));
        }
        Err(error) => {
            tracing::warn!(%error, "bundle rejected");
            lifecycle::fail_bundle(&ctx.bus, &ctx.state, id, error.to_string()).await?;
            release_blobs(&ctx.config.data_dir, id).await;
            return Ok(Outcome::Term);
        }
    };

    let images = match target_images(&ctx.config.targets, rec.target.as_deref(), &inventory) {
        Ok(images) => images,
        Err(error) => {
            tracing::warn!(%error, "bundle rejected");
            lifecycle::fail_bundle(&ctx.bus, &ctx.state, id, error).await?;
            release_blobs(&ctx.config.data_dir, id).await;
            return Ok(Outcome::Term);
        }
    };
    tracing::info!(
        images = images.len(),
        blobs = inventory.blob_count,
        bytes = inventory.blob_bytes,
        referrers = inventory.referrers,
        "bundle checked"
    );
    let format = inventory.format.to_string();
    let stored = ctx
        .state
        .update(id, |r| {
            (r.phase == Phase::Unpacking).then(|| {
                r.phase = Phase::Publishing;
                r.unpacked_at = Some(shipperd_bus::event::now_rfc3339());
                r.format = Some(format.clone());
                r.images = images.clone();
            })
        })
        .await?;
    if let Some(((), rec)) = stored {
        dispatch(ctx, &rec).await?;
        let body = v1::BundleUnpacked {
            bundle_id: id.clone(),
            name: rec.name.clone(),
            format,
            images: rec.images.iter().map(BundleRecord::image_ref).collect(),
            blob_count: inventory.blob_count,
            blob_bytes: inventory.blob_bytes,
        };
        let eid = event_id(EventKind::BundleUnpacked, id, None);
        ctx.bus
            .publish_event(EventKind::BundleUnpacked, &eid, id, encode(&body))
            .await?;
    }
    Ok(Outcome::Ack)
}

/// Publishes one job per image still pending (de-duplicated by `<bundle>.publish.<index>`).
async fn dispatch(ctx: &Ctx, rec: &BundleRecord) -> Result<()> {
    for img in rec.images.iter().filter(|i| i.phase == ImagePhase::Pending) {
        let job = v1::PublishJob {
            bundle_id: rec.id.clone(),
            bundle_path: rec.path.clone(),
            image: Some(BundleRecord::image_ref(img)),
            target: rec.target.clone().unwrap_or_default(),
        };
        let msg_id = format!("{}.publish.{}", rec.id, img.index);
        ctx.bus
            .publish_job(PUBLISH_JOB_SUBJECT, &msg_id, encode(&job))
            .await?;
    }
    Ok(())
}

/// Where each image of the bundle lands in its target. Refuses an unknown target, a name
/// the mapping cannot make, and two different images landing on one tag (which path
/// flattening can cause).
fn target_images(
    targets: &Targets,
    name: Option<&str>,
    inventory: &Inventory,
) -> Result<Vec<ImageRecord>, String> {
    let target = targets.get(name).map_err(|e| {
        let known: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        format!("{e} (targets: {})", known.join(", "))
    })?;
    let mut landed: std::collections::HashMap<String, (String, &str)> = Default::default();
    let mut images = Vec::with_capacity(inventory.images.len());
    for (i, img) in inventory.images.iter().enumerate() {
        let mapped = target
            .mapping
            .map(&img.source, &target.url.host)
            .map_err(|e| format!("target {}: {e}", target.name))?
            .to_string();
        let digest = img.descriptor.digest.as_str();
        if let Some((other, d)) = landed.get(&mapped)
            && *d != digest
        {
            return Err(format!(
                "{other} and {} would both land at {mapped} (target {}'s path mapping); \
                 change the mapping or the bundle",
                img.source, target.name
            ));
        }
        landed.insert(mapped.clone(), (img.source.to_string(), digest));
        images.push(ImageRecord {
            index: i as u32,
            source: img.source.to_string(),
            target: mapped,
            digest: digest.to_string(),
            media_type: img.descriptor.media_type.clone(),
            size: img.descriptor.size,
            phase: ImagePhase::Pending,
            error: None,
            bytes_total: 0,
            bytes_done: 0,
            skipped: false,
        });
    }
    Ok(images)
}

/// Lets go of the blobs a finished bundle claimed in the content-addressed store, and
/// deletes those no other bundle needs.
pub(crate) async fn release_blobs(data_dir: &std::path::Path, bundle_id: &str) {
    let cas = Cas::new(data_dir);
    let id = bundle_id.to_string();
    let _ = tokio::task::spawn_blocking(move || cas.finish(&id)).await;
}
