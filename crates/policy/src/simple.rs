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

/// The most bytes of a signature read.
pub const MAX_SIGNATURE: usize = 4 << 20;
/// The `critical.type` of a simple signature's payload.
pub const SIMPLE_SIGNATURE_TYPE: &str = "atomic container signature";

pub use crate::{Rejection, Signed};

/// The keys of a `signedBy` requirement (binary or ASCII-armored, one or many).
pub struct Keys(pub(crate) Vec<SignedPublicKey>);

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

/// Checks `signature` against `keys`: the signer, and what it signed.
pub fn verify(signature: &[u8], keys: &Keys) -> Result<Signed, Rejection> {
    if signature.len() > MAX_SIGNATURE {
        return Err(Rejection::Malformed(format!(
            "{} bytes, more than a signature may be",
            signature.len()
        )));
    }
    let bad =
        |e: &dyn std::fmt::Display| Rejection::Malformed(format!("not an OpenPGP signature: {e}"));
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
    let (digest, identity) = crate::payload(&payload, SIMPLE_SIGNATURE_TYPE)?;
    Ok(Signed {
        digest,
        identity,
        key: hex::encode_upper(key.as_bytes()),
    })
}

pub use crate::fits;
