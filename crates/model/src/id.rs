//! Bundle ids and target names.

use crate::{ParseError, digest::is_hex64};

/// A bundle's id: the sha256 of its bytes (of its part list, for a multi-part bundle),
/// 64 lowercase hex characters. Safe as a file name and as a NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleId(String);

impl BundleId {
    /// Exactly 64 lowercase hex characters.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if is_hex64(s) {
            Ok(BundleId(s.to_string()))
        } else {
            Err(ParseError::BundleId(s.to_string()))
        }
    }

    /// A checksum as people write it: any case, surrounding blanks, an optional
    /// `sha256:` prefix.
    pub fn from_checksum(s: &str) -> Result<Self, ParseError> {
        let s = s.trim().to_ascii_lowercase();
        let hex = s.strip_prefix("sha256:").unwrap_or(&s);
        BundleId::parse(hex).map_err(|_| ParseError::BundleId(s.clone()))
    }

    /// The id of the bytes whose sha256 is `hash`.
    pub fn from_sha256(hash: &[u8; 32]) -> Self {
        BundleId(hex::encode(hash))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BundleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BundleId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BundleId::parse(s)
    }
}

/// The name of a registry target: `NAME` (`default`, `quay`, a `ClusterRegistryTarget`,
/// a target of a targets file), or `NAMESPACE/NAME` for a namespaced `RegistryTarget`,
/// which only its own namespace's bundles may use. Each part: 1-63 letters, digits and
/// `- _ .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetName(String);

impl TargetName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let part = |p: &str| {
            (1..=63).contains(&p.len())
                && p.as_bytes()[0].is_ascii_alphanumeric()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let ok = match s.split_once('/') {
            Some((ns, name)) => part(ns) && part(name),
            None => part(s),
        };
        if ok {
            Ok(TargetName(s.to_string()))
        } else {
            Err(ParseError::TargetName(s.to_string()))
        }
    }

    /// `NAMESPACE/NAME` of a namespaced target.
    pub fn namespaced(namespace: &str, name: &str) -> Result<Self, ParseError> {
        Self::parse(&format!("{namespace}/{name}"))
    }

    /// The namespace of a namespaced target (`None`: a cluster-wide one).
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once('/').map(|(ns, _)| ns)
    }

    /// The name without its namespace.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, n)| n)
    }

    /// The target the `--registry` flags describe.
    pub fn default_name() -> Self {
        TargetName("default".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TargetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TargetName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetName::parse(s)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(BundleId);
string_serde!(TargetName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names() {
        let t = TargetName::parse("team-a/mirror").unwrap();
        assert_eq!((t.namespace(), t.name()), (Some("team-a"), "mirror"));
        let t = TargetName::parse("quay").unwrap();
        assert_eq!((t.namespace(), t.name()), (None, "quay"));
        assert!(TargetName::parse("quay-1.prod_x").is_ok());
        for bad in ["", "a/b/c", "/x", "x/", "a b", "../x", &"x".repeat(64)] {
            assert!(TargetName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bundle_ids() {
        let hex = "ab".repeat(32);
        assert_eq!(BundleId::parse(&hex).unwrap().as_str(), hex);
        assert!(BundleId::parse(&hex.to_uppercase()).is_err());
        assert!(BundleId::parse("../etc").is_err());
        let lenient = BundleId::from_checksum(&format!(" SHA256:{} ", hex.to_uppercase()));
        assert_eq!(lenient.unwrap().as_str(), hex);
    }
}
