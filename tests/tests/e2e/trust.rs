//! Trust at the site: the site's signature policy (`shipperd all --policy`, a
//! `containers-policy.json`) decides, before anything of a bundle is published, with the
//! signatures the bundle carries. Signatures are made independently of ShipperD's code:
//! simple signatures by `skopeo standalone-sign` with keys Debian's `gpg` makes, in the
//! lookaside layout (`sigstore/<repo>@sha256=<hex>/signature-1`); cosign signatures by
//! Python's `cryptography` (ECDSA P-256 over the payload, as cosign signs), in a
//! `sha256-<hex>.sig` image. A bundle whose images the policy accepts is published with
//! what accepted each; each kind of refusal fails its bundle with its reason, and
//! nothing of that bundle (not even its acceptable images) is tagged.

use std::{path::Path, process::Command, time::Duration};

use serde_json::{Value, json};
use shipperd_tests::{
    app::{Options, TestApp, spawn_app_with},
    fixtures::{LayoutBuilder, named_images, tar_bytes},
    proxy::{Fault, Proxy},
    servers::Registry,
};

use super::signatures::{new_key, run};

const DONE: Duration = Duration::from_secs(60);

/// A cosign key made by Python's `cryptography`: writes its public key to `public`
/// and signs each payload file `p` into `p.sig` (base64 of the DER signature); an
/// in-toto statement (`p.statement`) into a Sigstore bundle (a DSSE envelope) instead.
const COSIGN_SIGNER: &str = r#"
import sys, base64, json
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes, serialization
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
b64 = lambda b: base64.b64encode(b).decode()
for p in sys.argv[2:]:
    data = open(p, "rb").read()
    if p.endswith(".statement"):
        # A Sigstore bundle: a DSSE envelope over the in-toto statement.
        t = "application/vnd.in-toto+json"
        pae = b"DSSEv1 %d %s %d %s" % (len(t), t.encode(), len(data), data)
        sig = key.sign(pae, ec.ECDSA(hashes.SHA256()))
        open(p + ".sig", "w").write(json.dumps({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": ""}},
            "dsseEnvelope": {"payload": b64(data), "payloadType": t,
                             "signatures": [{"sig": b64(sig), "keyid": ""}]}}))
    else:
        open(p + ".sig", "w").write(b64(key.sign(data, ec.ECDSA(hashes.SHA256()))))
"#;

fn cosign_payload(digest: &str, identity: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"critical": {
        "identity": {"docker-reference": identity},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature"}, "optional": null}))
    .unwrap()
}

/// Signs each payload with a new cosign key (its public key at `public`); the
/// signatures, base64.
pub(crate) fn cosign_sign(
    dir: &Path,
    public: &Path,
    payloads: &[Vec<u8>],
) -> anyhow::Result<Vec<String>> {
    let files: Vec<String> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let statement = p.starts_with(b"{\"_type\"");
            let f = dir.join(format!(
                "payload-{i}{}",
                if statement { ".statement" } else { "" }
            ));
            std::fs::write(&f, p).map(|_| f.display().to_string())
        })
        .collect::<Result<_, _>>()?;
    let out = Command::new("python3")
        .arg("-c")
        .arg(COSIGN_SIGNER)
        .arg(public)
        .args(&files)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    files
        .iter()
        .map(|f| Ok(std::fs::read_to_string(format!("{f}.sig"))?))
        .collect()
}

/// A simple signature by `fpr` of the manifest `digest` of `b`, claiming `identity`,
/// as `skopeo standalone-sign` writes it.
fn gpg_sign(
    home: &Path,
    b: &LayoutBuilder,
    digest: &str,
    identity: &str,
    fpr: &str,
) -> anyhow::Result<Vec<u8>> {
    let m = home.join(format!("manifest-{}", &digest[7..19]));
    std::fs::write(&m, &b.blobs[digest])?;
    let out = home.join(format!("sig-{}-{}", &digest[7..19], &fpr[..8]));
    run(
        home,
        "skopeo",
        &[
            "standalone-sign",
            m.to_str().unwrap(),
            identity,
            fpr,
            "--output",
            out.to_str().unwrap(),
        ],
    )?;
    Ok(std::fs::read(out)?)
}

