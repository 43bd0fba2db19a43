//! TLS for the API (rustls): a certificate and key, and optionally a CA whose client
//! certificates are required (mutual TLS). The files are looked at again on every new
//! connection and the configuration rebuilt when one of them changed, so a certificate
//! rotated by cert-manager or OpenShift's service CA is served without a restart. A
//! rewrite caught half-done (a new certificate beside the old key) keeps the previous
//! configuration until the files agree again.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    RootCertStore, ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::auth::{Stamp, stamp};

/// The files TLS is served from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) of the clients allowed in; `None`: no client certificate
    /// asked for.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    fn stamps(&self) -> Vec<Stamp> {
        self.paths().map(stamp).collect()
    }
}

/// The TLS configuration served now, rebuilt when its files change.
pub struct Tls {
    files: TlsFiles,
    current: Mutex<(Vec<Stamp>, Arc<ServerConfig>)>,
}

impl Tls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, crate::Error> {
        let stamps = files.stamps();
        let config = build(&files).map_err(crate::Error::Tls)?;
        Ok(Tls {
            files,
            current: Mutex::new((stamps, Arc::new(config))),
        })
    }

    /// The configuration for a new connection (rebuilt first if a file changed).
    pub fn config(&self) -> Arc<ServerConfig> {
        let stamps = self.files.stamps();
        let mut current = self.current.lock().expect("not poisoned");
        if current.0 != stamps {
            match build(&self.files) {
                Ok(c) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: serving the new certificate");
                    *current = (stamps, Arc::new(c));
                }
                // Tried again on the next connection: the stamps stay the old ones.
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but cannot be used (yet); serving the previous certificate")
                }
            }
        }
        current.1.clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles) -> Result<ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate {}: no certificate in it",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    let verifier: Arc<dyn ClientCertVerifier> = match &files.client_ca {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "TLS client CA {}: no certificate in it",
                    ca.display()
                ));
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "TLS certificate {} and key {}: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
