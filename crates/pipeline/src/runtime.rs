//! The runtime a [`Stage`] runs on. A stage only decodes its job, does its work and says
//! what should follow ([`Done`]: a summary and its effects); the runtime owns the rest,
//! once for every stage:
//!
//! 1. decode (a message that does not decode is dropped, logged);
//! 2. a span, child of the trace context the message carries;
//! 3. the attempt, counted in the [`Ledger`] *before* the work starts; work whose
//!    attempts are spent is given up at once (its worker died each time), and work
//!    another attempt is running now is left to it;
//! 4. the work, with progress acks and a heartbeat, panics caught;
//! 5. the effects it returned, performed by the one [`Executor`];
//! 6. on an error: given up when retrying cannot help or the attempts are spent (the
//!    stage records why: its image or bundle ends `Failed`), else retried after the
//!    one [`Backoff`];
//! 7. the message settled, the stage's counters updated.

use std::{
    fmt::Display,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    AckKind, Message,
    consumer::{DeliverPolicy, PullConsumer},
};
use futures::FutureExt as _;
use shipperd_bus::{Bus, ConsumerSpec, MessageId, MessageIdError};
use shipperd_model::{Backoff, BundleSummary, Effects, ImageState};
use shipperd_state::Executor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    attempts::{Begin, Ledger, Spent},
    metrics::{self, Ended},
    pull::{self, Outcome},
};

/// May trying again later succeed?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// NATS, the registry or the volume may recover.
    Transient,
    /// Trying again will fail the same way.
    Permanent,
}

/// Errors a stage returns say which [`Class`] they are, by type.
pub trait Classify {
    fn class(&self) -> Class;
}

impl Classify for shipperd_bus::Error {
    fn class(&self) -> Class {
        if self.is_transient() {
            Class::Transient
        } else {
            Class::Permanent
        }
    }
}

/// What a stage's work came to: the bundle as it stored it and what must follow.
#[derive(Debug, Clone, Default)]
pub struct Done {
    pub bundle: Option<BundleSummary>,
    pub effects: Effects,
    /// The bundle's pending images, when the work has them in hand (a dispatch sends
    /// their jobs without reading them back).
    pub pending: Option<Vec<ImageState>>,
}

impl Done {
    /// Nothing follows.
    pub fn nothing() -> Self {
        Done::default()
    }

    /// `effects` follow for bundle `s`.
    pub fn then(s: BundleSummary, effects: Effects) -> Self {
        Done {
            bundle: Some(s),
            effects,
            pending: None,
        }
    }

    pub fn with_pending(mut self, images: Vec<ImageState>) -> Self {
        self.pending = Some(images);
        self
    }
}

/// Why a stage is asked to give up on a job: record the failure, so that its image or
/// bundle ends.
#[derive(Debug)]
pub enum GiveUp<E> {
    /// This attempt's error: retrying cannot help, or (`spent`) this was the last
    /// attempt.
    Error {
        error: E,
        attempts: u32,
        spent: bool,
    },
    /// The work panicked: a bug.
    Panic(String),
    /// The attempts were spent without an error in hand: the worker stopped (killed,
    /// out of memory, its node lost), or an earlier failure could not be recorded.
    Spent(Spent),
}

impl<E: Display> GiveUp<E> {
    /// The full reason.
    pub fn reason(&self) -> String {
        match self {
            GiveUp::Error { error, .. } => error.to_string(),
            GiveUp::Panic(m) => format!("internal error (a bug; please report it): {m}"),
            GiveUp::Spent(s) => s.to_string(),
        }
    }
}

/// The key a delivered job's attempts are counted under: its `Nats-Msg-Id` read back,
/// without the re-drive ([`MessageId::work`]).
fn work_of(msg: &Message) -> Result<String, MessageIdError> {
    let id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str())
        .unwrap_or_default();
    Ok(MessageId::parse(id)?.work())
}

/// The attempt a job's work runs in.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// The message's sequence in its stream (the order of arrival).
    pub stream_sequence: u64,
}

/// A stage of the pipeline.
pub trait Stage: Send + Sync + 'static {
    type Job: Send + Sync;
    type Error: Classify + Display + From<shipperd_bus::Error> + Send;

    /// Its name in logs, metrics and reasons (`unpack`, `publish`, `commit`).
    const NAME: &'static str;

    /// The job a message carries; `None` for one that does not decode (dropped).
    fn decode(&self, msg: &Message) -> Option<Self::Job>;

    fn span(&self, job: &Self::Job) -> tracing::Span;

    /// Does the work.
    fn handle(
        &self,
        job: &Self::Job,
        attempt: Attempt,
    ) -> impl Future<Output = Result<Done, Self::Error>> + Send;

    /// Records that the job failed for good (its image or bundle ends `Failed`).
    fn give_up(
        &self,
        job: &Self::Job,
        why: GiveUp<Self::Error>,
    ) -> impl Future<Output = Result<Done, Self::Error>> + Send;
}

