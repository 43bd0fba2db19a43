//! The site's signature policy applied to a bundle's images, before any of them is
//! published (by unpack) or served (by `shipperd serve`): each image (by its source
//! reference, host included) is checked against the site-wide policy and its target's,
//! with the signatures the bundle carries:
//!
//! - simple signatures in containers' lookaside layout anywhere in the bundle,
//!   `sigstore/<repo>@sha256=<hex>/signature-<n>` (as `skopeo copy --sign-by` writes to a
//!   `file://` lookaside, and `shipperd create --registries.d` carries them), and
//!   oc-mirror's release signatures, `working-dir/signatures/<tag>-sha256-<hex>`;
//! - cosign signatures: the `sha256-<hex>.sig` image of the same repository, OCI 1.1
//!   referrers whose layers carry `dev.cosignproject.cosign/signature`, and referrers
//!   holding a Sigstore bundle (cosign's new bundle format);
//! - for what the bundle brings none for (a differential bundle), the `.sig` the target
//!   registry holds ([`recheck_in_registry`]).
//!
//! What cosign attaches to an image (`sha256-<hex>.sig`, `.att`, `.sbom`) goes with
//! its image's answer when the image is in the bundle.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use shipperd_bundle::{BlobPaths, BundleFs, Descriptor, Digest, ManifestDoc, Reference, Walker};
use shipperd_model::state::{Trust, TrustedBy, Verification};
use shipperd_policy::{CosignSignature, Signatures, Verdict as PolicyVerdict, Verifier, cosign};

/// Signatures read for one image, at most: more are left unread.
const MAX_PER_IMAGE: usize = 16;
/// The largest signature file read.
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

/// The policies that apply to a bundle: the site-wide one, then its target's. An image
/// must satisfy every one.
#[derive(Debug, Default)]
pub struct Policies(Vec<Verifier>);

impl Policies {
    /// Reads each policy file and the keys it names; `None` when there is none.
    pub fn load(paths: &[PathBuf]) -> Result<Option<Self>, String> {
        let mut all = Vec::new();
        for p in paths {
            all.push(Verifier::load(p).map_err(|e| format!("{}: {e}", p.display()))?);
        }
        Ok((!all.is_empty()).then_some(Policies(all)))
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|v| v.name().to_string()).collect()
    }

    /// Every policy's answer for one image: how it was accepted, or why not.
    pub fn check(
        &self,
        image: &Reference,
        digest: &Digest,
        signatures: &dyn Fn() -> Signatures,
    ) -> Verdict {
        let needed = self.0.iter().any(|v| v.needs_signatures(image));
        let found = if needed {
            signatures()
        } else {
            Signatures::default()
        };
        let mut trust: Option<Trust> = None;
        for v in &self.0 {
            match v.check(image, digest, &found) {
                PolicyVerdict::Accepted { scope, by } => {
                    let by = by.into_iter().map(|a| TrustedBy {
                        requirement: a.requirement.to_string(),
                        key: a.key,
                    });
                    match &mut trust {
                        Some(t) => t.by.extend(by),
                        None => {
                            trust = Some(Trust {
                                scope,
                                by: by.collect(),
                            })
                        }
                    }
                }
                PolicyVerdict::Rejected { scope, reason } => {
                    let policy = if self.0.len() > 1 {
                        format!("policy {}, ", v.name())
                    } else {
                        String::new()
                    };
                    return Err(Refused {
                        kind: reason.kind(),
                        reason: format!("{reason} ({policy}scope {scope})"),
                    });
                }
            }
        }
        Ok(trust.unwrap_or_else(|| Trust {
            scope: "default".into(),
            by: Vec::new(),
        }))
    }

    /// The bundle's counts, from its images' answers.
    pub fn verification(&self, verdicts: &[Verdict]) -> Verification {
        let mut v = Verification {
            policies: self.names(),
            ..Verification::default()
        };
        for t in verdicts.iter().flatten() {
            v.count(t);
        }
        v
    }
}

/// Why an image was rejected: the kind (a metric label) and the reason as said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub kind: &'static str,
    pub reason: String,
}

/// An image's answer.
pub type Verdict = Result<Trust, Refused>;

/// Counts the answers in `shipperd_signature_verifications_total`.
pub fn count_metrics(verdicts: &[Verdict]) {
    let m = shipperd_telemetry::metrics::metrics();
    for v in verdicts {
        let (result, by) = match v {
            Ok(t) if t.signed() => ("accepted", "signed"),
            Ok(_) => ("accepted", "unsigned"),
            Err(r) => ("rejected", r.kind),
        };
        m.verifications
            .get_or_create(&shipperd_telemetry::metrics::labels(
                ("result", result),
                ("by", by),
            ))
            .inc();
    }
}

