//! Logging in. Requests go out without credentials until the registry answers 401;
//! then oci-client reads the challenge and fetches a token from the registry's token
//! service (with basic credentials when the target has them), or, for a registry that
//! takes basic auth itself, the basic header is used. Headers are kept per repository
//! (tokens are scoped to one) and renewed on the next 401.
//!
//! A cross-repository mount needs more than one repository's token: push on the
//! destination and pull on the source. oci-client asks for one repository only, so for
//! mounts the token is requested here with both scopes (the distribution token
//! protocol's repeated `scope` parameter) and kept under the pair.

use std::{collections::HashMap, sync::Mutex};

use base64::Engine as _;
use oci_client::{
    Reference,
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    token_cache::RegistryToken,
};
use reqwest::header::HeaderValue;
use shipperd_target::{Credentials, Target};

use super::RegistryError;

pub(crate) struct Auth {
    target: Target,
    oci: oci_client::Client,
    /// The registry's own client and base URL (for two-repository tokens).
    http: reqwest::Client,
    base: String,
    /// Per repository, or per `destination source` pair for mounts.
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
    pub(crate) fn new(
        target: &Target,
        http: reqwest::Client,
        base: String,
    ) -> Result<Self, RegistryError> {
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
            http,
            base,
            headers: Mutex::default(),
            required: Default::default(),
        })
    }

    /// The `Authorization` header for `repo` (and reading `from`, for a mount), if one
    /// is known or needed.
    pub(crate) async fn header(
        &self,
        repo: &str,
        from: Option<&str>,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        if let Some(h) = self
            .headers
            .lock()
            .expect("not poisoned")
            .get(&key(repo, from))
        {
            return Ok(Some(h.clone()));
        }
        if self.required.load(std::sync::atomic::Ordering::Relaxed) {
            return self.login(repo, from).await.map(Some);
        }
        Ok(None)
    }

    /// Logs in for pushing to `repo`, and reading `from` when mounting from it (after a
    /// 401).
    pub(crate) async fn login(
        &self,
        repo: &str,
        from: Option<&str>,
    ) -> Result<HeaderValue, RegistryError> {
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
                let token = match from {
                    None => {
                        let r = Reference::with_tag(
                            self.target.url.host.clone(),
                            repo.to_string(),
                            "latest".into(),
                        );
                        self.oci
                            .auth(&r, &auth, oci_client::RegistryOperation::Push)
                            .await
                            .map_err(|e| {
                                RegistryError::Auth(format!("logging in for {repo}: {e}"))
                            })?
                    }
                    Some(from) => self.mount_token(repo, from, &creds).await?,
                };
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
            .insert(key(repo, from), h.clone());
        Ok(h)
    }

    /// A token for pushing to `repo` and pulling from `from`, or `None` when the
    /// registry does not use a token service (basic auth covers every repository).
    async fn mount_token(
        &self,
        repo: &str,
        from: &str,
        creds: &Credentials,
    ) -> Result<Option<String>, RegistryError> {
        let failed = |e: &dyn std::fmt::Display| {
            RegistryError::Auth(format!("logging in for {repo} (mounting from {from}): {e}"))
        };
        let resp = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(|e| failed(&e))?;
        let Some((realm, service)) = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(bearer_challenge)
        else {
            return Ok(None);
        };
        let mut url = reqwest::Url::parse(&realm).map_err(|e| failed(&e))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &format!("repository:{repo}:pull,push"));
            q.append_pair("scope", &format!("repository:{from}:pull"));
        }
        let mut req = self.http.get(url);
        if let Credentials::Basic { username, password } = creds {
            req = req.basic_auth(username, Some(password.expose()));
        }
        let resp = req.send().await.map_err(|e| failed(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| failed(&e))?;
        if !status.is_success() {
            return Err(failed(&format!(
                "the token service answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            )));
        }
        let token: RegistryToken = serde_json::from_slice(&body).map_err(|e| failed(&e))?;
        Ok(Some(token.token().to_string()))
    }
}

fn key(repo: &str, from: Option<&str>) -> String {
    match from {
        Some(from) => format!("{repo} {from}"),
        None => repo.to_string(),
    }
}

/// The realm and service of a `Bearer` challenge in a `WWW-Authenticate` header.
fn bearer_challenge(header: &str) -> Option<(String, Option<String>)> {
    http_auth::ChallengeParser::new(header)
        .filter_map(Result::ok)
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|c| {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            Some((param("realm")?, param("service")))
        })
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

    #[test]
    fn reads_a_bearer_challenge() {
        let h = r#"Basic realm="x", Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#;
        assert_eq!(
            super::bearer_challenge(h),
            Some((
                "https://auth.example/token".into(),
                Some("registry.example".into())
            ))
        );
        assert_eq!(super::bearer_challenge(r#"Basic realm="registry""#), None);
        assert_eq!(super::bearer_challenge("Bearer service=\"x\""), None);
    }
}
