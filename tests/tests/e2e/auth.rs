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
    // The inventory says what the site holds: only for a known token.
    for token in [None, Some("wrong")] {
        let mut req = http.get(format!("{}/v1/inventory", app.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await?.status(), 401, "{token:?}");
    }
    let inv = http
        .get(format!("{}/v1/inventory?target=..%2Fx", app.base))
        .bearer_auth("first-token")
        .send()
        .await?;
    assert_eq!(inv.status(), 400, "a target name is checked");
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

/// A start-up cleans only what this replica left: another replica's upload stays, and a
/// drop-directory file a crash left half taken (the user's only copy) is put back and
/// taken again, not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_up_cleans_only_its_own_leftovers_and_loses_no_dropped_file() -> anyhow::Result<()>
{
    let me = shipperd_store::instance();
    let layout = sample("taken", "taken", 0);
    let bundle = tar_bytes(&layout.oci_files(""))?;
    let app = spawn_app(Options {
        drop_dir: true,
        files: vec![
            (
                "tmp/another-replica/upload.part".into(),
                b"half an upload".to_vec(),
            ),
            (format!("tmp/{me}/cut.part"), b"a cut upload".to_vec()),
            (
                format!("tmp/{me}/0b7f6a1e-taken--taken.tar.taken"),
                bundle.clone(),
            ),
        ],
        ..Default::default()
    })
    .await?;
    let data = app.data.path();
    assert!(data.join("tmp/another-replica/upload.part").exists());
    assert!(!data.join(format!("tmp/{me}/cut.part")).exists());
    let id = shipperd_tests::fixtures::sha256(&bundle)[7..].to_string();
    let rec = shipperd_tests::eventually(
        "the dropped bundle, taken again",
        Duration::from_secs(60),
        || async {
            let rec = app.bundle(&id).await.ok()??;
            (rec["phase"] == "Published").then_some(rec)
        },
    )
    .await?;
    assert_eq!(rec["name"], "taken.tar");
    app.assert_published(&layout, "").await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_users_need_the_right_to_create_bundles() -> anyhow::Result<()> {
    let (api, seen) = shipperd_tests::kube_auth::start().await?;
    let app = spawn_app(Options {
        kube_auth: Some((api, "mirror".into())),
        ..Default::default()
    })
    .await?;
    let body = tar_bytes(&sample("kube-auth", "kube-auth", 0).oci_files(""))?;
    let url = format!("{}/v1/bundles/kube.tar", app.base);
    let http = reqwest::Client::new();
    let put = |token: Option<&'static str>| {
        let mut req = http.put(&url).body(body.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };

    for token in [None, Some("stolen-token")] {
        let r = put(token).await?;
        assert_eq!(r.status(), 401, "{token:?}");
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="shipperd""#
        );
    }
    // Bob is known but may not create bundles: 403, naming him and the namespace.
    let r = put(Some("bob-token")).await?;
    assert_eq!(r.status(), 403);
    let error = r.text().await?;
    assert!(
        error.contains("bob") && error.contains("create") && error.contains("mirror"),
        "{error}"
    );
    assert_eq!(app.temp_files(), 0);
    assert_eq!(app.stored_bundles(), 0);

    // Alice may: her upload is taken, and she can read it back.
    let r = put(Some("alice-token")).await?;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let as_alice = |req: reqwest::RequestBuilder| req.bearer_auth("alice-token").send();
    let list = as_alice(http.get(format!("{}/v1/bundles", app.base))).await?;
    assert_eq!(list.status(), 200);
    // She may not delete (no such right here).
    let id = list.json::<serde_json::Value>().await?["bundles"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let del = as_alice(http.delete(format!("{}/v1/bundles/{id}", app.base))).await?;
    assert_eq!(del.status(), 403);

    {
        let seen = seen.lock().unwrap();
        let create = seen
            .access_reviews
            .iter()
            .find(|s| s["user"] == "alice" && s["resourceAttributes"]["verb"] == "create")
            .expect("alice's create was reviewed");
        assert_eq!(create["uid"], "uid-alice");
        assert_eq!(create["groups"][0], "system:authenticated");
        assert_eq!(create["resourceAttributes"]["namespace"], "mirror");
        assert_eq!(create["resourceAttributes"]["group"], "shipperd.io");
        assert_eq!(create["resourceAttributes"]["resource"], "bundles");
    }
    // Answers are cached for a while: the same request again asks nothing new.
    let before = seen.lock().unwrap().token_reviews;
    let again = as_alice(http.get(format!("{}/v1/bundles", app.base))).await?;
    assert_eq!(again.status(), 200);
    assert_eq!(seen.lock().unwrap().token_reviews, before);
    // Health stays open.
    assert_eq!(
        http.get(format!("{}/healthz", app.base))
            .send()
            .await?
            .status(),
        200
    );
    app.stop().await
}

/// Behind a proxy (an OpenShift router: every request's peer is the router), one
/// client's bad tokens lock out that client only: the router is trusted, and its
/// `X-Forwarded-For` says who each request is from. A valid Kubernetes identity the API
/// approved a moment ago gets in even from the locked-out address. The gRPC watches one
/// identity holds are capped, others' still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_proxy_bad_tokens_lock_out_no_valid_identity() -> anyhow::Result<()> {
    let (api, seen) = shipperd_tests::kube_auth::start().await?;
    let app = spawn_app(Options {
        kube_auth: Some((api, "mirror".into())),
        auth_tokens: Some("carol-token,carol\n".into()),
        trusted_proxies: vec!["127.0.0.1/32".into()],
        ..Default::default()
    })
    .await?;
    let http = reqwest::Client::new();
    let list = |token: &str, from: Option<&str>| {
        let mut r = http
            .get(format!("{}/v1/bundles", app.base))
            .bearer_auth(token);
        if let Some(f) = from {
            r = r.header("x-forwarded-for", f);
        }
        r.send()
    };
    // alice, from her address: approved (and the approval remembered).
    assert_eq!(
        list("alice-token", Some("198.51.100.7")).await?.status(),
        200
    );
    // 100 bad tokens from another client behind the same router: it is locked out...
    let mut refused = 0;
    for i in 0..100 {
        let st = list(&format!("made-up-{i}"), Some("203.0.113.9"))
            .await?
            .status();
        assert!(st == 401 || st == 429, "{st}");
        refused += usize::from(st == 429);
    }
    assert!(refused >= 100 - shipperd_listener::MAX_FAILURES as usize);
    // ...and the API server was asked at most that many times.
    assert!(seen.lock().unwrap().token_reviews <= 1 + shipperd_listener::MAX_FAILURES as usize);
    // alice is not, from her address or, approved a moment ago, from the locked one.
    assert_eq!(
        list("alice-token", Some("198.51.100.7")).await?.status(),
        200
    );
    assert_eq!(
        list("alice-token", Some("203.0.113.9")).await?.status(),
        200
    );
    // What the client writes before the router's entry does not free it.
    assert_eq!(
        list("made-up-x", Some("198.51.100.7, 203.0.113.9"))
            .await?
            .status(),
        429
    );

    // Watches: one identity holds at most its share; another still gets one.
    let channel = tonic::transport::Endpoint::from_shared(app.base.clone())?
        .connect()
        .await?;
    let watch = |token: &'static str| {
        let mut client = shipperd_proto::v1::bundles_client::BundlesClient::new(channel.clone());
        async move {
            let mut req = tonic::Request::new(shipperd_proto::v1::WatchRequest::default());
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            client.watch(req).await
        }
    };
    let mut held = Vec::new();
    for _ in 0..shipperd_ingest::MAX_WATCHES_PER_CALLER {
        held.push(watch("carol-token").await?);
    }
    let over = watch("carol-token").await.expect_err("over carol's share");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over}");
    assert!(over.message().contains("carol"), "{over}");
    assert!(watch("alice-token").await.is_ok(), "alice still watches");
    // A watch closed frees its slot.
    held.pop();
    assert!(
        shipperd_tests::eventually("a slot freed", Duration::from_secs(10), || async {
            watch("carol-token").await.ok().map(|_| ())
        })
        .await
        .is_ok()
    );
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_kubernetes_api_nobody_gets_in() -> anyhow::Result<()> {
    // An API server address where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let app = spawn_app(Options {
        kube_auth: Some((format!("http://{dead}"), "mirror".into())),
        ..Default::default()
    })
    .await?;
    let r = reqwest::Client::new()
        .put(format!("{}/v1/bundles/x.tar", app.base))
        .bearer_auth("alice-token")
        .body(b"bytes".to_vec())
        .send()
        .await?;
    assert_eq!(r.status(), 503);
    assert!(r.text().await?.contains("Kubernetes API"));
    assert_eq!(app.stored_bundles(), 0);
    app.stop().await
}

/// An API open on loopback (no token asked) answers only this machine's names: a web
/// page whose name a DNS rebinding points at 127.0.0.1 is refused, before any upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_on_loopback_refuses_other_host_names() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let http = reqwest::Client::new();
    let body = tar_bytes(&sample("rebind", "rebind", 0).oci_files(""))?;
    let r = http
        .put(format!("{}/v1/bundles/rebind.tar", app.base))
        .header("host", "evil.example")
        .body(body)
        .send()
        .await?;
    assert_eq!(r.status(), 421);
    assert!(r.text().await?.contains("loopback"));
    assert_eq!(app.stored_bundles(), 0);
    let port = app.base.rsplit(':').next().unwrap();
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let r = http
            .get(format!("{}/v1/bundles", app.base))
            .header("host", &host)
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{host}");
    }
    app.stop().await
}
