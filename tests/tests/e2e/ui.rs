//! The upload page in a real browser (headless Chromium driven by chromedriver): the
//! token asked for, a bundle chosen and uploaded in parts (a part the server refuses is
//! sent again, alone), the bundle seen reaching Published with its images, a broken
//! bundle's reason shown plainly, and a screenshot of it all in
//! `target/ui-screenshot.png`.

use std::time::Duration;

use serde_json::json;
use shipperd_tests::{
    app::{Options, spawn_app},
    browser::Browser,
    eventually,
    fixtures::{Compression, sample, tar_bytes},
    proxy::{Fault, Proxy},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upload_page_uploads_in_parts_and_shows_bundles_end() -> anyhow::Result<()> {
    let app = spawn_app(Options {
        auth_tokens: Some("ui-token\n".into()),
        ..Default::default()
    })
    .await?;
    // Part 2 is refused once: the page sends it again, and only it.
    let proxy = Proxy::start(&app.base).await?;
    let mut refused = false;
    proxy.rule(move |method, path| {
        if method == "PUT" && path.contains("/parts/2?") && !refused {
            refused = true;
            return Fault::Status(503, None);
        }
        Fault::Pass
    });

    // The page itself: open, with a policy that allows only its own files.
    let page = reqwest::get(format!("{}/", app.base)).await?;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    let dir = tempfile::tempdir()?;
    let good = dir.path().join("ui.tar");
    let layout = sample("ui", "ui", 2);
    let bytes = tar_bytes(&layout.oci_files(""))?;
    assert!(bytes.len() > 2 << 20, "three parts of 1 MiB");
    std::fs::write(&good, &bytes)?;
    let broken = dir.path().join("broken.tar");
    std::fs::write(&broken, b"this is no bundle".repeat(200))?;
    let squash = dir.path().join("ui.squashfs");
    sample("ui-sq", "uisq", 0).write_squashfs(&squash, Compression::Gzip)?;

    let browser = Browser::start(1280, 1000).await?;
    let result = steps(
        &app,
        &proxy,
        &browser,
        &good,
        &broken,
        &squash,
        layout.images.len(),
    )
    .await;
    if result.is_err() {
        // What the page said, to tell why.
        for css in [
            "#upload-error",
            "#transfer-state",
            "#transfer-detail",
            "#list-error",
            "#bundle-rows",
            "#b-action",
        ] {
            eprintln!("{css}: {:?}", browser.text(css).await);
        }
    }
    browser.quit().await;
    result
}

async fn steps(
    app: &shipperd_tests::app::TestApp,
    proxy: &Proxy,
    browser: &Browser,
    good: &std::path::Path,
    broken: &std::path::Path,
    squash: &std::path::Path,
    images: usize,
) -> anyhow::Result<()> {
    browser
        .goto(&format!("{}/?part={}", proxy.url(), 1 << 20))
        .await?;
    // Without the token the list says what is missing.
    let missing = eventually(
        "the list to ask for the token",
        Duration::from_secs(20),
        || async {
            let t = browser.text("#list-error").await.ok()?;
            t.contains("token").then_some(t)
        },
    )
    .await?;
    assert!(missing.contains("bearer token"), "{missing}");
    browser.type_into("#token", "ui-token").await?;
    browser.click("#drop").await?; // the field loses focus: its value is taken

    // A tar in parts.
    browser.type_into("#file", good.to_str().unwrap()).await?;
    let published = r#"#bundle-rows tr[data-phase="Published"]"#;
    eventually(
        "the bundle Published in the list",
        Duration::from_secs(90),
        || async { (browser.text(published).await.ok()?.contains("ui.tar")).then_some(()) },
    )
    .await?;
    let parts: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/parts/"))
        .map(|s| s.path)
        .collect();
    let sent = |n: u32| {
        parts
            .iter()
            .filter(|p| p.contains(&format!("/parts/{n}?")))
            .count()
    };
    assert_eq!((sent(1), sent(2), sent(3)), (1, 2, 1), "{parts:#?}");
    assert!(
        parts.iter().all(|p| p.contains("sha256=")),
        "the browser hashed every part: {parts:#?}"
    );
    assert!(
        browser
            .text("#transfer-state")
            .await?
            .contains("received as")
    );

    // Its images, in the bundle's box (it was selected when received).
    let rows = eventually("the bundle's images", Duration::from_secs(20), || async {
        let v = browser
            .eval(
                "return Array.from(document.querySelectorAll('#image-rows tr'), r => [r.dataset.phase, r.cells[3].textContent]);",
                json!([]),
            )
            .await
            .ok()?;
        let rows = v.as_array()?.clone();
        (rows.len() == images).then_some(rows)
    })
    .await?;
    for r in &rows {
        assert_eq!(r[0], "Published", "{rows:?}");
        assert!(
            r[1].as_str().unwrap_or_default().starts_with("sha256:"),
            "{rows:?}"
        );
    }
    assert_eq!(browser.text("#b-phase").await?, "Published");

    // A squashfs image goes in one request.
    browser.type_into("#file", squash.to_str().unwrap()).await?;
    eventually("the squashfs Published", Duration::from_secs(60), || async {
        let rows = browser
            .eval(
                "return Array.from(document.querySelectorAll('#bundle-rows tr'), r => r.dataset.phase + ' ' + r.cells[0].textContent);",
                json!([]),
            )
            .await
            .ok()?;
        rows.as_array()?
            .iter()
            .any(|r| r == "Published ui.squashfs")
            .then_some(())
    })
    .await?;
    assert!(
        proxy
            .log()
            .iter()
            .any(|s| s.method == "PUT" && s.path.starts_with("/v1/bundles/ui.squashfs")),
        "one PUT for the squashfs"
    );

    // A broken bundle: Failed, and the reason, as the API gives it, in its box.
    browser.type_into("#file", broken.to_str().unwrap()).await?;
    let failed = r#"#bundle-rows tr[data-phase="Failed"]"#;
    eventually(
        "the broken bundle Failed",
        Duration::from_secs(60),
        || async {
            browser
                .text(failed)
                .await
                .ok()?
                .contains("broken.tar")
                .then_some(())
        },
    )
    .await?;
    browser.click(failed).await?;
    let shown = eventually("its reason", Duration::from_secs(20), || async {
        let t = browser.text("#b-error").await.ok()?;
        (browser.text("#b-phase").await.ok()? == "Failed" && !t.is_empty()).then_some(t)
    })
    .await?;
    let id = browser
        .eval(
            "return document.querySelector('#b-id').textContent;",
            json!([]),
        )
        .await?;
    let api = app
        .http
        .get(format!("{}/v1/bundles/{}", app.base, id.as_str().unwrap()))
        .bearer_auth("ui-token")
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    assert_eq!(
        shown,
        api["error"].as_str().unwrap(),
        "the API's reason, as it is"
    );
    assert!(
        browser.text(failed).await?.contains(&shown),
        "and in the list"
    );

    let png = browser.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshot.png");
    std::fs::write(&out, &png)?;

    // Retry, from its button: accepted (and it fails again, for the same reason).
    browser.click("#b-retry").await?;
    eventually("the retry accepted", Duration::from_secs(20), || async {
        browser
            .text("#b-action")
            .await
            .ok()?
            .contains("retry accepted")
            .then_some(())
    })
    .await?;
    // Delete asks once more, then deletes.
    browser.click("#b-delete").await?;
    assert!(browser.text("#b-delete").await?.contains("Really delete?"));
    eventually(
        "the broken bundle gone",
        Duration::from_secs(30),
        || async {
            if browser.text("#b-delete").await.ok()?.contains("Really") {
                browser.click("#b-delete").await.ok()?;
            }
            (!browser
                .text("#bundle-rows")
                .await
                .ok()?
                .contains("broken.tar"))
            .then_some(())
        },
    )
    .await?;
    Ok(())
}
