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

use async_nats::jetstream::{Message, consumer::DeliverPolicy};
use futures::FutureExt as _;
use shipperd_bundle::{Limits, cas::Cas};
use shipperd_bus::{
    Bus, ConsumerSpec, EventKind, IncomingEvent,
    event::encode,
    subjects::{EVENTS_STREAM, UNPACK_CONSUMER},
    worker::{self, Outcome},
};
use shipperd_model::{
    BundleId, BundleSummary, DataDir, ImagePhase, ImageState, Phase, Reference, state::Unpacked,
};
use shipperd_proto::v1;
use shipperd_registry_targets::{LiveTargets, Targets};
use shipperd_state::{StateStore, dispatch, lifecycle};
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
    pub data_dir: DataDir,
    /// Where images land: each bundle's target (or the default one) maps its images'
    /// names.
    pub targets: Targets,
    /// The file `targets` came from: read again when it changes.
    pub targets_file: Option<std::path::PathBuf>,
    /// Bundles opened at once by this replica.
    pub concurrency: usize,
    /// Attempts at one bundle before a read error (or a result that cannot be recorded)
    /// fails it.
    pub max_deliver: i64,
    /// Bounds on what one bundle may hold.
    pub limits: Limits,
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
            concurrency: 2,
            max_deliver: 5,
            limits: Limits::default(),
        }
    }
}

/// Deliveries the server makes beyond `max_deliver`: room to record a failure after the
/// last attempt (the janitor re-announces a bundle the server gave up on).
const RECORD_SLACK: i64 = 10;

struct Ctx {
    bus: Bus,
    state: StateStore,
    /// The targets now (following `config.targets_file`).
    targets: LiveTargets,
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
                max_deliver: config.max_deliver + RECORD_SLACK,
                max_ack_pending: 256,
                deliver_policy: DeliverPolicy::All,
            })
            .await?;
        let state = StateStore::open(&bus).await?;
        Ok(Unpack {
            ctx: Arc::new(Ctx {
                bus,
                state,
                targets: LiveTargets::new(config.targets.clone(), config.targets_file.clone()),
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
    let event = IncomingEvent::parse(msg.headers.as_ref(), msg.payload.clone())
        .and_then(|e| e.decode::<v1::BundleReceived>());
    let (event, id) = match event.map(|e| (BundleId::parse(&e.bundle_id), e)) {
        Ok((Ok(id), e)) => (e, id),
        _ => {
            tracing::error!("undecodable bundle.received; dropping it");
            return worker::settle(&msg, Outcome::Term).await;
        }
    };
    let span = tracing::info_span!("unpack", bundle_id = %id, name = %event.name);
    shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
    let work = std::panic::AssertUnwindSafe(unpack(ctx, &msg, &id)).catch_unwind();
    let outcome = async {
        match worker::with_progress(&msg, Duration::from_secs(15), work).await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let error = format!(
                    "internal error while unpacking (a bug; please report it): {}",
                    worker::panic_message(&*panic)
                );
                tracing::error!(%error, "unpack panicked");
                fail(ctx, &id, error, Outcome::Term).await
            }
        }
    }
    .instrument(span)
    .await;
    worker::settle(&msg, outcome).await;
}

async fn unpack(ctx: &Ctx, msg: &Message, id: &BundleId) -> Outcome {
    match try_unpack(ctx, msg, id).await {
        Ok(o) => o,
        Err(error) if worker::delivered(msg) >= ctx.config.max_deliver => {
            let error = format!(
                "unpack gave up after {} attempts: {error}",
                worker::delivered(msg)
            );
            tracing::warn!(%error, "unpack step failed for the last time");
            fail(ctx, id, error, Outcome::Retry(Duration::from_secs(5))).await
        }
        Err(error) => {
            tracing::warn!(%error, "unpack step failed; will retry");
            Outcome::Retry(Duration::from_secs(2))
        }
    }
}

/// Fails the bundle with `error` and lets go of its blobs; `Term` once recorded, else
/// `otherwise` (to try recording it again).
async fn fail(ctx: &Ctx, id: &BundleId, error: String, otherwise: Outcome) -> Outcome {
    match lifecycle::fail_bundle(&ctx.bus, &ctx.state, id, error).await {
        Ok(_) => {
            release_blobs(&ctx.config.data_dir, id).await;
            Outcome::Term
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the bundle's failure; will retry");
            otherwise
        }
    }
}

async fn try_unpack(ctx: &Ctx, msg: &Message, id: &BundleId) -> Result<Outcome> {
    let Some(s) = ctx.state.summary(id).await? else {
        tracing::error!("bundle.received for an unknown bundle; dropping it");
        return Ok(Outcome::Term);
    };
    if s.deleting {
        return Ok(Outcome::Term);
    }
    match s.phase {
        Phase::Received | Phase::Unpacking => {}
        Phase::Publishing => {
            // Redelivered after the images were stored: make sure the jobs and the
            // event went out (both are de-duplicated by id).
            dispatch::dispatch_uncounted(&ctx.bus, &ctx.state, &s).await?;
            announce_unpacked(ctx, &s).await?;
            return Ok(Outcome::Ack);
        }
        Phase::Tagging => {
            dispatch::commit(&ctx.bus, &s).await?;
            return Ok(Outcome::Ack);
        }
        Phase::Published | Phase::Failed => {
            lifecycle::announce_if_done(&ctx.bus, &ctx.state, &s).await?;
            return Ok(Outcome::Ack);
        }
    }
    // The order bundles arrived in: the stream sequence of their first bundle.received.
    let order = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    ctx.state
        .update(id, |r| r.start_unpacking(order).then_some(()))
        .await?;

    let (data, rel, name, limits, bundle) = (
        ctx.config.data_dir.clone(),
        s.path.clone(),
        s.name.clone(),
        ctx.config.limits.clone(),
        id.clone(),
    );
    let inspected =
        tokio::task::spawn_blocking(move || inspect(&data, &bundle, &rel, &name, &limits)).await;
    let inventory = match inspected {
        Ok(Ok(inv)) => inv,
        Ok(Err(error))
            if error.kind() == shipperd_bundle::ErrorKind::Io
                && worker::delivered(msg) < ctx.config.max_deliver =>
        {
            tracing::warn!(%error, "cannot read the bundle; will retry");
            return Ok(Outcome::Retry(Duration::from_secs(5)));
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "bundle rejected");
            return Ok(fail(
                ctx,
                id,
                error.to_string(),
                Outcome::Retry(Duration::from_secs(5)),
            )
            .await);
        }
        Err(join) => {
            let error = format!(
                "internal error while reading the bundle (a bug; please report it): {}",
                join.try_into_panic()
                    .map(|p| worker::panic_message(&*p))
                    .unwrap_or_else(|_| "the reader was cancelled".into())
            );
            tracing::error!(%error, "bundle reader panicked");
            return Ok(fail(ctx, id, error, Outcome::Retry(Duration::from_secs(5))).await);
        }
    };

    let (target, images) = match target_images(&ctx.targets.get(), &s, &inventory) {
        Ok(t) => t,
        Err(error) => {
            tracing::warn!(%error, "bundle rejected");
            return Ok(fail(ctx, id, error, Outcome::Retry(Duration::from_secs(5))).await);
        }
    };
    tracing::info!(
        images = images.len(),
        blobs = inventory.blob_count,
        absent = inventory.absent,
        bytes = inventory.blob_bytes,
        referrers = inventory.referrers,
        "bundle checked"
    );
    ctx.state.put_pending_images(id, &images).await?;
    let unpacked = Unpacked {
        format: inventory.format.to_string(),
        images: images.len() as u32,
        blobs: inventory.blob_count,
        blob_bytes: inventory.blob_bytes,
        absent: inventory.absent,
        bytes_total: images.iter().map(|i| i.bytes_total).sum(),
        target: Some(target),
    };
    let stored = ctx
        .state
        .update(id, |r| r.unpacked(&unpacked).then_some(()))
        .await?;
    if let Some(((), s)) = stored {
        dispatch::dispatch(&ctx.bus, &s, &images).await?;
        announce_unpacked(ctx, &s).await?;
        // A bundle without images is published at once.
        lifecycle::announce_if_done(&ctx.bus, &ctx.state, &s).await?;
    }
    Ok(Outcome::Ack)
}

