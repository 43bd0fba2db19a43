//! Bundle and image records, and the rules that move them.
//!
//! A bundle is one small [`BundleSummary`] (phase, counts, bytes, error, timestamps)
//! plus one [`ImageState`] per image, each stored and written on its own, so finishing
//! an image or reporting its progress costs the same whatever the bundle's size.
//!
//! ```text
//!   Received ──► Unpacking ──► Publishing ──► Tagging ──► Published
//!       │            │              │             │
//!       └────────────┴──────────────┴─────────────┴──► Failed ──(retry)──► Publishing / Tagging / Received
//! ```
//!
//! Publishing pushes every image's content by digest; only when every image of the
//! bundle has succeeded does the bundle move to `Tagging`, where its tags are set (the
//! bundle-level commit). A bundle with any failed image (a corrupt blob, a missing one)
//! tags nothing.
//!
//! The counts in the summary are exact although image outcomes arrive at least once
//! (redelivered jobs, replicas racing): an outcome is first *claimed* in the summary
//! ([`BundleSummary::claim`], a compare-and-set that counts it, unless a claim for that
//! image is there already), then written to the image, then the claim is released. An
//! image is counted when its state says so ([`ImageState::is_counted`]) or while a claim
//! for it is held; the store checks both in the same compare-and-set loop, so no image is
//! counted twice and the claim that counts the last image moves the bundle to its
//! terminal phase exactly once. Claims live only between those writes, so there are at
//! most as many as images finishing at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    BundleId, Digest, Reference, TargetName,
    effects::{Effect, Effects},
    now_rfc3339,
};

/// Where a bundle is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Received,
    Unpacking,
    Publishing,
    /// Every image's content is in the registry; its tags are being set.
    Tagging,
    Published,
    Failed,
}

impl Phase {
    /// `Published` and `Failed` are where every bundle ends.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Published | Phase::Failed)
    }

    /// What a bundle in this phase is doing, for messages ("stalled while unpacking").
    pub fn doing(self) -> &'static str {
        match self {
            Phase::Received => "waiting to be unpacked",
            Phase::Unpacking => "unpacking",
            Phase::Publishing => "publishing",
            Phase::Tagging => "setting its tags",
            Phase::Published => "published",
            Phase::Failed => "failed",
        }
    }
}

/// Where one image of a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImagePhase {
    Pending,
    Published,
    Failed,
}

impl ImagePhase {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pending" => Some(ImagePhase::Pending),
            "published" => Some(ImagePhase::Published),
            "failed" => Some(ImagePhase::Failed),
            _ => None,
        }
    }
}

/// How many images a bundle has, and how they ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u32,
    /// In the registry (skipped ones included).
    pub published: u32,
    /// Of the published, those whose tag already pointed at their digest (Day-2).
    pub skipped: u32,
    pub failed: u32,
}

impl Counts {
    pub fn done(&self) -> u32 {
        self.published + self.failed
    }

    pub fn pending(&self) -> u32 {
        self.total.saturating_sub(self.done())
    }

    /// How many images are in `phase`.
    pub fn of(&self, phase: ImagePhase) -> u32 {
        match phase {
            ImagePhase::Pending => self.pending(),
            ImagePhase::Published => self.published,
            ImagePhase::Failed => self.failed,
        }
    }
}

/// How one image ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `Published` or `Failed`.
    pub phase: ImagePhase,
    /// Published without pushing: the tag already pointed at the digest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The image's bytes (blobs and manifests, shared ones counted per image).
    #[serde(default)]
    pub bytes: u64,
    /// Why it failed, in full (names the blob, repository, registry answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure with what is particular to this image left out, so failures of many
    /// images group under one cause in the bundle's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Pushes it took (0 when not known).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Where its blobs came from.
    #[serde(default, skip_serializing_if = "BlobCounts::is_empty")]
    pub blobs: BlobCounts,
}

/// Where an image's (or a bundle's images') blobs came from: uploaded from the bundle,
/// mounted from another repository of the registry, or already in the repository.
/// Counted per image (a layer two images share counts for each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobCounts {
    #[serde(default)]
    pub uploaded: u64,
    #[serde(default)]
    pub mounted: u64,
    #[serde(default)]
    pub present: u64,
    /// Bytes uploaded.
    #[serde(default)]
    pub uploaded_bytes: u64,
}

impl BlobCounts {
    pub fn is_empty(&self) -> bool {
        *self == BlobCounts::default()
    }

