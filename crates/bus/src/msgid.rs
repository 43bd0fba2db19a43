//! [`MessageId`]: the one builder of every `Nats-Msg-Id` (and CloudEvents id).
//!
//! Exactly-once rests on these ids: JetStream drops a message whose id it stored within
//! its duplicate window, so a worker that retries after a crash, or two replicas racing,
//! store one job or one event. An id names what the message is about (a bundle, one of
//! its images, a job), the bundle's generation (a retry starts a new one, whose messages
//! must not be dropped as duplicates of the first one's) and, for messages a sweep sends
//! again within one generation, the re-drive. [`MessageId::work`] is the same without the
//! re-drive: the identity of the *work* a job asks for, under which its attempts are
//! counted whichever copy of it is delivered.

use std::fmt;

use shipperd_model::{BundleId, BundleSummary, Phase};

use crate::EventKind;

/// What a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// A bundle-level event (`bundle.received`, `bundle.unpacked`, ...).
    Bundle(EventKind),
    /// An image-level event of image `index`.
    Image(EventKind, u32),
    /// A progress report of image `index`, at `bytes` done.
    Progress { index: u32, bytes: u64 },
    /// The publish job of image `index`.
    Publish(u32),
    /// The bundle's commit job (set every tag).
    Commit,
}

/// The de-duplication id of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId {
    bundle: BundleId,
    topic: Topic,
    generation: u32,
    redrive: u32,
}

impl MessageId {
    pub fn new(bundle: &BundleId, topic: Topic, generation: u32) -> Self {
        MessageId {
            bundle: bundle.clone(),
            topic,
            generation,
            redrive: 0,
        }
    }

    /// A bundle-level event of `generation`.
    pub fn event(kind: EventKind, bundle: &BundleId, generation: u32) -> Self {
        Self::new(bundle, Topic::Bundle(kind), generation)
    }

    /// An event about image `index` of `generation`.
    pub fn image_event(kind: EventKind, bundle: &BundleId, index: u32, generation: u32) -> Self {
        Self::new(bundle, Topic::Image(kind, index), generation)
    }

    /// Bundle `s`'s unpack: its `bundle.received`, as its generation and re-drives
    /// send it.
    pub fn unpack(s: &BundleSummary) -> Self {
        Self::event(EventKind::BundleReceived, &s.id, s.generation).redrive(s.redrives)
    }

    /// Bundle `s`'s commit job (set every tag), as its generation and re-drives send it.
    pub fn commit(s: &BundleSummary) -> Self {
        Self::new(&s.id, Topic::Commit, s.generation).redrive(s.redrives)
    }

    /// The one piece of work bundle `s`'s phase waits on: its unpack while `Received`
    /// or `Unpacking`, its commit while `Tagging`; none otherwise (a `Publishing`
    /// bundle's work is its images', an ended one has none).
    pub fn of_phase(s: &BundleSummary) -> Option<Self> {
        match s.phase {
            Phase::Received | Phase::Unpacking => Some(Self::unpack(s)),
            Phase::Tagging => Some(Self::commit(s)),
            Phase::Publishing | Phase::Published | Phase::Failed => None,
        }
    }

    /// The same message as sent by the `n`th re-drive of its generation (0: the first
    /// sending).
    pub fn redrive(mut self, n: u32) -> Self {
        self.redrive = n;
        self
    }

    pub fn bundle(&self) -> &BundleId {
        &self.bundle
    }

