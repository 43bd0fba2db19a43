//! The registry client's pull side against docker-registry: manifests by tag and by
//! digest, a blob resumed from a partial file (and a wrong partial file refused), tags
//! across pages, and referrers (from the API, or the fallback tag where there is none).

use shipperd_bundle::{Descriptor, Digest};
use shipperd_registry::Registry;
use shipperd_tests::servers;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn put_blob(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    bytes: &[u8],
) -> anyhow::Result<Descriptor> {
    let digest = Digest::of(bytes);
    shipperd_tests::fixtures::put_blob(http, base, repo, bytes).await?;
    Ok(Descriptor::new(
        "application/octet-stream",
        digest,
        bytes.len() as u64,
    ))
}

async fn put_manifest(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", MANIFEST)
        .body(body.to_vec())
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == 201,
        "PUT manifest {}: {}",
        r.status(),
        r.text().await?
    );
    Ok(())
}

fn manifest(config: &Descriptor, layer: &Descriptor, subject: Option<&Descriptor>) -> Vec<u8> {
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.digest, "size": layer.size}],
    });
    if let Some(s) = subject {
        m["subject"] =
            serde_json::json!({"mediaType": MANIFEST, "digest": s.digest, "size": s.size});
        m["artifactType"] = "application/spdx+json".into();
    }
    serde_json::to_vec(&m).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_what_a_registry_holds() -> anyhow::Result<()> {
    shipperd_tests::init();
    let registry = servers::Registry::start().await?;
    let base = registry.url();
    let http = reqwest::Client::new();
    let repo = "pull/app";
    let config = put_blob(
        &http,
        &base,
        repo,
        b"{\"architecture\":\"amd64\",\"os\":\"linux\"}",
    )
    .await?;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let layer = put_blob(&http, &base, repo, &big).await?;
    let m = manifest(&config, &layer, None);
    let mdigest = Digest::of(&m);
    for t in ["1", "2", "3", "4", "5", "6", "7"] {
        put_manifest(&http, &base, repo, t, &m).await?;
    }
    let targets = shipperd_registry_targets::Targets::single(&base, "", None, None, false)?;
    let reg = Registry::reader(targets.default_target().unwrap().clone())?;

    // Manifests by tag and by digest: the exact bytes, their digest and media type.
    let by_tag = reg.manifest(repo, "3").await?.expect("tag 3");
    assert_eq!(by_tag.bytes.as_ref(), m.as_slice());
    assert_eq!(by_tag.digest, mdigest);
    assert_eq!(by_tag.media_type, MANIFEST);
    let by_digest = reg
        .manifest(repo, mdigest.as_str())
        .await?
        .expect("by digest");
    assert_eq!(by_digest.digest, mdigest);
    assert!(reg.manifest(repo, "nope").await?.is_none());
    assert!(reg.manifest("pull/none", "1").await?.is_none());

    // A blob, resumed from the first third already on disk.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("layer");
    std::fs::write(&path, &big[..1_000_000])?;
    reg.blob_to_file(repo, &layer, &path).await?;
    assert_eq!(std::fs::read(&path)?, big);
    // Whole, from nothing.
    let fresh = dir.path().join("fresh");
    reg.blob_to_file(repo, &layer, &fresh).await?;
    assert_eq!(std::fs::read(&fresh)?, big);
    // A partial file that is not the blob's start: the whole is refused and removed.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, vec![0u8; 10])?;
    let err = reg.blob_to_file(repo, &layer, &wrong).await.unwrap_err();
    assert!(err.to_string().contains("hashing to"), "{err}");
    assert!(!wrong.exists());

    // Tags, three a page: all seven, once each.
    let mut tags = reg.tags_paged(repo, 3).await?;
    tags.sort();
    assert_eq!(tags, ["1", "2", "3", "4", "5", "6", "7"]);
    assert!(reg.tags("pull/none").await?.is_empty());

    // A referrer of the image: found through the API, or through the fallback tag
    // (docker-registry 2.8 has no API: the tag is set as publish sets it).
    let sbom = put_blob(&http, &base, repo, b"{\"spdx\":1}").await?;
    let subject = Descriptor::new(MANIFEST, mdigest.clone(), m.len() as u64);
    let r = manifest(&config, &sbom, Some(&subject));
    let rdigest = Digest::of(&r);
    put_manifest(&http, &base, repo, rdigest.as_str(), &r).await?;
    let mut rdesc = Descriptor::new(MANIFEST, rdigest.clone(), r.len() as u64);
    rdesc.artifact_type = Some("application/spdx+json".into());
    reg.update_referrers_tag(repo, &mdigest, std::slice::from_ref(&rdesc))
        .await?;
    let found = reg.referrers(repo, &mdigest, None).await?;
    assert_eq!(
        found.iter().map(|d| &d.digest).collect::<Vec<_>>(),
        [&rdigest]
    );
    let spdx = reg
        .referrers(repo, &mdigest, Some("application/spdx+json"))
        .await?;
    assert_eq!(spdx.len(), 1);
    assert!(
        reg.referrers(repo, &mdigest, Some("application/other"))
            .await?
            .is_empty()
    );
    assert!(reg.referrers(repo, &rdigest, None).await?.is_empty());
    Ok(())
}
