//! The bus error type. Callers branch on [`Error::kind`] (retry or give up), never on text.
//!
//! A failed NATS request keeps the client's error as its source, and its kind is read
//! from that chain by type: a refusal JetStream will repeat (a message over the server's
//! payload limit, an invalid key or subject, a 4xx API answer) is `Permanent`; a timeout,
//! a broken connection or a server that is not ready is `Transient`.

use std::error::Error as StdError;

use async_nats::jetstream;

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// NATS was unreachable or timed out: retrying later may succeed.
    Transient,
    /// The data is malformed or the request can never succeed: do not retry.
    Permanent,
    /// A compare-and-set lost too many races in a row.
    Conflict,
    /// A record that should exist does not.
    NotFound,
}

/// A boxed cause, as the NATS client gives them.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A NATS or JetStream request failed; `what` says which.
    #[error("NATS: {what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("{0} is not known")]
    NotFound(String),
    #[error("{0} was changed concurrently too many times; giving up this update")]
    Conflict(String),
    /// Connection settings that cannot work (two ways to log in, a missing file).
    #[error("{0}")]
    Settings(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Nats { source, .. } => classify(source.as_ref()),
            Error::Decode { .. } => ErrorKind::Permanent,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Settings(_) => ErrorKind::Permanent,
        }
    }

    /// May the same request succeed later (NATS unreachable or leaderless, a
    /// compare-and-set that lost its races)? A malformed record or a missing one will
    /// not change by waiting.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind(), ErrorKind::Transient | ErrorKind::Conflict)
    }

    /// Wraps a NATS client error, saying what was being done.
    pub fn nats<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |e| Error::Nats {
            what,
            source: e.into(),
        }
    }

    /// A record that does not decode.
    pub fn decode<E: Into<BoxError>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Error::Decode {
            what,
            source: e.into(),
        }
    }
}