    fn add(&mut self, o: &BlobCounts) {
        self.uploaded += o.uploaded;
        self.mounted += o.mounted;
        self.present += o.present;
        self.uploaded_bytes += o.uploaded_bytes;
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero64(n: &u64) -> bool {
    *n == 0
}

impl Outcome {
    pub fn published(bytes: u64, skipped: bool, blobs: BlobCounts) -> Self {
        Outcome {
            phase: ImagePhase::Published,
            skipped,
            bytes,
            error: None,
            cause: None,
            attempts: 0,
            blobs,
        }
    }

    pub fn failed(error: String, cause: String) -> Self {
        Outcome {
            phase: ImagePhase::Failed,
            skipped: false,
            bytes: 0,
            error: Some(error),
            cause: Some(cause),
            attempts: 0,
            blobs: BlobCounts::default(),
        }
    }
}

/// A failure cause and how many images it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    pub cause: String,
    pub images: u32,
}

/// Distinct causes a summary keeps; the rest are counted as "other errors".
pub const MAX_CAUSES: usize = 5;
const OTHER_CAUSES: &str = "other errors";

/// Where an image's publish plan is in the bundle's plans file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRef {
    pub offset: u64,
    pub len: u64,
}

/// One image of a bundle: where it comes from, where it lands, how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageState {
    /// Its position in the bundle (stable: jobs, events and keys name it).
    pub index: u32,
    pub source: Reference,
    pub target: Reference,
    /// Digest, media type and size of its top manifest (or index).
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub phase: ImagePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of its blobs and manifests, and how many of them the registry has.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    /// The tag already pointed at this digest: nothing was pushed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Pushes tried so far in this generation (failed ones retried later count).
    #[serde(default)]
    pub attempts: u32,
    /// The bundle generation of its outcome (a retry starts a new generation, in which
    /// images that failed before are pending again).
    #[serde(default)]
    pub generation: u32,
    /// Where its plan is.
    pub plan: PlanRef,
    /// Where its blobs came from (once published).
    #[serde(default, skip_serializing_if = "BlobCounts::is_empty")]
    pub blobs: BlobCounts,
    /// An operator catalog: its config carries the label
    /// `operators.operatorframework.io.index.configs.v1`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalog: bool,
    /// What the site's signature policy said of it (none when no policy applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Trust>,
}

/// How the site's signature policy accepted an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// The policy's scope that applied (`default` for its default).
    pub scope: String,
    /// The requirements that accepted it, each with the key whose signature did (its
    /// OpenPGP fingerprint, or `sha256:` of a cosign public key).
    pub by: Vec<TrustedBy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedBy {
    pub requirement: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Trust {
    /// Accepted by a signature (not by `insecureAcceptAnything` alone).
    pub fn signed(&self) -> bool {
        self.by.iter().any(|b| b.key.is_some())
    }
}

/// What the signature policy said of a bundle's images, in counts (bounded: never a
/// list of images).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The policy files applied: the site-wide one, then the target's.
    pub policies: Vec<String>,
    /// Images accepted by a signature.
    pub signed: u32,
    /// Images accepted by `insecureAcceptAnything` alone.
    pub unsigned: u32,
    /// The keys whose signatures were accepted, at most [`Verification::MAX_KEYS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
}

impl Verification {
    pub const MAX_KEYS: usize = 16;

    /// Counts one accepted image.
    pub fn count(&mut self, trust: &Trust) {
        if trust.signed() {
            self.signed += 1;
        } else {
            self.unsigned += 1;
        }
        for k in trust.by.iter().filter_map(|b| b.key.as_ref()) {
            if self.keys.len() < Self::MAX_KEYS && !self.keys.contains(k) {
                self.keys.push(k.clone());
            }
        }
    }
}

impl ImageState {
    /// Is this image's outcome part of the bundle's counts in `generation`? Published
    /// images stay counted; a failure counts only in the generation it happened in.
    pub fn is_counted(&self, generation: u32) -> bool {
        match self.phase {
            ImagePhase::Pending => false,
            ImagePhase::Published => true,
            ImagePhase::Failed => self.generation == generation,
        }
    }

    /// The phase as a bundle in `generation` sees it.
    pub fn phase_in(&self, generation: u32) -> ImagePhase {
        if self.is_counted(generation) {
            self.phase
        } else {
            ImagePhase::Pending
        }
    }

    /// Records `outcome` (as claimed in `generation`).
    pub fn apply(&mut self, outcome: &Outcome, generation: u32) {
        self.attempts = self.attempts.max(outcome.attempts);
        self.phase = outcome.phase;
        self.skipped = outcome.skipped;
        self.error = outcome.error.clone();
        self.generation = generation;
        self.blobs = outcome.blobs;
        if outcome.phase == ImagePhase::Published {
            self.bytes_done = self.bytes_total;
        }
    }
}

