//! Bearer tokens on the API: a missing or wrong token is refused with 401 and
//! `WWW-Authenticate` before anything is stored; the right one works; health stays open;
//! the token file is read again when it changes.

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    fixtures::{sample, tar_bytes},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_wants_a_known_bearer_token() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        auth_tokens: Some("# ops\nfirst-token\nsecond-token\n".into()),
        ..Default::default()
    })
    .await?;
    let body = tar_bytes(&sample("auth", "auth", 0).oci_files(""))?;
    let url = format!("{}/v1/bundles/auth.tar", app.base);
    let http = reqwest::Client::new();
    for token in [None, Some("wrong"), Some("first-token-but-longer")] {
        let mut req = http.put(&url).body(body.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        assert_eq!(resp.status(), 401, "{token:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            r#"Bearer realm="shipperd""#
        );
    }
    // Nothing of the refused uploads was kept.
    assert_eq!(app.temp_files(), 0);
    assert_eq!(app.stored_bundles(), 0);
    assert_eq!(
        http.get(format!("{}/v1/bundles", app.base))
            .send()
            .await?
            .status(),
        401
    );
    assert_eq!(
        http.get(format!("{}/healthz", app.base))
            .send()
            .await?
            .status(),
        200
    );
    let resp = http
        .put(&url)
        .bearer_auth("second-token")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 202);

    // The file changes: the old tokens go, the new one works.
    std::fs::write(app.data.path().join("tokens"), "rotated-token\n")?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let list = |t: &'static str| {
        http.get(format!("{}/v1/bundles", app.base))
            .bearer_auth(t)
            .send()
    };
    assert_eq!(list("second-token").await?.status(), 401);
    assert_eq!(list("rotated-token").await?.status(), 200);
    app.stop().await
}
