//! The site's signature policy, `containers-policy.json(5)` — the file skopeo, podman,
//! CRI-O and oc-mirror read — read as containers/image reads it, so the same file means
//! the same thing to them and to ShipperD:
//!
//! - **Scopes** (`transports.docker`): for `host/ns/repo:tag` the most specific of the
//!   reference itself, `host/ns/repo`, `host/ns`, `host`, then `*.domain` wildcards
//!   (`*.b.example.com`, `*.example.com`, ...; a port is stripped first), then the
//!   transport's `""`, then `default`. Each image is looked up by its **source** reference as the bundle names
//!   it (host included), not by its name in the target.
//! - **Requirements**: every one of a scope's list must accept. `insecureAcceptAnything`,
//!   `reject`, `signedBy` (GPG simple signing: `keyType: GPGKeys`, one of `keyPath`,
//!   `keyPaths`, `keyData`) and `sigstoreSigned` (cosign: one of `keyPath`, `keyPaths`,
//!   `keyData`, or `fulcio` with a Rekor key); each with a `signedIdentity`
//!   (`matchRepoDigestOrExact` when absent).
//! - **Strictness**: an unknown field, an unknown type, an empty requirement list, two
//!   ways to name keys, or no `default` are errors, as they are for containers/image: a
//!   policy that does not parse admits nothing. A scope is any string, as there.
//!
//! This module reads and selects; [`Identity::accepts`] decides whether a signature's
//! claimed identity fits an image. Checking the signatures' cryptography is done with
//! well-kept crates elsewhere.

pub mod cosign;
pub mod simple;
mod verify;

use std::collections::BTreeMap;

use serde::Deserialize;
use shipperd_model::{Digest, Reference};

pub use verify::{Accepted, Check, CosignSignature, Signatures, Verdict, Verifier};

/// Why a signature, or an image, was not accepted, said as a person reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The requirement needs signatures and the image has none of its kind.
    #[error("unsigned")]
    Unsigned,
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("signed by an unknown key")]
    UnknownKey,
    #[error("the signed payload is not a container signature: {0}")]
    Payload(String),
    #[error("signature for another digest ({0})")]
    OtherDigest(Digest),
    #[error("identity mismatch: signed for {0}")]
    Identity(String),
    /// The policy's `reject` requirement.
    #[error("the policy rejects every image of scope {0}")]
    Rejected(String),
    /// A requirement ShipperD cannot check yet: it fails closed.
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl Rejection {
    /// A short name of the kind of rejection (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownKey => "unknown_key",
            Rejection::Payload(_) => "payload",
            Rejection::OtherDigest(_) => "other_digest",
            Rejection::Identity(_) => "identity",
            Rejection::Rejected(_) => "rejected",
            Rejection::Unsupported(_) => "unsupported",
        }
    }

    /// How much the rejection says about a signature that was almost right: among a
    /// signature list, the most telling one is reported.
    fn weight(&self) -> u8 {
        match self {
            Rejection::Unsigned => 0,
            Rejection::Malformed(_) => 1,
            Rejection::Payload(_) => 2,
            Rejection::UnknownKey => 3,
            Rejection::OtherDigest(_) => 4,
            Rejection::Identity(_) => 5,
            Rejection::Rejected(_) | Rejection::Unsupported(_) => 6,
        }
    }
}

/// What a verified signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub digest: Digest,
    pub identity: String,
    /// The signing key: its OpenPGP fingerprint (hex, upper case as gpg prints it), or
    /// for a cosign key `sha256:` of its DER public key.
    pub key: String,
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    #[serde(rename = "type")]
    kind: String,
    image: PayloadImage,
    identity: PayloadIdentity,
}

#[derive(Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

#[derive(Deserialize)]
struct PayloadIdentity {
    #[serde(rename = "docker-reference")]
    reference: String,
}

