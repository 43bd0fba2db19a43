//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one acts.
//!
//! A replica holds the lease while it renews it within `lease_duration`; every write is
//! conditional on the `resourceVersion` it read, so two replicas racing for a free or
//! expired lease cannot both win (the loser's write is refused with 409). A replica
//! that fails to renew stops acting before its lease can have expired for the others
//! (it gives up after `renew_deadline`, shorter than the lease), and one that stops
//! gracefully hands the lease back at once.
//!
//! Whether a lease expired is judged on this replica's own monotonic clock, never by
//! comparing the lease's `renewTime` with the local time (as client-go does): a lease
//! is expired when its record (`resourceVersion`) has not changed for its
//! `leaseDurationSeconds` since this replica first saw it so. A holder whose clock is
//! hours off keeps its lease as long as it renews; a lease seen for the first time is
//! waited on for one duration before it is taken.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio_util::sync::CancellationToken;

/// How a replica holds the lease.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Lease's name (in the API's namespace).
    pub name: String,
    /// This replica (the pod's name, by default).
    pub identity: String,
    /// How long a lease not renewed stays with its holder.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops acting (< `lease_duration`).
    pub renew_deadline: Duration,
    /// How often the lease is renewed, or tried for.
    pub retry_period: Duration,
}

impl Settings {
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Settings {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One replica's view of the lease.
pub struct Elector {
    api: Api<Lease>,
    settings: Settings,
    /// The lease record last seen (its `resourceVersion`) and when, on this clock.
    observed: std::sync::Mutex<Option<(String, tokio::time::Instant)>>,
}

impl Elector {
    pub fn new(api: Api<Lease>, settings: Settings) -> Self {
        Elector {
            api,
            settings,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// How long the lease's record has stood unchanged, as this replica saw it.
    fn unchanged_for(&self, version: &str) -> Duration {
        let mut seen = self.observed.lock().expect("not poisoned");
        match seen.as_ref() {
            Some((v, at)) if v == version => at.elapsed(),
            _ => {
                *seen = Some((version.to_string(), tokio::time::Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Takes the lease when it is free, expired or ours, and renews it; whether this
    /// replica holds it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = &self.settings.identity;
        let duration = self.settings.lease_duration.as_secs().max(1) as i32;
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(me.as_str());
        let held =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(0) as u64);
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        // Never "now - renewTime": the holder's clock is not ours.
        let expired = spec.renew_time.is_none() || self.unchanged_for(&version) > held;
        if !(mine || holder.is_none() || expired) {
            return Ok(false);
        }
        let mut next = lease;
        let s = next.spec.get_or_insert_with(LeaseSpec::default);
        if !mine {
            s.acquire_time = Some(MicroTime(now));
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.holder_identity = Some(me.clone());
        s.lease_duration_seconds = Some(duration);
        s.renew_time = Some(MicroTime(now));
        // Conditional on the resourceVersion read: of two racing replicas, one wins.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Hands the lease back if this replica holds it (a graceful stop).
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(s) = lease.spec.as_mut() else {
            return Ok(());
        };
        if s.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        s.holder_identity = None;
        s.renew_time = None;
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs `work` while this replica leads, until `shutdown`: it starts when the lease
    /// is won and is cancelled (its token) when the lease cannot be renewed within
    /// `renew_deadline`; then the replica tries for the lease again.
    pub async fn run<F, Fut>(&self, shutdown: CancellationToken, work: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let period = self.settings.retry_period;
        while !shutdown.is_cancelled() {
            match self.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => {
                    sleep_or(period, &shutdown).await;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot reach the leader lease");
                    sleep_or(period, &shutdown).await;
                    continue;
                }
            }
            tracing::info!(identity = %self.settings.identity, "leading");
            let lead = shutdown.child_token();
            let task = tokio::spawn(work(lead.clone()));
            let mut renewed = tokio::time::Instant::now();
            while !lead.is_cancelled() {
                sleep_or(period, &shutdown).await;
                if shutdown.is_cancelled() {
                    break;
                }
                match self.try_acquire_or_renew().await {
                    Ok(true) => renewed = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::warn!("the leader lease was taken; stopping");
                        break;
                    }
                    Err(error) if renewed.elapsed() < self.settings.renew_deadline => {
                        tracing::warn!(%error, "cannot renew the leader lease; trying again");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew the leader lease in time; stopping");
                        break;
                    }
                }
            }
            lead.cancel();
            // The work stops on its token; one stuck on something that does not answer
            // (NATS gone, a reconcile waiting on it) is cut, so the lease goes back
            // and the process ends within its grace period.
            let abort = task.abort_handle();
            if tokio::time::timeout(WORK_GRACE, task).await.is_err() {
                tracing::warn!(
                    grace = ?WORK_GRACE,
                    "the controllers did not stop in time; cutting them"
                );
                abort.abort();
            }
        }
        match tokio::time::timeout(RELEASE_GRACE, self.release()).await {
            Ok(Ok(())) => tracing::info!("leader lease handed back"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot hand the leader lease back"),
            Err(_) => {
                tracing::warn!("the API server did not answer; the leader lease expires by itself")
            }
        }
    }
}

/// How long the work gets to stop once it is told to.
pub const WORK_GRACE: Duration = Duration::from_secs(5);
/// How long handing the lease back may take.
const RELEASE_GRACE: Duration = Duration::from_secs(3);

async fn sleep_or(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = shipperd_model::pause(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