/// What unpack found, for [`BundleSummary::unpacked`].
#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    pub format: String,
    pub images: u32,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Of `blobs`, those the bundle does not carry (a differential bundle): the
    /// registry must have them already.
    pub absent: u64,
    /// Sum of the images' bytes (shared blobs counted per image).
    pub bytes_total: u64,
    /// The target the images were mapped for (the default one resolved to its name).
    pub target: Option<TargetName>,
    /// What the signature policy said (none when no policy applies).
    pub verification: Option<Verification>,
}

/// What [`BundleSummary::claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Counted now; `finished` when it moved the bundle to its terminal phase.
    Counted { finished: bool },
    /// A claim for this image was there already: its outcome stands.
    Held,
    /// The bundle is not publishing: nothing to count.
    NotPublishing,
}

/// The uploader of a bundle taken from the drop directory.
pub const DROP_DIRECTORY: &str = "drop-directory";
/// The uploader of a bundle uploaded while the API asks for no token.
pub const ANONYMOUS: &str = "anonymous";

/// A bundle: small and of fixed size whatever its image count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleSummary {
    pub id: BundleId,
    /// The name it was uploaded or dropped under.
    pub name: String,
    pub size: u64,
    /// Where it is stored, relative to the data directory.
    pub path: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The registry target it goes to (`None`: the default target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetName>,
    /// The Kubernetes namespace that brought it in: a `Bundle`'s, for a bundle the
    /// operator fetched or took from a path. `None`: the ingest endpoint or the drop
    /// directory (the operator's upload namespace). Only `Bundle`s of this namespace
    /// may follow, apply or delete it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Who uploaded it through the ingest endpoint: the token file's user or the
    /// Kubernetes user (`anonymous` when the API is open), or `drop-directory`. `None`
    /// for a bundle a `Bundle` brought in (its namespace is the owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploader: Option<String>,
    #[serde(default)]
    pub counts: Counts,
    /// Distinct blobs (manifests included) its images need, and their bytes.
    #[serde(default)]
    pub blobs: u64,
    #[serde(default)]
    pub blob_bytes: u64,
    /// Of `blobs`, those the bundle does not carry (the registry had them already).
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub blobs_absent: u64,
    /// What the site's signature policy said of its images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// Where the published images' blobs came from (summed over images).
    #[serde(default, skip_serializing_if = "BlobCounts::is_empty")]
    pub blob_sources: BlobCounts,
    /// While `Tagging`: images below this index are tagged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tag_cursor: u32,
    /// Bytes of every image (shared blobs counted per image), and of the finished ones.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    pub received_at: String,
    pub updated_at: String,
    /// When unpack handed the images to publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_at: Option<String>,
    /// When it reached `Published` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The terminal event (bundle.published / bundle.failed) is stored on the bus.
    #[serde(default)]
    pub announced: bool,
    /// Bumped by each retry: failures of earlier generations no longer count.
    #[serde(default)]
    pub generation: u32,
    /// Bumped each time a sweep re-drives it (keeps re-sent messages distinct).
    #[serde(default)]
    pub redrives: u32,
    /// The order bundles were received in (the `bundle.received` event's stream
    /// sequence): a tag moves only to the image of a bundle received later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u64>,
    /// Outcomes counted but not yet written to their image, by image index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<u32, Outcome>,
    /// Why images failed, most frequent first (at most [`MAX_CAUSES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Cause>,
    /// `DELETE` began: its files and state are going.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// When its stored files were removed after it finished (`--keep-finished`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<String>,
}

impl BundleSummary {
    pub fn new(
        id: BundleId,
        name: String,
        size: u64,
        path: String,
        target: Option<TargetName>,
    ) -> Self {
        let now = now_rfc3339();
        BundleSummary {
            id,
            name,
            size,
            path,
            phase: Phase::Received,
            error: None,
            format: None,
            target,
            owner: None,
            uploader: None,
            counts: Counts::default(),
            blobs: 0,
            blob_bytes: 0,
            blobs_absent: 0,
            verification: None,
            blob_sources: BlobCounts::default(),
            tag_cursor: 0,
            bytes_total: 0,
            bytes_done: 0,
            received_at: now.clone(),
            updated_at: now,
            unpacked_at: None,
            finished_at: None,
            announced: false,
            generation: 0,
            redrives: 0,
            order: None,
            claims: BTreeMap::new(),
            causes: Vec::new(),
            deleting: false,
            expired_at: None,
        }
    }