async fn announce_unpacked(ctx: &Ctx, s: &BundleSummary) -> Result<()> {
    let body = v1::BundleUnpacked {
        bundle_id: s.id.to_string(),
        name: s.name.clone(),
        format: s.format.clone().unwrap_or_default(),
        blob_count: s.blobs,
        blob_bytes: s.blob_bytes,
        image_count: s.counts.total,
        bytes_total: s.bytes_total,
        blobs_absent: s.blobs_absent,
    };
    let eid = lifecycle::bundle_event_id(EventKind::BundleUnpacked, s);
    ctx.bus
        .publish_event(EventKind::BundleUnpacked, &eid, &s.id, encode(&body))
        .await?;
    Ok(())
}

/// Where each image of the bundle lands in its target, as pending image states.
/// Refuses an unknown target, a name the mapping cannot make, and two different images
/// landing on one tag (which path flattening can cause).
fn target_images(
    targets: &Targets,
    s: &BundleSummary,
    inventory: &Inventory,
) -> Result<(shipperd_model::TargetName, Vec<ImageState>), String> {
    let target = targets.get(s.target.as_ref()).map_err(|e| {
        let known: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        format!("{e} (targets: {})", known.join(", "))
    })?;
    let mut landed: std::collections::HashMap<Reference, (&Reference, &shipperd_model::Digest)> =
        Default::default();
    let mut images = Vec::with_capacity(inventory.images.len());
    for (i, img) in inventory.images.iter().enumerate() {
        let mapped = target
            .mapping
            .map(&img.source, &target.url.host)
            .map_err(|e| format!("target {}: {e}", target.name))?;
        let digest = &img.digest;
        if let Some((other, d)) = landed.get(&mapped)
            && *d != digest
        {
            return Err(format!(
                "{other} and {} would both land at {mapped} (target {}'s path mapping); \
                 change the mapping or the bundle",
                img.source, target.name
            ));
        }
        landed.insert(mapped.clone(), (&img.source, digest));
        images.push(ImageState {
            index: i as u32,
            source: img.source.clone(),
            target: mapped,
            digest: digest.clone(),
            media_type: img.media_type.clone(),
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
        });
    }
    Ok((target.name.clone(), images))
}

/// Lets go of the blobs a finished bundle claimed in the content-addressed store, and
/// deletes those no other bundle needs.
pub async fn release_blobs(data: &DataDir, id: &BundleId) {
    let cas = Cas::new(data);
    let id = id.to_string();
    let _ = tokio::task::spawn_blocking(move || cas.finish(&id)).await;
}
