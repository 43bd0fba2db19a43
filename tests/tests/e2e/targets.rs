//! Registry targets from a targets file: token auth with credentials from a
//! `.dockerconfigjson`, a custom CA over TLS, several targets chosen per bundle, and
//! path mapping for registries that cap path depth.

use std::time::Duration;

use futures::StreamExt as _;

use base64::Engine as _;
use shipperd_tests::{
    app::{Options, spawn_app, spawn_app_with},
    fixtures::{LayoutBuilder, sample, tar_bytes},
    pki,
    servers::{Registry, RegistryOptions},
    token::TokenServer,
};

const DONE: Duration = Duration::from_secs(90);

fn repos(b: &LayoutBuilder) -> Vec<&str> {
    let mut r: Vec<&str> = b.images.iter().map(|i| i.repo.as_str()).collect();
    r.sort();
    r.dedup();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_auth_with_credentials_from_a_dockerconfigjson() -> anyhow::Result<()> {
    shipperd_tests::init();
    let tokens = TokenServer::start("mirror", "s3cret", pki::token_signing_cert()?).await?;
    let mut registry = Registry::start_with(RegistryOptions {
        token: Some(tokens.registry_auth()),
        ..Default::default()
    })
    .await?;
    let b = sample("tok", "tok", 0);
    registry.check_auth = Some(format!("Bearer {}", tokens.token_for(&repos(&b))));
    let auth = base64::engine::general_purpose::STANDARD.encode("mirror:s3cret");
    let dockercfg = format!(
        r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
        registry.host()
    );
    let opts = Options {
        files: vec![
            ("dockercfg.json".into(), dockercfg.into_bytes()),
            ("wrong-password".into(), b"nope\n".to_vec()),
        ],
        targets_toml: Some(
            r#"
            default = "good"
            [[target]]
            name = "good"
            url = "{registry}"
            auth.docker_config = "dockercfg.json"
            [[target]]
            name = "bad"
            url = "{registry}"
            auth = { username = "mirror", password_file = "wrong-password" }
            transfer = { retries = 1 }
            "#
            .into(),
        ),
        ..Default::default()
    };
    let app = spawn_app_with(opts, registry).await?;
    let nats = async_nats::connect(app.nats.url()).await?;
    let mut published = nats.subscribe("shipperd.events.image.published").await?;

    let (st, r) = app
        .put("tok.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    let (issued, refused) = tokens.counts();
    assert!(issued >= repos(&b).len() as u64, "{issued} tokens issued");
    assert_eq!(refused, 0);
    // The layer the sample's repositories share went up once and was mounted into the
    // others: that takes a token for two repositories (push here, pull there).
    let (mut mounted, mut pushed) = (0, 0);
    for _ in 0..rec["images"].as_array().map_or(0, Vec::len) {
        let msg = tokio::time::timeout(Duration::from_secs(10), published.next())
            .await?
            .expect("subscription open");
        let ev: shipperd_proto::v1::ImagePublished = prost::Message::decode(msg.payload)?;
        mounted += ev.blobs_mounted;
        pushed += ev.blobs_pushed;
    }
    assert!(mounted >= 1, "{mounted} blobs mounted, {pushed} pushed");

    // The same registry with a wrong password: refused by the token service. Retrying
    // cannot fix that, so every image fails at its first attempt (one refused login
    // each), the bundle's error says why, and nothing of it is tagged.
    let other = sample("tok2", "tok2", 0);
    let (st, r) = app
        .put_with("tok2.tar", tar_bytes(&other.oci_files(""))?, "target=bad")
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let n = other.images.len();
    let errors: Vec<&str> = rec["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["error"].as_str())
        .collect();
    assert_eq!(errors.len(), n, "{rec:#}");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("refused (401)") && e.contains("bad credentials")),
        "the registry's own answer: {errors:?}"
    );
    let why = rec["error"].as_str().unwrap_or_default();
    assert_eq!(
        why,
        format!(
            "{n} of {n} images failed: login to {} refused (401) ({n} images)",
            app.registry.host()
        )
    );
    assert_eq!(rec["counts"]["failed"], n as u64);
    for img in rec["images"].as_array().unwrap() {
        assert_eq!(img["attempts"], 1, "failed at its first attempt: {img}");
    }
    // At most one refused login per blob an image was pushing when it was refused
    // (retrying would have made several per blob).
    let pairs: usize = other.images.iter().map(|i| i.blobs.len()).sum();
    let refused = tokens.counts().1;
    assert!(
        (n as u64..=pairs as u64).contains(&refused),
        "{refused} refused logins for {n} images, {pairs} image blobs"
    );
    assert!(app.tags("tok2").await.unwrap_or_default().is_empty());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_custom_ca_is_trusted_over_tls_and_nothing_else_is() -> anyhow::Result<()> {
    shipperd_tests::init();
    let cert = pki::loopback_server_cert()?;
    let registry = Registry::start_with(RegistryOptions {
        tls: Some(cert.clone()),
        ..Default::default()
    })
    .await?;
    assert!(registry.url().starts_with("https://"));
    let opts = Options {
        files: vec![("ca.pem".into(), cert.ca_pem.clone().into_bytes())],
        targets_toml: Some(
            r#"
            [[target]]
            name = "tls"
            url = "{registry}"
            ca_file = "ca.pem"
            [[target]]
            name = "untrusted"
            url = "{registry}"
            transfer = { retries = 1 }
            "#
            .into(),
        ),
        ..Default::default()
    };
    let app = spawn_app_with(opts, registry).await?;
    let b = sample("tls", "tls", 2);
    let (st, r) = app
        .put("tls.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;

    // Without the CA the registry's certificate is not trusted: the bundle fails.
    let other = sample("tls2", "tls2", 0);
    let (st, r) = app
        .put_with(
            "tls2.tar",
            tar_bytes(&other.oci_files(""))?,
            "target=untrusted",
        )
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let err = rec["images"][0]["error"].as_str().unwrap_or_default();
    println!("untrusted: {err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // An unknown target fails the bundle with the names of those there are.
    let (st, r) = app
        .put_with(
            "tls3.tar",
            tar_bytes(&sample("tls3", "tls3", 0).oci_files(""))?,
            "target=nope",
        )
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed");
    let err = rec["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("no target named \"nope\"") && err.contains("tls, untrusted"),
        "{err}"
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_mapping_flattens_deep_names_and_refuses_collisions() -> anyhow::Result<()> {
    shipperd_tests::init();
    let registry = Registry::start().await?;
    let opts = Options {
        targets_toml: Some(
            r#"
            [[target]]
            name = "openshift"
            url = "{registry}"
            [target.mapping]
            keep_host = true
            prefix = "mirror"
            max_depth = 2
            rename = [{ from = "demo/tool", to = "ops/tool" }]
            "#
            .into(),
        ),
        ..Default::default()
    };
    let app = spawn_app_with(opts, registry).await?;
    let b = sample("depth", "depth", 0);
    let (st, r) = app
        .put("depth.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    // Written out by hand: source → where OpenShift's namespace/name allows it.
    let expected = [
        ("demo/app", "mirror/example.com-demo-app"),
        ("demo/multi", "mirror/example.com-demo-multi"),
        ("demo/tool", "mirror/example.com-ops-tool"),
        ("depth", "mirror/depth"),
    ];
    for img in &b.images {
        let (_, landed) = expected
            .iter()
            .find(|(src, _)| *src == img.repo)
            .unwrap_or_else(|| panic!("no expectation for {}", img.repo));
        let (top, _) = app
            .manifest(landed, &img.tag)
            .await?
            .unwrap_or_else(|| panic!("{landed}:{} missing", img.tag));
        assert_eq!(
            shipperd_tests::fixtures::sha256(&top),
            img.digest,
            "{landed}"
        );
        for blob in &img.blobs {
            assert!(
                app.blob(landed, blob).await?.is_some(),
                "{landed} lacks {blob}"
            );
        }
    }
    let mut catalog = app.catalog().await?;
    catalog.sort();
    let mut want: Vec<&str> = expected.iter().map(|(_, l)| *l).collect();
    want.sort();
    assert_eq!(catalog, want);

    // a/b-c and a/b/c flatten to the same name: the bundle is refused, nothing pushed.
    let mut c = LayoutBuilder::new();
    for (repo, salt) in [("a/b-c", "one"), ("a/b/c", "two")] {
        let layer = c.layer(
            &[("f", salt.as_bytes().to_vec())],
            flate2::Compression::fast(),
        );
        c.image(
            serde_json::json!({ "org.opencontainers.image.ref.name":
                format!("example.com/{repo}:1") }),
            &[layer],
            repo,
            "1",
        );
    }
    let (st, r) = app
        .put("clash.tar", tar_bytes(&c.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let err = rec["error"].as_str().unwrap_or_default();
    println!("clash: {err}");
    assert!(
        err.contains("would both land at") && err.contains("mirror/example.com-a-b-c"),
        "{err}"
    );
    assert_eq!(app.catalog().await?.len(), want.len());
    app.stop().await
}

/// Tags of `repo` in the registry at `url`.
async fn tags_at(url: &str, repo: &str) -> anyhow::Result<Vec<String>> {
    let resp = reqwest::get(format!("{url}/v2/{repo}/tags/list")).await?;
    if resp.status() == 404 {
        return Ok(vec![]);
    }
    let v: serde_json::Value = resp.error_for_status()?.json().await?;
    Ok(v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect())
}

/// The targets file changes while the services run (by hand, or by the operator from a
/// RegistryTarget): the next bundle goes where it says now; a file that no longer
/// parses changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_targets_file_applies_without_a_restart() -> anyhow::Result<()> {
    shipperd_tests::init();
    let first = Registry::start().await?;
    let second = Registry::start().await?;
    let app = spawn_app_with(
        Options {
            targets_toml: Some("[[target]]\nname = \"default\"\nurl = \"{registry}\"\n".into()),
            follow_targets: true,
            ..Default::default()
        },
        first,
    )
    .await?;
    let file = app.data.path().join("targets.toml");
    let put = |salt: &'static str| {
        let app = &app;
        async move {
            let b = sample(salt, salt, 0);
            let (st, r) = app
                .put(&format!("{salt}.tar"), tar_bytes(&b.oci_files(""))?, None)
                .await?;
            anyhow::ensure!(st == 202, "{r}");
            let rec = app
                .wait_done(r["id"].as_str().unwrap(), Duration::from_secs(60))
                .await?;
            anyhow::ensure!(rec["phase"] == "Published", "{rec:#}");
            Ok::<_, anyhow::Error>(b)
        }
    };
    let a = put("before").await?;
    app.assert_published(&a, "").await?;

    std::fs::write(
        &file,
        format!(
            "[[target]]\nname = \"default\"\nurl = \"{}\"\nmapping.prefix = \"moved\"\n",
            second.url()
        ),
    )?;
    // The services look at the file every 2 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = put("after").await?;
    assert_eq!(tags_at(&second.url(), "moved/after").await?, ["v3"]);
    assert!(
        app.tags("after").await?.is_empty(),
        "went to the old registry"
    );
    assert!(app.tags("moved/after").await?.is_empty());
    let _ = b;

    std::fs::write(&file, "this is [not toml")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    put("broken").await?;
    assert_eq!(tags_at(&second.url(), "moved/broken").await?, ["v3"]);
    app.stop().await
}

/// A cluster target whose conditions leave the upload namespace out (the operator
/// renders it `uploads = false`) takes no upload: the bundle fails saying so, and
/// nothing reaches the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_closed_to_uploads_takes_none() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        targets_toml: Some(
            "default = \"open\"\n[[target]]\nname = \"open\"\nurl = \"{registry}\"\n\n\
             [[target]]\nname = \"team-a-only\"\nurl = \"{registry}\"\nuploads = false\n"
                .into(),
        ),
        ..Default::default()
    })
    .await?;
    let b = sample("closed", "closed", 0);
    let (st, r) = app
        .put_with(
            "closed.tar",
            tar_bytes(&b.oci_files(""))?,
            "target=team-a-only",
        )
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap_or_default()
            .contains("does not serve uploads"),
        "{rec:#}"
    );
    assert!(app.catalog().await?.is_empty());
    app.stop().await
}