    /// Who the tags this bundle sets belong to: the namespace whose `Bundle` brought it
    /// in, else whoever uploaded it. Another owner's bundle may not move them.
    pub fn tag_owner(&self) -> String {
        match (&self.owner, &self.uploader) {
            (Some(ns), _) => format!("namespace {ns}"),
            (None, Some(u)) if u == DROP_DIRECTORY || u == ANONYMOUS => u.clone(),
            (None, Some(u)) => format!("user {u}"),
            (None, None) => ANONYMOUS.into(),
        }
    }

    /// Received → Unpacking; `order` is kept from the first time.
    pub fn start_unpacking(&mut self, order: u64) -> bool {
        if self.phase != Phase::Received || self.deleting {
            return false;
        }
        self.phase = Phase::Unpacking;
        self.order.get_or_insert(order);
        true
    }

    /// Unpacking → Publishing, with what unpack found: its images' jobs go out, then
    /// `bundle.unpacked`. A bundle without images is published at once.
    pub fn unpacked(&mut self, u: &Unpacked) -> Option<Effects> {
        if self.phase != Phase::Unpacking || self.deleting {
            return None;
        }
        self.phase = Phase::Publishing;
        self.unpacked_at = Some(now_rfc3339());
        self.format = Some(u.format.clone());
        self.counts = Counts {
            total: u.images,
            ..Counts::default()
        };
        self.blobs = u.blobs;
        self.blob_bytes = u.blob_bytes;
        self.blobs_absent = u.absent;
        self.bytes_total = u.bytes_total;
        self.bytes_done = 0;
        if u.target.is_some() {
            self.target = u.target.clone();
        }
        self.verification = u.verification.clone();
        let effects = Effects::of([Effect::Dispatch, Effect::Unpacked]);
        Some(if self.check_done() {
            effects.then(self.follow_up())
        } else {
            effects
        })
    }

    /// Fails a bundle that has not ended (a broken bundle, a stage that gave up, a
    /// stalled one): its end is announced.
    pub fn fail(&mut self, error: String) -> Option<Effects> {
        if self.phase.is_terminal() {
            return None;
        }
        self.phase = Phase::Failed;
        self.error = Some(error);
        self.finished_at = Some(now_rfc3339());
        Some(self.follow_up())
    }

    /// What moves the bundle on from its phase; each effect is idempotent, so sending
    /// them again (a redelivery, a sweep) is harmless. The one place that decides what
    /// follows a phase:
    ///
    /// | phase | effects |
    /// |---|---|
    /// | `Received`, `Unpacking` | announce it (unpack) |
    /// | `Publishing` | the jobs of its images not yet counted |
    /// | `Tagging` | the commit job |
    /// | `Published` | announce its end; let go of its expanded blobs |
    /// | `Failed` | announce its end (and let go of the blobs when it failed before its images were listed: a retry unpacks it again) |
    pub fn follow_up(&self) -> Effects {
        match self.phase {
            Phase::Received | Phase::Unpacking => Effects::of([Effect::Announce]),
            Phase::Publishing => Effects::of([Effect::Dispatch]),
            Phase::Tagging => Effects::of([Effect::Commit]),
            Phase::Published => Effects::of([Effect::Ended, Effect::ReleaseBlobs]),
            Phase::Failed if self.unpacked_at.is_none() => {
                Effects::of([Effect::Ended, Effect::ReleaseBlobs])
            }
            Phase::Failed => Effects::of([Effect::Ended]),
        }
    }

    /// What follows an image's recorded outcome: its event, when it is sent now (a
    /// failure; an image skipped because its tag was there; a pushed image's goes
    /// out when the commit sets its tag), then what the bundle's phase needs once
    /// publishing is over.
    pub fn after_image(&self, img: &ImageState) -> Effects {
        let mut effects = Effects::none();
        if img.phase == ImagePhase::Failed || (img.phase == ImagePhase::Published && img.skipped) {
            effects.push(Effect::ImageEnded(Box::new(img.clone())));
        }
        if self.phase == Phase::Publishing {
            effects
        } else {
            effects.then(self.follow_up())
        }
    }

    /// A sweep found the bundle stalled: send what moves it on again, counted; after
    /// `max` re-drives it fails instead, saying so.
    pub fn redrive(&mut self, max: u32) -> Option<Effects> {
        if self.phase.is_terminal() || self.deleting {
            return None;
        }
        if self.redrives >= max {
            let error = format!(
                "stalled while {}: sent on again {} times without finishing; retry it once \
                 the cause is fixed",
                self.phase.doing(),
                self.redrives
            );
            return self.fail(error);
        }
        self.redrives += 1;
        Some(self.follow_up())
    }

