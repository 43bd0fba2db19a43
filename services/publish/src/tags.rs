//! Who holds a tag, and who may move it.
//!
//! The `shipperd-blobs` bucket keeps, per registry and tag, the last image ShipperD
//! tagged there: the order (see `BundleSummary::order`), bundle and digest, and whose the
//! tag is: the owner of that bundle (`BundleSummary::tag_owner`: its namespace, or the
//! user who uploaded it) and the repository its image came from (`quay.io/org/app`).
//!
//! - **Owners.** A bundle may move a tag only when it has the same owner and comes from
//!   the same source repository; otherwise its image fails at publish, before anything
//!   is tagged (`tag org/app:1 belongs to user alice (from quay.io/org/app)`), so the
//!   bundle tags nothing. A tag ShipperD never set but the registry has is not moved
//!   either. A target's [`TagPolicy`] lets an admin allow both (the take-over is logged
//!   and named in the image's `image.published`). Holders written before owners were
//!   kept (no owner) may be moved by anyone, who then owns the tag.
//! - **Order.** A tag moves only to the image of a bundle received later than the one
//!   that set it, so a late redelivery of an old bundle's job never moves a tag back.
//!
//! The commit claims each key by compare-and-set before it pushes the tag, checking the
//! owner again: two owners' bundles committing at the very same time cannot both win a
//! tag, and the one that finds the tag taken fails (some of its earlier tags may be set
//! by then; the check at publish keeps that to bundles published side by side). When the
//! bucket cannot be read the image's job is retried: the owner must be known.

use async_nats::jetstream::kv::{self, Operation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shipperd_model::{BundleId, BundleSummary, Digest, ImageState};
use shipperd_registry_targets::TagPolicy;

use crate::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    order: u64,
    bundle: BundleId,
    digest: Digest,
    /// The bundle's owner (`BundleSummary::tag_owner`); `None` in holders written before
    /// owners were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    /// The repository the image came from, host included when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

pub(crate) struct Tags {
    kv: kv::Store,
}

const MAX_ROUNDS: usize = 16;

/// A tag's holder as last read: `None` when nothing holds it.
type Read = Result<Option<kv::Entry>, shipperd_bus::Error>;

/// One tag of one registry, and its holder as read when its image began.
pub(crate) struct Tag {
    key: String,
    read: Read,
}

/// Whose a tag would be: a bundle's owner, and its image's source repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub owner: String,
    pub source: String,
}

impl Claim {
    pub(crate) fn of(s: &BundleSummary, img: &ImageState) -> Self {
        let src = &img.source;
        Claim {
            owner: s.tag_owner(),
            source: match &src.host {
                Some(h) => format!("{h}/{}", src.repository),
                None => src.repository.clone(),
            },
        }
    }
}

/// What a claim on a tag comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nobody else's: it may move.
    Free,
    /// Another owner's (or another source's), taken over as the target allows: from
    /// whom, for the log and the event.
    TakeOver(String),
    /// Another owner's: the image fails with this reason.
    Refused(String),
}

/// Whose a held tag is, said as a person reads it.
fn whose(h: &Holder) -> String {
    let owner = h.owner.as_deref().unwrap_or("another owner");
    match &h.source {
        Some(src) => format!("{owner} (from {src})"),
        None => owner.to_string(),
    }
}

/// A source repository's registry host (by Docker's rule: a first component with a
/// `.` or `:`, or `localhost`) and its path.
fn host_and_path(source: &str) -> (Option<&str>, &str) {
    match source.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, source),
    }
}

/// Are two source repositories the same? Equal paths, and equal hosts where both name
/// one: an image of a registry storage tree (oc-mirror, Koffer) carries no host, and is
/// the same repository as the one its tag was set from.
fn same_source(a: &str, b: &str) -> bool {
    match (host_and_path(a), host_and_path(b)) {
        ((Some(ha), pa), (Some(hb), pb)) => ha.eq_ignore_ascii_case(hb) && pa == pb,
        ((_, pa), (_, pb)) => pa == pb,
    }
}

