//! Each image's publish plan, worked out once by unpack and stored in the bundle's plans
//! file (`bundles/<id>/plans`, one JSON document after another). A publish job names
//! its plan's offset and length, so publishing an image reads a few kilobytes whatever
//! the bundle's size: no catalog of every blob, no walk of the manifests again.

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use shipperd_model::PlanRef;

use crate::{
    BlobSource, Descriptor, Digest, Error, ImagePlan, Result, catalog::BlobStore, catalog::Location,
};

/// Everything publish needs of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPlan {
    /// Distinct blobs (configs, layers) of the image and its referrers, and where their
    /// bytes are.
    pub blobs: Vec<PlannedBlob>,
    /// Manifests with their exact bytes, children first; the last is the image's top
    /// manifest (or index).
    pub manifests: Vec<PlannedManifest>,
    /// Referrers with their children first, pushed after the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<PlannedReferrer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedBlob {
    pub desc: Descriptor,
    pub at: Location,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedManifest {
    pub desc: Descriptor,
    /// Its exact bytes; empty when `absent`.
    #[serde(with = "b64")]
    pub bytes: Vec<u8>,
    /// The bundle does not carry it (a differential bundle): the target registry must
    /// have it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absent: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedReferrer {
    /// The manifest it refers to, for the referrer itself; `None` for its children.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    pub desc: Descriptor,
    #[serde(with = "b64")]
    pub bytes: Vec<u8>,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

impl StoredPlan {
    /// A walked plan, with each blob's location from `locate`.
    pub fn new(
        plan: ImagePlan,
        mut locate: impl FnMut(&Digest) -> Result<Location>,
    ) -> Result<Self> {
        Ok(StoredPlan {
            blobs: plan
                .blobs
                .into_iter()
                .map(|desc| {
                    Ok(PlannedBlob {
                        at: locate(&desc.digest)?,
                        desc,
                    })
                })
                .collect::<Result<_>>()?,
            manifests: plan
                .manifests
                .into_iter()
                .map(|(desc, bytes)| PlannedManifest {
                    desc,
                    absent: bytes.is_none(),
                    bytes: bytes.unwrap_or_default(),
                })
                .collect(),
            referrers: plan
                .referrers
                .into_iter()
                .map(|(subject, desc, bytes)| PlannedReferrer {
                    subject,
                    desc,
                    bytes,
                })
                .collect(),
        })
    }

    /// The image's own top manifest (or index).
    pub fn top(&self) -> Option<&PlannedManifest> {
        self.manifests.last()
    }

    /// Blobs and manifests the bundle does not carry (the registry must have them).
    pub fn absent(&self) -> usize {
        self.blobs
            .iter()
            .filter(|b| b.at == Location::Absent)
            .count()
            + self.manifests.iter().filter(|m| m.absent).count()
    }

    /// Bytes of everything the image needs: blobs, manifests and referrers.
    pub fn bytes_total(&self) -> u64 {
        self.blobs.iter().map(|b| b.desc.size).sum::<u64>()
            + self
                .manifests
                .iter()
                .map(|m| m.bytes.len() as u64)
                .sum::<u64>()
            + self
                .referrers
                .iter()
                .map(|r| r.bytes.len() as u64)
                .sum::<u64>()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a bundle's plans file: plans one after another, then fsynced and renamed into
/// place by [`PlanWriter::finish`] (a crash leaves no half-written plans file). The
/// walk is deterministic, so the same bundle always gives the same plans at the same
/// offsets.
pub struct PlanWriter {
    out: BufWriter<std::fs::File>,
    tmp: PathBuf,
    dest: PathBuf,
    offset: u64,
}

impl PlanWriter {
    pub fn create(dest: &Path) -> Result<Self> {
        // Its own temp file: two unpacks of one bundle (a re-announced one) write the
        // same plans, and must not write them into one file.
        let tmp = crate::cas::temp_beside(dest);
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(PlanWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            dest: dest.to_path_buf(),
            offset: 0,
        })
    }

    /// Appends one plan; where it is.
    pub fn append(&mut self, plan: &StoredPlan) -> Result<PlanRef> {
        let body = serde_json::to_vec(plan).expect("a plan serialises");
        self.out.write_all(&body).map_err(io(&self.tmp))?;
        self.out.write_all(b"\n").map_err(io(&self.tmp))?;
        let at = PlanRef {
            offset: self.offset,
            len: body.len() as u64,
        };
        self.offset += body.len() as u64 + 1;
        Ok(at)
    }

    pub fn finish(self) -> Result<()> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| io(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest))
    }
}

/// Largest plan read back (manifests are bounded by `maxManifestBytes`; this only
/// guards against a damaged job).
const MAX_PLAN_BYTES: u64 = 256 << 20;

/// Reads one plan from a plans file.
pub fn read_plan(path: &Path, at: PlanRef) -> Result<StoredPlan> {
    use std::os::unix::fs::FileExt as _;
    if at.len > MAX_PLAN_BYTES {
        return Err(Error::Layout(format!(
            "a plan of {} bytes in {} is over the limit",
            at.len,
            path.display()
        )));
    }
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; at.len as usize];
    file.read_exact_at(&mut buf, at.offset).map_err(io(path))?;
    serde_json::from_slice(&buf).map_err(|e| Error::Json {
        path: format!("{} at {}", path.display(), at.offset),
        reason: e.to_string(),
    })
}

/// The blobs of one image's plan, read from its bundle.
pub struct PlanBlobs {
    store: Arc<BlobStore>,
    blobs: Vec<PlannedBlob>,
}

impl PlanBlobs {
    pub fn new(store: Arc<BlobStore>, plan: &StoredPlan) -> Self {
        PlanBlobs {
            store,
            blobs: plan.blobs.clone(),
        }
    }
}

impl BlobSource for PlanBlobs {
    fn blob(&self, digest: &Digest) -> Result<Option<(Box<dyn std::io::Read + '_>, u64)>> {
        let Some(b) = self
            .blobs
            .iter()
            .find(|b| &b.desc.digest == digest && b.at != Location::Absent)
        else {
            return Ok(None);
        };
        let reader = self.store.read(&b.at, b.desc.size, digest.hex())?;
        Ok(Some((reader, b.desc.size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_read_back_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("plans");
        let mut w = PlanWriter::create(&dest).unwrap();
        let mut refs = Vec::new();
        for i in 0..3u8 {
            let bytes = vec![i; 10 + usize::from(i)];
            let plan = StoredPlan {
                blobs: vec![PlannedBlob {
                    desc: Descriptor::new("m", Digest::of(&[i]), 1),
                    at: Location::Range {
                        offset: u64::from(i),
                    },
                }],
                manifests: vec![PlannedManifest {
                    desc: Descriptor::new("m", Digest::of(&bytes), bytes.len() as u64),
                    bytes,
                    absent: false,
                }],
                referrers: vec![],
            };
            refs.push((w.append(&plan).unwrap(), plan));
        }
        assert!(!dest.exists(), "not in place before finish");
        w.finish().unwrap();
        for (at, plan) in refs.iter().rev() {
            assert_eq!(&read_plan(&dest, *at).unwrap(), plan);
        }
        assert_eq!(refs[2].1.bytes_total(), 1 + 12);
    }
}
