//! [`Backoff`]: the one retry delay of ShipperD: exponential from a base to a cap, with
//! jitter so that retries of many jobs (or replicas) spread out instead of arriving
//! together. Built on `backon`'s exponential backoff; used by the stage runtime for
//! redelivery delays, by the registry client between requests, by fetches, webhooks,
//! compare-and-set loops, the operator's failed reconciles and the CLI's uploads.
//!
//! Every wait in ShipperD is one of three, by name (`clippy.toml` refuses
//! `tokio::time::sleep` elsewhere): a wait before trying again is a [`Retry`], made by
//! a `Backoff` (or from what the other side asked, `Retry-After`); a wait between two
//! looks at something that changes by itself (a file, a directory, a lease) is a
//! [`pause`]; a timer raced against other work is a [`deadline`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay (before jitter).
    pub base: Duration,
    /// No delay is longer than this (before jitter).
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// The builder `backon`'s retry loops take: `attempts` tries in all.
    pub fn builder(&self, attempts: usize) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.base)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(attempts.saturating_sub(1))
    }

    /// How long to wait after failed attempt `attempt` (1 = the first): `base` doubled
    /// per attempt up to `max`, plus up to as much again at random.
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = attempt.clamp(1, 64) as usize;
        self.builder(n + 1).build().nth(n - 1).unwrap_or(self.max)
    }

    /// The wait after failed attempt `attempt` (1 = the first).
    pub fn retry(&self, attempt: u32) -> Retry {
        Retry(self.delay(attempt))
    }

    /// The wait after failed attempt `attempt`: as long as the other side asked
    /// (`Retry-After`), else as this backoff says.
    pub fn retry_or(&self, attempt: u32, asked: Option<Duration>) -> Retry {
        Retry(asked.unwrap_or_else(|| self.delay(attempt)))
    }
}

/// A wait before trying again, made by a [`Backoff`]: the only way ShipperD waits to
/// retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a retry waits only when awaited"]
pub struct Retry(Duration);

impl Retry {
    /// How long it waits (for logs).
    pub fn delay(&self) -> Duration {
        self.0
    }

    pub async fn wait(self) {
        #[allow(clippy::disallowed_methods, reason = "the one retry wait")]
        tokio::time::sleep(self.0).await;
    }
}

/// Waits `period` between two looks at something that changes by itself (a file, a
/// directory, a lease, a bundle's state): a fixed period, not a retry after a failure
/// (that is a [`Retry`]).
pub async fn pause(period: Duration) {
    #[allow(clippy::disallowed_methods, reason = "the one poll wait")]
    tokio::time::sleep(period).await;
}

/// A timer `after` from now, to race against other work (`select!`) or to reset: a
/// deadline, not a wait before a retry.
pub fn deadline(after: Duration) -> tokio::time::Sleep {
    #[allow(clippy::disallowed_methods, reason = "the one timer")]
    tokio::time::sleep(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..50 {
            for (attempt, floor) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (4, 800),
                (5, 1000),
                (30, 1000),
            ] {
                let d = b.delay(attempt);
                let floor = Duration::from_millis(floor);
                assert!(d >= floor && d <= floor * 2, "attempt {attempt}: {d:?}");
            }
        }
        // Jittered: not every delay is the same.
        let seen: std::collections::HashSet<Duration> = (0..20).map(|_| b.delay(2)).collect();
        assert!(seen.len() > 1);
    }
}