/// The cosign attachment tag `sha256-<hex>.sig|.att|.sbom`: the hex of its subject.
pub fn attached_to(image: &Reference) -> Option<&str> {
    let tag = image.tag.as_deref()?;
    let rest = tag.strip_prefix("sha256-")?;
    let (hex, kind) = rest.split_once('.')?;
    (hex.len() == 64
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && matches!(kind, "sig" | "att" | "sbom"))
    .then_some(hex)
}

/// `host/repository` of an image, the key attachments are found by.
fn repo(image: &Reference) -> String {
    format!(
        "{}/{}",
        image.host.as_deref().unwrap_or("docker.io"),
        image.repository
    )
}

/// Where the bundle's signatures are, by the digest they are for.
pub struct BundleSignatures<'a> {
    fs: &'a dyn BundleFs,
    walker: &'a Walker<'a>,
    paths: &'a BlobPaths,
    /// Simple signature files, by the hex of the digest they sign.
    simple: HashMap<String, Vec<String>>,
    /// cosign signature manifests (`.sig` images by repository, and referrers).
    sig_images: HashMap<(String, String), Vec<Descriptor>>,
    referrers: &'a BTreeMap<Digest, Vec<Descriptor>>,
}

/// The digest hex a lookaside signature's path names:
/// `.../sigstore/<repo>@sha256=<hex>/signature-<n>`.
fn lookaside_digest(path: &str) -> Option<&str> {
    let (dir, file) = path.rsplit_once('/')?;
    let n = file.strip_prefix("signature-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !(dir.starts_with("sigstore/") || dir.contains("/sigstore/")) {
        return None;
    }
    let hex = dir.rsplit_once("@sha256=")?.1;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Whether `name` is a signature file's name: `<tag>-sha256-<64 hex>`, of plain
/// characters (it becomes a file name, then a ConfigMap key).
pub fn signature_name(name: &str) -> bool {
    let Some((tag, hex)) = name.rsplit_once("-sha256-") else {
        return false;
    };
    (1..=128).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The digest hex an oc-mirror release signature's path names:
/// `.../working-dir/signatures/<tag>-sha256-<hex>`.
fn release_digest(path: &str) -> Option<&str> {
    let (dir, name) = path.rsplit_once('/')?;
    if !(dir == "working-dir/signatures" || dir.ends_with("/working-dir/signatures")) {
        return None;
    }
    signature_name(name).then(|| name.rsplit_once("-sha256-").map(|(_, h)| h))?
}

impl<'a> BundleSignatures<'a> {
    /// Finds the signature files and images of a bundle (names only: nothing is read
    /// until an image's signatures are asked for).
    pub fn index(
        fs: &'a dyn BundleFs,
        walker: &'a Walker<'a>,
        paths: &'a BlobPaths,
        images: &[shipperd_bundle::LayoutImage],
        referrers: &'a BTreeMap<Digest, Vec<Descriptor>>,
    ) -> Self {
        let mut simple: HashMap<String, Vec<String>> = HashMap::new();
        for path in fs.files() {
            if let Some(hex) = lookaside_digest(path).or_else(|| release_digest(path)) {
                let list = simple.entry(hex.to_ascii_lowercase()).or_default();
                if list.len() < MAX_PER_IMAGE {
                    list.push(path.to_string());
                }
            }
        }
        let mut sig_images: HashMap<(String, String), Vec<Descriptor>> = HashMap::new();
        for img in images {
            if let Some(hex) = attached_to(&img.source)
                && img
                    .source
                    .tag
                    .as_deref()
                    .is_some_and(|t| t.ends_with(".sig"))
            {
                let list = sig_images
                    .entry((repo(&img.source), hex.to_ascii_lowercase()))
                    .or_default();
                if list.len() < MAX_PER_IMAGE {
                    list.push(img.descriptor.clone());
                }
            }
        }
        BundleSignatures {
            fs,
            walker,
            paths,
            simple,
            sig_images,
            referrers,
        }
    }

    /// The signatures the bundle carries for `image` at `digest`. What cannot be read
    /// is left out (and logged): the policy then finds the image unsigned.
    pub fn of(&self, image: &Reference, digest: &Digest) -> Signatures {
        let hex = digest.hex().to_ascii_lowercase();
        let mut out = Signatures::default();
        for path in self.simple.get(&hex).into_iter().flatten() {
            match self.fs.read_small(path, MAX_SIGNATURE_BYTES) {
                Ok(b) => out.simple.push(b),
                Err(error) => tracing::warn!(%error, path, "a signature is not readable"),
            }
        }
        let manifests = self
            .sig_images
            .get(&(repo(image), hex))
            .into_iter()
            .flatten()
            .chain(self.referrers.get(digest).into_iter().flatten());
        for m in manifests {
            if out.cosign.len() + out.bundles.len() >= MAX_PER_IMAGE {
                break;
            }
            if let Err(error) = self.cosign(m, &mut out) {
                tracing::warn!(%error, manifest = %m.digest, "a signature manifest is not readable");
            }
        }
        out
    }

    /// The cosign signatures of one signature manifest: each layer carrying the
    /// signature annotation, with its payload.
    fn cosign(&self, m: &Descriptor, out: &mut Signatures) -> shipperd_bundle::Result<()> {
        let what = format!("signature manifest {}", m.digest);
        let Some(bytes) = self.walker.manifest_bytes(&what, m)? else {
            return Ok(());
        };
        let doc = ManifestDoc::parse(&what, &bytes)?;
        let is_bundle = |t: Option<&str>| t.is_some_and(|t| t.starts_with(cosign::SIGSTORE_BUNDLE));
        if is_bundle(m.artifact_type.as_deref()) || is_bundle(doc.artifact_type.as_deref()) {
            // A Sigstore bundle: its one layer is the bundle's JSON.
            if let Some(layer) = doc.layers.first()
                && layer.size <= cosign::MAX_PAYLOAD
                && out.bundles.len() < MAX_PER_IMAGE
                && let Some(path) = self.paths.get(&layer.digest)
            {
                out.bundles
                    .push(self.fs.read_small(&path, cosign::MAX_PAYLOAD)?);
            }
            return Ok(());
        }
        let out = &mut out.cosign;
        for layer in &doc.layers {
            let Some(sig) = layer.annotations.get(cosign::SIGNATURE_ANNOTATION) else {
                continue;
            };
            if out.len() >= MAX_PER_IMAGE || layer.size > cosign::MAX_PAYLOAD {
                continue;
            }
            let Some(path) = self.paths.get(&layer.digest) else {
                continue;
            };
            let payload = self.fs.read_small(&path, cosign::MAX_PAYLOAD)?;
            out.push(CosignSignature {
                payload,
                signature: sig.clone(),
            });
        }
        Ok(())
    }
}

/// Checks every image of a bundle (its source reference and top digest), in order;
/// what cosign attached to an image in the bundle takes that image's answer.
pub fn check_all(
    policies: &Policies,
    images: &[(Reference, Digest)],
    signatures: &BundleSignatures<'_>,
) -> Vec<Verdict> {
    let mut each: Vec<Option<Verdict>> = vec![None; images.len()];
    for (i, (image, digest)) in images.iter().enumerate() {
        if attached_to(image).is_none() {
            each[i] = Some(policies.check(image, digest, &|| signatures.of(image, digest)));
        }
    }
    let subjects = subjects(images);
    for (i, (image, digest)) in images.iter().enumerate() {
        if each[i].is_none() {
            each[i] = Some(match subject_of(&subjects, image) {
                Some(s) => each[s].clone().expect("subjects are checked first"),
                None => policies.check(image, digest, &|| signatures.of(image, digest)),
            });
        }
    }
    each.into_iter().flatten().collect()
}

/// The images that are not attachments, by `(repository, digest hex)`.
fn subjects(images: &[(Reference, Digest)]) -> HashMap<(String, String), usize> {
    images
        .iter()
        .enumerate()
        .filter(|(_, (image, _))| attached_to(image).is_none())
        .map(|(i, (image, digest))| ((repo(image), digest.hex().to_ascii_lowercase()), i))
        .collect()
}

/// The image in the bundle that `image` is attached to.
fn subject_of(subjects: &HashMap<(String, String), usize>, image: &Reference) -> Option<usize> {
    let hex = attached_to(image)?;
    subjects
        .get(&(repo(image), hex.to_ascii_lowercase()))
        .copied()
}

/// The bundle's rejection, naming the first rejected images and why (not what is
/// attached to them, which is counted): `None` when every image was accepted.
pub fn rejection(images: &[(Reference, Digest)], verdicts: &[Verdict]) -> Option<String> {
    const SHOWN: usize = 5;
    let rejected = verdicts.iter().filter(|v| v.is_err()).count();
    if rejected == 0 {
        return None;
    }
    let subjects = subjects(images);
    let named: Vec<String> = images
        .iter()
        .zip(verdicts)
        .filter_map(|((image, _), v)| {
            let why = v.as_ref().err()?;
            subject_of(&subjects, image)
                .is_none()
                .then(|| format!("{image}: {}", why.reason))
        })
        .collect();
    let mut msg = format!(
        "the signature policy rejects {rejected} of {} images: {}",
        images.len(),
        named
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    if named.len() > SHOWN {
        msg.push_str(&format!("; and {} more", named.len() - SHOWN));
    }
    msg.push_str(". Nothing of the bundle was published.");
    Some(msg)
}

/// The largest cosign signature manifest read from a registry.
const MAX_SIG_MANIFEST: usize = 256 << 10;
/// Registry reads at once when signatures are looked for there.
const REGISTRY_READS: usize = 16;

/// The cosign signatures the target registry holds for an image (`repo` there) at
/// `digest`: its `sha256-<hex>.sig` image's layers with their payloads.
async fn registry_signatures(
    registry: &shipperd_registry::Registry,
    repo: &str,
    digest: &Digest,
) -> Result<Signatures, shipperd_registry::RegistryError> {
    let mut out = Signatures::default();
    let tag = format!("sha256-{}.sig", digest.hex());
    let Some(m) = registry.manifest(repo, &tag).await? else {
        return Ok(out);
    };
    if m.bytes.len() > MAX_SIG_MANIFEST {
        return Ok(out);
    }
    let Ok(doc) = ManifestDoc::parse(&tag, &m.bytes) else {
        return Ok(out);
    };
    for layer in doc.layers.iter().take(MAX_PER_IMAGE) {
        let Some(sig) = layer.annotations.get(cosign::SIGNATURE_ANNOTATION) else {
            continue;
        };
        if layer.size > cosign::MAX_PAYLOAD {
            continue;
        }
        if let Some(payload) = registry
            .blob_small(repo, &layer.digest, cosign::MAX_PAYLOAD as usize)
            .await?
        {
            out.cosign.push(CosignSignature {
                payload: payload.to_vec(),
                signature: sig.clone(),
            });
        }
    }
    Ok(out)
}

/// Checks again the images the bundle brings no signature for, with the
/// cosign signatures the target registry holds for them (`targets[i]`: where image
/// `i` lands). A differential bundle leaves out what the site has, its signatures
/// included. A registry that cannot be read is an error (the answer would be a wrong
/// `unsigned`): the caller tries again later.
pub async fn recheck_in_registry(
    policies: &Policies,
    registry: &shipperd_registry::Registry,
    images: &[(Reference, Digest)],
    targets: &[Reference],
    verdicts: &mut [Verdict],
) -> Result<(), String> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let todo: Vec<usize> = (0..images.len())
        .filter(|&i| {
            // Only what the bundle brings no signature for: a signature it brings that
            // fails, or a scope that rejects, is not rescued by the registry's.
            matches!(&verdicts[i], Err(r) if r.kind == "unsigned")
                && attached_to(&images[i].0).is_none()
        })
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    tracing::info!(
        images = todo.len(),
        "looking for signatures in the target registry"
    );
    // The client has retried already: a read that fails means the registry is down or
    // refuses us, and the answer would be a wrong `unsigned`: the first failure ends the
    // recheck, and the bundle's unpack is tried again.
    let found: Vec<(usize, Signatures)> = futures::stream::iter(todo)
        .map(|i| async move {
            registry_signatures(registry, &targets[i].repository, &images[i].1)
                .await
                .map(|sigs| (i, sigs))
                .map_err(|error| {
                    format!(
                        "cannot read the signatures of {} in the target registry: {error}",
                        images[i].0
                    )
                })
        })
        .buffer_unordered(REGISTRY_READS)
        .try_collect()
        .await?;
    for (i, sigs) in found {
        if !sigs.is_empty() {
            let (image, digest) = &images[i];
            verdicts[i] = policies.check(image, digest, &|| sigs.clone());
        }
    }
    let subjects = subjects(images);
    for (i, (image, _)) in images.iter().enumerate() {
        if let Some(s) = subject_of(&subjects, image) {
            verdicts[i] = verdicts[s].clone();
        }
    }
    Ok(())
}

/// One image's answer in a [`Report`].
#[derive(Debug)]
pub struct Checked {
    pub source: Reference,
    pub digest: Digest,
    /// The bundle carries its top manifest (a differential bundle leaves out what the
    /// site has: the site checks that with its registry's signatures).
    pub carried: bool,
    pub answer: Result<Trust, String>,
}

/// What [`verify_bundle`] found.
#[derive(Debug)]
pub struct Report {
    pub images: Vec<Checked>,
    pub verification: Verification,
    /// The bundle's rejection, as unpack would fail it.
    pub rejection: Option<String>,
}

/// Checks a bundle file (or its parts) against `policies` as unpack does, offline and
/// without publishing: `shipperd verify`. A compressed tar is expanded into `scratch`.
pub fn verify_bundle(
    parts: &[PathBuf],
    policies: &Policies,
    limits: &shipperd_bundle::Limits,
    scratch: &std::path::Path,
) -> shipperd_bundle::Result<Report> {
    let data = shipperd_model::DataDir::new(scratch);
    let cas = shipperd_bundle::cas::Cas::new(&data);
    let guard = shipperd_bundle::Guard::default();
    let name = parts
        .first()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let opened = shipperd_bundle::container::open_parts(parts, &cas, "verify", limits, &guard)?;
    let fs = opened.fs.as_ref();
    let found = shipperd_bundle::discover(fs, &name, limits)?;
    let blobs = found.blobs(fs);
    let walker = Walker::new(&blobs, limits);
    let mut referrers: BTreeMap<Digest, Vec<Descriptor>> = BTreeMap::new();
    for (_, desc) in &found.unnamed {
        let what = format!("manifest {}", desc.digest);
        if let Some(bytes) = walker.manifest_bytes(&what, desc)?
            && let Some(subject) = ManifestDoc::parse(&what, &bytes)?.subject
        {
            referrers
                .entry(subject.digest)
                .or_default()
                .push(desc.clone());
        }
    }
    let named: Vec<(Reference, Digest)> = found
        .images
        .iter()
        .map(|i| (i.source.clone(), i.descriptor.digest.clone()))
        .collect();
    let signatures =
        BundleSignatures::index(fs, &walker, &found.blob_paths, &found.images, &referrers);
    let verdicts = check_all(policies, &named, &signatures);
    let rejection = rejection(&named, &verdicts);
    let verification = policies.verification(&verdicts);
    let carried: Vec<bool> = found
        .images
        .iter()
        .map(|i| {
            walker
                .manifest_bytes("manifest", &i.descriptor)
                .is_ok_and(|b| b.is_some())
        })
        .collect();
    Ok(Report {
        images: named
            .into_iter()
            .zip(verdicts)
            .zip(carried)
            .map(|(((source, digest), answer), carried)| Checked {
                source,
                digest,
                carried,
                answer: answer.map_err(|r| r.reason),
            })
            .collect(),
        verification,
        rejection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_files_and_attachments_are_recognised_by_name() {
        let hex = "ab".repeat(32);
        assert_eq!(
            lookaside_digest(&format!("sigstore/org/app@sha256={hex}/signature-1")),
            Some(hex.as_str())
        );
        assert_eq!(
            lookaside_digest(&format!("x/sigstore/app@sha256={hex}/signature-12")),
            Some(hex.as_str())
        );
        for bad in [
            format!("sigstore/app@sha256={hex}/signature-"),
            format!("sigstore/app@sha256={hex}/sig-1"),
            format!("other/app@sha256={hex}/signature-1"),
            format!("sigstore/app@sha256={}/signature-1", &hex[..10]),
        ] {
            assert_eq!(lookaside_digest(&bad), None, "{bad}");
        }
        assert_eq!(
            release_digest(&format!(
                "working-dir/signatures/4.18.1-x86_64-sha256-{hex}"
            )),
            Some(hex.as_str())
        );
        assert_eq!(
            release_digest(&format!("a/working-dir/signatures/4.18-sha256-{hex}")),
            Some(hex.as_str())
        );
        assert_eq!(
            release_digest(&format!("signatures/4.18-sha256-{hex}")),
            None
        );
        let r = |s: &str| Reference::parse(s).unwrap();
        assert_eq!(
            attached_to(&r(&format!("quay.io/org/app:sha256-{hex}.sig"))),
            Some(hex.as_str())
        );
        assert_eq!(
            attached_to(&r(&format!("quay.io/org/app:sha256-{hex}.sbom"))),
            Some(hex.as_str())
        );
        assert_eq!(
            attached_to(&r(&format!("quay.io/org/app:sha256-{hex}"))),
            None
        );
        assert_eq!(attached_to(&r("quay.io/org/app:1")), None);
    }
}
