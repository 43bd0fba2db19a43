//! A site's inventory (`GET /v1/inventory`, `shipperd inventory`): what a target
//! registry holds of what ShipperD published there, for the connected side to make a
//! bundle of only what the site lacks (`shipperd create --have`).
//!
//! Compact by shape: images grouped by their source repository (tags and the manifests
//! known there), and every blob once, as its 64 hex digits. A site of 20,000 images
//! and 60,000 blobs gives a file of about 6 MB.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Digest;

/// The format's version; a reader refuses a version it does not know.
pub const INVENTORY_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub version: u32,
    /// The target's name at the site, as bundles name it (`None`: the default target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The registry's host (`host[:port]`): a bundle made against this inventory is
    /// refused by any other.
    pub registry: String,
    /// By source repository as bundles named it (`quay.io/org/app`; a registry storage
    /// tree's images have no host).
    pub repositories: BTreeMap<String, InventoryRepo>,
    /// Every blob (config or layer) ShipperD pushed there, as 64 hex digits, sorted.
    pub blobs: BTreeSet<String>,
    /// How it was checked against the registry (`None`: not checked, from ShipperD's
    /// records alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<Checked>,
}

/// What a check against the registry looked at (`HEAD` of manifests and blobs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checked {
    /// Every entry (else a sample, and every entry when the sample missed one).
    pub all: bool,
    pub manifests: u64,
    pub blobs: u64,
    /// Entries the registry no longer has, left out.
    pub missing: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryRepo {
    /// The repository in the target registry.
    pub repository: String,
    /// Tag → the digest ShipperD set it to last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, Digest>,
    /// Top manifests (and indexes) published there that no tag of `tags` names (those
    /// are listed once, under their tags).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub manifests: BTreeSet<Digest>,
}

impl Inventory {
    pub fn new(registry: impl Into<String>, target: Option<String>) -> Self {
        Inventory {
            version: INVENTORY_VERSION,
            target,
            registry: registry.into(),
            ..Default::default()
        }
    }

    /// Reads an inventory, refusing a version this build does not know.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version =
            serde_json::from_slice(bytes).map_err(|e| format!("not a ShipperD inventory: {e}"))?;
        if v.version != INVENTORY_VERSION {
            return Err(format!(
                "inventory version {} (this shipperd reads version {INVENTORY_VERSION})",
                v.version
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("not a ShipperD inventory: {e}"))
    }

    /// Does the site hold blob `d`?
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blobs.contains(d.hex())
    }

    /// Does the site hold manifest `d` in the repository images of `source` land in?
    pub fn has_manifest(&self, source: &str, d: &Digest) -> bool {
        self.repositories
            .get(source)
            .is_some_and(|r| r.manifests.contains(d) || r.tags.values().any(|t| t == d))
    }

    /// Lists each manifest once: those a tag names only under the tag.
    pub fn compact(&mut self) {
        for r in self.repositories.values_mut() {
            let tagged: BTreeSet<&Digest> = r.tags.values().collect();
            r.manifests.retain(|d| !tagged.contains(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_versions() {
        let d = Digest::of(b"x");
        let mut inv = Inventory::new("registry.site:5000", None);
        inv.repositories.insert(
            "quay.io/org/app".into(),
            InventoryRepo {
                repository: "mirror/org/app".into(),
                tags: BTreeMap::from([("1".into(), d.clone())]),
                manifests: BTreeSet::from([d.clone(), Digest::of(b"untagged")]),
            },
        );
        inv.blobs.insert(d.hex().to_string());
        inv.compact();
        assert_eq!(
            inv.repositories["quay.io/org/app"].manifests.len(),
            1,
            "the tagged one goes"
        );
        assert!(inv.has_manifest("quay.io/org/app", &Digest::of(b"untagged")));
        let bytes = serde_json::to_vec(&inv).unwrap();
        let back = Inventory::from_json(&bytes).unwrap();
        assert_eq!(back, inv);
        assert!(back.has_blob(&d) && back.has_manifest("quay.io/org/app", &d));
        assert!(!back.has_manifest("quay.io/org/other", &d));
        let future = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\":1", "\"version\":2");
        let err = Inventory::from_json(future.as_bytes()).unwrap_err();
        assert!(err.contains("version 2"), "{err}");
        assert!(Inventory::from_json(b"{}").is_err());
    }
}
