//! Logging in. Requests go out without credentials until the registry answers 401;
//! then the registry's `Bearer` challenge names its token service, and a token is
//! requested there (with basic credentials when the target has them), or, for a
//! registry that takes basic auth itself, the basic header is used. Headers are kept
//! per repository (tokens are scoped to one) and renewed on the next 401.
//!
//! A cross-repository mount needs more than one repository's token: push on the
//! destination and pull on the source, asked for together (the distribution token
//! protocol's repeated `scope` parameter) and kept under the pair. The token service's
//! answer says what a failure is: 401 or 403 (credentials refused) will not heal, 429,
//! 5xx or no answer may. Tokens are read with oci-client's token type.

use std::{collections::HashMap, sync::Mutex};

use base64::Engine as _;
use oci_client::token_cache::RegistryToken;
use reqwest::header::HeaderValue;
use shipperd_registry_targets::{Credentials, Target};

use super::RegistryError;

/// What a login asks the token service for, on the repository worked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    PullPush,
}

pub(crate) struct Auth {
    target: Target,
    access: Access,
    /// The registry's own client and base URL.
    http: reqwest::Client,
    base: String,
    /// Per repository, or per `destination source` pair for mounts.
    headers: Mutex<HashMap<String, HeaderValue>>,
    /// Set after the first 401: later repositories log in before their first request.
    required: std::sync::atomic::AtomicBool,
}

impl Auth {
    pub(crate) fn new(
        target: &Target,
        http: reqwest::Client,
        base: String,
        access: Access,
    ) -> Result<Self, RegistryError> {
        Ok(Auth {
            target: target.clone(),
            access,
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
        let host = self.target.url.host.clone();
        let denied = |status: Option<u16>, message: String| RegistryError::AuthDenied {
            host: host.clone(),
            status,
            message,
        };
        let creds = self
            .target
            .credentials()
            .map_err(|e| denied(None, e.to_string()))?;
        let value = match &creds {
            Credentials::Bearer(t) => format!("Bearer {}", t.expose()),
            _ => match (self.token(repo, from, &creds).await?, &creds) {
                (Some(t), _) => format!("Bearer {t}"),
                (None, Credentials::Basic { username, password }) => format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{}", password.expose()))
                ),
                (None, _) => {
                    return Err(denied(
                        Some(401),
                        format!(
                            "{host} asks for credentials and target {} has none",
                            self.target.name
                        ),
                    ));
                }
            },
        };
        let mut h = HeaderValue::from_str(&value)
            .map_err(|_| denied(None, "the token is not a valid header".into()))?;
        h.set_sensitive(true);
        self.headers
            .lock()
            .expect("not poisoned")
            .insert(key(repo, from), h.clone());
        Ok(h)
    }

    /// A token for pushing to `repo` (and pulling from `from`, for a mount), or `None`
    /// when the registry does not use a token service (basic auth covers every
    /// repository).
    async fn token(
        &self,
        repo: &str,
        from: Option<&str>,
        creds: &Credentials,
    ) -> Result<Option<String>, RegistryError> {
        let host = &self.target.url.host;
        let what = match from {
            Some(from) => format!("logging in for {repo} (mounting from {from})"),
            None => format!("logging in for {repo}"),
        };
        let unavailable = |e: &dyn std::fmt::Display| RegistryError::AuthUnavailable {
            host: host.clone(),
            message: format!("{what}: {e}"),
        };
        let resp = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(RegistryError::transport)?;
        let Some((realm, service)) = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(bearer_challenge)
        else {
            return Ok(None);
        };
        let mut url = reqwest::Url::parse(&realm).map_err(|e| unavailable(&e))?;
        if matches!(creds, Credentials::Basic { .. }) {
            self.may_send_credentials(&url)
                .map_err(|message| RegistryError::AuthDenied {
                    host: host.clone(),
                    status: None,
                    message: format!("{what}: {message}"),
                })?;
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &service {
                q.append_pair("service", s);
            }
            let actions = match self.access {
                Access::Pull => "pull",
                Access::PullPush => "pull,push",
            };
            q.append_pair("scope", &format!("repository:{repo}:{actions}"));
            if let Some(from) = from {
                q.append_pair("scope", &format!("repository:{from}:pull"));
            }
        }
        let mut req = self.http.get(url);
        if let Credentials::Basic { username, password } = creds {
            req = req.basic_auth(username, Some(password.expose()));
        }
        let resp = req.send().await.map_err(|e| unavailable(&e))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| unavailable(&e))?;
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)])
                .trim()
                .to_string();
            let message = format!("{what}: the token service answered {status}: {text}");
            return Err(if status == 429 || status >= 500 {
                RegistryError::AuthUnavailable {
                    host: host.clone(),
                    message,
                }
            } else {
                RegistryError::AuthDenied {
                    host: host.clone(),
                    status: Some(status),
                    message,
                }
            });
        }
        let token: RegistryToken = serde_json::from_slice(&body).map_err(|e| unavailable(&e))?;
        Ok(Some(token.token().to_string()))
    }
}

impl Auth {
    /// May the basic credentials go to the token service at `realm`? Only on the
    /// registry's own host (any port), or a host the target lists in `token_hosts`; and
    /// not in clear text when the registry itself is reached over TLS.
    fn may_send_credentials(&self, realm: &reqwest::Url) -> Result<(), String> {
        let registry = &self.target.url;
        let own = registry
            .host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(registry.host.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let realm_host = realm
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']']);
        let with_port = match realm.port() {
            Some(p) => format!("{realm_host}:{p}"),
            None => realm_host.to_string(),
        };
        let listed = self
            .target
            .auth
            .token_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(realm_host) || h.eq_ignore_ascii_case(&with_port));
        if !realm_host.eq_ignore_ascii_case(own) && !listed {
            return Err(format!(
                "the registry sends logins to a token service on {with_port}, not on {own}: the credentials go there only if target {} lists it in auth.token_hosts",
                self.target.name
            ));
        }
        if registry.https && realm.scheme() != "https" {
            return Err(format!(
                "the registry is reached over TLS but names a token service over plain HTTP ({with_port}): the credentials are not sent in clear text"
            ));
        }
        Ok(())
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

    #[test]
    fn credentials_go_only_to_the_registry_host_or_a_listed_one() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth = |registry: &str, listed: &[&str]| {
            let mut t = shipperd_registry_targets::Targets::single(registry, "", None, None, false)
                .unwrap()
                .default_target()
                .unwrap()
                .clone();
            t.auth.token_hosts = listed.iter().map(|s| s.to_string()).collect();
            super::Auth::new(
                &t,
                reqwest::Client::new(),
                registry.into(),
                super::Access::PullPush,
            )
            .unwrap()
        };
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let quay = auth("https://quay.example:8443", &[]);
        assert!(
            quay.may_send_credentials(&url("https://quay.example/v2/auth"))
                .is_ok()
        );
        let e = quay
            .may_send_credentials(&url("https://evil.example/token"))
            .unwrap_err();
        assert!(
            e.contains("evil.example") && e.contains("token_hosts"),
            "{e}"
        );
        let e = quay
            .may_send_credentials(&url("http://quay.example/v2/auth"))
            .unwrap_err();
        assert!(e.contains("clear text"), "{e}");
        let hub = auth("https://registry-1.docker.io", &["auth.docker.io"]);
        assert!(
            hub.may_send_credentials(&url("https://auth.docker.io/token"))
                .is_ok()
        );
        let local = auth("http://127.0.0.1:5000", &[]);
        assert!(
            local
                .may_send_credentials(&url("http://127.0.0.1:5001/token"))
                .is_ok()
        );
    }
}
