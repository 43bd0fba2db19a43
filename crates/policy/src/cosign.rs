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