/// The digest and identity a signature payload (simple signing's JSON, which cosign
/// also signs) claims, once its `critical.type` is `kind`.
fn payload(bytes: &[u8], kind: &str) -> std::result::Result<(Digest, String), Rejection> {
    let p: Payload =
        serde_json::from_slice(bytes).map_err(|e| Rejection::Payload(e.to_string()))?;
    if p.critical.kind != kind {
        return Err(Rejection::Payload(format!("type {:?}", p.critical.kind)));
    }
    let digest =
        Digest::parse(&p.critical.image.digest).map_err(|e| Rejection::Payload(e.to_string()))?;
    Ok((digest, p.critical.identity.reference))
}

/// A signature's `docker-reference`: a reference, or a repository alone (cosign signs
/// `host/repo` without a tag).
fn signed_reference(s: &str) -> Option<Reference> {
    if let Ok(r) = Reference::parse(s) {
        return Some(r);
    }
    if s.contains('@') {
        return None;
    }
    // A name alone: parsed with a tag, which is then taken off again.
    let mut r = Reference::parse(&format!("{s}:latest")).ok()?;
    r.tag = None;
    Some(r)
}

/// Does a verified signature fit the image `image` at `digest`, under `identity`?
pub fn fits(
    signed: &Signed,
    image: &Reference,
    digest: &Digest,
    identity: &Identity,
) -> std::result::Result<(), Rejection> {
    if signed.digest != *digest {
        return Err(Rejection::OtherDigest(signed.digest.clone()));
    }
    let claimed = signed_reference(&signed.identity)
        .ok_or_else(|| Rejection::Identity(signed.identity.clone()))?;
    if !identity.accepts(image, &claimed) {
        return Err(Rejection::Identity(signed.identity.clone()));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the policy is not a containers-policy.json: {0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, PolicyError>;

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    default: Vec<Requirement>,
    /// `transports.docker`: scope → requirements.
    docker: BTreeMap<String, Vec<Requirement>>,
}

/// How a signed image's claimed identity must relate to the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Identity {
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    ExactReference {
        #[serde(rename = "dockerReference")]
        docker_reference: String,
    },
    ExactRepository {
        #[serde(rename = "dockerRepository")]
        docker_repository: String,
    },
    RemapIdentity {
        prefix: String,
        #[serde(rename = "signedPrefix")]
        signed_prefix: String,
    },
}

/// Where a requirement's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    Paths(Vec<String>),
    /// Base64 of the key material, as `keyData` holds it.
    Data(String),
}

/// Keyless (Fulcio) trust for `sigstoreSigned`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fulcio {
    #[serde(default)]
    pub ca_path: Option<String>,
    #[serde(default)]
    pub ca_data: Option<String>,
    #[serde(default)]
    pub oidc_issuer: Option<String>,
    #[serde(default)]
    pub subject_email: Option<String>,
}

/// One requirement of a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// GPG simple signing.
    SignedBy {
        keys: Keys,
        identity: Identity,
    },
    /// cosign (sigstore) signatures: by a public key, or keyless through Fulcio with a
    /// Rekor key.
    SigstoreSigned {
        keys: Option<Keys>,
        fulcio: Option<Fulcio>,
        rekor: Option<Keys>,
        identity: Identity,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Option<Vec<RawRequirement>>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<RawRequirement>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRequirement {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default)]
    key_path: Option<String>,
    #[serde(default)]
    key_paths: Option<Vec<String>>,
    #[serde(default)]
    key_data: Option<String>,
    #[serde(default)]
    fulcio: Option<Fulcio>,
    #[serde(default)]
    rekor_public_key_path: Option<String>,
    #[serde(default)]
    rekor_public_key_paths: Option<Vec<String>>,
    #[serde(default)]
    rekor_public_key_data: Option<String>,
    #[serde(default)]
    signed_identity: Option<Identity>,
}

fn invalid(m: impl Into<String>) -> PolicyError {
    PolicyError::Invalid(m.into())
}