/// How a stage runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Jobs at once in this replica.
    pub concurrency: usize,
    /// Attempts at one job, counting those whose worker stopped.
    pub max_attempts: u32,
    /// How long a delivered message may go without an ack or progress ack; progress
    /// acks and heartbeats go every quarter of it.
    pub ack_wait: Duration,
    /// Delay before attempt n + 1 after attempt n failed.
    pub backoff: Backoff,
    /// How long jobs in hand may take to finish at shutdown.
    pub drain: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency: 2,
            max_attempts: 5,
            ack_wait: Duration::from_secs(60),
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
            drain: Duration::from_secs(30),
        }
    }
}

impl Settings {
    /// A durable pull consumer for a stage run with these settings. JetStream never
    /// gives up on a message by itself (it would drop it silently): the ledger bounds
    /// the attempts and records the failure.
    pub fn consumer(&self, stream: &'static str, durable: &str, filter: String) -> ConsumerSpec {
        ConsumerSpec {
            stream,
            durable: durable.into(),
            filter,
            ack_wait: self.ack_wait,
            max_deliver: -1,
            max_ack_pending: 4096,
            deliver_policy: DeliverPolicy::All,
        }
    }

    fn heartbeat(&self) -> Duration {
        (self.ack_wait / 4).max(Duration::from_millis(100))
    }

    /// A heartbeat younger than this says the attempt is alive. A worker that died
    /// stopped beating at its last progress ack, and its message comes back an
    /// `ack_wait` later: its heartbeat is older than this by then.
    fn alive_window(&self) -> Duration {
        self.ack_wait / 2
    }
}

/// What every stage of a process shares: the bus, the executor, the ledger.
#[derive(Clone)]
pub struct Runtime {
    pub executor: Executor,
    ledger: Ledger,
}

