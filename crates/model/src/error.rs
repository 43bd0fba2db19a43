//! Values that do not parse.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid digest {0:?}: only sha256:<64 lowercase hex> is supported")]
    Digest(String),
    #[error("invalid bundle id {0:?}: expected 64 lowercase hex characters (the bundle's sha256)")]
    BundleId(String),
    #[error(
        "invalid target name {0:?}: NAME or NAMESPACE/NAME, each 1-63 letters, digits and - _ ., \
         starting with a letter or digit"
    )]
    TargetName(String),
    #[error("invalid image reference {reference:?}: {problem}")]
    Reference { reference: String, problem: String },
}