/// One of `path`, `paths`, `data`, or none; two are an error.
fn keys(
    what: &str,
    path: Option<String>,
    paths: Option<Vec<String>>,
    data: Option<String>,
) -> Result<Option<Keys>> {
    match (path, paths, data) {
        (None, None, None) => Ok(None),
        (Some(p), None, None) => Ok(Some(Keys::Paths(vec![p]))),
        (None, Some(ps), None) if !ps.is_empty() => Ok(Some(Keys::Paths(ps))),
        (None, None, Some(d)) => Ok(Some(Keys::Data(d))),
        (None, Some(_), None) => Err(invalid(format!("{what}: an empty list of key paths"))),
        _ => Err(invalid(format!(
            "{what}: give one of the key's path, paths or data"
        ))),
    }
}

impl RawRequirement {
    fn into_requirement(self) -> Result<Requirement> {
        let plain = |r: &RawRequirement| {
            r.key_type.is_none()
                && r.key_path.is_none()
                && r.key_paths.is_none()
                && r.key_data.is_none()
                && r.fulcio.is_none()
                && r.signed_identity.is_none()
                && r.rekor_public_key_path.is_none()
                && r.rekor_public_key_paths.is_none()
                && r.rekor_public_key_data.is_none()
        };
        let identity = self
            .signed_identity
            .clone()
            .unwrap_or(Identity::MatchRepoDigestOrExact);
        match self.kind.as_str() {
            "insecureAcceptAnything" if plain(&self) => Ok(Requirement::InsecureAcceptAnything),
            "reject" if plain(&self) => Ok(Requirement::Reject),
            "insecureAcceptAnything" | "reject" => {
                Err(invalid(format!("{} takes no other field", self.kind)))
            }
            "signedBy" => {
                if self.key_type.as_deref() != Some("GPGKeys") {
                    return Err(invalid(format!(
                        "signedBy: keyType {:?} (GPGKeys is the one supported)",
                        self.key_type.unwrap_or_default()
                    )));
                }
                if self.fulcio.is_some()
                    || self.rekor_public_key_path.is_some()
                    || self.rekor_public_key_paths.is_some()
                    || self.rekor_public_key_data.is_some()
                {
                    return Err(invalid("signedBy takes no fulcio or rekor fields"));
                }
                let keys = keys("signedBy", self.key_path, self.key_paths, self.key_data)?
                    .ok_or_else(|| invalid("signedBy: no keyPath, keyPaths or keyData"))?;
                Ok(Requirement::SignedBy { keys, identity })
            }
            "sigstoreSigned" => {
                if self.key_type.is_some() {
                    return Err(invalid("sigstoreSigned takes no keyType"));
                }
                let keys = keys(
                    "sigstoreSigned",
                    self.key_path,
                    self.key_paths,
                    self.key_data,
                )?;
                let rekor = keys_rekor(
                    self.rekor_public_key_path,
                    self.rekor_public_key_paths,
                    self.rekor_public_key_data,
                )?;
                match (&keys, &self.fulcio) {
                    (Some(_), Some(_)) => {
                        Err(invalid("sigstoreSigned: a public key or fulcio, not both"))
                    }
                    (None, None) => Err(invalid(
                        "sigstoreSigned: no keyPath, keyPaths, keyData or fulcio",
                    )),
                    (None, Some(_)) if rekor.is_none() => {
                        Err(invalid("sigstoreSigned: fulcio needs a rekor public key"))
                    }
                    _ => Ok(Requirement::SigstoreSigned {
                        keys,
                        fulcio: self.fulcio,
                        rekor,
                        identity,
                    }),
                }
            }
            "signedBaseLayer" => Err(invalid("signedBaseLayer is not supported")),
            other => Err(invalid(format!("unknown requirement type {other:?}"))),
        }
    }
}

fn keys_rekor(
    path: Option<String>,
    paths: Option<Vec<String>>,
    data: Option<String>,
) -> Result<Option<Keys>> {
    keys("sigstoreSigned's rekor public key", path, paths, data)
}

fn requirements(what: &str, raw: Vec<RawRequirement>) -> Result<Vec<Requirement>> {
    if raw.is_empty() {
        return Err(invalid(format!(
            "{what}: an empty list of requirements (use insecureAcceptAnything or reject)"
        )));
    }
    raw.into_iter()
        .map(|r| {
            r.into_requirement().map_err(|e| match e {
                PolicyError::Invalid(m) => invalid(format!("{what}: {m}")),
            })
        })
        .collect()
}

