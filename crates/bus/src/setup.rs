//! Connecting to NATS and declaring the streams, KV buckets and durable consumers.
//!
//! Every declaration is idempotent ("get or create"), so any service and any replica can
//! run it at start; designed for nats-server 2.9 (no 2.10-only fields).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    kv,
    stream::{self, RetentionPolicy, StorageType},
};
use bytes::Bytes;

use crate::{
    Error, MessageId, NatsConfig, Result,
    event::{EventKind, event_headers},
    subjects::*,
};

/// A connection to NATS with its JetStream context.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Replicas of the streams and buckets this connection declares.
    replicas: usize,
}

/// A message for the jobs stream: its subject, de-duplication id and body.
#[derive(Debug, Clone)]
pub struct Job {
    pub subject: &'static str,
    pub msg_id: MessageId,
    pub body: Bytes,
}

/// Publishes awaiting their acknowledgement at once, in [`Bus::publish_jobs`].
const PUBLISH_WINDOW: usize = 256;

/// How a durable pull consumer is declared.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    pub filter: String,
    /// How long a delivered message may go without an ack (or progress ack).
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message (-1: never).
    pub max_deliver: i64,
    /// Messages delivered but not yet acked, across all replicas.
    pub max_ack_pending: i64,
    pub deliver_policy: DeliverPolicy,
}

impl Bus {
    /// Connects to one plain server at `url` (e.g. `nats://127.0.0.1:4222`) as `name`.
    pub async fn connect(url: &str, name: &str) -> Result<Self> {
        Self::connect_with(&NatsConfig::new(url), name).await
    }

    /// Connects as `config` says (servers, credentials, TLS, replicas) as `name`.
    pub async fn connect_with(config: &NatsConfig, name: &str) -> Result<Self> {
        let client = config
            .options(name)
            .await?
            .connect(config.servers.as_slice())
            .await
            .map_err(Error::nats(format!(
                "cannot connect to {}",
                config.servers_shown()
            )))?;
        let js = jetstream::new(client.clone());
        Ok(Bus {
            client,
            js,
            replicas: config.replicas,
        })
    }

