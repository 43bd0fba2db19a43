//! [`Backoff`]: the one retry delay of ShipperD: exponential from a base to a cap, with
//! jitter so that retries of many jobs (or replicas) spread out instead of arriving
//! together. Built on `backon`'s exponential backoff; used by the stage runtime for
//! redelivery delays, by the registry client between requests, by fetches, webhooks and
//! compare-and-set loops.

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
