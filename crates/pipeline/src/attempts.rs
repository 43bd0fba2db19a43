//! The attempts ledger: how many times a piece of work was started, written to NATS KV
//! *before* the work starts, so an attempt that never returns (the process was killed,
//! ran out of memory, lost its node) still counts. JetStream's own delivery count cannot
//! tell "it died three times" from "it never ran", and it forgets a message silently
//! once its deliveries are spent.
//!
//! One key per piece of work (its [`MessageId::work`](shipperd_bus::MessageId::work):
//! the bundle, the job, the generation, not the re-drive), so every copy of a job (a
//! redelivery, a sweep's re-drive) counts against the same budget. While an attempt runs
//! it writes a heartbeat; a copy delivered meanwhile finds it alive and waits instead
//! of running the same work beside it. A finished piece of work removes its key.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use serde::{Deserialize, Serialize};
use shipperd_bus::{Bus, Error, Result, subjects::ATTEMPTS_BUCKET};
use shipperd_model::{age, now_rfc3339};

/// Longest error text kept in a record.
const MAX_ERROR: usize = 1024;
/// Compare-and-set rounds before giving up on a begin.
const MAX_RACES: usize = 16;

/// What the ledger holds for one piece of work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Attempts started.
    pub started: u32,
    /// Of those, the ones that ended with an error that may heal (and so a retry).
    pub failed: u32,
    /// The last such error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Who ran the latest attempt (`host/pid`), and that attempt's own id.
    pub holder: String,
    pub token: String,
    /// When the latest attempt started, and when it last said it was alive.
    pub started_at: String,
    pub alive_at: String,
}

impl Record {
    /// Attempts that neither succeeded nor returned an error: their worker stopped.
    pub fn stopped(&self) -> u32 {
        self.started.saturating_sub(self.failed)
    }

    /// Is the latest attempt still running: it has not ended and its heartbeat is
    /// younger than `window`?
    pub fn alive(&self, window: Duration) -> bool {
        self.started > self.failed && age(&self.alive_at).is_some_and(|a| a < window)
    }
}

/// Attempts spent without a live error in hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub stage: &'static str,
    pub record: Record,
}

impl Spent {
    /// The reason without who and when, for grouping failures.
    pub fn cause(&self) -> String {
        let (stage, r) = (self.stage, &self.record);
        let n = r.started;
        match (r.stopped(), &r.last_error) {
            (s, _) if s == n => {
                format!("{stage} did not finish in {n} attempts: the worker stopped each time")
            }
            (0, Some(e)) => format!("{stage} gave up after {n} attempts: {e}"),
            (s, Some(e)) => format!(
                "{stage} did not finish in {n} attempts: the worker stopped {s} times; last error: {e}"
            ),
            (s, None) => {
                format!("{stage} did not finish in {n} attempts: the worker stopped {s} times")
            }
        }
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.record;
        if r.stopped() == r.started {
            write!(
                f,
                "{} (last: {} at {})",
                self.cause(),
                r.holder,
                r.started_at
            )
        } else {
            f.write_str(&self.cause())
        }
    }
}

/// What [`Ledger::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Run attempt `number` (1 = the first); `revision` is the record's, for heartbeats.
    Run { number: u32, revision: u64 },
    /// Another attempt is running it now.
    Busy { holder: String },
    /// Its attempts are spent.
    Spent(Record),
}

/// The ledger of one process: its bucket and its name as a holder.
#[derive(Clone)]
pub struct Ledger {
    kv: kv::Store,
    holder: String,
}

impl Ledger {
    pub async fn open(bus: &Bus) -> Result<Self> {
        Ok(Ledger {
            kv: bus.bucket(ATTEMPTS_BUCKET).await?,
            holder: holder(),
        })
    }