impl Policy {
    /// Reads a policy as containers/image does.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let f: File = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let default = requirements(
            "default",
            f.default
                .ok_or_else(|| invalid("no default requirements"))?,
        )?;
        let mut docker = BTreeMap::new();
        for (transport, scopes) in f.transports {
            for (scope, raw) in scopes {
                let reqs = requirements(&format!("transports.{transport}.{scope:?}"), raw)?;
                if transport == "docker" {
                    // Any string is a scope to containers/image (one that names no
                    // image is simply never used), so it is here too.
                    docker.insert(scope, reqs);
                }
            }
        }
        Ok(Policy { default, docker })
    }

    /// Every file the policy names (key paths, Rekor key paths, Fulcio CA paths): a
    /// policy written into a resource may name none, since it would read the
    /// service's files.
    pub fn paths(&self) -> Vec<&str> {
        fn keys(k: &Option<Keys>) -> Vec<&str> {
            match k {
                Some(Keys::Paths(p)) => p.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            }
        }
        let mut out = Vec::new();
        for r in self.default.iter().chain(self.docker.values().flatten()) {
            match r {
                Requirement::SignedBy {
                    keys: Keys::Paths(p),
                    ..
                } => out.extend(p.iter().map(String::as_str)),
                Requirement::SigstoreSigned {
                    keys: k,
                    fulcio,
                    rekor,
                    ..
                } => {
                    out.extend(keys(k));
                    out.extend(keys(rekor));
                    out.extend(fulcio.as_ref().and_then(|f| f.ca_path.as_deref()));
                }
                _ => {}
            }
        }
        out
    }

    /// The requirements for `image` (its source reference, host included), and the
    /// scope they came from (`""`: the transport's default; `None`: the policy's).
    pub fn requirements_for(&self, image: &Reference) -> (&[Requirement], Option<&str>) {
        for scope in scopes(image) {
            if let Some((k, r)) = self.docker.get_key_value(&scope) {
                return (r, Some(k.as_str()));
            }
        }
        (&self.default, None)
    }
}

/// The scopes that may hold `image`'s requirements, most specific first, as
/// containers/image's `DockerReferenceIdentity` and `DockerReferenceNamespaces` list
/// them: the reference, its repository and parent namespaces, its host, then
/// wildcards of the host's parent domains (the port stripped: `example.com:8443` gives
/// `*.com`), then the transport's `""`.
pub fn scopes(image: &Reference) -> Vec<String> {
    let image = &normalized(image);
    let host = image.host.as_deref().unwrap_or("docker.io");
    let repo = format!("{host}/{}", image.repository);
    let mut out = Vec::new();
    // The reference by tag, and by digest (containers/image names a reference with
    // both by neither; the bundle's images can have both).
    if let Some(t) = &image.tag {
        out.push(format!("{repo}:{t}"));
    }
    if let Some(d) = &image.digest {
        out.push(format!("{repo}@{d}"));
    }
    let mut at = repo.as_str();
    loop {
        out.push(at.to_string());
        match at.rfind('/') {
            Some(i) => at = &at[..i],
            None => break,
        }
    }
    let mut rest = host.split(':').next().unwrap_or(host);
    while let Some(i) = rest.find('.') {
        rest = &rest[i + 1..];
        out.push(format!("*.{rest}"));
    }
    out.push(String::new());
    out
}

/// `r` as docker names it in full: Docker Hub's host, and `library/` for its official
/// images (`busybox:1` is `docker.io/library/busybox:1`).
pub fn normalized(r: &Reference) -> Reference {
    let mut r = r.clone();
    if r.host.is_none() || r.host.as_deref() == Some("index.docker.io") {
        r.host = Some("docker.io".into());
    }
    if r.host.as_deref() == Some("docker.io") && !r.repository.contains('/') {
        r.repository = format!("library/{}", r.repository);
    }
    r
}

/// `host/repository`.
fn name(r: &Reference) -> String {
    format!(
        "{}/{}",
        r.host.as_deref().unwrap_or("docker.io"),
        r.repository
    )
}

