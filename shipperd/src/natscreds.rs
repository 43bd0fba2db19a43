//! `shipperd nats-credentials`: the per-install secrets of ShipperD's NATS, made once.
//!
//! A random password for the `shipperd` NATS user, a CA of the install's own and a
//! server certificate it signed for the NATS Service's names (the Service, its headless
//! pod names, in-namespace and fully qualified). Written as files (`--out-dir`, mode
//! 0600) or as a Kubernetes Secret (`--secret`, created only when absent: a re-run, or a
//! second install Job, never rotates what the running servers use). Nothing secret is
//! printed.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The keys of the credentials, as files and as the Secret's data.
pub const PASSWORD: &str = "password";
pub const CA: &str = "ca.crt";
pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";

/// The generated credentials: key → bytes.
pub struct Credentials(pub BTreeMap<&'static str, Vec<u8>>);

/// The DNS names a NATS Service `service` in `namespace` answers to, for its server
/// certificate (the StatefulSet's pods are `<pod>.<service>...`).
pub fn hosts(service: &str, namespace: &str) -> Vec<String> {
    // `<pod>.<service>` from inside the namespace: clients and the cluster's routes dial
    // those. Named one by one (a cluster has at most 5 nodes): a wildcard over a
    // one-label name (`*.nats`) is refused by TLS clients, as `*.com` is.
    let mut h = vec![service.to_string()];
    h.extend((0..5).map(|i| format!("{service}-{i}.{service}")));
    for suffix in ["", ".svc", ".svc.cluster.local"] {
        h.push(format!("{service}.{namespace}{suffix}"));
        h.push(format!("*.{service}.{namespace}{suffix}"));
    }
    h.push("localhost".into());
    h
}

/// A CA of its own named `ca_name`, and a certificate it signed for `hosts` (DNS names
/// or IP addresses): the CA's PEM, the chain's (leaf then CA) and the leaf key's.
pub fn ca_and_leaf(hosts: &[String], ca_name: &str) -> anyhow::Result<(String, String, String)> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("shipperd", |h| h.as_str()),
    );
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        // NATS cluster routes present the same certificate to each other.
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = leaf.signed_by(&key, &ca)?;
    Ok((
        ca.pem(),
        format!("{}{}", cert.pem(), ca.pem()),
        key.serialize_pem(),
    ))
}

/// A fresh password, CA and server certificate for `hosts`.
pub fn generate(hosts: &[String]) -> anyhow::Result<Credentials> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let password = hex(&raw);
    let (ca, chain, key) = ca_and_leaf(hosts, "ShipperD NATS CA")?;
    Ok(Credentials(BTreeMap::from([
        (PASSWORD, password.into_bytes()),
        (CA, ca.into_bytes()),
        (CERT, chain.into_bytes()),
        (KEY, key.into_bytes()),
    ])))
}

/// `ca.crt`, `tls.crt` and `tls.key` in `dir` for `hosts`, made unless `tls.crt` is
/// there already (a restart keeps what clients trust). Whether it made them.
pub fn ensure_tls(dir: &Path, hosts: &[String], ca_name: &str) -> anyhow::Result<bool> {
    if dir.join(CERT).exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, chain, key) = ca_and_leaf(hosts, ca_name)?;
    for (name, bytes) in [(KEY, key), (CA, ca), (CERT, chain)] {
        let path = dir.join(name);
        write_private(&path, bytes.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the credentials into `dir` (mode 0600), unless a password is there already.
/// Whether it wrote them.
pub fn write_files(dir: &Path, hosts: &[String]) -> anyhow::Result<bool> {
    if dir.join(PASSWORD).exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in generate(hosts)?.0 {
        let path = dir.join(name);
        write_private(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(true)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Creates the Secret `name` in `namespace` with fresh credentials, unless it exists.
/// Whether it created it.
pub async fn ensure_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
) -> anyhow::Result<bool> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if api.get_opt(name).await?.is_some() {
        return Ok(false);
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "shipperd".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(
            generate(hosts)?
                .0
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v)))
                .collect(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(true),
        // Another run was quicker: its credentials stand.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating Secret {namespace}/{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_cover_the_service_and_its_pods() {
        let h = hosts("nats", "shipperd");
        for want in [
            "nats",
            "nats-0.nats",
            "nats-2.nats",
            "nats.shipperd.svc",
            "*.nats.shipperd.svc.cluster.local",
            "*.nats.shipperd",
        ] {
            assert!(h.iter().any(|x| x == want), "{want} missing from {h:?}");
        }
    }

    #[test]
    fn files_are_private_and_never_replaced() {
        let dir = std::env::temp_dir().join(format!("shipperd-natscreds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(write_files(&dir, &hosts("nats", "x")).unwrap());
        let password = std::fs::read_to_string(dir.join(PASSWORD)).unwrap();
        assert_eq!(password.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
        assert!(!write_files(&dir, &hosts("nats", "x")).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join(PASSWORD)).unwrap(),
            password
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