    /// Is the connection up right now?
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Declares both streams and the KV buckets, each with the configured replicas.
    pub async fn ensure_topology(&self) -> Result<()> {
        let week = Duration::from_secs(7 * 24 * 3600);
        self.stream(stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![EVENTS_SUBJECTS.into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: week,
            duplicate_window: Duration::from_secs(600),
            num_replicas: self.replicas,
            ..Default::default()
        })
        .await?;
        self.stream(stream::Config {
            name: JOBS_STREAM.into(),
            subjects: vec![JOBS_SUBJECTS.into()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            max_age: week,
            duplicate_window: Duration::from_secs(600),
            num_replicas: self.replicas,
            ..Default::default()
        })
        .await?;
        for b in BUCKETS {
            self.stream(self.kv_stream(&b)).await?;
            self.kv(&b).await?;
        }
        Ok(())
    }

    /// Gets or creates a stream; one that exists with other replicas is moved to the
    /// configured count (nats-server 2.10+ can; an older one keeps it, with a warning).
    async fn stream(&self, config: stream::Config) -> Result<()> {
        let name = config.name.clone();
        let want = config.num_replicas;
        // The answer to the create (or the lookup) carries the stream's info already.
        let s = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(Error::nats(format!("declaring stream {name}")))?;
        let have = s.cached_info().config.num_replicas;
        if have != want {
            let mut changed = s.cached_info().config.clone();
            changed.num_replicas = want;
            match self.js.update_stream(changed).await {
                Ok(_) => {
                    tracing::info!(stream = %name, from = have, to = want, "stream replicas changed")
                }
                Err(e) => tracing::warn!(
                    stream = %name, have, want, error = %e,
                    "stream keeps its replicas (the server would not change them)"
                ),
            }
        }
        Ok(())
    }

    /// The backing stream of a KV bucket, shaped as the KV protocol wants it.
    fn kv_stream(&self, b: &Bucket) -> stream::Config {
        stream::Config {
            name: format!("KV_{}", b.name),
            subjects: vec![format!("$KV.{}.>", b.name)],
            max_messages_per_subject: b.history,
            max_age: b.max_age,
            discard: stream::DiscardPolicy::New,
            storage: StorageType::File,
            allow_direct: b.direct,
            allow_rollup: true,
            deny_delete: true,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// Gets (or creates) a KV bucket keeping `history` values per key. With `direct`,
    /// reads may be served by any replica of a clustered bucket (faster, possibly a
    /// moment stale); without it they go to the leader, which compare-and-set loops
    /// that read one key to decide a write to another rely on.
    ///
    /// async-nats' `create_key_value` first reads the account info, whose reply from
    /// nats-server 2.9 lacks fields the client requires (`reserved_memory`), so it fails
    /// there. We declare the bucket's backing stream ourselves ([`Bus::kv_stream`]),
    /// then bind to it.
    pub async fn kv(&self, b: &Bucket) -> Result<kv::Store> {
        let bucket = b.name;
        if let Ok(store) = self.js.get_key_value(bucket).await {
            return Ok(store);
        }
        let what = format!("declaring KV bucket {bucket}");
        self.js
            .get_or_create_stream(self.kv_stream(b))
            .await
            .map_err(Error::nats(what.clone()))?;
        self.js
            .get_key_value(bucket)
            .await
            .map_err(Error::nats(what))
    }

    /// Gets (or creates) a durable pull consumer.
    pub async fn consumer(&self, spec: &ConsumerSpec) -> Result<PullConsumer> {
        let stream = self
            .js
            .get_stream(spec.stream)
            .await
            .map_err(Error::nats(format!("reading stream {}", spec.stream)))?;
        stream
            .get_or_create_consumer(
                &spec.durable,
                pull::Config {
                    durable_name: Some(spec.durable.clone()),
                    filter_subject: spec.filter.clone(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: spec.ack_wait,
                    max_deliver: spec.max_deliver,
                    max_ack_pending: spec.max_ack_pending,
                    deliver_policy: spec.deliver_policy,
                    ..Default::default()
                },
            )
            .await
            .map_err(Error::nats(format!("declaring consumer {}", spec.durable)))
    }

    /// Publishes an event and waits for JetStream to store it (a duplicate within the
    /// window counts as stored). Returns its stream sequence.
    pub async fn publish_event(&self, kind: EventKind, id: &MessageId, body: Bytes) -> Result<u64> {
        let headers = event_headers(kind, id);
        let what = || format!("storing event {id}");
        let ack = self
            .js
            .publish_with_headers(kind.subject(), headers, body)
            .await
            .map_err(Error::nats(what()))?
            .await
            .map_err(Error::nats(what()))?;
        Ok(ack.sequence)
    }

    /// Publishes jobs, each with its de-duplication id, and waits until JetStream has
    /// stored every one. Up to [`PUBLISH_WINDOW`] are in flight at once, so thousands go
    /// out in one round of acknowledgements rather than one round trip each.
    pub async fn publish_jobs(&self, jobs: impl IntoIterator<Item = Job>) -> Result<u64> {
        let mut pending = std::collections::VecDeque::new();
        let mut sent = 0u64;
        let what = |id: &MessageId| format!("storing job {id}");
        for job in jobs {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                job.msg_id.to_string().as_str(),
            );
            crate::trace::inject(&mut headers);
            let ack = self
                .js
                .publish_with_headers(job.subject, headers, job.body)
                .await
                .map_err(Error::nats(what(&job.msg_id)))?;
            pending.push_back((job.msg_id, ack));
            if pending.len() >= PUBLISH_WINDOW
                && let Some((id, first)) = pending.pop_front()
            {
                first.await.map_err(Error::nats(what(&id)))?;
            }
            sent += 1;
        }
        for (id, ack) in pending {
            ack.await.map_err(Error::nats(what(&id)))?;
        }
        Ok(sent)
    }

    /// One of ShipperD's KV buckets ([`BUNDLES_BUCKET`], [`IMAGES_BUCKET`],
    /// [`BLOBS_BUCKET`]), declared as [`Bus::ensure_topology`] does.
    pub async fn bucket(&self, name: &'static str) -> Result<kv::Store> {
        let b = BUCKETS
            .into_iter()
            .find(|b| b.name == name)
            .unwrap_or(Bucket {
                name,
                history: 1,
                direct: true,
                max_age: Duration::ZERO,
            });
        self.kv(&b).await
    }

    /// Messages of a durable consumer not yet delivered or not yet acknowledged: is
    /// there work queued or in hand?
    pub async fn consumer_backlog(&self, stream: &str, durable: &str) -> Result<u64> {
        let what = || format!("reading consumer {durable}");
        let mut consumer: PullConsumer = self
            .js
            .get_stream(stream)
            .await
            .map_err(Error::nats(what()))?
            .get_consumer(durable)
            .await
            .map_err(Error::nats(what()))?;
        let info = consumer.info().await.map_err(Error::nats(what()))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Every durable consumer of ShipperD's streams: its name, messages not yet
    /// delivered and messages delivered but not acknowledged.
    pub async fn consumers(&self) -> Result<Vec<(String, u64, u64)>> {
        use futures::TryStreamExt as _;
        let mut all = Vec::new();
        for name in [EVENTS_STREAM, JOBS_STREAM] {
            let what = || format!("listing the consumers of {name}");
            let stream = self
                .js
                .get_stream(name)
                .await
                .map_err(Error::nats(what()))?;
            let infos: Vec<_> = stream
                .consumers()
                .try_collect()
                .await
                .map_err(Error::nats(what()))?;
            all.extend(infos.into_iter().map(|i| {
                (
                    i.config.durable_name.unwrap_or(i.name),
                    i.num_pending,
                    i.num_ack_pending as u64,
                )
            }));
        }
        Ok(all)
    }
}

/// How a KV bucket is declared.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub name: &'static str,
    /// Values kept per key.
    pub history: i64,
    /// Reads may be served by any replica.
    pub direct: bool,
    /// Values older than this go (zero: kept).
    pub max_age: Duration,
}

/// The KV buckets.
const BUCKETS: [Bucket; 4] = [
    Bucket {
        name: BUNDLES_BUCKET,
        history: 5,
        direct: false,
        max_age: Duration::ZERO,
    },
    Bucket {
        name: IMAGES_BUCKET,
        history: 1,
        direct: false,
        max_age: Duration::ZERO,
    },
    Bucket {
        name: BLOBS_BUCKET,
        history: 1,
        direct: true,
        max_age: Duration::ZERO,
    },
    // A job's attempts matter while it is retried: a week covers any retry schedule.
    Bucket {
        name: ATTEMPTS_BUCKET,
        history: 1,
        direct: false,
        max_age: Duration::from_secs(7 * 24 * 3600),
    },
];
