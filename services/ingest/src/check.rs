//! `POST /v1/bundles/{id}/check` (`shipperd check ID`): is what a `Published` bundle
//! put in its registry still there? Every image it published is looked at with `HEAD`
//! (a few at once): its tag must still name the digest the bundle published, and the
//! manifest must still be in its repository. What is found is counted; the answer names
//! the first images that drifted, so it stays small at any image count.
//!
//! This is the on-demand half of drift detection (issue 32); the periodic check, the
//! `InSync` condition and repair come on top of it.

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use shipperd_model::{BundleId, ImagePhase, Phase};
use shipperd_registry::Registry;
use shipperd_registry_targets::LiveTargets;
use shipperd_store::{Error, Result, Store};

/// `HEAD`s at once: a check of 20,000 images must not crowd out the site's pulls.
const CHECKS: usize = 8;
/// Drifted images named in the answer.
const FIRST: usize = 10;
/// Checks running at once in this process; one more is refused (503): anyone who may
/// upload may ask for a check, and each costs up to two requests per image.
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Drift {
    pub id: String,
    /// The images looked at (those the bundle published).
    pub checked: u64,
    /// A tag that names another digest now.
    pub moved_tags: u64,
    /// A tag that is gone (its manifest may still be there).
    pub missing_tags: u64,
    /// A manifest the repository no longer has.
    pub missing_manifests: u64,
    /// Nothing moved or went missing.
    pub in_sync: bool,
    /// The first images that drifted, each with what was found.
    pub first: Vec<Drifted>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drifted {
    pub index: u32,
    /// Where the bundle put it (`host/repository[:tag]`).
    pub target: String,
    pub digest: String,
    /// `tag moved to sha256:…`, `tag missing`, `manifest missing`, or both of the last.
    pub found: String,
}

/// An image's tag as the registry has it now.
#[derive(Debug, PartialEq, Eq)]
enum Tag {
    Untagged,
    AtDigest,
    Moved(String),
    Missing,
}

/// Checks bundle `id` against its target registry.
pub async fn check(store: &Store, targets: &LiveTargets, id: &BundleId) -> Result<Drift> {
    let _running = RUNNING.try_acquire().map_err(|_| {
        Error::Busy("two bundle checks are running already; try again when they end".into())
    })?;
    let s = match store.known(id).await? {
        Some(s) if !s.deleting => s,
        _ => return Err(Error::NotFound(id.to_string())),
    };
    if s.phase != Phase::Published {
        return Err(Error::Conflict(format!(
            "bundle {id} is {:?}: only a Published bundle is checked against its registry",
            s.phase
        )));
    }
    let target = targets
        .get()
        .get(s.target.as_ref())
        .map_err(|e| Error::BadRequest(format!("bundle {id}'s target: {e}")))?
        .clone();
    let host = target.url.host.clone();
    let reg =
        Registry::reader(target).map_err(|e| Error::Busy(format!("checking bundle {id}: {e}")))?;
    let unavailable = |e: shipperd_registry::RegistryError| {
        Error::Busy(format!(
            "checking bundle {id} against {}: {}",
            reg.host(),
            e.cause()
        ))
    };
    let images = store.state().images(id, 0, s.counts.total);
    let found = images
        .try_filter(|img| {
            // Only what the bundle published, to this registry (a target moved to
            // another registry since has nothing of it there).
            std::future::ready(
                s.phase_of(img) == ImagePhase::Published
                    && img.target.host.as_deref() == Some(host.as_str()),
            )
        })
        .map_err(Error::from)
        .map_ok(|img| {
            let (reg, unavailable) = (&reg, &unavailable);
            async move {
                let looked = async {
                    let repo = &img.target.repository;
                    let tag = match &img.target.tag {
                        None => Tag::Untagged,
                        Some(t) => match reg.tag_digest(repo, t).await? {
                            None => Tag::Missing,
                            Some(d) if d == img.digest => Tag::AtDigest,
                            Some(d) => Tag::Moved(d.to_string()),
                        },
                    };
                    // A tag still at its digest says the manifest is there.
                    let manifest_gone =
                        tag != Tag::AtDigest && !reg.manifest_exists(repo, &img.digest).await?;
                    Ok::<_, shipperd_registry::RegistryError>((tag, manifest_gone))
                };
                let (tag, manifest_gone) = looked.await.map_err(unavailable)?;
                Ok((img, tag, manifest_gone))
            }
        })
        .try_buffer_unordered(CHECKS);
    futures::pin_mut!(found);
    let mut drift = Drift {
        id: id.to_string(),
        ..Default::default()
    };
    while let Some(r) = found.next().await {
        let (img, tag, manifest_gone) = r?;
        drift.checked += 1;
        let mut what = Vec::new();
        match &tag {
            Tag::Moved(other) => {
                drift.moved_tags += 1;
                what.push(format!("tag moved to {other}"));
            }
            Tag::Missing => {
                drift.missing_tags += 1;
                what.push("tag missing".to_string());
            }
            Tag::Untagged | Tag::AtDigest => {}
        }
        if manifest_gone {
            drift.missing_manifests += 1;
            what.push("manifest missing".to_string());
        }
        if !what.is_empty() && drift.first.len() < FIRST {
            drift.first.push(Drifted {
                index: img.index,
                target: img.target.to_string(),
                digest: img.digest.to_string(),
                found: what.join(", "),
            });
        }
    }
    drift.in_sync = drift.moved_tags + drift.missing_tags + drift.missing_manifests == 0;
    drift.first.sort_by_key(|d| d.index);
    Ok(drift)
}
