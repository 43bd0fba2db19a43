//! Test certificates: a CA and a loopback server certificate it signed (for a registry
//! over TLS), and a self-signed signing key for registry tokens.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, Clone)]
pub struct ServerCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A fresh CA, and a certificate for `127.0.0.1` and `localhost` signed by it.
pub fn loopback_server_cert() -> anyhow::Result<ServerCert> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "ShipperD test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "registry on loopback");
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(ServerCert {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A self-signed ECDSA P-256 certificate and its PKCS#8 key (for signing tokens).
pub struct SigningCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub pkcs8: Vec<u8>,
}

pub fn token_signing_cert() -> anyhow::Result<SigningCert> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "ShipperD test token issuer");
    let cert = p.self_signed(&key)?;
    Ok(SigningCert {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        pkcs8: key.serialize_der(),
    })
}