    /// Counts the outcome of image `index`, unless a claim for it is held already. The
    /// caller has checked, in the same compare-and-set round, that the image itself is
    /// not counted ([`ImageState::is_counted`]).
    pub fn claim(&mut self, index: u32, outcome: &Outcome) -> Claimed {
        if self.phase != Phase::Publishing {
            return Claimed::NotPublishing;
        }
        if self.claims.contains_key(&index) {
            return Claimed::Held;
        }
        match outcome.phase {
            ImagePhase::Published => {
                self.counts.published += 1;
                self.counts.skipped += u32::from(outcome.skipped);
                self.blob_sources.add(&outcome.blobs);
                self.bytes_done = (self.bytes_done + outcome.bytes).min(self.bytes_total);
            }
            ImagePhase::Failed => {
                self.counts.failed += 1;
                let cause = outcome
                    .cause
                    .clone()
                    .or_else(|| outcome.error.clone())
                    .unwrap_or_else(|| "unknown error".into());
                self.add_cause(cause);
            }
            // Not an outcome; nothing to count.
            ImagePhase::Pending => return Claimed::Held,
        }
        self.claims.insert(index, outcome.clone());
        Claimed::Counted {
            finished: self.check_done(),
        }
    }

    /// Sets the counts to `tally`, what the images' own states say (they are the
    /// truth; the counts are kept beside them for speed), when they disagree and no
    /// claim is in flight; then moves the bundle on if every image has ended. A sweep
    /// does this for a stalled bundle: a NATS cluster that lost a summary write in a
    /// failover (nats-server 2.9) would otherwise leave it waiting for images that
    /// ended long ago.
    pub fn recount(&mut self, tally: Counts) -> Option<Effects> {
        if self.phase != Phase::Publishing || !self.claims.is_empty() {
            return None;
        }
        // Lost writes only ever lose increments; a tally read while an image finished
        // may be behind the summary, and never lowers it.
        let raised = Counts {
            total: self.counts.total,
            published: tally.published.max(self.counts.published),
            skipped: tally.skipped.max(self.counts.skipped),
            failed: tally.failed.max(self.counts.failed),
        };
        if raised == self.counts || raised.done() > self.counts.total {
            return None;
        }
        for _ in self.counts.failed..raised.failed {
            self.add_cause("image failed (cause not recorded in the summary)".into());
        }
        self.counts = raised;
        if self.check_done() {
            Some(self.follow_up())
        } else {
            Some(Effects::none())
        }
    }

    /// The claim on image `index` was written to the image: let it go.
    pub fn release(&mut self, index: u32) -> bool {
        self.claims.remove(&index).is_some()
    }

    fn add_cause(&mut self, cause: String) {
        if let Some(c) = self.causes.iter_mut().find(|c| c.cause == cause) {
            c.images += 1;
        } else if self.causes.len() < MAX_CAUSES {
            self.causes.push(Cause { cause, images: 1 });
        } else if let Some(other) = self.causes.iter_mut().find(|c| c.cause == OTHER_CAUSES) {
            other.images += 1;
        } else {
            // Make room for "other errors" by folding in the rarest cause.
            self.causes.sort_by_key(|c| std::cmp::Reverse(c.images));
            let rarest = self.causes.pop().map_or(0, |c| c.images);
            self.causes.push(Cause {
                cause: OTHER_CAUSES.into(),
                images: rarest + 1,
            });
        }
        self.causes.sort_by_key(|c| std::cmp::Reverse(c.images));
    }

    /// Moves a publishing bundle whose images have all ended on: to `Tagging` when every
    /// one is in the registry (straight to `Published` when no tag needs setting), else
    /// to `Failed`, tagging nothing. Whether it moved.
    fn check_done(&mut self) -> bool {
        if self.phase != Phase::Publishing || self.counts.pending() > 0 {
            return false;
        }
        if self.counts.failed == 0 {
            self.error = None;
            self.tag_cursor = 0;
            if self.counts.published == self.counts.skipped {
                self.phase = Phase::Published;
                self.finished_at = Some(now_rfc3339());
            } else {
                self.phase = Phase::Tagging;
            }
        } else {
            self.phase = Phase::Failed;
            self.finished_at = Some(now_rfc3339());
            self.error = Some(self.failure_text());
        }
        true
    }

    /// Notes that images below `cursor` are tagged (a resumed commit starts there).
    pub fn tagged_through(&mut self, cursor: u32, generation: u32) -> bool {
        if self.phase != Phase::Tagging
            || self.generation != generation
            || self.deleting
            || cursor <= self.tag_cursor
        {
            return false;
        }
        self.tag_cursor = cursor;
        true
    }

