//! `GET /v1/inventory[?target=NAME]`: what ShipperD published to a target, from its own
//! records (no registry request): the images of every bundle sent to that target (the
//! default one when none is named) that reached the registry, by source repository,
//! with their tags as the latest bundle set them; and every blob location publish
//! recorded for that registry (`shipperd-blobs`). The connected side makes a bundle of
//! only what this does not list (`shipperd create --have`).
//!
//! Where ingest knows the targets (`shipperd all`), it checks what it lists against the
//! registry with `HEAD`: a sample of the manifests and blobs (`?check=all`: every one),
//! and every one when the sample finds one missing (a retention rule, a restored
//! backup); what the registry no longer has is left out. Without the targets (a lone
//! `shipperd ingest`) it lists ShipperD's records as they are (`checked` absent): a
//! bundle made against it that then lacks a blob fails at publish, naming the blob,
//! before any tag moves.

use std::collections::HashMap;

use futures::{StreamExt as _, TryStreamExt as _};
use shipperd_bus::{
    Error as BusError,
    subjects::{BLOBS_BUCKET, registry_key_prefix},
};
use shipperd_model::{Checked, Digest, ImagePhase, Inventory, InventoryRepo, TargetName};
use shipperd_registry::Registry;
use shipperd_registry_targets::LiveTargets;
use shipperd_store::{Error, Result, Store};

/// Entries looked at in a sample.
const SAMPLE: usize = 64;
/// `HEAD`s at once.
const CHECKS: usize = 8;

/// How to check an inventory: the targets, and whether every entry is looked at.
pub struct Check<'a> {
    pub targets: &'a LiveTargets,
    pub all: bool,
}

/// The inventory of `target`; `None`: the one target bundles went to (a site with
/// several must name one). Checked against the registry when `check` is given.
pub async fn build(
    store: &Store,
    target: Option<&TargetName>,
    check: Option<Check<'_>>,
) -> Result<Inventory> {
    let mut bundles = store.state().list().await?;
    bundles.retain(|s| !s.deleting);
    let target = match target {
        Some(t) => Some(t.clone()),
        None => {
            let used: std::collections::BTreeSet<&TargetName> =
                bundles.iter().filter_map(|s| s.target.as_ref()).collect();
            if used.len() > 1 {
                let names: Vec<&str> = used.iter().map(|t| t.as_str()).collect();
                return Err(Error::BadRequest(format!(
                    "bundles went to several targets ({}): name one (?target=, --target)",
                    names.join(", ")
                )));
            }
            used.into_iter().next().cloned()
        }
    };
    let target = target.as_ref();
    bundles.retain(|s| s.target.as_ref() == target);
    // Oldest first: a later bundle's tag wins.
    bundles.sort_by(|a, b| (a.order, &a.received_at).cmp(&(b.order, &b.received_at)));
    // By registry host: a target pointed at another registry since counts only its
    // current one (the latest bundle's).
    let mut by_host: HashMap<String, Inventory> = HashMap::new();
    let mut latest = None;
    for s in &bundles {
        let images = store.state().images(&s.id, 0, s.counts.total);
        futures::pin_mut!(images);
        while let Some(img) = images.try_next().await? {
            let Some(host) = img.target.host.clone() else {
                continue;
            };
            if s.phase_of(&img) != ImagePhase::Published {
                continue;
            }
            latest = Some(host.clone());
            let inv = by_host
                .entry(host.clone())
                .or_insert_with(|| Inventory::new(host, target.map(|t| t.to_string())));
            let source = match &img.source.host {
                Some(h) => format!("{h}/{}", img.source.repository),
                None => img.source.repository.clone(),
            };
            let repo = inv
                .repositories
                .entry(source)
                .or_insert_with(|| InventoryRepo {
                    repository: img.target.repository.clone(),
                    ..Default::default()
                });
            repo.repository = img.target.repository.clone();
            if let Some(tag) = &img.target.tag {
                repo.tags.insert(tag.clone(), img.digest.clone());
            }
            repo.manifests.insert(img.digest.clone());
        }
    }
    let Some(mut inv) = latest.and_then(|h| by_host.remove(&h)) else {
        return Ok(Inventory::new("", target.map(|t| t.to_string())));
    };
    let kv = store.bus().bucket(BLOBS_BUCKET).await?;
    let inv_target = inv.target.clone();
    let prefix = format!("{}.", registry_key_prefix(&inv.registry));
    let keys = kv
        .keys()
        .await
        .map_err(|e| Error::Bus(BusError::nats("listing blob locations")(e)))?;
    futures::pin_mut!(keys);
    while let Some(k) = keys
        .try_next()
        .await
        .map_err(|e| Error::Bus(BusError::nats("listing blob locations")(e)))?
    {
        if let Some(hex) = k.strip_prefix(&prefix)
            && shipperd_model::Digest::from_hex(hex).is_ok()
        {
            inv.blobs.insert(hex.to_string());
        }
    }
    if let Some(check) = check {
        let targets = check.targets.get();
        let name = inv_target
            .as_deref()
            .and_then(|t| TargetName::parse(t).ok());
        if let Ok(t) = targets.get(name.as_ref())
            && t.url.host == inv.registry
        {
            let reg = Registry::reader(t.clone())
                .map_err(|e| Error::Busy(format!("checking the inventory: {e}")))?;
            let mut checked = verify(&mut inv, &reg, &kv, check.all).await?;
            if !checked.all && checked.missing > 0 {
                // The registry lost something: look at everything.
                let first = checked.missing;
                checked = verify(&mut inv, &reg, &kv, true).await?;
                checked.missing += first;
            }
            inv.checked = Some(checked);
        }
    }
    inv.compact();
    Ok(inv)
}

