//! Simple signing (`signedBy` with `GPGKeys`): an OpenPGP signed message, as
//! `skopeo copy --sign-by` and `skopeo standalone-sign` write it (gpg's output, usually
//! compressed), whose literal data is the JSON payload
//! `{"critical": {"type": "atomic container signature", "image": {"docker-manifest-digest":
//! ...}, "identity": {"docker-reference": ...}}, "optional": {...}}`. The OpenPGP work is
//! rpgp's; this reads the keys, checks the signature against them, and the payload's
//! shape, as containers/image's `signature/simple.go` does.

use pgp::{
    composed::{Deserializable as _, Message, SignedPublicKey},
    types::KeyDetails as _,
};
use serde::Deserialize;
use shipperd_model::{Digest, Reference};

/// The most bytes of a signature read.
pub const MAX_SIGNATURE: usize = 4 << 20;

/// Why a signature was not accepted, said as a person reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("not an OpenPGP signature: {0}")]
    Malformed(String),
    #[error("signed by an unknown key")]
    UnknownKey,
    #[error("the signed payload is not a container signature: {0}")]
    Payload(String),
    #[error("signature for another digest ({0})")]
    OtherDigest(Digest),
    #[error("identity mismatch: signed for {0}")]
    Identity(String),
}

/// The keys of a `signedBy` requirement (binary or ASCII-armored, one or many).
pub struct Keys(Vec<SignedPublicKey>);

impl Keys {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let (keys, _) = SignedPublicKey::from_reader_many(std::io::Cursor::new(bytes))
            .map_err(|e| format!("not an OpenPGP public key: {e}"))?;
        let keys: Vec<SignedPublicKey> = keys
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not an OpenPGP public key: {e}"))?;
        if keys.is_empty() {
            return Err("no OpenPGP public key in it".into());
        }
        Ok(Keys(keys))
    }
}

/// What a simple signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub digest: Digest,
    pub identity: String,
    /// The fingerprint (hex, upper case as gpg prints it) of the key that signed.
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
    image: Image,
    identity: IdentityField,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

#[derive(Deserialize)]
struct IdentityField {
    #[serde(rename = "docker-reference")]
    reference: String,
}

/// Checks `signature` against `keys`: the signer, and what it signed.
pub fn verify(signature: &[u8], keys: &Keys) -> Result<Signed, Rejection> {
    if signature.len() > MAX_SIGNATURE {
        return Err(Rejection::Malformed(format!(
            "{} bytes, more than a signature may be",
            signature.len()
        )));
    }
    let bad = |e: &dyn std::fmt::Display| Rejection::Malformed(e.to_string());
    let msg = Message::from_bytes(std::io::Cursor::new(signature)).map_err(|e| bad(&e))?;
    let mut msg = msg.decompress().map_err(|e| bad(&e))?;
    let payload = msg.as_data_vec().map_err(|e| bad(&e))?;
    let mut signer = None;
    'keys: for k in &keys.0 {
        if msg.verify(k).is_ok() {
            signer = Some(k.fingerprint());
            break;
        }
        for sub in &k.public_subkeys {
            if msg.verify(sub).is_ok() {
                signer = Some(k.fingerprint());
                break 'keys;
            }
        }
    }
    let key = signer.ok_or(Rejection::UnknownKey)?;
    let p: Payload =
        serde_json::from_slice(&payload).map_err(|e| Rejection::Payload(e.to_string()))?;
    if p.critical.kind != "atomic container signature" {
        return Err(Rejection::Payload(format!("type {:?}", p.critical.kind)));
    }
    let digest =
        Digest::parse(&p.critical.image.digest).map_err(|e| Rejection::Payload(e.to_string()))?;
    Ok(Signed {
        digest,
        identity: p.critical.identity.reference,
        key: hex::encode_upper(key.as_bytes()),
    })
}

/// Does a verified signature fit the image `image` at `digest`, under `identity`?
pub fn fits(
    signed: &Signed,
    image: &Reference,
    digest: &Digest,
    identity: &crate::Identity,
) -> Result<(), Rejection> {
    if signed.digest != *digest {
        return Err(Rejection::OtherDigest(signed.digest.clone()));
    }
    let claimed = Reference::parse(&signed.identity)
        .map_err(|_| Rejection::Identity(signed.identity.clone()))?;
    if !identity.accepts(image, &claimed) {
        return Err(Rejection::Identity(signed.identity.clone()));
    }
    Ok(())
}
