//! Where NATS is and how ShipperD proves who it is there: several server URLs (the
//! client fails over between them and learns the rest of a cluster from the one it
//! reaches), one way to authenticate (a credentials file, an NKey seed, a user and
//! password, or a token), TLS with a CA bundle and a client certificate, and how many
//! replicas the streams and buckets ShipperD declares get.
//!
//! Secrets are only ever read from files (a mounted Secret), at connect time: they are
//! never on a command line, in this type's `Debug`, in a log line or an error. A URL
//! that carries `user:password@` is shown with the password masked.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Error, Result};

/// How to reach NATS. [`NatsConfig::new`] is one plain server, as in the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URLs (`nats://`, `tls://`); the client tries them in turn.
    pub servers: Vec<String>,
    /// A `.creds` file (user JWT and NKey seed, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// A file holding a user NKey seed (`SU...`).
    pub nkey_file: Option<PathBuf>,
    /// A user name, with its password in `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A file holding an authentication token.
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to; setting it (or a
    /// client certificate) requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Replicas of the streams and KV buckets ShipperD declares (1, or 3 on a cluster of
    /// three or more). Consumers follow their stream.
    pub replicas: usize,
}

impl NatsConfig {
    /// One server, no authentication, no TLS, one replica.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            servers: vec![url.into()],
            creds_file: None,
            nkey_file: None,
            user: None,
            password_file: None,
            token_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            replicas: 1,
        }
    }

    /// The servers as they may be shown: a password in a URL is masked.
    pub fn servers_shown(&self) -> String {
        self.servers
            .iter()
            .map(|s| redact_url(s))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Settings that cannot work together, found before anything connects.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Settings(m));
        if self.servers.is_empty() || self.servers.iter().any(|s| s.trim().is_empty()) {
            return bad("no NATS server URL (--nats-url)".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return bad(format!(
                "--nats-replicas must be 1 to 5 (JetStream's limit), not {}",
                self.replicas
            ));
        }
        let methods = [
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
            self.user.is_some() || self.password_file.is_some(),
            self.token_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad(
                "give one way to authenticate to NATS: a credentials file, an NKey seed, \
                 a user and password, or a token"
                    .into(),
            );
        }
        if self.user.is_some() != self.password_file.is_some() {
            return bad("--nats-user and --nats-password-file go together".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad("--nats-tls-cert-file and --nats-tls-key-file go together".into());
        }
        Ok(())
    }

    /// The client's options, secrets read from their files now.
    pub(crate) async fn options(&self, name: &str) -> Result<async_nats::ConnectOptions> {
        self.check()?;
        let mut o = match (&self.creds_file, &self.nkey_file, &self.token_file) {
            (Some(f), _, _) => async_nats::ConnectOptions::with_credentials_file(f)
                .await
                .map_err(|e| {
                    Error::Settings(format!("NATS credentials file {}: {e}", f.display()))
                })?,
            (_, Some(f), _) => async_nats::ConnectOptions::with_nkey(secret(f, "NKey seed")?),
            (_, _, Some(f)) => async_nats::ConnectOptions::with_token(secret(f, "token")?),
            _ => match (&self.user, &self.password_file) {
                (Some(u), Some(f)) => async_nats::ConnectOptions::with_user_and_password(
                    u.clone(),
                    secret(f, "password")?,
                ),
                _ => async_nats::ConnectOptions::new(),
            },
        };
        if let Some(ca) = &self.tls_ca_file {
            readable(ca, "TLS CA")?;
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            readable(cert, "TLS client certificate")?;
            readable(key, "TLS client key")?;
            o = o
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(o.name(name).connection_timeout(Duration::from_secs(5)))
    }
}

/// A secret from a file, trailing newline gone; the error names the file, never its bytes.
fn secret(path: &Path, what: &str) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::Settings(format!("NATS {what} file {}: {e}", path.display())))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::Settings(format!(
            "NATS {what} file {} is empty",
            path.display()
        )));
    }
    Ok(s.to_string())
}

fn readable(path: &Path, what: &str) -> Result<()> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| Error::Settings(format!("NATS {what} file {}: {e}", path.display())))
}

/// `nats://user:secret@host:4222` shown as `nats://user:***@host:4222` (and a lone
/// token `nats://secret@host` as `nats://***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{shown}@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_hide_their_secrets() {
        assert_eq!(
            redact_url("nats://shipperd:hunter2@nats:4222"),
            "nats://shipperd:***@nats:4222"
        );
        assert_eq!(
            redact_url("tls://s3cr3t@nats-0.nats:4222"),
            "tls://***@nats-0.nats:4222"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        let mut c = NatsConfig::new("nats://a:b@x:1");
        c.servers.push("nats://y:2".into());
        assert_eq!(c.servers_shown(), "nats://a:***@x:1,nats://y:2");
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let base = NatsConfig::new("nats://127.0.0.1:4222");
        assert!(base.check().is_ok());
        let two = NatsConfig {
            token_file: Some("t".into()),
            nkey_file: Some("n".into()),
            ..base.clone()
        };
        assert!(two.check().unwrap_err().to_string().contains("one way"));
        let half_user = NatsConfig {
            user: Some("u".into()),
            ..base.clone()
        };
        assert!(
            half_user
                .check()
                .unwrap_err()
                .to_string()
                .contains("go together")
        );
        let half_cert = NatsConfig {
            tls_cert_file: Some("c".into()),
            ..base.clone()
        };
        assert!(half_cert.check().is_err());
        let replicas = NatsConfig {
            replicas: 7,
            ..base.clone()
        };
        assert!(replicas.check().unwrap_err().to_string().contains("1 to 5"));
        let none = NatsConfig {
            servers: vec![],
            ..base
        };
        assert!(none.check().is_err());
    }

    #[tokio::test]
    async fn a_secret_file_is_read_but_never_shown() {
        let dir = std::env::temp_dir().join(format!("shipperd-bus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "tok-123\n").unwrap();
        assert_eq!(secret(&f, "token").unwrap(), "tok-123");
        std::fs::write(&f, "\n").unwrap();
        let e = secret(&f, "token").unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let c = NatsConfig {
            token_file: Some(dir.join("missing")),
            ..NatsConfig::new("nats://127.0.0.1:1")
        };
        let e = c.options("t").await.err().unwrap().to_string();
        assert!(e.contains("token file") && e.contains("missing"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