/// `SAMPLE` of `items`, spread evenly over them (all of them when `all`).
fn sample<T>(items: Vec<T>, all: bool) -> Vec<T> {
    let step = if all {
        1
    } else {
        items.len().div_ceil(SAMPLE).max(1)
    };
    items.into_iter().step_by(step).collect()
}

/// Looks at the inventory's manifests and blobs (a sample, or all) with `HEAD`, and
/// leaves out what the registry does not have (a manifest's tags with it).
async fn verify(
    inv: &mut Inventory,
    reg: &Registry,
    kv: &async_nats::jetstream::kv::Store,
    all: bool,
) -> Result<Checked> {
    let unavailable = |e: shipperd_registry::RegistryError| {
        Error::Busy(format!(
            "checking the inventory against {}: {}",
            reg.host(),
            e.cause()
        ))
    };
    let manifests: Vec<(String, String, Digest)> = inv
        .repositories
        .iter()
        .flat_map(|(src, r)| {
            r.manifests
                .iter()
                .map(|d| (src.clone(), r.repository.clone(), d.clone()))
        })
        .collect();
    let manifests_len = manifests.len();
    let looked = sample(manifests, all);
    let n_manifests = looked.len() as u64;
    let gone: Vec<(String, Digest)> = futures::stream::iter(looked)
        .map(|(src, repo, d)| async move {
            let there = reg.manifest_exists(&repo, &d).await?;
            Ok((!there).then_some((src, d)))
        })
        .buffer_unordered(CHECKS)
        .try_filter_map(|gone| std::future::ready(Ok(gone)))
        .try_collect()
        .await
        .map_err(unavailable)?;
    for (src, d) in &gone {
        if let Some(r) = inv.repositories.get_mut(src) {
            r.manifests.remove(d);
            r.tags.retain(|_, t| t != d);
        }
    }
    let prefix = registry_key_prefix(&inv.registry);
    let blobs_len = inv.blobs.len();
    let looked = sample(inv.blobs.iter().cloned().collect(), all);
    let n_blobs = looked.len() as u64;
    let missing_blobs: Vec<String> = futures::stream::iter(looked)
        .map(|hex| {
            let key = format!("{prefix}.{hex}");
            async move {
                let Ok(d) = Digest::from_hex(&hex) else {
                    return Ok(Some(hex));
                };
                let repo = match kv.get(&key).await {
                    Ok(Some(r)) => String::from_utf8_lossy(&r).into_owned(),
                    // Its record went meanwhile: not known to be there.
                    _ => return Ok(Some(hex)),
                };
                let there = reg.blob_exists(&repo, &d).await?;
                Ok((!there).then_some(hex))
            }
        })
        .buffer_unordered(CHECKS)
        .try_filter_map(|gone| std::future::ready(Ok(gone)))
        .try_collect()
        .await
        .map_err(unavailable)?;
    for hex in &missing_blobs {
        inv.blobs.remove(hex);
    }
    Ok(Checked {
        // A sample of a small inventory is all of it.
        all: all || (n_manifests == manifests_len as u64 && n_blobs == blobs_len as u64),
        manifests: n_manifests,
        blobs: n_blobs,
        missing: (gone.len() + missing_blobs.len()) as u64,
    })
}
