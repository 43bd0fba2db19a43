//! Simple signing as skopeo writes it, read by ShipperD's verifier: signatures made by
//! `skopeo standalone-sign` with keys Debian's `gpg` makes (never by the code under
//! test), checked for their signer, digest and identity, and a wrong key, a wrong digest,
//! a wrong identity and damaged bytes refused with their reasons. skopeo's own
//! `standalone-verify` agrees on what is accepted.

use std::{path::Path, process::Command};

use shipperd_model::{Digest, Reference};
use shipperd_policy::{
    Identity,
    simple::{self, Keys, Rejection},
};

pub(crate) fn run(home: &Path, cmd: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(cmd)
        .args(args)
        .env("GNUPGHOME", home)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// A new signing key in `home`; its fingerprint.
pub(crate) fn new_key(home: &Path, name: &str) -> anyhow::Result<String> {
    let before: Vec<u8> = run(home, "gpg", &["--list-keys", "--with-colons"]).unwrap_or_default();
    run(
        home,
        "gpg",
        &[
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("{name} <{name}@shipperd.invalid>"),
            "ed25519",
            "sign",
            "never",
        ],
    )?;
    let after = String::from_utf8(run(home, "gpg", &["--list-keys", "--with-colons"])?)?;
    let before = String::from_utf8(before)?;
    after
        .lines()
        .filter(|l| l.starts_with("fpr:"))
        .map(|l| l.split(':').nth(9).unwrap_or_default().to_string())
        .find(|f| !before.contains(f.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no new key"))
}

#[test]
fn simple_signatures_made_by_skopeo_are_read_as_skopeo_reads_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let trusted = new_key(&home, "site")?;
    let stranger = new_key(&home, "stranger")?;
    let manifest = dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    )?;
    let digest = Digest::of(&std::fs::read(&manifest)?);
    let sign = |fp: &str, identity: &str, out: &str| -> anyhow::Result<Vec<u8>> {
        let path = dir.path().join(out);
        run(
            &home,
            "skopeo",
            &[
                "standalone-sign",
                manifest.to_str().unwrap(),
                identity,
                fp,
                "--output",
                path.to_str().unwrap(),
            ],
        )?;
        Ok(std::fs::read(path)?)
    };
    let good = sign(&trusted, "quay.io/org/app:1", "good.sig")?;
    let by_stranger = sign(&stranger, "quay.io/org/app:1", "stranger.sig")?;
    // The site's key as a binary export, the stranger's armored.
    let site_keys = Keys::from_bytes(&run(&home, "gpg", &["--export", &trusted])?)
        .map_err(anyhow::Error::msg)?;
    let stranger_keys = Keys::from_bytes(&run(&home, "gpg", &["--export", "--armor", &stranger])?)
        .map_err(anyhow::Error::msg)?;

    let img = Reference::parse("quay.io/org/app:1")?;
    let signed = simple::verify(&good, &site_keys).expect("the site's key signed it");
    assert_eq!(
        signed.key, trusted,
        "the signer's fingerprint, as gpg prints it"
    );
    assert_eq!(signed.digest, digest);
    assert_eq!(signed.identity, "quay.io/org/app:1");
    simple::fits(&signed, &img, &digest, &Identity::MatchRepoDigestOrExact).unwrap();

    // Refusals, each with its reason.
    assert_eq!(
        simple::verify(&by_stranger, &site_keys).unwrap_err(),
        Rejection::UnknownKey
    );
    assert!(simple::verify(&good, &stranger_keys).is_err());
    let other = Digest::of(b"another manifest");
    assert_eq!(
        simple::fits(&signed, &img, &other, &Identity::MatchRepoDigestOrExact).unwrap_err(),
        Rejection::OtherDigest(digest.clone())
    );
    let elsewhere = Reference::parse("quay.io/org/app:2")?;
    assert_eq!(
        simple::fits(
            &signed,
            &elsewhere,
            &digest,
            &Identity::MatchRepoDigestOrExact
        )
        .unwrap_err()
        .to_string(),
        "identity mismatch: signed for quay.io/org/app:1"
    );
    simple::fits(&signed, &elsewhere, &digest, &Identity::MatchRepository).unwrap();
    let mut damaged = good.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    assert!(simple::verify(&damaged, &site_keys).is_err());
    assert!(matches!(
        simple::verify(b"not a signature", &site_keys),
        Err(Rejection::Malformed(_))
    ));

    // skopeo agrees on both.
    let verify = |sig: &str, fp: &str| {
        run(
            &home,
            "skopeo",
            &[
                "standalone-verify",
                manifest.to_str().unwrap(),
                "quay.io/org/app:1",
                fp,
                dir.path().join(sig).to_str().unwrap(),
            ],
        )
    };
    assert!(verify("good.sig", &trusted).is_ok());
    assert!(verify("stranger.sig", &trusted).is_err());
    let _ = run(&home, "gpgconf", &["--kill", "gpg-agent"]);
    Ok(())
}
