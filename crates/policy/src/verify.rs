//! The policy applied: each requirement's keys loaded once, then an image's
//! signatures (found by the caller, wherever they travel) checked against the
//! requirements of the image's scope. Every requirement must accept, as in
//! containers/image; a requirement that needs signatures accepts when one of the
//! image's signatures of its kind verifies and fits.

use std::{collections::BTreeMap, path::Path};

use base64::Engine as _;
use shipperd_model::{Digest, Reference};

use crate::{Identity, Keys, Policy, PolicyError, Rejection, Requirement, cosign, simple};

/// The largest policy or key file read.
const MAX_FILE: u64 = 1 << 20;

/// The signatures found for one image, of both kinds.
#[derive(Debug, Default, Clone)]
pub struct Signatures {
    /// Simple signatures (OpenPGP messages): the lookaside `sigstore/` files, release
    /// signatures.
    pub simple: Vec<Vec<u8>>,
    pub cosign: Vec<CosignSignature>,
    /// Sigstore bundles (JSON), as cosign's new bundle format attaches them.
    pub bundles: Vec<Vec<u8>>,
}

impl Signatures {
    pub fn is_empty(&self) -> bool {
        self.simple.is_empty() && self.cosign.is_empty() && self.bundles.is_empty()
    }
}

/// One cosign signature: the payload (the layer's bytes) and its base64 signature
/// (the layer's annotation).
#[derive(Debug, Clone)]
pub struct CosignSignature {
    pub payload: Vec<u8>,
    pub signature: String,
}

/// One requirement, ready to check.
#[derive(Debug)]
pub enum Check {
    Accept,
    Reject,
    SignedBy {
        keys: simple::Keys,
        identity: Identity,
    },
    Cosign {
        keys: cosign::Keys,
        identity: Identity,
    },
    /// What ShipperD cannot check yet: images under it are rejected, saying so.
    Unsupported(String),
}

impl std::fmt::Debug for simple::Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} OpenPGP keys", self.0.len())
    }
}

/// What accepted an image: the requirement (`insecureAcceptAnything`, `signedBy`,
/// `sigstoreSigned`) and the key that signed, for those that need one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub requirement: &'static str,
    pub key: Option<String>,
}

/// The policy's answer for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted {
        /// The scope whose requirements applied (`default` for the policy's default).
        scope: String,
        by: Vec<Accepted>,
    },
    Rejected {
        scope: String,
        reason: Rejection,
    },
}

impl Verdict {
    pub fn accepted(&self) -> bool {
        matches!(self, Verdict::Accepted { .. })
    }
}

/// A policy with its keys loaded.
#[derive(Debug)]
pub struct Verifier {
    /// Where it came from, for messages.
    name: String,
    default: Vec<Check>,
    docker: BTreeMap<String, Vec<Check>>,
}

/// A key file: by its absolute path (skopeo reads a relative one from its working
/// directory, which ShipperD cannot know: the same policy would mean something else).
fn read(path: &str, what: &str) -> Result<Vec<u8>, PolicyError> {
    if !Path::new(path).is_absolute() {
        return Err(PolicyError::Invalid(format!(
            "{what}: key path {path:?} is not absolute"
        )));
    }
    read_file(path, what)
}

fn read_file(path: &str, what: &str) -> Result<Vec<u8>, PolicyError> {
    let invalid = |m: String| PolicyError::Invalid(format!("{what}: {m}"));
    let file = std::fs::File::open(path).map_err(|e| invalid(format!("{path}: {e}")))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE + 1), &mut bytes)
        .map_err(|e| invalid(format!("{path}: {e}")))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(invalid(format!("{path} is over {MAX_FILE} bytes")));
    }
    Ok(bytes)
}

/// The key material a requirement names: each file's bytes, or the decoded `keyData`.
fn material(keys: &Keys, what: &str) -> Result<Vec<Vec<u8>>, PolicyError> {
    match keys {
        Keys::Paths(paths) => paths.iter().map(|p| read(p, what)).collect(),
        Keys::Data(data) => base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map(|b| vec![b])
            .map_err(|e| PolicyError::Invalid(format!("{what}: keyData is not base64: {e}"))),
    }
}