/// The bundle's files: its layout and lookaside signatures `(repo path, digest, sig)`.
fn bundle(b: &LayoutBuilder, lookaside: &[(&str, &str, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut files = b.oci_files("");
    for (repo, digest, sig) in lookaside {
        files.push((
            format!("sigstore/{repo}@sha256={}/signature-1", &digest[7..]),
            sig.clone(),
        ));
    }
    tar_bytes(&files)
}

async fn upload(app: &TestApp, name: String, body: Vec<u8>) -> anyhow::Result<Value> {
    let (status, r) = app.put(&name, body, None).await?;
    anyhow::ensure!(status == 202, "{status}: {r}");
    app.wait_done(r["id"].as_str().unwrap_or_default(), DONE)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_what_the_site_policy_accepts_is_published() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let site = new_key(&home, "site")?;
    let stranger = new_key(&home, "stranger")?;
    let site_key = dir.path().join("site.gpg");
    std::fs::write(&site_key, run(&home, "gpg", &["--export", &site])?)?;
    let cosign_pub = dir.path().join("cosign.pub");

    // The accepted bundle: a GPG-signed image, a cosign-signed one, an open one.
    let mut good = named_images(
        "trust-good",
        &[
            ("quay.io/gpg/app:1", "gpg/app", "1"),
            ("quay.io/cosign/app:1", "cosign/app", "1"),
            ("quay.io/open/tool:1", "open/tool", "1"),
            (
                "quay.io/gpg/release:4.18.1-x86_64",
                "gpg/release",
                "4.18.1-x86_64",
            ),
            ("quay.io/gpg/tools-unsigned:1", "gpg/tools-unsigned", "1"),
            ("quay.io/cosign/bundled:1", "cosign/bundled", "1"),
        ],
    );
    let (gpg_digest, cosign_digest) =
        (good.images[0].digest.clone(), good.images[1].digest.clone());
    // Bundles each with one image the policy refuses, beside an acceptable one.
    let refused = |n: &str, bad: &str| {
        let open = format!("quay.io/open/{n}:1");
        let repo = bad
            .split_once('/')
            .unwrap()
            .1
            .split_once(':')
            .unwrap()
            .0
            .to_string();
        named_images(
            n,
            &[
                (open.as_str(), &format!("open/{n}"), "1"),
                (bad, &repo, "1"),
            ],
        )
    };
    let unsigned = refused("unsigned", "quay.io/gpg/unsigned:1");
    let stranger_b = refused("stranger", "quay.io/gpg/stranger:1");
    let mislabelled = refused("mislabelled", "quay.io/gpg/mislabelled:1");
    let mut other_digest = refused("otherdigest", "quay.io/cosign/otherdigest:1");
    let elsewhere = refused("elsewhere", "quay.io/elsewhere/app:1");

    // cosign signs the repository, without a tag: one for the good image, and one for
    // a digest that is not the refused image's.
    let sigs = cosign_sign(
        dir.path(),
        &cosign_pub,
        &[
            cosign_payload(&cosign_digest, "quay.io/cosign/app"),
            cosign_payload(&gpg_digest, "quay.io/cosign/otherdigest"),
            // cosign's new bundle format: an in-toto statement naming the image.
            serde_json::to_vec(&json!({"_type": "https://in-toto.io/Statement/v1",
                "subject": [{"name": "quay.io/cosign/bundled",
                    "digest": {"sha256": &good.images[5].digest[7..]}}],
                "predicateType": "https://sigstore.dev/cosign/sign/v1", "predicate": {}}))?,
        ],
    )?;
    // As an OCI 1.1 referrer of the image.
    let bundled = good.images[5].digest.clone();
    good.referrer(
        &bundled,
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        sigs[2].as_bytes(),
    );
    good.cosign_signature(
        &format!("quay.io/cosign/app:sha256-{}.sig", &cosign_digest[7..]),
        &cosign_payload(&cosign_digest, "quay.io/cosign/app"),
        &sigs[0],
    );
    let od = other_digest.images[1].digest.clone();
    other_digest.cosign_signature(
        &format!("quay.io/cosign/otherdigest:sha256-{}.sig", &od[7..]),
        &cosign_payload(&gpg_digest, "quay.io/cosign/otherdigest"),
        &sigs[1],
    );

    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        serde_json::to_vec(&json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                "quay.io/gpg": [{"type": "signedBy", "keyType": "GPGKeys",
                    "keyPath": site_key}],
                "quay.io/cosign": [{"type": "sigstoreSigned", "keyPath": cosign_pub,
                    "signedIdentity": {"type": "matchRepository"}}],
                "quay.io/open": [{"type": "insecureAcceptAnything"}],
                // One repository of a signed namespace let in unsigned: that one only.
                "quay.io/gpg/tools-unsigned": [{"type": "insecureAcceptAnything"}],
            }}
        }))?,
    )?;
    // A second target of the same registry narrows the site's policy with its own.
    // ShipperD reaches the registry through a proxy that can fail its requests.
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    let app = Box::pin(spawn_app_with(
        Options {
            policy: Some(policy.clone()),
            targets_toml: Some(
                r#"
            default = "site"
            [[target]]
            name = "site"
            url = "{proxy}"
            transfer = { retries = 2, retry_base = 0.02, retry_max = 0.05 }
            [[target]]
            name = "strict"
            url = "{proxy}"
            policies = ["strict.json"]
            transfer = { retries = 2, retry_base = 0.02, retry_max = 0.05 }
            "#
                .replace("{proxy}", &proxy.url()),
            ),
            files: vec![(
                "strict.json".into(),
                br#"{"default": [{"type": "reject"}]}"#.to_vec(),
            )],
            max_attempts: Some(3),
            ..Options::default()
        },
        registry,
    ))
    .await?;

    let good_sig = gpg_sign(&home, &good, &gpg_digest, "quay.io/gpg/app:1", &site)?;
    // A release, signed as Red Hat signs releases, carried where oc-mirror keeps
    // release signatures.
    let release = good.images[3].digest.clone();
    let release_sig = gpg_sign(
        &home,
        &good,
        &release,
        "quay.io/gpg/release:4.18.1-x86_64",
        &site,
    )?;
    let mut good_files = good.oci_files("");
    good_files.push((
        format!("sigstore/gpg/app@sha256={}/signature-1", &gpg_digest[7..]),
        good_sig,
    ));
    good_files.push((
        format!(
            "working-dir/signatures/4.18.1-x86_64-sha256-{}",
            &release[7..]
        ),
        release_sig,
    ));
    let good_tar = dir.path().join("good.tar");
    std::fs::write(&good_tar, tar_bytes(&good_files)?)?;

    // `shipperd verify` says, offline, what the site will say.
    let verify = |bundle: &Path| {
        Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
            .args(["verify", "--json", "--policy"])
            .arg(&policy)
            .arg(bundle)
            .output()
    };
    let out = verify(&good_tar)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["verification"]["signed"], 5, "{report:#}");
    assert_eq!(report["verification"]["unsigned"], 2, "{report:#}");

    let rec = upload(&app, "good.tar".into(), std::fs::read(&good_tar)?).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    let v = &rec["verification"];
    assert_eq!(
        v["signed"], 5,
        "four images and the cosign signature image: {v:#}"
    );
    assert_eq!(v["unsigned"], 2, "{v:#}");
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(keys.contains(&site.as_str()), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("sha256:")), "{keys:?}");
    let id = rec["id"].as_str().unwrap();
    let images: Value = app
        .http
        .get(format!("{}/v1/bundles/{id}/images", app.base))
        .send()
        .await?
        .json()
        .await?;
    let trust_of = |source: &str| {
        images["images"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["source"] == source))
            .map(|i| i["trust"].clone())
            .unwrap_or_default()
    };
    // `shipperd status` says it too.
    let out = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["status", "--server", &app.base, id])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("signed   5 images accepted by a signature, 2 without one")
            && text.contains(&site),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = trust_of("quay.io/gpg/app:1");
    assert_eq!(t["scope"], "quay.io/gpg", "{images:#}");
    assert_eq!(t["by"][0], json!({"requirement": "signedBy", "key": site}));
    assert_eq!(
        trust_of("quay.io/cosign/app:1")["by"][0]["requirement"],
        "sigstoreSigned"
    );
    assert_eq!(
        trust_of("quay.io/cosign/bundled:1")["by"][0]["requirement"],
        "sigstoreSigned",
        "accepted by its Sigstore bundle: {images:#}"
    );
    assert_eq!(
        trust_of("quay.io/open/tool:1")["by"][0],
        json!({"requirement": "insecureAcceptAnything"})
    );
    assert_eq!(
        trust_of("quay.io/gpg/release:4.18.1-x86_64")["by"][0],
        json!({"requirement": "signedBy", "key": site})
    );
    assert_eq!(
        trust_of("quay.io/gpg/tools-unsigned:1")["scope"],
        "quay.io/gpg/tools-unsigned"
    );
    for (repo, tag) in [
        ("gpg/app", "1"),
        ("cosign/app", "1"),
        ("open/tool", "1"),
        ("gpg/release", "4.18.1-x86_64"),
        ("gpg/tools-unsigned", "1"),
    ] {
        assert!(
            app.manifest(repo, tag).await?.is_some(),
            "{repo}:{tag} is tagged"
        );
    }

    // Day 2: a differential bundle names the cosign-signed image and its signature
    // image without carrying either (the site has them: their signature is only in the
    // target registry now), beside a new open image.
    let mut day2 = good.clone();
    let l = day2.layer(
        &[("etc/new", b"day two".to_vec())],
        flate2::Compression::fast(),
    );
    day2.image(
        json!({"org.opencontainers.image.ref.name": "quay.io/open/new:1"}),
        &[l],
        "open/new",
        "1",
    );
    let keep = [
        "quay.io/cosign/app:1".to_string(),
        format!("quay.io/cosign/app:sha256-{}.sig", &cosign_digest[7..]),
        "quay.io/open/new:1".to_string(),
    ];
    let files: Vec<(String, Vec<u8>)> = day2
        .oci_files("")
        .into_iter()
        .filter_map(|(path, bytes)| {
            if path == "index.json" {
                let mut index: Value = serde_json::from_slice(&bytes).ok()?;
                index["manifests"].as_array_mut()?.retain(|m| {
                    keep.iter().any(|k| {
                        m["annotations"]["org.opencontainers.image.ref.name"] == k.as_str()
                    })
                });
                return Some((path, serde_json::to_vec(&index).ok()?));
            }
            match path.strip_prefix("blobs/sha256/") {
                Some(hex) if good.blobs.contains_key(&format!("sha256:{hex}")) => None,
                _ => Some((path, bytes)),
            }
        })
        .collect();
    // While the registry fails every read of a signature image, the bundle cannot be
    // checked: it is tried again, then fails saying so, not as 'unsigned'.
    proxy.rule(|_, path| {
        if path.contains(".sig") {
            Fault::Status(500, None)
        } else {
            Fault::Pass
        }
    });
    let rec = upload(&app, "day2.tar".into(), tar_bytes(&files)?).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let why = rec["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("target registry") && !why.contains("unsigned"),
        "{rec:#}"
    );
    println!("the day-two bundle while the registry fails: {why}");
    let refused = proxy
        .log()
        .iter()
        .filter(|r| r.path.contains(".sig") && r.fault != Fault::Pass)
        .count();
    assert!(refused >= 3, "one read per attempt at least: {refused}");
    assert!(app.manifest("open/new", "1").await?.is_none(), "tagged");
    // The registry heals; the bundle is retried and passes.
    proxy.rule(|_, _| Fault::Pass);
    let id = rec["id"].as_str().unwrap();
    let (status, r) = app.post(&format!("/v1/bundles/{id}/retry")).await?;
    assert_eq!(status, 202, "{r}");
    let rec = app.wait_done(id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(rec["verification"]["signed"], 2, "{rec:#}");
    assert_eq!(rec["verification"]["unsigned"], 1, "{rec:#}");
    let day2_images: Value = app
        .http
        .get(format!("{}/v1/bundles/{id}/images", app.base))
        .send()
        .await?
        .json()
        .await?;
    let cosign_app = day2_images["images"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["source"] == "quay.io/cosign/app:1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        cosign_app["trust"]["by"][0]["requirement"], "sigstoreSigned",
        "accepted by its signature in the target registry: {day2_images:#}"
    );

    // Each refusal, with its reason; nothing of the bundle tagged.
    let by_stranger = gpg_sign(
        &home,
        &stranger_b,
        &stranger_b.images[1].digest,
        "quay.io/gpg/stranger:1",
        &stranger,
    )?;
    let for_other = gpg_sign(
        &home,
        &mislabelled,
        &mislabelled.images[1].digest,
        "quay.io/gpg/other:1",
        &site,
    )?;
    let cases = [
        (
            "unsigned",
            bundle(&unsigned, &[])?,
            "quay.io/gpg/unsigned:1: unsigned (scope quay.io/gpg)",
        ),
        (
            "stranger",
            bundle(
                &stranger_b,
                &[("gpg/stranger", &stranger_b.images[1].digest, by_stranger)],
            )?,
            "quay.io/gpg/stranger:1: signed by an unknown key",
        ),
        (
            "mislabelled",
            bundle(
                &mislabelled,
                &[("gpg/mislabelled", &mislabelled.images[1].digest, for_other)],
            )?,
            "quay.io/gpg/mislabelled:1: identity mismatch: signed for quay.io/gpg/other:1",
        ),
        (
            "otherdigest",
            bundle(&other_digest, &[])?,
            &format!("quay.io/cosign/otherdigest:1: signature for another digest ({gpg_digest})"),
        ),
        (
            "elsewhere",
            bundle(&elsewhere, &[])?,
            "quay.io/elsewhere/app:1: the policy rejects every image of scope default",
        ),
    ];
    let ended = futures::future::try_join_all(
        cases
            .iter()
            .map(|(n, body, _)| upload(&app, format!("{n}.tar"), body.clone())),
    )
    .await?;
    // The CLI refuses a bundle the site refuses, with the same reason, and exits
    // non-zero (one case: each run is a process reading a bundle).
    for (n, body, _) in &cases {
        std::fs::write(dir.path().join(format!("{n}.tar")), body)?;
    }
    let (_, _, reason) = &cases[1];
    let out = verify(&dir.path().join("stranger.tar"))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(reason), "{err}");
    // Day 0: `shipperd serve --policy` serves what the policy accepts and nothing else,
    // image by image.
    let unsigned_tar = dir.path().join("unsigned.tar");
    let stranger_tar = dir.path().join("stranger.tar");
    let served = super::serve::serve(
        &["--policy", policy.to_str().unwrap()],
        &[&good_tar, &unsigned_tar, &stranger_tar],
    )
    .await?;
    let http = reqwest::Client::new();
    let status = |path: String| {
        let http = http.clone();
        let url = format!("http://{}/v2/{path}", served.addr);
        async move {
            anyhow::Ok(
                http.get(url)
                    .header(
                        "accept",
                        "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json",
                    )
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    assert_eq!(status("gpg/app/manifests/1".into()).await?, 200);
    assert_eq!(status("cosign/app/manifests/1".into()).await?, 200);
    assert_eq!(status("open/unsigned/manifests/1".into()).await?, 200);
    assert_eq!(status("gpg/unsigned/manifests/1".into()).await?, 404);
    assert_eq!(status("gpg/stranger/manifests/1".into()).await?, 404);
    let refused = &stranger_b.images[1].digest;
    assert_eq!(
        status(format!("gpg/stranger/manifests/{refused}")).await?,
        404,
        "not by digest either"
    );
    drop(served);

    for ((n, _, reason), rec) in cases.iter().zip(ended) {
        assert_eq!(rec["phase"], "Failed", "{n}: {rec:#}");
        let error = rec["error"].as_str().unwrap_or_default();
        // The refused image, and the signature image attached to it where there is one.
        let counted = if *n == "otherdigest" {
            "2 of 3"
        } else {
            "1 of 2"
        };
        assert!(
            error.contains(&format!("the signature policy rejects {counted} images")),
            "{n}: {error}"
        );
        assert!(
            !error.contains(".sig:"),
            "attached images are counted, not listed: {error}"
        );
        assert!(error.contains(reason), "{n}: {error}");
        assert!(
            app.manifest(&format!("open/{n}"), "1").await?.is_none(),
            "{n}: its acceptable image is not tagged either"
        );
    }
    // The same accepted bundle, to the target whose own policy rejects everything:
    // the site's acceptance does not widen it.
    // (Other bytes than the published bundle's, which would be that bundle again.)
    good_files.push(("notes.txt".into(), b"for the strict target".to_vec()));
    let (status, r) = app
        .put_with("strict.tar", tar_bytes(&good_files)?, "target=strict")
        .await?;
    assert_eq!(status, 202, "{r}");
    let rec = app
        .wait_done(r["id"].as_str().unwrap_or_default(), DONE)
        .await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the policy rejects every image of scope default")
            && error.contains("policy "),
        "{error}"
    );
    let _ = run(&home, "gpgconf", &["--kill", "gpg-agent"]);
    Ok(())
}

/// The check that ShipperD reads the policy and the signatures as their owners do:
/// images are signed by `skopeo copy --sign-by` into a `file://` lookaside as a
/// connected site signs what it mirrors, carried by `shipperd create --registries.d`,
/// and checked by `shipperd verify`; skopeo, given the same `policy.json` and the same
/// lookaside, accepts exactly the images ShipperD accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_accepts_exactly_what_shipperd_accepts() -> anyhow::Result<()> {
    shipperd_tests::init();
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let site = new_key(&home, "site")?;
    let stranger = new_key(&home, "stranger")?;
    let site_key = dir.path().join("site.gpg");
    std::fs::write(&site_key, run(&home, "gpg", &["--export", &site])?)?;

    let source = shipperd_tests::servers::Registry::start().await?;
    let src = source.host();
    let layout = dir.path().join("layout");
    let images = [
        ("app", "signed/app", Some(&site)),
        ("stranger", "signed/stranger", Some(&stranger)),
        ("none", "signed/none", None),
        ("open", "open/tool", None),
        ("other", "other/thing", Some(&site)),
    ];
    let names: Vec<(&str, &str, &str)> = images.iter().map(|(n, r, _)| (*n, *r, "1")).collect();
    named_images("agree", &names).write_dir(&layout)?;
    let sigstore = dir.path().join("sigstore");
    let registries_d = dir.path().join("registries.d");
    std::fs::create_dir(&registries_d)?;
    std::fs::write(
        registries_d.join("site.yaml"),
        format!(
            "docker:\n  {src}:\n    lookaside: file://{s}\n    sigstore-staging: file://{s}\n",
            s = sigstore.display()
        ),
    )?;
    let rd = registries_d.to_str().unwrap().to_string();
    for (name, repo, signer) in &images {
        let from = format!("oci:{}:{name}", layout.display());
        let to = format!("docker://{src}/{repo}:1");
        let mut args = vec![
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--registries.d",
            &rd,
        ];
        if let Some(fpr) = signer {
            args.extend(["--sign-by", fpr.as_str()]);
        }
        args.extend([from.as_str(), to.as_str()]);
        run(&home, "skopeo", &args)?;
    }
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        serde_json::to_vec(&json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                format!("{src}/signed"): [{"type": "signedBy", "keyType": "GPGKeys",
                    "keyPath": site_key}],
                format!("{src}/open"): [{"type": "insecureAcceptAnything"}],
            }}
        }))?,
    )?;

    // skopeo's answers.
    let mut skopeo_says = std::collections::BTreeMap::new();
    for (i, (_, repo, _)) in images.iter().enumerate() {
        let out = dir.path().join(format!("pulled-{i}"));
        let ok = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false", "--policy"])
            .arg(&policy)
            .args(["--registries.d", &rd])
            .arg(format!("docker://{src}/{repo}:1"))
            .arg(format!("dir:{}", out.display()))
            .env("GNUPGHOME", &home)
            .output()?
            .status
            .success();
        skopeo_says.insert(format!("{src}/{repo}:1"), ok);
    }

    // ShipperD's: the bundle create carries, checked by verify.
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        images
            .iter()
            .map(|(_, repo, _)| format!("{src}/{repo}:1\n"))
            .collect::<String>(),
    )?;
    let bundle = dir.path().join("bundle.tar");
    let made = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .arg("create")
        .arg(&bundle)
        .arg("--images")
        .arg(&list)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["--registries.d", &rd])
        .output()?;
    anyhow::ensure!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["verify", "--json", "--policy"])
        .arg(&policy)
        .arg(&bundle)
        .output()?;
    assert!(!out.status.success(), "some images are rejected");
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let shipperd_says: std::collections::BTreeMap<String, bool> = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["source"].as_str().unwrap_or_default().to_string(),
                i["accepted"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(shipperd_says, skopeo_says, "{report:#}");
    let accepted: Vec<&str> = skopeo_says
        .iter()
        .filter(|(_, ok)| **ok)
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        accepted,
        [format!("{src}/open/tool:1"), format!("{src}/signed/app:1")],
        "{report:#}"
    );

    // `create --policy` requires it on the connected side: a bundle with a rejected
    // image is removed, saying why; one of accepted images is kept.
    let create = |list: &Path, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
            .arg("create")
            .arg(out)
            .arg("--images")
            .arg(list)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(["--registries.d", &rd, "--policy"])
            .arg(&policy)
            .output()
    };
    let refused = dir.path().join("refused.tar");
    let out = create(&list, &refused)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{src}/signed/stranger:1: signed by an unknown key"
        )),
        "{err}"
    );
    assert!(!refused.exists(), "the refused bundle is removed");
    let good_list = dir.path().join("good.txt");
    std::fs::write(
        &good_list,
        format!("{src}/signed/app:1\n{src}/open/tool:1\n"),
    )?;
    let kept = dir.path().join("kept.tar");
    let out = create(&good_list, &kept)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kept.exists());
    let _ = run(&home, "gpgconf", &["--kill", "gpg-agent"]);
    Ok(())
}
