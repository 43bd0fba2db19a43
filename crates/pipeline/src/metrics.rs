//! Per-stage figures the runtime keeps for every stage of this process: attempts by how
//! they ended (`shipperd_stage_jobs_total{stage, outcome}`) and how long each took
//! (`shipperd_stage_attempt_duration_seconds{stage}`), in the process's registry
//! (`shipperd_telemetry::metrics`); [`counts`] reads them back for tests.

use shipperd_telemetry::metrics::{label, labels};
use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
    time::Duration,
};

/// The figures of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageCounts {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    /// Attempts that found their work running elsewhere, and waited.
    pub busy: u64,
    pub seconds: f64,
}

fn stages() -> &'static Mutex<BTreeMap<&'static str, StageCounts>> {
    static STAGES: OnceLock<Mutex<BTreeMap<&'static str, StageCounts>>> = OnceLock::new();
    STAGES.get_or_init(Default::default)
}

fn with(stage: &'static str, f: impl FnOnce(&mut StageCounts)) {
    let mut all = stages().lock().unwrap_or_else(|p| p.into_inner());
    f(all.entry(stage).or_default());
}

/// How an attempt ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Succeeded,
    Failed,
    Retried,
    Busy,
}

/// Shows `stage`'s series from the start, at zero (a rate needs a first sample).
pub(crate) fn declare(stage: &'static str) {
    let m = shipperd_telemetry::metrics::metrics();
    for outcome in ["started", "succeeded", "failed", "retried", "busy"] {
        let _ = m
            .stage_jobs
            .get_or_create(&labels(("stage", stage), ("outcome", outcome)));
    }
    let _ = m.stage_seconds.get_or_create(&label("stage", stage));
}

pub(crate) fn started(stage: &'static str) {
    with(stage, |c| c.started += 1);
    shipperd_telemetry::metrics::metrics()
        .stage_jobs
        .get_or_create(&labels(("stage", stage), ("outcome", "started")))
        .inc();
}

pub(crate) fn ended(stage: &'static str, how: Ended, took: Duration) {
    with(stage, |c| {
        match how {
            Ended::Succeeded => c.succeeded += 1,
            Ended::Failed => c.failed += 1,
            Ended::Retried => c.retried += 1,
            Ended::Busy => c.busy += 1,
        }
        c.seconds += took.as_secs_f64();
    });
    let outcome = match how {
        Ended::Succeeded => "succeeded",
        Ended::Failed => "failed",
        Ended::Retried => "retried",
        Ended::Busy => "busy",
    };
    let m = shipperd_telemetry::metrics::metrics();
    m.stage_jobs
        .get_or_create(&labels(("stage", stage), ("outcome", outcome)))
        .inc();
    if how != Ended::Busy {
        m.stage_seconds
            .get_or_create(&label("stage", stage))
            .observe(took.as_secs_f64());
    }
}

/// The figures of `stage` so far in this process.
pub fn counts(stage: &str) -> StageCounts {
    let all = stages().lock().unwrap_or_else(|p| p.into_inner());
    all.get(stage).copied().unwrap_or_default()
}