fn check(req: &Requirement, what: &str) -> Result<Check, PolicyError> {
    let invalid = |m: String| PolicyError::Invalid(format!("{what}: {m}"));
    Ok(match req {
        Requirement::InsecureAcceptAnything => Check::Accept,
        Requirement::Reject => Check::Reject,
        Requirement::SignedBy { keys, identity } => {
            let mut all: Option<simple::Keys> = None;
            for bytes in material(keys, what)? {
                let k = simple::Keys::from_bytes(&bytes).map_err(invalid)?;
                match &mut all {
                    Some(a) => a.0.extend(k.0),
                    None => all = Some(k),
                }
            }
            Check::SignedBy {
                keys: all.ok_or_else(|| invalid("no keys".into()))?,
                identity: identity.clone(),
            }
        }
        Requirement::SigstoreSigned {
            keys: Some(_),
            rekor: Some(_),
            ..
        } => Check::Unsupported(
            "sigstoreSigned with a rekorPublicKey (a Rekor SET check) is not checked by \
             ShipperD yet"
                .into(),
        ),
        Requirement::SigstoreSigned {
            keys: Some(keys),
            identity,
            ..
        } => {
            let mut all = Vec::new();
            for bytes in material(keys, what)? {
                all.extend(cosign::Keys::from_pem(&bytes).map_err(invalid)?.0);
            }
            Check::Cosign {
                keys: cosign::Keys(all),
                identity: identity.clone(),
            }
        }
        Requirement::SigstoreSigned { .. } => Check::Unsupported(
            "keyless sigstoreSigned (fulcio) is not checked by ShipperD yet".into(),
        ),
    })
}

fn checks(reqs: &[Requirement], what: &str) -> Result<Vec<Check>, PolicyError> {
    reqs.iter().map(|r| check(r, what)).collect()
}