    pub async fn get(&self, key: &str) -> Result<Option<(Record, u64)>> {
        match self
            .kv
            .entry(key)
            .await
            .map_err(Error::nats("reading an attempts record"))?
        {
            Some(e) if e.operation == Operation::Put => {
                let r =
                    serde_json::from_slice(&e.value).map_err(Error::decode("attempts record"))?;
                Ok(Some((r, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Counts a new attempt at `key` unless `max` are spent or one is alive (a heartbeat
    /// younger than `alive`). `token` names this attempt.
    pub async fn begin(&self, key: &str, max: u32, alive: Duration, token: &str) -> Result<Begin> {
        // The usual case, a first attempt: one create, no read.
        let now = now_rfc3339();
        let first = Record {
            started: 1,
            holder: self.holder.clone(),
            token: token.to_string(),
            started_at: now.clone(),
            alive_at: now,
            ..Record::default()
        };
        if let Some(revision) = self.write(key, &first, None).await? {
            return Ok(Begin::Run {
                number: 1,
                revision,
            });
        }
        for _ in 0..MAX_RACES {
            let found = self.get(key).await?;
            let mut r = match &found {
                Some((r, _)) if r.token != token && r.alive(alive) => {
                    return Ok(Begin::Busy {
                        holder: r.holder.clone(),
                    });
                }
                Some((r, _)) if r.started >= max => return Ok(Begin::Spent(r.clone())),
                Some((r, _)) => r.clone(),
                None => Record::default(),
            };
            let now = now_rfc3339();
            r.started += 1;
            r.holder = self.holder.clone();
            r.token = token.to_string();
            r.started_at = now.clone();
            r.alive_at = now;
            if let Some(revision) = self.write(key, &r, found.map(|(_, rev)| rev)).await? {
                return Ok(Begin::Run {
                    number: r.started,
                    revision,
                });
            }
        }
        Err(Error::Conflict(format!("attempts of {key}")))
    }

    /// Says the attempt holding `revision` is alive; its new revision (`None` when the
    /// record changed meanwhile: the heartbeat stops).
    pub async fn heartbeat(&self, key: &str, revision: u64) -> Result<Option<u64>> {
        let Some((mut r, rev)) = self.get(key).await? else {
            return Ok(None);
        };
        if rev != revision {
            return Ok(None);
        }
        r.alive_at = now_rfc3339();
        self.write(key, &r, Some(rev)).await
    }

    /// Notes that the attempt ended with `error`, which may heal.
    pub async fn failed(&self, key: &str, error: &str) -> Result<()> {
        for _ in 0..MAX_RACES {
            let Some((mut r, rev)) = self.get(key).await? else {
                return Ok(());
            };
            r.failed = (r.failed + 1).min(r.started);
            r.last_error = Some(truncate(error));
            if self.write(key, &r, Some(rev)).await?.is_some() {
                return Ok(());
            }
        }
        Err(Error::Conflict(format!("attempts of {key}")))
    }

    /// The attempt `token` let go of its work on purpose (an orderly shutdown ran out
    /// of time): it does not count.
    pub async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        for _ in 0..MAX_RACES {
            let Some((mut r, rev)) = self.get(key).await? else {
                return Ok(());
            };
            if r.token != token || r.started <= r.failed {
                return Ok(());
            }
            r.started -= 1;
            r.alive_at = String::new();
            if self.write(key, &r, Some(rev)).await?.is_some() {
                return Ok(());
            }
        }
        Err(Error::Conflict(format!("attempts of {key}")))
    }

    /// The work is done (or given up and recorded): its attempts are forgotten.
    pub async fn finish(&self, key: &str) -> Result<()> {
        self.kv
            .purge(key)
            .await
            .map_err(Error::nats("removing an attempts record"))
    }

    /// Writes `r` over `revision` (created when `None`); the new revision, or `None`
    /// when another writer came first.
    async fn write(&self, key: &str, r: &Record, revision: Option<u64>) -> Result<Option<u64>> {
        let body = serde_json::to_vec(r).expect("records serialize").into();
        match revision {
            None => match self.kv.create(key, body).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if shipperd_bus::lost_race(&e) => Ok(None),
                Err(e) => Err(Error::nats("writing an attempts record")(e)),
            },
            Some(rev) => match self.kv.update(key, body, rev).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if shipperd_bus::lost_race(&e) => Ok(None),
                Err(e) => Err(Error::nats("writing an attempts record")(e)),
            },
        }
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_ERROR {
        return s.to_string();
    }
    let mut end = MAX_ERROR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// This process as a holder of attempts: `host/pid`.
fn holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started: u32, failed: u32, last_error: Option<&str>) -> Record {
        Record {
            started,
            failed,
            last_error: last_error.map(str::to_string),
            holder: "node-a/42".into(),
            token: "t".into(),
            started_at: "2025-12-04T10:00:00Z".into(),
            alive_at: "2025-12-04T10:00:00Z".into(),
        }
    }

    #[test]
    fn reasons_say_how_the_attempts_ended() {
        let cases = [
            (
                record(3, 0, None),
                "unpack did not finish in 3 attempts: the worker stopped each time (last: node-a/42 at 2025-12-04T10:00:00Z)",
            ),
            (
                record(3, 3, Some("disk error")),
                "unpack gave up after 3 attempts: disk error",
            ),
            (
                record(3, 1, Some("disk error")),
                "unpack did not finish in 3 attempts: the worker stopped 2 times; last error: disk error",
            ),
        ];
        for (r, want) in cases {
            let s = Spent {
                stage: "unpack",
                record: r,
            };
            assert_eq!(s.to_string(), want);
            assert!(!s.cause().contains("node-a"), "a cause groups: no host");
        }
    }

    #[test]
    fn only_a_fresh_heartbeat_of_a_running_attempt_is_alive() {
        let mut r = record(1, 0, None);
        r.alive_at = now_rfc3339();
        assert!(r.alive(Duration::from_secs(10)));
        r.failed = 1;
        assert!(!r.alive(Duration::from_secs(10)), "it ended with an error");
        let old = record(1, 0, None);
        assert!(!old.alive(Duration::from_secs(10)), "its worker stopped");
        assert_eq!(truncate(&"é".repeat(1000)).len(), MAX_ERROR + "…".len());
    }
}
