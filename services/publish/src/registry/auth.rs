//! Logging in. Requests go out without credentials until the registry answers 401;
//! then oci-client reads the challenge and fetches a token from the registry's token
//! service (with basic credentials when the target has them), or, for a registry that
//! takes basic auth itself, the basic header is used. Headers are kept per repository
//! (tokens are scoped to one) and renewed on the next 401.

use std::{collections::HashMap, sync::Mutex};

use base64::Engine as _;
use oci_client::{
    Reference,
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
};
use reqwest::header::HeaderValue;
use shipperd_target::{Credentials, Target};

use super::RegistryError;

pub(crate) struct Auth {
    target: Target,
    oci: oci_client::Client,
    headers: Mutex<HashMap<String, HeaderValue>>,
    /// Set after the first 401: later repositories log in before their first request.
    required: std::sync::atomic::AtomicBool,
}

/// Each certificate of a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Vec<Certificate> {
    let text = String::from_utf8_lossy(pem);
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    text.split(BEGIN)
        .skip(1)
        .filter_map(|rest| rest.split_once(END))
        .map(|(body, _)| Certificate {
            encoding: CertificateEncoding::Pem,
            data: format!("{BEGIN}{body}{END}\n").into_bytes(),
        })
        .collect()
}

impl Auth {
    pub(crate) fn new(target: &Target) -> Result<Self, RegistryError> {
        let oci = oci_client::Client::try_from(ClientConfig {
            protocol: if target.url.https {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            accept_invalid_certificates: target.insecure,
            extra_root_certificates: target
                .ca_pem
                .as_deref()
                .map(pem_certificates)
                .unwrap_or_default(),
            ..Default::default()
        })
        .map_err(|e| RegistryError::Tls(e.to_string()))?;
        Ok(Auth {
            target: target.clone(),
            oci,
            headers: Mutex::default(),
            required: Default::default(),
        })
    }

    /// The `Authorization` header for `repo`, if one is known or needed.
    pub(crate) async fn header(&self, repo: &str) -> Result<Option<HeaderValue>, RegistryError> {
        if let Some(h) = self.headers.lock().expect("not poisoned").get(repo) {
            return Ok(Some(h.clone()));
        }
        if self.required.load(std::sync::atomic::Ordering::Relaxed) {
            return self.login(repo).await.map(Some);
        }
        Ok(None)
    }

    /// Logs in for pushing to `repo` (after a 401; oci-client reads the challenge).
    pub(crate) async fn login(&self, repo: &str) -> Result<HeaderValue, RegistryError> {
        self.required
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let creds = self
            .target
            .credentials()
            .map_err(|e| RegistryError::Auth(e.to_string()))?;
        let value = match &creds {
            Credentials::Bearer(t) => format!("Bearer {}", t.expose()),
            _ => {
                let auth = match &creds {
                    Credentials::Basic { username, password } => {
                        RegistryAuth::Basic(username.clone(), password.expose().to_string())
                    }
                    _ => RegistryAuth::Anonymous,
                };
                let r = Reference::with_tag(
                    self.target.url.host.clone(),
                    repo.to_string(),
                    "latest".into(),
                );
                let token = self
                    .oci
                    .auth(&r, &auth, oci_client::RegistryOperation::Push)
                    .await
                    .map_err(|e| RegistryError::Auth(format!("logging in for {repo}: {e}")))?;
                match (token, &creds) {
                    (Some(t), _) => format!("Bearer {t}"),
                    (None, Credentials::Basic { username, password }) => format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{username}:{}", password.expose()))
                    ),
                    (None, _) => {
                        return Err(RegistryError::Auth(format!(
                            "{} asks for credentials and target {} has none",
                            self.target.url.host, self.target.name
                        )));
                    }
                }
            }
        };
        let mut h = HeaderValue::from_str(&value)
            .map_err(|_| RegistryError::Auth("the token is not a valid header".into()))?;
        h.set_sensitive(true);
        self.headers
            .lock()
            .expect("not poisoned")
            .insert(repo.to_string(), h.clone());
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_a_pem_bundle() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let certs = super::pem_certificates(format!("junk\n{one}{one}").as_bytes());
        assert_eq!(certs.len(), 2);
        assert!(String::from_utf8_lossy(&certs[0].data).contains("AAAA"));
    }
}
