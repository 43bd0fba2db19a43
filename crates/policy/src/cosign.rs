//! cosign signatures checked with public keys (`sigstoreSigned` with `keyPath`,
//! `keyPaths` or `keyData`): the payload is simple signing's JSON with `critical.type`
//! `cosign container image signature`; the signature is base64 in the annotation
//! `dev.cosignproject.cosign/signature` of the layer that holds the payload, in the
//! `sha256-<hex>.sig` image (or an OCI 1.1 referrer) cosign attaches. The keys are PEM
//! public keys (ECDSA P-256/P-384, Ed25519, RSA), read and used through sigstore-rs.

use base64::Engine as _;
use sha2::Digest as _;
use sigstore::crypto::{CosignVerificationKey, Signature};

pub use crate::{Rejection, Signed};

/// The annotation of a cosign signature layer that holds the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Rekor's signed entry timestamp (the `dev.sigstore.cosign/bundle` annotation).
pub const SET_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// The media type of a cosign signature layer (its payload).
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The `critical.type` of a cosign payload.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// The most bytes of a payload read.
pub const MAX_PAYLOAD: u64 = 64 << 10;

/// The public keys of a `sigstoreSigned` requirement.
pub struct Keys(pub(crate) Vec<(CosignVerificationKey, String)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(_, fpr)| fpr))
            .finish()
    }
}

impl Keys {
    /// Every `PUBLIC KEY` PEM block in `bytes` (one or many, as cosign writes
    /// `cosign.pub`).
    pub fn from_pem(bytes: &[u8]) -> Result<Self, String> {
        let blocks = pem::parse_many(bytes).map_err(|e| format!("not a PEM public key: {e}"))?;
        let mut keys = Vec::new();
        for b in blocks.iter().filter(|b| b.tag() == "PUBLIC KEY") {
            let key = CosignVerificationKey::try_from_der(b.contents())
                .map_err(|e| format!("not a public key cosign signs with: {e}"))?;
            let fpr = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b.contents())));
            keys.push((key, fpr));
        }
        if keys.is_empty() {
            return Err("no PEM PUBLIC KEY block in it".into());
        }
        Ok(Keys(keys))
    }
}

/// Checks a cosign signature (`signature`, base64 as the annotation holds it) over
/// `payload` against `keys`: the signer, and what it signed.
pub fn verify(payload: &[u8], signature: &str, keys: &Keys) -> Result<Signed, Rejection> {
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(Rejection::Malformed(format!(
            "a payload of {} bytes, more than a signature's",
            payload.len()
        )));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|e| Rejection::Malformed(format!("the signature is not base64: {e}")))?;
    let key = keys
        .0
        .iter()
        .find(|(k, _)| k.verify_signature(Signature::Raw(&raw), payload).is_ok())
        .map(|(_, fpr)| fpr.clone())
        .ok_or(Rejection::UnknownKey)?;
    let (digest, identity) = crate::payload(payload, COSIGN_SIGNATURE_TYPE)?;
    Ok(Signed {
        digest,
        identity,
        key,
    })
}

/// The media type prefix of a Sigstore bundle (`…v0.3+json`), as an OCI 1.1 referrer's
/// `artifactType` and its layer.
pub const SIGSTORE_BUNDLE: &str = "application/vnd.dev.sigstore.bundle";
/// The DSSE payload type of an in-toto statement.
const IN_TOTO: &str = "application/vnd.in-toto+json";

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(serde::Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(serde::Deserialize)]
struct Statement {
    #[serde(default)]
    subject: Vec<Subject>,
}

#[derive(serde::Deserialize)]
struct Subject {
    #[serde(default)]
    name: String,
    #[serde(default)]
    digest: std::collections::BTreeMap<String, String>,
}

/// DSSE's pre-authentication encoding of a payload: what is signed.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Checks a Sigstore bundle (as cosign's new bundle format attaches it, an OCI 1.1
/// referrer) signed with a key: its DSSE envelope's signature over the in-toto
/// statement, by one of `keys`. What it signed is the statement's subject: the digest
/// its `sha256` names, and the identity its `name` gives (the repository). Transparency
/// log entries are not checked (a key with a Rekor key is not supported). A bundle
/// with a message signature (no statement, so no identity) is refused as malformed.
pub fn verify_bundle(bundle: &[u8], keys: &Keys) -> Result<Signed, Rejection> {
    if bundle.len() as u64 > MAX_PAYLOAD {
        return Err(Rejection::Malformed(format!(
            "a Sigstore bundle of {} bytes",
            bundle.len()
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |m: String| Rejection::Malformed(format!("Sigstore bundle: {m}"));
    let b: Bundle = serde_json::from_slice(bundle).map_err(|e| bad(e.to_string()))?;
    let env = b
        .dsse_envelope
        .ok_or_else(|| bad("no DSSE envelope (a message signature names no image)".into()))?;
    if env.payload_type != IN_TOTO {
        return Err(bad(format!("payload type {:?}", env.payload_type)));
    }
    let payload = b64
        .decode(env.payload.trim())
        .map_err(|e| bad(format!("payload: {e}")))?;
    let signed = pae(&env.payload_type, &payload);
    let key = env
        .signatures
        .iter()
        .filter_map(|s| b64.decode(s.sig.trim()).ok())
        .find_map(|raw| {
            keys.0
                .iter()
                .find(|(k, _)| k.verify_signature(Signature::Raw(&raw), &signed).is_ok())
                .map(|(_, fpr)| fpr.clone())
        })
        .ok_or(Rejection::UnknownKey)?;
    let st: Statement =
        serde_json::from_slice(&payload).map_err(|e| Rejection::Payload(e.to_string()))?;
    let subject = st
        .subject
        .into_iter()
        .next()
        .ok_or_else(|| Rejection::Payload("the statement names no subject".into()))?;
    let hex = subject
        .digest
        .get("sha256")
        .ok_or_else(|| Rejection::Payload("the subject has no sha256 digest".into()))?;
    let digest = shipperd_model::Digest::parse(&format!("sha256:{hex}"))
        .map_err(|e| Rejection::Payload(e.to_string()))?;
    Ok(Signed {
        digest,
        identity: subject.name,
        key,
    })
}