/// May `claim` move a tag held by `h`?
fn judge(h: &Holder, claim: &Claim, policy: TagPolicy, tag: &str) -> Verdict {
    let (Some(owner), Some(source)) = (&h.owner, &h.source) else {
        // Written before owners were kept: the first owner to move it keeps it.
        return Verdict::Free;
    };
    if *owner == claim.owner && same_source(source, &claim.source) {
        return Verdict::Free;
    }
    if policy.take_over {
        return Verdict::TakeOver(whose(h));
    }
    Verdict::Refused(format!(
        "tag {tag} belongs to {} (this bundle: {}, from {}); the target's \
         tags.take_over lets an admin move it",
        whose(h),
        claim.owner,
        claim.source
    ))
}

impl Tag {
    /// Did a bundle point this tag at `digest` before (so the registry may have it
    /// already, worth one request to find out)? `false` when nothing says so, or the
    /// holders cannot be read.
    pub(crate) fn set_before(&self, digest: &Digest) -> bool {
        self.holder().is_some_and(|h| h.digest == *digest)
    }

    /// The tag, if its holder could be read (else why not).
    pub(crate) fn read_ok(self) -> Result<Self, shipperd_bus::Error> {
        let read = Ok(self.read?);
        Ok(Tag { read, ..self })
    }

    /// Is the tag held by a bundle of ShipperD's?
    pub(crate) fn held(&self) -> bool {
        matches!(self.read, Ok(Some(_)))
    }

    fn holder(&self) -> Option<Holder> {
        let e = self.read.as_ref().ok()?.as_ref()?;
        serde_json::from_slice(&e.value).ok()
    }

    /// May `claim` move this tag (`tag`, for messages), as it was read?
    pub(crate) fn judge(&self, claim: &Claim, policy: TagPolicy, tag: &str) -> Verdict {
        match self.holder() {
            Some(h) => judge(&h, claim, policy, tag),
            None => Verdict::Free,
        }
    }
}

/// What the commit does with one tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Move {
    /// Claimed: push it (taking it over from someone, when so).
    Push { taken_from: Option<String> },
    /// A bundle received later holds it: leave it.
    Keep,
    /// Another owner holds it now: the commit fails with this reason.
    Refused(String),
}

impl Tags {
    pub(crate) fn new(kv: kv::Store) -> Self {
        Tags { kv }
    }

    async fn entry(&self, key: &str) -> Read {
        match self.kv.entry(key).await {
            Ok(e) => Ok(e.filter(|e| e.operation == Operation::Put)),
            Err(error) => {
                tracing::debug!(%error, "tag holders unavailable");
                Err(shipperd_bus::Error::nats("reading who holds a tag")(error))
            }
        }
    }

    /// `repo:tag` at `reg`, with its holder.
    pub(crate) async fn read(&self, reg: &Registry, repo: &str, tag: &str) -> Tag {
        let key = tag_key(reg.host(), repo, tag);
        let read = self.entry(&key).await;
        Tag { key, read }
    }

