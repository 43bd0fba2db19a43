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

/// A CA that signs server and client certificates on demand.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Certificate and key in one PEM (what `reqwest::Identity::from_pem` reads).
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        Ok(TestCa {
            pem: issuer.pem(),
            issuer,
        })
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self) -> anyhow::Result<Leaf> {
        self.leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str) -> anyhow::Result<Leaf> {
        self.leaf(
            vec![name.into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(
        &self,
        names: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names)?;
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
