//! The pull loop under every consumer: bounded concurrency, settling, a bounded drain.
//!
//! Replicas bind the same durable consumer and share its messages. Each replica pulls one
//! message at a time and only when it has a free slot, so no message waits (and ages
//! toward its ack deadline) in a local buffer. On shutdown it stops pulling and lets the
//! jobs in hand finish, up to a deadline; then it tells the jobs still running to let go
//! (`abandon`), and a job cut off is redelivered, never lost.

use std::{future::Future, sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What to do with a message once its handler is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (successfully or with a recorded failure): remove it.
    Ack,
    /// Deliver it again after this delay.
    Retry(Duration),
    /// It can never succeed and its failure is recorded: stop delivering it.
    Term,
}

/// Settles a message. A failed ack only means it will be redelivered; handlers are
/// idempotent, so that is logged, not fatal.
pub async fn settle(msg: &Message, outcome: Outcome) {
    let kind = match outcome {
        Outcome::Ack => AckKind::Ack,
        Outcome::Retry(d) => AckKind::Nak(Some(d)),
        Outcome::Term => AckKind::Term,
    };
    if let Err(error) = msg.ack_with(kind).await {
        tracing::warn!(%error, subject = %msg.subject, "could not settle message; it will be redelivered");
    }
}

/// How many times this message has been delivered (1 on the first delivery).
pub fn delivered(msg: &Message) -> i64 {
    msg.info().map(|i| i.delivered).unwrap_or(1)
}

/// The waits after failed pulls: 500 ms doubling to 5 s.
const PULL_RETRY: shipperd_model::Backoff =
    shipperd_model::Backoff::new(Duration::from_millis(500), Duration::from_secs(5));

/// How long jobs in hand may take to finish at shutdown: up to `time`, and no longer
/// once `nats` (the client they record and acknowledge through) is disconnected: a job
/// that ends then can do neither, and is delivered again anyway.
#[derive(Clone)]
pub struct Drain {
    pub time: Duration,
    pub nats: Option<async_nats::Client>,
}

/// How often a drain looks whether NATS is still there.
const DRAIN_LOOK: Duration = Duration::from_millis(250);

/// How long after the drain deadline jobs that were told to let go have to do so.
const ABANDON_GRACE: Duration = Duration::from_secs(3);

/// Pulls messages from `consumer` and hands each to `handle` (with a token that fires
/// when the drain deadline passed and the job should let go), at most `concurrency` at
/// a time, until `shutdown`; then waits up to `drain` for the jobs in hand.
pub async fn run<F, Fut>(
    name: &str,
    consumer: PullConsumer,
    concurrency: usize,
    drain: Drain,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Message, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    let handle = Arc::new(handle);
    // Pulls failed in a row (NATS away): each waits longer, up to 5 s.
    let mut failed = 0;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let pulled = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = consumer.batch().max_messages(1).expires(Duration::from_secs(5)).messages() => b,
        };
        let mut batch = match pulled {
            Ok(b) => {
                failed = 0;
                b
            }
            Err(error) => {
                failed += 1;
                let retry = PULL_RETRY.retry(failed);
                tracing::warn!(%error, worker = name, delay = ?retry.delay(), "pull failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = retry.wait() => continue,
                }
            }
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = batch.next() => m,
        };
        match next {
            None => {} // the pull expired with nothing to do
            Some(Err(error)) => {
                tracing::debug!(%error, worker = name, "pull ended without a message");
            }
            Some(Ok(msg)) => {
                let (handle, abandon) = (handle.clone(), abandon.clone());
                tracker.spawn(async move {
                    handle(msg, abandon).await;
                    drop(permit);
                });
            }
        }
    }
    tracker.close();
    let deadline = tokio::time::Instant::now() + drain.time;
    let gone = || {
        drain
            .nats
            .as_ref()
            .is_some_and(|c| c.connection_state() != async_nats::connection::State::Connected)
    };
    let drained = async {
        loop {
            if gone() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::select! {
                () = tracker.wait() => return true,
                () = shipperd_model::pause(DRAIN_LOOK) => {}
            }
        }
    };
    if !drained.await {
        tracing::warn!(
            worker = name,
            nats_gone = gone(),
            "jobs still running at shutdown; letting go of them (they will be redelivered)"
        );
        abandon.cancel();
        let _ = tokio::time::timeout(ABANDON_GRACE, tracker.wait()).await;
    }
}