/// containers/image's `matchRepoDigestOrExactReferenceValues`: an image by tag (with or
/// without a digest) must be signed for exactly that reference; by digest only, for
/// its repository.
fn repo_digest_or_exact(intended: &Reference, signed: &Reference) -> bool {
    if intended.tag.is_some() {
        intended.to_string() == signed.to_string()
    } else {
        name(intended) == name(signed)
    }
}

impl Identity {
    /// Does a signature claiming `signed` (its `docker-reference`) fit `image`? As
    /// containers/image's `signature/policy_reference_match.go` decides it, both names
    /// normalized first.
    pub fn accepts(&self, image: &Reference, signed: &Reference) -> bool {
        let (image, signed) = (normalized(image), normalized(signed));
        match self {
            Identity::MatchExact => image.to_string() == signed.to_string(),
            Identity::MatchRepoDigestOrExact => repo_digest_or_exact(&image, &signed),
            Identity::MatchRepository => name(&image) == name(&signed),
            Identity::ExactReference { docker_reference } => Reference::parse(docker_reference)
                .is_ok_and(|r| normalized(&r).to_string() == signed.to_string()),
            Identity::ExactRepository { docker_repository } => {
                // A repository alone does not parse as a reference: give it a tag.
                Reference::parse(&format!("{docker_repository}:x"))
                    .is_ok_and(|r| name(&normalized(&r)) == name(&signed))
            }
            Identity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                let n = name(&image);
                let matches = n == *prefix
                    || (n.len() > prefix.len()
                        && n.starts_with(prefix.as_str())
                        && n.as_bytes()[prefix.len()] == b'/');
                let remapped = if matches {
                    match Reference::parse(&image.to_string().replacen(
                        prefix.as_str(),
                        signed_prefix,
                        1,
                    )) {
                        Ok(r) => normalized(&r),
                        // A prefix that makes no reference matches nothing.
                        Err(_) => return false,
                    }
                } else {
                    image
                };
                repo_digest_or_exact(&remapped, &signed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn scopes_from_most_specific_on() {
        assert_eq!(
            scopes(&r("busybox:1"))[..2],
            ["docker.io/library/busybox:1", "docker.io/library/busybox"]
        );
        assert_eq!(
            scopes(&r("registry.b.example.com/ns/app:1")),
            vec![
                "registry.b.example.com/ns/app:1",
                "registry.b.example.com/ns/app",
                "registry.b.example.com/ns",
                "registry.b.example.com",
                "*.b.example.com",
                "*.example.com",
                "*.com",
                "",
            ]
        );
        assert_eq!(
            scopes(&r("example.com:8443/ns/app:1")),
            vec![
                "example.com:8443/ns/app:1",
                "example.com:8443/ns/app",
                "example.com:8443/ns",
                "example.com:8443",
                "*.com",
                "",
            ]
        );
    }

    #[test]
    fn a_policy_is_read_as_containers_reads_it() {
        let p = Policy::from_json(
            br#"{
  "default": [{"type": "reject"}],
  "transports": {
    "docker": {
      "quay.io/org": [{"type": "sigstoreSigned", "keyPath": "/etc/keys/cosign.pub"}],
      "quay.io/org/open": [{"type": "insecureAcceptAnything"}],
      "registry.redhat.io": [{"type": "signedBy", "keyType": "GPGKeys",
        "keyPaths": ["/etc/pki/rpm-gpg/RPM-GPG-KEY-redhat-release"],
        "signedIdentity": {"type": "matchRepository"}}],
      "*.example.com": [{"type": "insecureAcceptAnything"}]
    },
    "docker-daemon": {"": [{"type": "insecureAcceptAnything"}]}
  }
}"#,
        )
        .unwrap();
        let scope = |s: &str| p.requirements_for(&r(s)).1.map(str::to_string);
        assert_eq!(scope("quay.io/org/app:1").as_deref(), Some("quay.io/org"));
        assert_eq!(
            scope("quay.io/org/open:1").as_deref(),
            Some("quay.io/org/open")
        );
        assert_eq!(scope("quay.io/other/app:1"), None, "the global default");
        assert_eq!(
            scope("mirror.lab.example.com/a:1").as_deref(),
            Some("*.example.com")
        );
        let (reqs, _) = p.requirements_for(&r("registry.redhat.io/ubi9/ubi:9"));
        assert!(matches!(
            &reqs[0],
            Requirement::SignedBy { identity: Identity::MatchRepository, keys: Keys::Paths(k) } if k.len() == 1
        ));
        let (reqs, _) = p.requirements_for(&r("quay.io/org/app:1"));
        assert!(matches!(
            &reqs[0],
            Requirement::SigstoreSigned {
                identity: Identity::MatchRepoDigestOrExact,
                ..
            }
        ));
    }

    #[test]
    fn what_containers_refuses_is_refused() {
        let bad = |s: &str| Policy::from_json(s.as_bytes()).unwrap_err().to_string();
        assert!(bad(r#"{"transports": {}}"#).contains("no default"));
        assert!(bad(r#"{"default": []}"#).contains("empty list"));
        assert!(bad(r#"{"default": [{"type": "acceptAll"}]}"#).contains("unknown requirement"));
        assert!(bad(r#"{"default": [{"type": "reject"}], "extra": 1}"#).contains("unknown field"));
        assert!(bad(r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "a", "keyData": "b"}]}"#)
            .contains("one of"));
        assert!(bad(r#"{"default": [{"type": "signedBy", "keyPath": "a"}]}"#).contains("keyType"));
        assert!(bad(r#"{"default": [{"type": "sigstoreSigned"}]}"#).contains("no keyPath"));
        assert!(
            bad(r#"{"default": [{"type": "reject", "keyPath": "a"}]}"#).contains("no other field")
        );
        assert!(
            bad(r#"{"default": [{"type": "sigstoreSigned", "fulcio": {"caPath": "x"}}]}"#)
                .contains("rekor")
        );
    }

    #[test]
    fn signed_identities() {
        let img = r("quay.io/org/app:1");
        let by_digest = r(&format!("quay.io/org/app@sha256:{}", "a".repeat(64)));
        assert!(Identity::MatchRepoDigestOrExact.accepts(&img, &r("quay.io/org/app:1")));
        assert!(!Identity::MatchRepoDigestOrExact.accepts(&img, &r("quay.io/org/app:2")));
        assert!(Identity::MatchRepoDigestOrExact.accepts(&by_digest, &r("quay.io/org/app:2")));
        assert!(!Identity::MatchRepoDigestOrExact.accepts(&by_digest, &r("quay.io/org/other:2")));
        assert!(Identity::MatchRepository.accepts(&img, &r("quay.io/org/app:9")));
        assert!(Identity::MatchExact.accepts(&by_digest, &by_digest));
        assert!(!Identity::MatchExact.accepts(&img, &r("quay.io/org/app:2")));
        assert!(
            Identity::MatchRepository.accepts(&r("busybox:1"), &r("docker.io/library/busybox:2")),
            "names are normalized as docker does"
        );
        let repo_only = Identity::ExactRepository {
            docker_repository: "quay.io/org/app".into(),
        };
        assert!(repo_only.accepts(&r("x.io/y:1"), &r("quay.io/org/app:3")));
        let exact = Identity::ExactReference {
            docker_reference: "registry.redhat.io/ubi9/ubi:9".into(),
        };
        assert!(exact.accepts(&img, &r("registry.redhat.io/ubi9/ubi:9")));
        let remap = Identity::RemapIdentity {
            prefix: "mirror.site/redhat".into(),
            signed_prefix: "registry.redhat.io".into(),
        };
        assert!(remap.accepts(
            &r("mirror.site/redhat/ubi9/ubi:9"),
            &r("registry.redhat.io/ubi9/ubi:9")
        ));
        assert!(!remap.accepts(
            &r("mirror.site/redhatx/ubi:9"),
            &r("registry.redhat.io/x/ubi:9")
        ));
    }
}