    /// Every tag is set: `Tagging` → `Published`.
    pub fn tagged(&mut self, generation: u32) -> Option<Effects> {
        if self.phase != Phase::Tagging || self.generation != generation || self.deleting {
            return None;
        }
        self.phase = Phase::Published;
        self.tag_cursor = self.counts.total;
        self.finished_at = Some(now_rfc3339());
        Some(self.follow_up())
    }

    /// "4 of 4 images failed: connection refused by 127.0.0.1:5000 (4 images)".
    pub fn failure_text(&self) -> String {
        let causes: Vec<String> = self
            .causes
            .iter()
            .map(|c| {
                let s = if c.images == 1 { "" } else { "s" };
                format!("{} ({} image{s})", c.cause, c.images)
            })
            .collect();
        let head = format!(
            "{} of {} images failed",
            self.counts.failed, self.counts.total
        );
        if causes.is_empty() {
            head
        } else {
            format!("{head}: {}", causes.join("; "))
        }
    }

    /// Starts a new generation of a `Failed` bundle: unpacked again when it failed
    /// before its images were listed; its tags set again when every image is in the
    /// registry (setting them failed); else its failed images are pending again
    /// (published ones stay published). `None` when the bundle is not `Failed`.
    pub fn retry(&mut self) -> Option<Effects> {
        if self.phase != Phase::Failed || self.deleting || !self.claims.is_empty() {
            return None;
        }
        self.generation += 1;
        self.redrives = 0;
        self.error = None;
        self.finished_at = None;
        self.announced = false;
        self.causes.clear();
        if self.unpacked_at.is_none() {
            self.phase = Phase::Received;
        } else if self.counts.failed == 0 && self.counts.pending() == 0 {
            self.phase = Phase::Tagging;
            self.tag_cursor = 0;
        } else {
            self.phase = Phase::Publishing;
            self.counts.failed = 0;
        }
        Some(self.follow_up())
    }

    /// Where `img` is as this bundle sees it: its phase in the current generation, or
    /// the outcome a claim holds for it (counted, not yet written to the image).
    pub fn phase_of(&self, img: &ImageState) -> ImagePhase {
        match self.claims.get(&img.index) {
            Some(o) if !img.is_counted(self.generation) => o.phase,
            _ => img.phase_in(self.generation),
        }
    }