    pub fn topic(&self) -> Topic {
        self.topic
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The work this message asks for, whichever re-drive sent it: the key its attempts
    /// are counted under.
    pub fn work(&self) -> String {
        self.clone().redrive(0).to_string()
    }

    /// The id a message carries (its `Nats-Msg-Id`), read back: the inverse of
    /// `Display`.
    pub fn parse(s: &str) -> Result<Self, MessageIdError> {
        let bad = || MessageIdError(s.chars().take(200).collect());
        let (bundle, mut rest) = s.split_once('.').ok_or_else(bad)?;
        let bundle = BundleId::parse(bundle).map_err(|_| bad())?;
        // Trailing `.r<n>`, then `.g<n>`.
        let mut suffix = |tag: char| -> Option<u32> {
            let (head, last) = rest.rsplit_once('.')?;
            let n = last.strip_prefix(tag)?.parse().ok()?;
            rest = head;
            Some(n)
        };
        let redrive = suffix('r').unwrap_or(0);
        let generation = suffix('g').unwrap_or(0);
        let number = |t: &str| t.parse::<u64>().ok();
        let topic = if rest == "commit" {
            Topic::Commit
        } else if let Some(i) = rest.strip_prefix("publish.") {
            Topic::Publish(
                number(i)
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(bad)?,
            )
        } else {
            let kind = EventKind::ALL
                .into_iter()
                .filter(|k| {
                    rest == k.short_name() || rest.starts_with(&format!("{}.", k.short_name()))
                })
                .max_by_key(|k| k.short_name().len())
                .ok_or_else(bad)?;
            let args: Vec<u64> = rest[kind.short_name().len()..]
                .split('.')
                .filter(|p| !p.is_empty())
                .map(|p| number(p).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            let index = |i: u64| u32::try_from(i).map_err(|_| bad());
            match (kind, args.as_slice()) {
                (EventKind::ImageProgress, [i, bytes]) => Topic::Progress {
                    index: index(*i)?,
                    bytes: *bytes,
                },
                (_, []) => Topic::Bundle(kind),
                (_, [i]) => Topic::Image(kind, index(*i)?),
                _ => return Err(bad()),
            }
        };
        Ok(MessageId {
            bundle,
            topic,
            generation,
            redrive,
        })
    }
}

/// A message id that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a ShipperD message id: {0:?}")]
pub struct MessageIdError(String);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.bundle;
        match self.topic {
            Topic::Bundle(kind) => write!(f, "{b}.{}", kind.short_name())?,
            Topic::Image(kind, i) => write!(f, "{b}.{}.{i}", kind.short_name())?,
            Topic::Progress { index, bytes } => write!(
                f,
                "{b}.{}.{index}.{bytes}",
                EventKind::ImageProgress.short_name()
            )?,
            Topic::Publish(i) => write!(f, "{b}.publish.{i}")?,
            Topic::Commit => write!(f, "{b}.commit")?,
        }
        if self.generation > 0 {
            write!(f, ".g{}", self.generation)?;
        }
        if self.redrive > 0 {
            write!(f, ".r{}", self.redrive)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_reads_back_as_itself() {
        let b = id();
        let ids = [
            MessageId::event(EventKind::BundleReceived, &b, 0),
            MessageId::event(EventKind::BundleReceived, &b, 2).redrive(3),
            MessageId::event(EventKind::BundleFailed, &b, 0).redrive(1),
            MessageId::image_event(EventKind::ImagePublished, &b, 7, 1),
            MessageId::image_event(EventKind::ImageFailed, &b, 0, 0),
            MessageId::new(&b, Topic::Publish(4), 0).redrive(1),
            MessageId::new(&b, Topic::Publish(u32::MAX), 9),
            MessageId::new(&b, Topic::Commit, 1),
            MessageId::new(
                &b,
                Topic::Progress {
                    index: 2,
                    bytes: 10,
                },
                3,
            ),
        ];
        for m in ids {
            assert_eq!(MessageId::parse(&m.to_string()), Ok(m.clone()), "{m}");
        }
        for bad in [
            "",
            "nope",
            &format!("{}.commit", "a".repeat(63)),
            &format!("{}.publish.x", "a".repeat(64)),
            &format!("{}.bundle.nothing", "a".repeat(64)),
            &format!("{}.image.published.1.2.3", "a".repeat(64)),
            &format!("{}.publish.99999999999", "a".repeat(64)),
        ] {
            assert!(MessageId::parse(bad).is_err(), "{bad}");
        }
    }

    fn id() -> BundleId {
        BundleId::parse(&"a".repeat(64)).unwrap()
    }

    #[test]
    fn ids_are_stable_and_distinct_per_generation_and_redrive() {
        let b = id();
        let a = "a".repeat(64);
        let cases = [
            (
                MessageId::event(EventKind::BundleReceived, &b, 0),
                format!("{a}.bundle.received"),
            ),
            (
                MessageId::event(EventKind::BundleReceived, &b, 2).redrive(3),
                format!("{a}.bundle.received.g2.r3"),
            ),
            (
                MessageId::image_event(EventKind::ImagePublished, &b, 7, 1),
                format!("{a}.image.published.7.g1"),
            ),
            (
                MessageId::new(&b, Topic::Publish(4), 0).redrive(1),
                format!("{a}.publish.4.r1"),
            ),
            (
                MessageId::new(&b, Topic::Commit, 1),
                format!("{a}.commit.g1"),
            ),
            (
                MessageId::new(
                    &b,
                    Topic::Progress {
                        index: 2,
                        bytes: 10,
                    },
                    0,
                ),
                format!("{a}.image.progress.2.10"),
            ),
        ];
        for (id, want) in cases {
            assert_eq!(id.to_string(), want);
        }
        let redriven = MessageId::new(&b, Topic::Publish(4), 1).redrive(5);
        assert_eq!(redriven.work(), format!("{a}.publish.4.g1"));
    }
}