impl Runtime {
    pub async fn new(bus: &Bus, executor: Executor) -> shipperd_bus::Result<Self> {
        Ok(Runtime {
            ledger: Ledger::open(bus).await?,
            executor,
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Runs `stage` on `consumer` until `shutdown`.
    pub async fn run<S: Stage>(
        &self,
        stage: Arc<S>,
        consumer: PullConsumer,
        settings: Settings,
        shutdown: CancellationToken,
    ) {
        metrics::declare(S::NAME);
        tracing::info!(
            stage = S::NAME,
            concurrency = settings.concurrency,
            "stage running"
        );
        let job = Arc::new((self.clone(), stage, settings.clone()));
        let drain = pull::Drain {
            time: settings.drain,
            nats: Some(self.executor.bus().client.clone()),
        };
        pull::run(
            S::NAME,
            consumer,
            settings.concurrency,
            drain,
            shutdown,
            move |msg, abandon| {
                let job = job.clone();
                async move {
                    let (rt, stage, settings) = &*job;
                    let outcome = rt.attempt(stage.as_ref(), settings, &msg, abandon).await;
                    pull::settle(&msg, outcome).await;
                }
            },
        )
        .await;
    }

    async fn attempt<S: Stage>(
        &self,
        stage: &S,
        settings: &Settings,
        msg: &Message,
        abandon: CancellationToken,
    ) -> Outcome {
        let Some(job) = stage.decode(msg) else {
            tracing::error!(stage = S::NAME, subject = %msg.subject, "undecodable job; dropping it");
            return Outcome::Term;
        };
        let span = stage.span(&job);
        shipperd_bus::trace::set_parent(&span, msg.headers.as_ref());
        self.run_job(stage, settings, msg, &job, abandon)
            .instrument(span)
            .await
    }

    async fn run_job<S: Stage>(
        &self,
        stage: &S,
        settings: &Settings,
        msg: &Message,
        job: &S::Job,
        abandon: CancellationToken,
    ) -> Outcome {
        // The work this message asks for, whichever copy was delivered: its attempts are
        // counted under the message's own id, without its re-drive.
        let key = match work_of(msg) {
            Ok(key) => key,
            Err(error) => {
                tracing::error!(stage = S::NAME, %error, "a job without a ShipperD message id; dropping it");
                return Outcome::Term;
            }
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let began = self
            .ledger
            .begin(&key, settings.max_attempts, settings.alive_window(), &token)
            .await;
        let (number, revision) = match began {
            Ok(Begin::Run { number, revision }) => (number, revision),
            Ok(Begin::Busy { holder }) => {
                tracing::info!(
                    holder,
                    "this work is running elsewhere; checking again later"
                );
                metrics::ended(S::NAME, Ended::Busy, Duration::ZERO);
                return Outcome::Retry(settings.alive_window());
            }
            Ok(Begin::Spent(record)) => {
                let spent = Spent {
                    stage: S::NAME,
                    record,
                };
                return self
                    .give_up(
                        stage,
                        settings,
                        job,
                        &key,
                        GiveUp::Spent(spent),
                        Instant::now(),
                    )
                    .await;
            }
            Err(error) => {
                // Not counted, not started: NATS is failing; the message comes back.
                tracing::warn!(%error, "cannot count the attempt; will try again");
                return Outcome::Retry(settings.backoff.delay(1));
            }
        };
        metrics::started(S::NAME);
        let started = Instant::now();
        let attempt = Attempt {
            number,
            stream_sequence: msg.info().map(|i| i.stream_sequence).unwrap_or_default(),
        };
        let work = async {
            match stage.handle(job, attempt).await {
                Ok(done) => self.perform(done).await.map_err(S::Error::from),
                Err(e) => Err(e),
            }
        };
        let work = std::panic::AssertUnwindSafe(work).catch_unwind();
        let result = tokio::select! {
            r = self.beating(msg, &key, revision, settings.heartbeat(), work) => r,
            _ = abandon.cancelled() => {
                if let Err(error) = self.ledger.abandon(&key, &token).await {
                    tracing::debug!(%error, "cannot take back the attempt");
                }
                return Outcome::Retry(Duration::ZERO);
            }
        };
        let error = match result {
            Ok(Ok(())) => {
                self.forget(&key).await;
                metrics::ended(S::NAME, Ended::Succeeded, started.elapsed());
                return Outcome::Ack;
            }
            Ok(Err(error)) => error,
            Err(panic) => {
                let why = GiveUp::Panic(shipperd_model::panic_message(&*panic));
                tracing::error!(reason = %why.reason(), "the work panicked");
                return self.give_up(stage, settings, job, &key, why, started).await;
            }
        };
        let spent = number >= settings.max_attempts;
        if error.class() == Class::Permanent || spent {
            let why = GiveUp::Error {
                error,
                attempts: number,
                spent,
            };
            return self.give_up(stage, settings, job, &key, why, started).await;
        }
        let delay = settings.backoff.delay(number);
        tracing::warn!(%error, attempt = number, ?delay, "attempt failed; will retry");
        if let Err(e) = self.ledger.failed(&key, &error.to_string()).await {
            tracing::debug!(error = %e, "cannot note the failed attempt");
        }
        metrics::ended(S::NAME, Ended::Retried, started.elapsed());
        Outcome::Retry(delay)
    }

    /// Records the job's failure through the stage; `Term` once recorded.
    async fn give_up<S: Stage>(
        &self,
        stage: &S,
        settings: &Settings,
        job: &S::Job,
        key: &str,
        why: GiveUp<S::Error>,
        started: Instant,
    ) -> Outcome {
        let reason = why.reason();
        tracing::warn!(%reason, "giving up");
        let recorded = match stage.give_up(job, why).await {
            Ok(done) => self.perform(done).await.map_err(S::Error::from),
            Err(e) => Err(e),
        };
        match recorded {
            Ok(()) => {
                self.forget(key).await;
                metrics::ended(S::NAME, Ended::Failed, started.elapsed());
                Outcome::Term
            }
            Err(error) if error.class() == Class::Transient => {
                // The ledger still says the attempts are spent: the next delivery comes
                // straight back here.
                tracing::warn!(%error, "cannot record the failure; will try again");
                Outcome::Retry(settings.backoff.delay(1))
            }
            Err(error) => {
                tracing::error!(%error, %reason, "cannot record the failure, ever; dropping the job");
                Outcome::Term
            }
        }
    }

    async fn perform(&self, done: Done) -> shipperd_bus::Result<()> {
        if let Some(s) = &done.bundle {
            self.executor
                .perform_with(s, &done.effects, done.pending.as_deref())
                .await?;
        }
        Ok(())
    }

    async fn forget(&self, key: &str) {
        if let Err(error) = self.ledger.finish(key).await {
            tracing::debug!(%error, key, "cannot remove the attempts record");
        }
    }

    /// Runs `work`, telling JetStream (progress ack) and the ledger (heartbeat) every
    /// `every` that it is alive, from a task of their own so the work is never held up.
    async fn beating<T>(
        &self,
        msg: &Message,
        key: &str,
        revision: u64,
        every: Duration,
        work: impl Future<Output = T>,
    ) -> T {
        let (msg, ledger, key) = (msg.clone(), self.ledger.clone(), key.to_string());
        let beat = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut revision = Some(revision);
            loop {
                tick.tick().await;
                if let Err(error) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress ack failed");
                }
                if let Some(rev) = revision {
                    revision = match ledger.heartbeat(&key, rev).await {
                        Ok(r) => r,
                        Err(error) => {
                            tracing::debug!(%error, "heartbeat failed");
                            Some(rev)
                        }
                    };
                }
            }
        });
        let _stop = AbortOnDrop(beat);
        work.await
    }
}

/// Stops a task when dropped (the work ended, or was let go of).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