    /// `img` as this bundle sees it: with the outcome a claim holds for it applied when
    /// the claim is not yet written to the image.
    pub fn view_of(&self, img: &ImageState) -> ImageState {
        let mut img = img.clone();
        if let Some(o) = self.claims.get(&img.index)
            && !img.is_counted(self.generation)
        {
            img.apply(o, self.generation);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publishing(n: u32) -> BundleSummary {
        let id = BundleId::parse(&"c".repeat(64)).unwrap();
        let mut s = BundleSummary::new(id, "b".into(), 1, "p".into(), None);
        assert!(s.start_unpacking(7));
        assert!(
            s.unpacked(&Unpacked {
                format: "tar".into(),
                images: n,
                bytes_total: 10 * u64::from(n),
                ..Unpacked::default()
            })
            .is_some()
        );
        s
    }

    fn ok() -> Outcome {
        Outcome::published(10, false, BlobCounts::default())
    }

    #[test]
    fn a_recount_from_the_images_moves_a_bundle_whose_counts_lost_writes() {
        let mut s = publishing(3);
        assert!(matches!(s.claim(0, &ok()), Claimed::Counted { .. }));
        s.release(0);
        // The images say all three ended; the summary saw one.
        let tally = Counts {
            total: 3,
            published: 3,
            ..Counts::default()
        };
        let effects = s.recount(tally).expect("the counts change");
        assert_eq!(s.counts.published, 3);
        assert_eq!(s.phase, Phase::Tagging);
        assert_eq!(effects, Effects::of([Effect::Commit]));
        // Agreeing counts, or a claim in flight, change nothing.
        assert!(s.recount(tally).is_none());
        let mut held = publishing(2);
        assert!(matches!(held.claim(0, &ok()), Claimed::Counted { .. }));
        let two = Counts {
            total: 2,
            published: 2,
            ..Counts::default()
        };
        assert!(held.recount(two).is_none());
        // A tally behind the summary (read while an image finished) lowers nothing.
        let mut s = publishing(2);
        assert!(matches!(s.claim(0, &ok()), Claimed::Counted { .. }));
        s.release(0);
        let behind = Counts {
            total: 2,
            ..Counts::default()
        };
        assert!(s.recount(behind).is_none());
        assert_eq!(s.counts.published, 1);
        // A tally beyond the bundle's images is not believed.
        let mut s = publishing(1);
        let too_many = Counts {
            total: 1,
            published: 2,
            ..Counts::default()
        };
        assert!(s.recount(too_many).is_none());
    }

    /// Moves a bundle whose images are all in the registry through tagging.
    fn commit(s: &mut BundleSummary) {
        assert_eq!(s.phase, Phase::Tagging);
        assert!(s.tagged_through(1, s.generation));
        assert!(!s.tagged_through(1, s.generation));
        assert!(s.tagged(s.generation).is_some());
        assert!(s.tagged(s.generation).is_none());
    }

    fn refused() -> Outcome {
        Outcome::failed(
            "blob sha256:aa to app: connection refused".into(),
            "connection refused by 127.0.0.1:5000".into(),
        )
    }

    #[test]
    fn the_last_outcome_ends_the_bundle_once() {
        let mut s = publishing(2);
        assert_eq!(s.claim(0, &ok()), Claimed::Counted { finished: false });
        assert_eq!(s.phase, Phase::Publishing);
        assert_eq!(s.claim(1, &ok()), Claimed::Counted { finished: true });
        assert_eq!(s.bytes_done, 20);
        assert_eq!(s.finished_at, None, "not finished before its tags are set");
        // A redelivered outcome for the same image while its claim is held: not again.
        assert_eq!(s.claim(1, &ok()), Claimed::NotPublishing);
        assert_eq!(s.counts.published, 2);
        commit(&mut s);
        assert_eq!(s.phase, Phase::Published);
        assert!(s.finished_at.is_some());
    }

    #[test]
    fn a_bundle_of_images_already_tagged_needs_no_commit() {
        let mut s = publishing(2);
        let skipped = Outcome::published(10, true, BlobCounts::default());
        s.claim(0, &skipped);
        s.claim(1, &skipped);
        assert_eq!(s.phase, Phase::Published);
    }

    #[test]
    fn a_failed_image_tags_nothing_and_a_failed_commit_is_retried_as_one() {
        let mut s = publishing(2);
        let sent = BlobCounts {
            uploaded: 2,
            mounted: 1,
            present: 0,
            uploaded_bytes: 7,
        };
        s.claim(0, &Outcome::published(10, false, sent));
        s.claim(1, &refused());
        assert_eq!(s.phase, Phase::Failed, "one failure: no tagging");
        assert_eq!(s.blob_sources, sent);
        s.claims.clear();
        assert_eq!(s.retry(), Some(Effects::of([Effect::Dispatch])));
        s.claim(1, &ok());
        assert_eq!(s.phase, Phase::Tagging);
        // Setting the tags failed: a retry sets them again, pushing nothing.
        s.claims.clear();
        assert!(s.tagged_through(1, s.generation));
        assert!(s.fail("tagging failed".into()).is_some());
        assert_eq!(s.retry(), Some(Effects::of([Effect::Commit])));
        assert_eq!((s.phase, s.tag_cursor), (Phase::Tagging, 0));
        assert!(
            s.tagged(s.generation - 1).is_none(),
            "a stale generation's commit"
        );
        commit(&mut s);
    }

    #[test]
    fn a_held_claim_is_counted_once() {
        let mut s = publishing(3);
        assert_eq!(s.claim(0, &ok()), Claimed::Counted { finished: false });
        assert_eq!(s.claim(0, &refused()), Claimed::Held);
        assert_eq!((s.counts.published, s.counts.failed), (1, 0));
        assert!(s.release(0));
        assert!(!s.release(0));
    }

    #[test]
    fn failures_group_by_cause() {
        let mut s = publishing(4);
        for i in 0..4 {
            s.claim(i, &refused());
        }
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("4 of 4 images failed: connection refused by 127.0.0.1:5000 (4 images)")
        );
    }

    #[test]
    fn causes_stay_bounded() {
        let mut s = publishing(100);
        for i in 0..100 {
            let cause = format!("cause {}", i % 9);
            s.claim(i, &Outcome::failed(cause.clone(), cause));
        }
        assert!(s.causes.len() <= MAX_CAUSES);
        assert_eq!(s.causes.iter().map(|c| c.images).sum::<u32>(), 100);
        assert!(s.error.unwrap().starts_with("100 of 100 images failed: "));
    }

    #[test]
    fn an_empty_bundle_is_published_at_once() {
        let s = publishing(0);
        assert_eq!(s.phase, Phase::Published);
    }

    #[test]
    fn retry_makes_failed_images_pending_again() {
        let mut s = publishing(2);
        s.claim(0, &ok());
        s.claim(1, &refused());
        assert_eq!(s.retry(), None, "claims are still held");
        s.release(0);
        s.release(1);
        assert_eq!(s.retry(), Some(Effects::of([Effect::Dispatch])));
        assert_eq!(s.phase, Phase::Publishing);
        assert_eq!((s.counts.published, s.counts.failed), (1, 0));
        let mut failed = ImageState {
            phase: ImagePhase::Failed,
            error: Some("x".into()),
            attempts: 5,
            ..image(1)
        };
        assert!(!failed.is_counted(s.generation));
        assert_eq!(failed.phase_in(s.generation), ImagePhase::Pending);
        assert_eq!(s.claim(1, &ok()), Claimed::Counted { finished: true });
        failed.apply(&ok(), s.generation);
        assert!(failed.is_counted(s.generation));
        commit(&mut s);
    }

    #[test]
    fn a_bundle_that_failed_unpacking_is_unpacked_again() {
        let id = BundleId::parse(&"d".repeat(64)).unwrap();
        let mut s = BundleSummary::new(id, "b".into(), 1, "p".into(), None);
        assert_eq!(
            s.fail("corrupt".into()),
            Some(Effects::of([Effect::Ended, Effect::ReleaseBlobs])),
            "nothing was listed: its blobs go, a retry unpacks it again"
        );
        assert!(s.fail("again".into()).is_none());
        assert_eq!(s.retry(), Some(Effects::of([Effect::Announce])));
        assert_eq!(s.phase, Phase::Received);
        assert!(s.start_unpacking(9));
        assert_eq!(s.order, Some(9));
    }

    #[test]
    fn what_follows_each_phase() {
        use Effect::*;
        let mut s = publishing(1);
        let img = |phase, skipped| ImageState {
            phase,
            skipped,
            ..image(0)
        };
        // An image pushed while others are pending: nothing yet (its event goes out
        // with its tag).
        s.counts.total = 2;
        assert_eq!(
            s.after_image(&img(ImagePhase::Published, false)),
            Effects::none()
        );
        let failed = img(ImagePhase::Failed, false);
        assert_eq!(
            s.after_image(&failed),
            Effects::of([ImageEnded(Box::new(failed.clone()))])
        );
        let rows: [(Phase, Option<&str>, Effects); 6] = [
            (Phase::Received, None, Effects::of([Announce])),
            (Phase::Unpacking, None, Effects::of([Announce])),
            (Phase::Publishing, Some("t"), Effects::of([Dispatch])),
            (Phase::Tagging, Some("t"), Effects::of([Commit])),
            (
                Phase::Published,
                Some("t"),
                Effects::of([Ended, ReleaseBlobs]),
            ),
            (Phase::Failed, Some("t"), Effects::of([Ended])),
        ];
        for (phase, unpacked, want) in rows {
            s.phase = phase;
            s.unpacked_at = unpacked.map(str::to_string);
            assert_eq!(s.follow_up(), want, "{phase:?}");
        }
        s.phase = Phase::Tagging;
        let skipped = img(ImagePhase::Published, true);
        assert_eq!(
            s.after_image(&skipped),
            Effects::of([ImageEnded(Box::new(skipped.clone())), Commit])
        );
    }

    #[test]
    fn redrives_are_counted_and_bounded() {
        let mut s = publishing(3);
        for n in 1..=2 {
            assert_eq!(s.redrive(2), Some(Effects::of([Effect::Dispatch])));
            assert_eq!(s.redrives, n);
        }
        assert_eq!(s.redrive(2), Some(Effects::of([Effect::Ended])));
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some(
                "stalled while publishing: sent on again 2 times without finishing; retry \
                 it once the cause is fixed"
            )
        );
        assert_eq!(s.redrive(2), None, "an ended bundle is not sent on");
        assert!(s.retry().is_some());
        assert_eq!(s.redrives, 0, "a retry starts counting again");
    }

    fn image(index: u32) -> ImageState {
        ImageState {
            index,
            source: Reference::parse("a:1").unwrap(),
            target: Reference::parse("r.io/a:1").unwrap(),
            digest: Digest::of(b"x"),
            media_type: String::new(),
            size: 1,
            phase: ImagePhase::Pending,
            error: None,
            bytes_total: 10,
            bytes_done: 0,
            skipped: false,
            attempts: 0,
            generation: 0,
            plan: PlanRef::default(),
            blobs: BlobCounts::default(),
            catalog: false,
            trust: None,
        }
    }
}