    /// May bundle `s` point `tag` (`name`, for messages) at `digest` for `claim`? Claims
    /// the tag when so (starting from the holder `tag` was read with; reading again only
    /// when another writer came first).
    pub(crate) async fn may_move(
        &self,
        tag: Tag,
        s: &BundleSummary,
        digest: &Digest,
        claim: &Claim,
        policy: TagPolicy,
        name: &str,
    ) -> Result<Move, shipperd_bus::Error> {
        let Some(order) = s.order else {
            return Ok(Move::Push { taken_from: None });
        };
        let Tag { key, mut read } = tag;
        let mine = Holder {
            order,
            bundle: s.id.clone(),
            digest: digest.clone(),
            owner: Some(claim.owner.clone()),
            source: Some(claim.source.clone()),
        };
        let value: bytes::Bytes = serde_json::to_vec(&mine)
            .expect("a holder serialises")
            .into();
        for _ in 0..MAX_ROUNDS {
            let mut taken_from = None;
            let written: Result<(), shipperd_bus::BoxError> = match read? {
                None => self
                    .kv
                    .create(&key, value.clone())
                    .await
                    .map(|_| ())
                    .map_err(Into::into),
                Some(e) => {
                    let holder: Option<Holder> = serde_json::from_slice(&e.value).ok();
                    if let Some(h) = &holder {
                        match judge(h, claim, policy, name) {
                            Verdict::Free => {}
                            Verdict::TakeOver(from) => taken_from = Some(from),
                            Verdict::Refused(why) => return Ok(Move::Refused(why)),
                        }
                    }
                    match holder {
                        Some(h) if h == mine => return Ok(Move::Push { taken_from }),
                        Some(h) if h.order > order && h.digest != *digest => {
                            tracing::info!(
                                holder = %h.bundle,
                                "the tag belongs to a bundle received later; not moving it"
                            );
                            return Ok(Move::Keep);
                        }
                        _ => self
                            .kv
                            .update(&key, value.clone(), e.revision)
                            .await
                            .map(|_| ())
                            .map_err(Into::into),
                    }
                }
            };
            match written {
                Ok(()) => return Ok(Move::Push { taken_from }),
                Err(e) if shipperd_bus::lost_race(e.as_ref()) => {
                    read = self.entry(&key).await;
                }
                Err(e) => return Err(shipperd_bus::Error::nats("claiming a tag")(e)),
            }
        }
        Err(shipperd_bus::Error::Conflict(format!(
            "the holder of tag {name}"
        )))
    }
}

/// The bucket key of `repo:tag` at registry `host`.
fn tag_key(host: &str, repo: &str, tag: &str) -> String {
    let h = Sha256::digest(format!("{host}/{repo}:{tag}").as_bytes());
    format!("tag.{}", hex::encode(&h[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(owner: Option<&str>, source: Option<&str>) -> Holder {
        Holder {
            order: 1,
            bundle: BundleId::parse(&"a".repeat(64)).unwrap(),
            digest: Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap(),
            owner: owner.map(String::from),
            source: source.map(String::from),
        }
    }

    fn claim(owner: &str, source: &str) -> Claim {
        Claim {
            owner: owner.into(),
            source: source.into(),
        }
    }

    #[test]
    fn only_the_owner_from_the_same_source_moves_a_tag() {
        let h = holder(Some("user alice"), Some("quay.io/org/app"));
        let strict = TagPolicy::default();
        let alice = claim("user alice", "quay.io/org/app");
        assert_eq!(judge(&h, &alice, strict, "org/app:1"), Verdict::Free);
        for other in [
            claim("user bob", "quay.io/org/app"),
            claim("user alice", "evil.example/org/app"),
            claim("namespace team-b", "quay.io/org/app"),
        ] {
            match judge(&h, &other, strict, "org/app:1") {
                Verdict::Refused(why) => assert!(
                    why.starts_with("tag org/app:1 belongs to user alice (from quay.io/org/app)"),
                    "{why}"
                ),
                v => panic!("{other:?}: {v:?}"),
            }
            let admin = TagPolicy {
                take_over: true,
                ..TagPolicy::default()
            };
            assert_eq!(
                judge(&h, &other, admin, "org/app:1"),
                Verdict::TakeOver("user alice (from quay.io/org/app)".into())
            );
        }
        // A source without a host (a registry storage tree's) is the same repository.
        assert_eq!(
            judge(&h, &claim("user alice", "org/app"), strict, "org/app:1"),
            Verdict::Free
        );
        assert!(matches!(
            judge(&h, &claim("user alice", "org/other"), strict, "org/app:1"),
            Verdict::Refused(_)
        ));
        // A holder from before owners were kept: free to whoever comes first.
        assert_eq!(
            judge(
                &holder(None, None),
                &claim("user bob", "x/y"),
                strict,
                "y:1"
            ),
            Verdict::Free
        );
    }

    #[test]
    fn holders_written_before_owners_still_read() {
        let old = br#"{"order":3,"bundle":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}"#;
        let h: Holder = serde_json::from_slice(old).unwrap();
        assert_eq!(h.order, 3);
        assert_eq!(h.owner, None);
    }
}
