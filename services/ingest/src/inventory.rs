//! `GET /v1/inventory[?target=NAME]`: what ShipperD published to a target, from its own
//! records (no registry request): the images of every bundle sent to that target (the
//! default one when none is named) that reached the registry, by source repository,
//! with their tags as the latest bundle set them; and every blob location publish
//! recorded for that registry (`shipperd-blobs`). The connected side makes a bundle of
//! only what this does not list (`shipperd create --have`).
//!
//! It lists what ShipperD knows it published: a tag someone moved since, or a blob a
//! registry's retention rule deleted, is still listed. A bundle made against it that
//! then lacks a blob fails at publish, naming the blob, before any tag moves.

use std::collections::HashMap;

use futures::TryStreamExt as _;
use shipperd_bus::{
    Error as BusError,
    subjects::{BLOBS_BUCKET, registry_key_prefix},
};
use shipperd_model::{ImagePhase, Inventory, InventoryRepo, TargetName};
use shipperd_store::{Error, Result, Store};

/// The inventory of `target`; `None`: the one target bundles went to (a site with
/// several must name one).
pub async fn build(store: &Store, target: Option<&TargetName>) -> Result<Inventory> {
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
    Ok(inv)
}
