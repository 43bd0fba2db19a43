//! Tags have owners. Two uploaders who do not trust each other share one registry: a
//! Kubernetes user (alice, through the API server's TokenReview) and a token-file user
//! (carol). A tag one of them set cannot be moved by the other, nor by a bundle naming
//! another registry host for the same repository (even alice's own); a tag set outside
//! ShipperD stays; the refused bundle tags nothing at all. The admin's target that
//! allows a take-over moves it, and the event says whose it was.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;
use shipperd_tests::{
    app::{Options, TestApp, skopeo, spawn_app},
    fixtures::{LayoutBuilder, named_images, sha256, tar_bytes},
};

const DONE: Duration = Duration::from_secs(60);

/// Uploads `b` as `token`'s bundle (to `target`, if given) and waits for its end.
async fn upload(
    app: &TestApp,
    token: &str,
    name: &str,
    b: &LayoutBuilder,
    target: Option<&str>,
) -> anyhow::Result<Value> {
    let mut url = format!("{}/v1/bundles/{name}", app.base);
    if let Some(t) = target {
        url.push_str(&format!("?target={t}"));
    }
    let r = app
        .http
        .put(url)
        .bearer_auth(token)
        .body(tar_bytes(&b.oci_files(""))?)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 202, "{}: {}", r.status(), r.text().await?);
    let id = r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    shipperd_tests::bundle_ended(&app.http, &app.base, &id, Some(token), DONE).await
}

/// The digest `repo:tag` points at in the test registry.
async fn tagged(app: &TestApp, repo: &str, tag: &str) -> anyhow::Result<Option<String>> {
    Ok(app.manifest(repo, tag).await?.map(|(m, _)| sha256(&m)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_owner_cannot_move_a_tag_and_the_admin_can() -> anyhow::Result<()> {
    let (api, _) = shipperd_tests::kube_auth::start().await?;
    let app = spawn_app(Options {
        kube_auth: Some((api, "mirror".into())),
        auth_tokens: Some("carol-token,carol\n".into()),
        targets_toml: Some(
            r#"
            default = "shared"
            [[target]]
            name = "shared"
            url = "{registry}"
            [[target]]
            name = "override"
            url = "{registry}"
            tags = { take_over = true, overwrite_unowned = true }
            "#
            .into(),
        ),
        ..Options::default()
    })
    .await?;
    let nats = async_nats::connect(app.nats.url()).await?;
    let mut published = nats.subscribe("shipperd.events.image.published").await?;

    // alice (a Kubernetes user) publishes quay.io/org/app:1.
    let alices = named_images("alice", &[("quay.io/org/app:1", "org/app", "1")]);
    let rec = upload(&app, "alice-token", "alice.tar", &alices, None).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    let first = alices.images[0].digest.clone();
    assert_eq!(tagged(&app, "org/app", "1").await?, Some(first.clone()));

    // carol (a token-file user) brings other bytes for the same tag, with an image of
    // her own: the tag is alice's, so the bundle fails and tags nothing.
    let carols = named_images(
        "carol",
        &[
            ("quay.io/carol/tool:1", "carol/tool", "1"),
            ("quay.io/org/app:1", "org/app", "1"),
        ],
    );
    let rec = upload(&app, "carol-token", "carol.tar", &carols, None).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tag org/app:1 belongs to user alice (from quay.io/org/app)"),
        "{error}"
    );
    assert_eq!(tagged(&app, "org/app", "1").await?, Some(first.clone()));
    assert_eq!(
        tagged(&app, "carol/tool", "1").await?,
        None,
        "a refused bundle tagged its other image"
    );

    // The same repository name from another registry host is another source: refused,
    // even to alice herself.
    for (token, who) in [("carol-token", "carol"), ("alice-token", "alice")] {
        let evil = named_images(who, &[("evil.example/org/app:1", "org/app", "1")]);
        let rec = upload(&app, token, &format!("evil-{who}.tar"), &evil, None).await?;
        assert_eq!(rec["phase"], "Failed", "{who}: {rec:#}");
        let error = rec["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("belongs to user alice (from quay.io/org/app)"),
            "{who}: {error}"
        );
    }
    assert_eq!(tagged(&app, "org/app", "1").await?, Some(first.clone()));

    // A tag set outside ShipperD stays.
    let outside = named_images("outside", &[("foreign", "org/foreign", "1")]);
    let dir = tempfile::tempdir()?;
    outside.write_dir(dir.path())?;
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:foreign", dir.path().display()),
        &format!("docker://{}/org/foreign:1", app.registry.host()),
    ])?;
    let foreign = tagged(&app, "org/foreign", "1").await?;
    assert!(foreign.is_some());
    let theirs = named_images("carol2", &[("quay.io/org/foreign:1", "org/foreign", "1")]);
    let rec = upload(&app, "carol-token", "foreign.tar", &theirs, None).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tag org/foreign:1 is in") && error.contains("not moved"),
        "{error}"
    );
    assert_eq!(tagged(&app, "org/foreign", "1").await?, foreign);

    // alice moves her own tag forward: it is hers, from the same source.
    let newer = named_images("alice-2", &[("quay.io/org/app:1", "org/app", "1")]);
    let rec = upload(&app, "alice-token", "alice-2.tar", &newer, None).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    let second = newer.images[0].digest.clone();
    assert_eq!(tagged(&app, "org/app", "1").await?, Some(second.clone()));

    // The admin's target takes tags over: carol's bundle moves alice's tag, and the
    // event names whose it was.
    let taken = named_images("carol-3", &[("quay.io/org/app:1", "org/app", "1")]);
    let rec = upload(&app, "carol-token", "take.tar", &taken, Some("override")).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    assert_eq!(
        tagged(&app, "org/app", "1").await?,
        Some(taken.images[0].digest.clone())
    );
    let from = tokio::time::timeout(DONE, async {
        while let Some(msg) = published.next().await {
            let ev: shipperd_proto::v1::ImagePublished = prost::Message::decode(msg.payload)?;
            if !ev.tag_taken_from.is_empty() {
                return anyhow::Ok(ev.tag_taken_from);
            }
        }
        anyhow::bail!("the subscription ended")
    })
    .await??;
    assert_eq!(from, "user alice (from quay.io/org/app)");
    // And from then on the tag is carol's: alice's bundle through the shared target is
    // refused.
    let back = named_images("alice-3", &[("quay.io/org/app:1", "org/app", "1")]);
    let rec = upload(&app, "alice-token", "alice-3.tar", &back, None).await?;
    assert_eq!(rec["phase"], "Failed", "{rec:#}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap_or_default()
            .contains("belongs to user carol (from quay.io/org/app)"),
        "{rec:#}"
    );
    app.stop().await
}
