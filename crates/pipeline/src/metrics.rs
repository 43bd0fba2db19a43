//! Per-stage counters the runtime keeps for every stage of this process: jobs started,
//! succeeded, failed (given up and recorded), retried, and the time they took; rendered
//! in Prometheus' text format by whichever service serves `/metrics`.

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

pub(crate) fn started(stage: &'static str) {
    with(stage, |c| c.started += 1);
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
}

/// The figures of `stage` so far in this process.
pub fn counts(stage: &str) -> StageCounts {
    let all = stages().lock().unwrap_or_else(|p| p.into_inner());
    all.get(stage).copied().unwrap_or_default()
}

/// Every stage's counters, in the Prometheus text format.
pub fn render() -> String {
    let all = stages().lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut out = String::new();
    type Family = (&'static str, &'static str, fn(&StageCounts) -> String);
    let families: [Family; 6] = [
        ("started", "Attempts at jobs begun.", |c| {
            c.started.to_string()
        }),
        ("succeeded", "Jobs done.", |c| c.succeeded.to_string()),
        (
            "failed",
            "Jobs given up on (their failure recorded).",
            |c| c.failed.to_string(),
        ),
        (
            "retried",
            "Attempts that failed and will be tried again.",
            |c| c.retried.to_string(),
        ),
        (
            "busy",
            "Deliveries that found their work running elsewhere.",
            |c| c.busy.to_string(),
        ),
        ("seconds", "Time spent in attempts.", |c| {
            c.seconds.to_string()
        }),
    ];
    for (what, help, value) in families {
        let name = format!("shipperd_stage_jobs_{what}_total");
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for (stage, c) in &all {
            out.push_str(&format!("{name}{{stage=\"{stage}\"}} {}\n", value(c)));
        }
    }
    out
}
