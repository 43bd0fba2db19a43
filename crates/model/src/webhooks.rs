//! The webhooks file notify follows (`--webhooks-file`) and the operator writes from
//! `WebhookTarget`s: TOML, one `[[webhook]]` each.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One webhook of a webhooks file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// A namespace's webhook (a `WebhookTarget`): only events of bundles that namespace
    /// brought in. None: every event (the admin's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub url: String,
    /// A file holding the signing secret (`whsec_<base64>` or raw bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Event types to send (e.g. `io.shipperd.bundle.published`); empty: all.
    #[serde(default)]
    pub types: Vec<String>,
}

/// A webhooks file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksFile {
    /// The namespace bundles of the ingest endpoint and drop directory belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhook: Vec<WebhookSpec>,
}
