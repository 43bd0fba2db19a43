//! Content digests.

use sha2::{Digest as _, Sha256};

use crate::ParseError;

/// A validated `sha256:<64 lowercase hex>` digest. Anything else is refused, so a digest
/// can never smuggle a path (`..`, `/`) into a blob path or a subject into a KV key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ParseError::Digest(s.to_string()))?;
        if is_hex64(hex) {
            Ok(Digest(s.to_string()))
        } else {
            Err(ParseError::Digest(s.to_string()))
        }
    }

    /// From 64 lowercase hex characters (a blob file name, a KV key part).
    pub fn from_hex(hex: &str) -> Result<Self, ParseError> {
        if is_hex64(hex) {
            Ok(Digest(format!("sha256:{hex}")))
        } else {
            Err(ParseError::Digest(hex.to_string()))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// A finished hash.
    pub fn from_sha256(hash: &[u8; 32]) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The 64 hex characters, without `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The 32 bytes of the hash: a compact key where many digests are kept (a catalog
    /// bundle's tens of thousands of blobs).
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.hex(), &mut out).expect("a parsed digest is 64 hex digits");
        out
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The referrers fallback tag of this digest: `sha256-<hex>`.
    pub fn referrers_tag(&self) -> String {
        format!("sha256-{}", self.hex())
    }
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strict() {
        let ok = format!("sha256:{}", "0a".repeat(32));
        assert!(Digest::parse(&ok).is_ok());
        for bad in [
            "sha512:00".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
            "sha256:".to_string(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_checks_the_digest() {
        let ok = format!("\"sha256:{}\"", "a".repeat(64));
        let d: Digest = serde_json::from_str(&ok).unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), ok);
        assert!(serde_json::from_str::<Digest>("\"sha256:xyz\"").is_err());
        assert_eq!(
            Digest::of(b""),
            Digest::from_hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .unwrap()
        );
    }
}
