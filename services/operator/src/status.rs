//! A `Bundle`'s status from ShipperD's state: phase, counts, bytes, error, and the
//! standard conditions `Ready` (published) and `Failed`, each keeping its last
//! transition time while its status holds.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use shipperd_model::{BundleSummary, Phase};

use crate::crd::{BundlePhase, BundleStatus, ImageCounts};

pub const READY: &str = "Ready";
pub const FAILED: &str = "Failed";

/// The status of a `Bundle` of generation `generation` whose bundle is `s`, given the
/// conditions it had (`previous`), at `now`.
pub fn bundle_status(
    s: &BundleSummary,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> BundleStatus {
    let c = &s.counts;
    let phase = BundlePhase::from(s.phase);
    let ready = match s.phase {
        Phase::Published => (
            true,
            "Published",
            "every image is in the registry and tagged".to_string(),
        ),
        Phase::Failed => (false, "Failed", s.error.clone().unwrap_or_default()),
        p => (
            false,
            phase_reason(p),
            format!("{} of {} images done", c.done(), c.total),
        ),
    };
    let failed = if s.phase == Phase::Failed {
        let reason = if c.failed > 0 {
            "ImagesFailed"
        } else if s.unpacked_at.is_none() {
            "BundleRejected"
        } else {
            "TaggingFailed"
        };
        (true, reason, s.error.clone().unwrap_or_default())
    } else {
        (false, "NotFailed", String::new())
    };
    let conditions = vec![
        condition(READY, ready, generation, previous, now),
        condition(FAILED, failed, generation, previous, now),
    ];
    let mut summary = format!("{}/{}", c.published, c.total);
    if c.failed > 0 {
        summary.push_str(&format!(" ({} failed)", c.failed));
    }
    BundleStatus {
        phase: Some(phase),
        bundle_id: Some(s.id.to_string()),
        images: Some(ImageCounts {
            total: c.total,
            published: c.published,
            skipped: c.skipped,
            failed: c.failed,
        }),
        images_summary: Some(summary),
        bytes_done: s.bytes_done,
        bytes_total: s.bytes_total,
        progress: (s.bytes_total > 0)
            .then(|| format!("{}%", s.bytes_done.saturating_mul(100) / s.bytes_total)),
        error: s.error.clone(),
        conditions,
        observed_generation: generation,
        cluster_resources: None,
    }
}

/// The status of a `Bundle` ShipperD does not hold yet (its URL is being fetched, or
/// fetching it failed).
pub fn pending_status(
    phase: BundlePhase,
    failure: Option<&str>,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> BundleStatus {
    let ready = (
        false,
        phase_reason_str(phase),
        failure.unwrap_or("").to_string(),
    );
    let failed = match failure {
        Some(f) => (true, "FetchFailed", f.to_string()),
        None => (false, "NotFailed", String::new()),
    };
    BundleStatus {
        phase: Some(phase),
        error: failure.map(str::to_string),
        conditions: vec![
            condition(READY, ready, generation, previous, now),
            condition(FAILED, failed, generation, previous, now),
        ],
        observed_generation: generation,
        ..BundleStatus::default()
    }
}

/// The status of a `Bundle` the operator refuses to act on (it names another
/// namespace's bundle, a target it may not use, a path outside the import directory):
/// `Failed`, with `reason` on both conditions and `message` as the error.
pub fn refused_status(
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> BundleStatus {
    BundleStatus {
        phase: Some(BundlePhase::Failed),
        error: Some(message.to_string()),
        conditions: vec![
            condition(
                READY,
                (false, reason, message.to_string()),
                generation,
                previous,
                now,
            ),
            condition(
                FAILED,
                (true, reason, message.to_string()),
                generation,
                previous,
                now,
            ),
        ],
        observed_generation: generation,
        ..BundleStatus::default()
    }
}

fn phase_reason(p: Phase) -> &'static str {
    match p {
        Phase::Received => "Received",
        Phase::Unpacking => "Unpacking",
        Phase::Publishing => "Publishing",
        Phase::Tagging => "Tagging",
        Phase::Published => "Published",
        Phase::Failed => "Failed",
    }
}

fn phase_reason_str(p: BundlePhase) -> &'static str {
    match p {
        BundlePhase::Fetching => "Fetching",
        BundlePhase::Failed => "Failed",
        _ => "Pending",
    }
}

/// A target's status: its `Ready` condition, `Applied` with `applied` as the message
/// when it could be used, else `False` with the problem's reason and message.
pub(crate) fn ready_status(
    verdict: Result<String, (&str, String)>,
    generation: Option<i64>,
    previous: Option<&crate::crd::TargetStatus>,
) -> crate::crd::TargetStatus {
    let previous = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let ready = match verdict {
        Ok(message) => (true, "Applied", message),
        Err((reason, message)) => (false, reason, message),
    };
    crate::crd::TargetStatus {
        conditions: vec![condition(
            READY,
            ready,
            generation,
            previous,
            Timestamp::now(),
        )],
        observed_generation: generation,
    }
}

/// A condition; its transition time is the previous one's while the status holds.
fn condition(
    type_: &str,
    (on, reason, message): (bool, &str, String),
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

#[cfg(test)]
mod tests {
    use shipperd_model::{BundleId, Outcome, state::Unpacked};

    use super::*;

    fn publishing(n: u32) -> BundleSummary {
        let id = BundleId::parse(&"c".repeat(64)).unwrap();
        let mut s = BundleSummary::new(id, "b.tar".into(), 1, "p".into(), None);
        s.start_unpacking(1);
        s.unpacked(&Unpacked {
            format: "tar".into(),
            images: n,
            bytes_total: 10 * u64::from(n),
            ..Unpacked::default()
        });
        s
    }

    fn get<'a>(st: &'a BundleStatus, t: &str) -> &'a Condition {
        st.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_publishing_bundle_is_not_ready_and_shows_its_progress() {
        let mut s = publishing(4);
        s.claim(0, &Outcome::published(10, false, Default::default()));
        let st = bundle_status(&s, Some(3), &[], Timestamp::UNIX_EPOCH);
        assert_eq!(st.phase, Some(BundlePhase::Publishing));
        assert_eq!(st.images_summary.as_deref(), Some("1/4"));
        assert_eq!(st.progress.as_deref(), Some("25%"));
        assert_eq!(get(&st, READY).status, "False");
        assert_eq!(get(&st, READY).reason, "Publishing");
        assert_eq!(get(&st, FAILED).status, "False");
        assert_eq!(st.observed_generation, Some(3));
    }

    #[test]
    fn failed_images_fail_the_bundle_with_the_grouped_error() {
        let mut s = publishing(2);
        let failed = Outcome::failed("x".into(), "connection refused".into());
        s.claim(0, &failed);
        s.claim(1, &failed);
        let st = bundle_status(&s, Some(1), &[], Timestamp::UNIX_EPOCH);
        assert_eq!(st.phase, Some(BundlePhase::Failed));
        assert_eq!(st.images_summary.as_deref(), Some("0/2 (2 failed)"));
        let f = get(&st, FAILED);
        assert_eq!(
            (f.status.as_str(), f.reason.as_str()),
            ("True", "ImagesFailed")
        );
        assert_eq!(
            f.message,
            "2 of 2 images failed: connection refused (2 images)"
        );
        assert_eq!(st.error.as_deref(), Some(f.message.as_str()));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_it_holds() {
        let mut s = publishing(1);
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = bundle_status(&s, Some(1), &[], t0);
        let again = bundle_status(&s, Some(1), &first.conditions, t1);
        assert_eq!(get(&again, READY).last_transition_time, Time(t0));
        s.claim(0, &Outcome::published(10, true, Default::default()));
        assert_eq!(s.phase, Phase::Published);
        let done = bundle_status(&s, Some(1), &again.conditions, t1);
        let r = get(&done, READY);
        assert_eq!(
            (r.status.as_str(), &r.last_transition_time),
            ("True", &Time(t1))
        );
        assert_eq!(get(&done, FAILED).last_transition_time, Time(t0));
    }

    #[test]
    fn a_fetch_that_failed_is_failed() {
        let st = pending_status(
            BundlePhase::Failed,
            Some("fetching http://x/b.tar failed 8 times"),
            Some(2),
            &[],
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(get(&st, FAILED).reason, "FetchFailed");
        assert_eq!(get(&st, READY).status, "False");
    }
}
