//! Credentials for a target. Files are read again at every login, so a rotated Secret
//! or a refreshed service-account token is picked up without a restart.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use shipperd_model::Secret;

use crate::{Error, Result};

/// How a target authenticates; at most one way. With none, requests go anonymously.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    /// Basic auth user; the password comes from `password_file` (or, for the
    /// `--registry` flags, `--registry-password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A docker `config.json` or a Kubernetes `.dockerconfigjson` Secret file; the entry
    /// for the target's host is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_config: Option<PathBuf>,
    /// An OpenShift service-account token file (for the internal registry:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`), sent as the password of
    /// user `serviceaccount`, which the registry's token service accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<PathBuf>,
    /// A file holding a bearer token sent as is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// Hosts other than the registry's own whose token service may be sent the basic
    /// credentials (e.g. `auth.docker.io`). A registry whose challenge names a token
    /// service elsewhere is refused the login otherwise, so a compromised or spoofed
    /// registry cannot send the credentials to a host of its choosing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hosts: Vec<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// What to present to the registry (or its token service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

fn read_secret(what: &str, path: &Path) -> Result<Secret> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::Credentials(format!("{what} {}: {e}", path.display())))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::Credentials(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(s))
}

impl AuthSpec {
    pub fn validate(&self) -> Result<()> {
        let ways = [
            self.username.is_some(),
            self.docker_config.is_some(),
            self.service_account_token.is_some(),
            self.bearer_token_file.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if ways > 1 {
            return Err(Error::Credentials(
                "give one of username, docker_config, service_account_token, bearer_token_file"
                    .into(),
            ));
        }
        if self.password_file.is_some() && self.username.is_none() {
            return Err(Error::Credentials("password_file needs username".into()));
        }
        Ok(())
    }

    /// The credentials for `host` as the files say now.
    pub fn credentials(&self, host: &str) -> Result<Credentials> {
        if let Some(user) = &self.username {
            let password = match (&self.password, &self.password_file) {
                (_, Some(f)) => read_secret("password file", f)?,
                (Some(p), None) => p.clone(),
                (None, None) => {
                    return Err(Error::Credentials(format!("no password for user {user}")));
                }
            };
            return Ok(Credentials::Basic {
                username: user.clone(),
                password,
            });
        }
        if let Some(f) = &self.service_account_token {
            return Ok(Credentials::Basic {
                username: "serviceaccount".into(),
                password: read_secret("service-account token", f)?,
            });
        }
        if let Some(f) = &self.bearer_token_file {
            return Ok(Credentials::Bearer(read_secret("bearer token file", f)?));
        }
        if let Some(f) = &self.docker_config {
            return docker_config(f, host);
        }
        Ok(Credentials::Anonymous)
    }
}

/// A docker `config.json`, `.dockerconfigjson` or `containers-auth.json`: its entries
/// by registry (or, in the containers format, by `host/namespace`).
#[derive(Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    pub auths: std::collections::BTreeMap<String, DockerAuth>,
}

/// One entry of a [`DockerConfig`].
#[derive(Deserialize)]
pub struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl DockerAuth {
    /// The entry's user and password (`auth` is base64 of `user:password`); `name`
    /// says which entry in errors.
    pub fn basic(&self, name: &str) -> Result<(String, Secret)> {
        let bad = |p: &str| Error::Credentials(format!("docker config entry for {name}: {p}"));
        if self.identitytoken.is_some() {
            return Err(bad(
                "identitytoken (OAuth refresh) entries are not supported; use user and password",
            ));
        }
        let (username, password) = match (&self.auth, &self.username, &self.password) {
            (Some(a), _, _) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|_| bad("auth is not base64"))?;
                let raw = String::from_utf8(raw).map_err(|_| bad("auth is not UTF-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| bad("auth is not user:password"))?;
                (u.to_string(), p.to_string())
            }
            (None, Some(u), Some(p)) => (u.clone(), p.clone()),
            _ => return Err(bad("neither auth nor username and password")),
        };
        Ok((username, Secret::new(password)))
    }
}

/// `https://reg.example:5000/v1/` → `reg.example:5000`.
fn registry_key(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

fn docker_config(path: &Path, host: &str) -> Result<Credentials> {
    let text = std::fs::read(path)
        .map_err(|e| Error::Credentials(format!("docker config {}: {e}", path.display())))?;
    let cfg: DockerConfig = serde_json::from_slice(&text).map_err(|e| {
        Error::Credentials(format!(
            "docker config {} is not a config.json: {e}",
            path.display()
        ))
    })?;
    let Some((_, entry)) = cfg.auths.iter().find(|(k, _)| registry_key(k) == host) else {
        return Err(Error::Credentials(format!(
            "docker config {} has no entry for {host}",
            path.display()
        )));
    };
    let (username, password) = entry.basic(host)?;
    Ok(Credentials::Basic { username, password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(".dockerconfigjson");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}},
                "other.example":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        let spec = AuthSpec {
            docker_config: Some(f.clone()),
            ..Default::default()
        };
        assert_eq!(
            spec.credentials("reg.example:5000").unwrap(),
            Credentials::Basic {
                username: "bob".into(),
                password: Secret::new("s3cret")
            }
        );
        assert!(matches!(
            spec.credentials("other.example").unwrap(),
            Credentials::Basic { username, .. } if username == "u"
        ));
        let err = spec.credentials("nope.example").unwrap_err().to_string();
        assert!(err.contains("no entry for nope.example"), "{err}");
    }

    #[test]
    fn service_account_token_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "one\n").unwrap();
        let spec = AuthSpec {
            service_account_token: Some(f.clone()),
            ..Default::default()
        };
        let pw = |c| match c {
            Credentials::Basic { password, .. } => password.expose().to_string(),
            _ => panic!(),
        };
        assert_eq!(pw(spec.credentials("h").unwrap()), "one");
        std::fs::write(&f, "two").unwrap();
        assert_eq!(pw(spec.credentials("h").unwrap()), "two");
    }

    #[test]
    fn one_way_only() {
        let spec = AuthSpec {
            username: Some("u".into()),
            bearer_token_file: Some("/t".into()),
            ..Default::default()
        };
        assert!(spec.validate().is_err());
    }
}