/// The kind of a NATS client error, read from its chain of sources by type: the first
/// link that says decides; one that says nothing is transient (a lost connection).
pub fn classify(e: &(dyn StdError + 'static)) -> ErrorKind {
    let mut link: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(e) = link {
        if let Some(kind) = kind_of(e) {
            return kind;
        }
        link = e.source();
    }
    ErrorKind::Transient
}

/// "Wrong last sequence": a compare-and-set lost to another writer. One server says
/// 10071 (which async-nats reports as `WrongLastRevision` / `AlreadyExists`); a clustered
/// stream says 10164 (`JSStreamWrongLastSequenceConstantErr`, nats-server 2.12+), which
/// async-nats 0.51 and 0.52 report as `Other`.
const WRONG_LAST_SEQUENCE: [u64; 2] = [10071, 10164];

/// Did a compare-and-set (a KV `update` at a revision, or a `create`) lose because another
/// writer came first? Read from the chain of sources by type, so it holds on a cluster
/// too, where the client does not recognise the server's answer.
pub fn lost_race(e: &(dyn StdError + 'static)) -> bool {
    use jetstream::kv;
    let mut link: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(e) = link {
        let lost = e
            .downcast_ref::<kv::UpdateError>()
            .is_some_and(|x| x.kind() == kv::UpdateErrorKind::WrongLastRevision)
            || e.downcast_ref::<kv::CreateError>()
                .is_some_and(|x| x.kind() == kv::CreateErrorKind::AlreadyExists)
            || e.downcast_ref::<jetstream::context::PublishError>()
                .is_some_and(|x| {
                    x.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
                })
            || e.downcast_ref::<jetstream::Error>()
                .is_some_and(|x| WRONG_LAST_SEQUENCE.contains(&(x.error_code().0)));
        if lost {
            return true;
        }
        link = e.source();
    }
    false
}

fn kind_of(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    use ErrorKind::{Conflict, Permanent, Transient};
    if let Some(api) = e.downcast_ref::<jetstream::Error>() {
        if WRONG_LAST_SEQUENCE.contains(&(api.error_code().0)) {
            return Some(Conflict);
        }
        // The API's own status: 4xx is a refusal of this request, 5xx (e.g. 503
        // "JetStream system temporarily unavailable") may pass.
        return Some(if (400..500).contains(&api.code()) {
            Permanent
        } else {
            Transient
        });
    }
    if let Some(p) = e.downcast_ref::<jetstream::context::PublishError>() {
        use jetstream::context::PublishErrorKind as K;
        return match p.kind() {
            K::MaxPayloadExceeded => Some(Permanent),
            K::WrongLastSequence => Some(Conflict),
            K::WrongLastMessageId => Some(Permanent),
            // No responders: on a cluster, a stream whose replicas are electing a leader
            // (a node lost) answers nothing for a moment. The streams are declared at
            // start, so this passes; attempts are bounded in any case.
            K::StreamNotFound => Some(Transient),
            K::TimedOut | K::BrokenPipe | K::MaxAckPending => Some(Transient),
            K::Other => None,
        };
    }
    if let Some(p) = e.downcast_ref::<async_nats::PublishError>() {
        use async_nats::PublishErrorKind as K;
        return match p.kind() {
            K::MaxPayloadExceeded | K::InvalidSubject => Some(Permanent),
            K::Send => Some(Transient),
        };
    }
    if let Some(r) = e.downcast_ref::<jetstream::context::RequestError>() {
        use jetstream::context::RequestErrorKind as K;
        return match r.kind() {
            K::InvalidSubject => Some(Permanent),
            K::NoResponders | K::TimedOut => Some(Transient),
            K::Other => None,
        };
    }
    use jetstream::kv;
    let invalid_key = e
        .downcast_ref::<kv::PutError>()
        .is_some_and(|x| x.kind() == kv::PutErrorKind::InvalidKey)
        || e.downcast_ref::<kv::EntryError>()
            .is_some_and(|x| x.kind() == kv::EntryErrorKind::InvalidKey)
        || e.downcast_ref::<kv::UpdateError>()
            .is_some_and(|x| x.kind() == kv::UpdateErrorKind::InvalidKey)
        || e.downcast_ref::<kv::CreateError>()
            .is_some_and(|x| x.kind() == kv::CreateErrorKind::InvalidKey);
    invalid_key.then_some(Permanent)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_cause_by_type() {
        use jetstream::context::{PublishError, PublishErrorKind};
        let too_big = Error::nats("storing an image state")(PublishError::new(
            PublishErrorKind::MaxPayloadExceeded,
        ));
        assert_eq!(too_big.kind(), ErrorKind::Permanent);
        let timed_out =
            Error::nats("storing an event")(PublishError::new(PublishErrorKind::TimedOut));
        assert_eq!(timed_out.kind(), ErrorKind::Transient);
        // Wrapped once more, as KV puts wrap the publish: the kind still shows.
        let put = jetstream::kv::PutError::with_source(
            jetstream::kv::PutErrorKind::Publish,
            PublishError::new(PublishErrorKind::MaxPayloadExceeded),
        );
        assert_eq!(Error::nats("kv put")(put).kind(), ErrorKind::Permanent);
        let lost = Error::nats("x")(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(lost.kind(), ErrorKind::Transient);
        assert!(
            std::error::Error::source(&lost).is_some(),
            "the cause is kept"
        );
    }

    #[test]
    fn a_lost_compare_and_set_is_known_on_one_server_and_on_a_cluster() {
        use jetstream::{
            context::{PublishError, PublishErrorKind},
            kv::{UpdateError, UpdateErrorKind},
        };
        let api = |code: u64| -> jetstream::Error {
            serde_json::from_str(&format!(
                r#"{{"code":400,"err_code":{code},"description":"wrong last sequence"}}"#
            ))
            .unwrap()
        };
        // As async-nats wraps a clustered stream's answer: Other, Other, 10164.
        let clustered = UpdateError::with_source(
            UpdateErrorKind::Other,
            PublishError::with_source(PublishErrorKind::Other, api(10164)),
        );
        assert!(lost_race(&clustered));
        assert_eq!(
            Error::nats("writing a bundle summary")(clustered).kind(),
            ErrorKind::Conflict
        );
        assert!(lost_race(&UpdateError::new(
            UpdateErrorKind::WrongLastRevision
        )));
        let other = UpdateError::with_source(
            UpdateErrorKind::Other,
            PublishError::with_source(PublishErrorKind::Other, api(10058)),
        );
        assert!(!lost_race(&other));
        // No responders (a stream electing a leader) may pass.
        let leaderless =
            Error::nats("storing an event")(PublishError::new(PublishErrorKind::StreamNotFound));
        assert_eq!(leaderless.kind(), ErrorKind::Transient);
    }
}