impl Verifier {
    /// Reads the policy at `path` and every key it names.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let bytes = read_file(&shown, "the policy")?;
        let policy = Policy::from_json(&bytes)?;
        Self::new(&policy, shown)
    }

    /// `policy` with its keys loaded.
    pub fn new(policy: &Policy, name: impl Into<String>) -> Result<Self, PolicyError> {
        let mut docker = BTreeMap::new();
        for (scope, reqs) in &policy.docker {
            docker.insert(
                scope.clone(),
                checks(reqs, &format!("transports.docker.{scope:?}"))?,
            );
        }
        Ok(Verifier {
            name: name.into(),
            default: checks(&policy.default, "default")?,
            docker,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The requirements for `image`, and the scope's name.
    fn scope(&self, image: &Reference) -> (&[Check], String) {
        for scope in crate::scopes(image) {
            if let Some(c) = self.docker.get(&scope) {
                let shown = if scope.is_empty() {
                    "docker".to_string()
                } else {
                    scope
                };
                return (c, shown);
            }
        }
        (&self.default, "default".into())
    }

    /// Whether checking `image` reads signatures (a scope of `insecureAcceptAnything`
    /// or `reject` alone does not).
    pub fn needs_signatures(&self, image: &Reference) -> bool {
        self.scope(image)
            .0
            .iter()
            .any(|c| matches!(c, Check::SignedBy { .. } | Check::Cosign { .. }))
    }

    /// The policy's answer for `image` (its source reference) at `digest` (its top
    /// manifest), given the signatures found for it.
    pub fn check(&self, image: &Reference, digest: &Digest, found: &Signatures) -> Verdict {
        let (checks, scope) = self.scope(image);
        let mut by = Vec::with_capacity(checks.len());
        for c in checks {
            match one(c, image, digest, found, &scope) {
                Ok(a) => by.push(a),
                Err(reason) => return Verdict::Rejected { scope, reason },
            }
        }
        Verdict::Accepted { scope, by }
    }
}

/// One requirement's answer.
fn one(
    c: &Check,
    image: &Reference,
    digest: &Digest,
    found: &Signatures,
    scope: &str,
) -> Result<Accepted, Rejection> {
    let signed = |requirement, key| Accepted {
        requirement,
        key: Some(key),
    };
    match c {
        Check::Accept => Ok(Accepted {
            requirement: "insecureAcceptAnything",
            key: None,
        }),
        Check::Reject => Err(Rejection::Rejected(scope.to_string())),
        Check::Unsupported(what) => Err(Rejection::Unsupported(what.clone())),
        Check::SignedBy { keys, identity } => best(found.simple.iter().map(|sig| {
            let s = simple::verify(sig, keys)?;
            crate::fits(&s, image, digest, identity)?;
            Ok(signed("signedBy", s.key))
        })),
        Check::Cosign { keys, identity } => best(
            found
                .cosign
                .iter()
                .map(|sig| cosign::verify(&sig.payload, &sig.signature, keys))
                .chain(found.bundles.iter().map(|b| cosign::verify_bundle(b, keys)))
                .map(|s| {
                    let s = s?;
                    crate::fits(&s, image, digest, identity)?;
                    Ok(signed("sigstoreSigned", s.key))
                }),
        ),
    }
}

/// The first signature that is accepted; else the most telling rejection; `unsigned`
/// when there are none.
fn best(answers: impl Iterator<Item = Result<Accepted, Rejection>>) -> Result<Accepted, Rejection> {
    let mut worst = Rejection::Unsigned;
    for a in answers {
        match a {
            Ok(a) => return Ok(a),
            Err(r) if r.weight() >= worst.weight() => worst = r,
            Err(_) => {}
        }
    }
    Err(worst)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use sigstore::crypto::SigningScheme;

    use super::*;

    struct Signer(sigstore::crypto::SigStoreSigner);

    impl Signer {
        fn new() -> Self {
            Signer(
                SigningScheme::ECDSA_P256_SHA256_ASN1
                    .create_signer()
                    .unwrap(),
            )
        }
        fn pem(&self) -> String {
            self.0
                .to_sigstore_keypair()
                .unwrap()
                .public_key_to_pem()
                .unwrap()
        }
        fn sign(&self, digest: &Digest, identity: &str) -> CosignSignature {
            let payload = serde_json::json!({"critical": {
                "identity": {"docker-reference": identity},
                "image": {"docker-manifest-digest": digest.to_string()},
                "type": "cosign container image signature"}, "optional": null})
            .to_string()
            .into_bytes();
            let signature =
                base64::engine::general_purpose::STANDARD.encode(self.0.sign(&payload).unwrap());
            CosignSignature { payload, signature }
        }
    }

    fn verifier(policy: serde_json::Value) -> Verifier {
        Verifier::new(
            &Policy::from_json(policy.to_string().as_bytes()).unwrap(),
            "test",
        )
        .unwrap()
    }

    fn key_data(pem: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(pem)
    }

    fn cosign(sigs: Vec<CosignSignature>) -> Signatures {
        Signatures {
            cosign: sigs,
            ..Signatures::default()
        }
    }

    fn rejected(v: Verdict) -> Rejection {
        match v {
            Verdict::Rejected { reason, .. } => reason,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn cosign_signatures_are_checked_for_key_digest_and_identity() {
        let (site, stranger) = (Signer::new(), Signer::new());
        let v = verifier(serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                "quay.io/org": [{"type": "sigstoreSigned", "keyData": key_data(&site.pem()),
                    "signedIdentity": {"type": "matchRepository"}}],
                "quay.io/open": [{"type": "insecureAcceptAnything"}],
            }}
        }));
        let img = Reference::parse("quay.io/org/app:1").unwrap();
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let other = Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap();

        // cosign signs the repository without a tag.
        let good = site.sign(&digest, "quay.io/org/app");
        match v.check(&img, &digest, &cosign(vec![good.clone()])) {
            Verdict::Accepted { scope, by } => {
                assert_eq!(scope, "quay.io/org");
                assert_eq!(by[0].requirement, "sigstoreSigned");
                assert!(by[0].key.as_deref().unwrap().starts_with("sha256:"));
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(
            rejected(v.check(&img, &digest, &cosign(vec![]))),
            Rejection::Unsigned
        );
        assert_eq!(
            rejected(v.check(
                &img,
                &digest,
                &cosign(vec![stranger.sign(&digest, "quay.io/org/app")])
            )),
            Rejection::UnknownKey
        );
        assert_eq!(
            rejected(v.check(
                &img,
                &digest,
                &cosign(vec![site.sign(&other, "quay.io/org/app")])
            )),
            Rejection::OtherDigest(other.clone())
        );
        assert_eq!(
            rejected(v.check(
                &img,
                &digest,
                &cosign(vec![site.sign(&digest, "quay.io/evil/app")])
            )),
            Rejection::Identity("quay.io/evil/app".into())
        );
        // The most telling of several failures is told; one good signature is enough.
        let mixed = vec![
            stranger.sign(&digest, "quay.io/org/app"),
            site.sign(&other, "quay.io/org/app"),
        ];
        assert_eq!(
            rejected(v.check(&img, &digest, &cosign(mixed.clone()))),
            Rejection::OtherDigest(other)
        );
        let mut with_good = mixed;
        with_good.push(good.clone());
        assert!(v.check(&img, &digest, &cosign(with_good)).accepted());
        // A damaged signature.
        let mut damaged = good.clone();
        damaged.payload[10] ^= 1;
        assert!(!v.check(&img, &digest, &cosign(vec![damaged])).accepted());
        // The default rejects; an open scope accepts without signatures.
        let elsewhere = Reference::parse("docker.io/library/busybox:1").unwrap();
        assert_eq!(
            rejected(v.check(&elsewhere, &digest, &cosign(vec![good]))),
            Rejection::Rejected("default".into())
        );
        assert!(!v.needs_signatures(&elsewhere));
        assert!(v.needs_signatures(&img));
        let open = Reference::parse("quay.io/open/x:1").unwrap();
        assert!(v.check(&open, &digest, &Signatures::default()).accepted());
    }

    #[test]
    fn every_requirement_must_accept_and_what_cannot_be_checked_rejects() {
        let site = Signer::new();
        let digest = Digest::parse(&format!("sha256:{}", "c".repeat(64))).unwrap();
        let img = Reference::parse("quay.io/org/app:1").unwrap();
        // matchRepoDigestOrExact (the default identity) wants the tag for an image by
        // tag: cosign's tagless identity does not fit it, as in containers/image.
        let strict = verifier(serde_json::json!({
            "default": [{"type": "insecureAcceptAnything"},
                {"type": "sigstoreSigned", "keyData": key_data(&site.pem())}]
        }));
        assert_eq!(
            rejected(strict.check(
                &img,
                &digest,
                &cosign(vec![site.sign(&digest, "quay.io/org/app")])
            )),
            Rejection::Identity("quay.io/org/app".into())
        );
        match strict.check(
            &img,
            &digest,
            &cosign(vec![site.sign(&digest, "quay.io/org/app:1")]),
        ) {
            Verdict::Accepted { by, .. } => assert_eq!(
                by.iter().map(|a| a.requirement).collect::<Vec<_>>(),
                ["insecureAcceptAnything", "sigstoreSigned"]
            ),
            r => panic!("{r:?}"),
        }
        let keyless = verifier(serde_json::json!({
            "default": [{"type": "sigstoreSigned", "fulcio": {"caData": "eA==",
                "oidcIssuer": "https://x", "subjectEmail": "a@b"}, "rekorPublicKeyData": "eA=="}]
        }));
        assert!(matches!(
            rejected(keyless.check(
                &img,
                &digest,
                &cosign(vec![site.sign(&digest, "quay.io/org/app:1")])
            )),
            Rejection::Unsupported(_)
        ));
        // Key files: absolute paths only; a missing one is an error at load.
        let relative = Policy::from_json(
            br#"{"default": [{"type": "sigstoreSigned", "keyPath": "cosign.pub"}]}"#,
        )
        .unwrap();
        let e = Verifier::new(&relative, "p").unwrap_err().to_string();
        assert!(e.contains("not absolute"), "{e}");
        let missing = Policy::from_json(
            br#"{"default": [{"type": "sigstoreSigned", "keyPath": "/nonexistent/cosign.pub"}]}"#,
        )
        .unwrap();
        assert!(Verifier::new(&missing, "p").is_err());
        let not_a_key = Policy::from_json(
            br#"{"default": [{"type": "sigstoreSigned", "keyData": "bm90IGEga2V5"}]}"#,
        )
        .unwrap();
        assert!(Verifier::new(&not_a_key, "p").is_err());
    }
}
