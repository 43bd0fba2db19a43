//! NATS as a site runs it: a 3-node JetStream cluster with R3 streams and buckets that
//! loses a node mid-bundle (on Debian's nats-server 2.9.10 and on a current one), and a
//! server locked down with TLS, client certificates and users that refuses strangers and
//! admits ShipperD.

use std::{path::Path, time::Duration};

use shipperd_bus::{Bus, NatsConfig};
use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
    fixtures::{catalog, tar_bytes},
    pki::TestCa,
    servers::{Nats, NatsCluster, nats_server_builds, nats_server_version},
};

const IMAGES: usize = 100;

/// Waits until the cluster has a JetStream leader and takes R3 streams: ShipperD's
/// topology declares.
async fn until_ready(config: &NatsConfig, cluster: &NatsCluster) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = async {
            Bus::connect_with(config, "ready")
                .await?
                .ensure_topology()
                .await
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                anyhow::bail!("cluster not ready in 30 s: {e}\n{}", cluster.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `recount_allowed`: a 2.9.10 cluster loses compare-and-set writes to the bundle
/// summary in a stream-leader failover (seen here: 24 to 26 of 200 image counts, while
/// every image's own state says Published), so the bundle would wait forever; the
/// janitor recounts a bundle that has sat still for `stale_after` from its images'
/// states and moves it on. A current server loses nothing and needs no re-drive.
async fn node_lost_mid_bundle(bin: &Path, recount_allowed: bool) -> anyhow::Result<()> {
    let version = nats_server_version(bin);
    let mut cluster = NatsCluster::start(bin, 3).await?;
    let nats = NatsConfig {
        servers: cluster.urls(),
        replicas: 3,
        ..NatsConfig::new("")
    };
    until_ready(&nats, &cluster).await?;
    let app = spawn_app(Options {
        nats: Some(nats.clone()),
        publish_concurrency: Some(4),
        publish_retry: Some(Duration::from_millis(500)),
        janitor: Some(shipperd_ingest::JanitorSettings {
            every: Duration::from_millis(500),
            stale_after: Duration::from_secs(4),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;

    // Every stream and bucket ShipperD declared has three replicas.
    let bus = Bus::connect_with(&nats, "check").await?;
    for name in [
        "SHIPPERD",
        "SHIPPERD_JOBS",
        "KV_shipperd-bundles",
        "KV_shipperd-images",
        "KV_shipperd-blobs",
        "KV_shipperd-attempts",
    ] {
        let info = bus.js.get_stream(name).await?.info().await?.clone();
        assert_eq!(info.config.num_replicas, 3, "{version}: {name}");
    }

    let b = catalog(IMAGES, "cluster");
    let (st, r) = app
        .put("catalog.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();

    // Mid-bundle: some images out, most still to go.
    let published = eventually(
        "the first images to be published",
        Duration::from_secs(120),
        || async {
            let b = app.bundle(&id).await.ok()??;
            let n = b["counts"]["published"].as_u64()?;
            (n >= 10).then_some(n)
        },
    )
    .await?;
    assert!(
        published < IMAGES as u64,
        "{version}: the bundle finished before a node could be killed"
    );
    // Kill the node that leads the jobs stream: its raft group must elect another.
    let leader = bus
        .js
        .get_stream("SHIPPERD_JOBS")
        .await?
        .info()
        .await?
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .unwrap_or_default();
    let victim = cluster.index_of(&leader).unwrap_or(0);
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(victim).await?;

    let rec = match app.wait_done(&id, Duration::from_secs(240)).await {
        Ok(rec) => rec,
        Err(e) => {
            let mut why = format!(
                "{version}: {e}\n{:#}",
                app.bundle(&id).await?.unwrap_or_default()
            );
            let pending: serde_json::Value = app
                .http
                .get(format!(
                    "{}/v1/bundles/{id}/images?phase=Pending&limit=1000",
                    app.base
                ))
                .send()
                .await?
                .json()
                .await?;
            why.push_str(&format!(
                "\nimages still Pending by their own state: {}",
                pending["total"]
            ));
            let kv = bus.js.get_key_value("shipperd-images").await?;
            let (mut missing, mut phases) = (0, std::collections::BTreeMap::<String, u32>::new());
            for i in 0..IMAGES {
                match kv.get(format!("{id}.{i}")).await? {
                    None => missing += 1,
                    Some(v) => {
                        let v: serde_json::Value = serde_json::from_slice(&v)?;
                        *phases.entry(v["phase"].to_string()).or_default() += 1;
                    }
                }
            }
            why.push_str(&format!("\nimage records: {missing} missing, {phases:?}"));
            let jobs = bus
                .js
                .get_stream("SHIPPERD_JOBS")
                .await?
                .info()
                .await?
                .state
                .clone();
            why.push_str(&format!(
                "\njobs stream: {} messages, first {} last {}",
                jobs.messages, jobs.first_sequence, jobs.last_sequence
            ));
            for (stream, consumer) in [
                ("SHIPPERD_JOBS", "unpack"),
                ("SHIPPERD_JOBS", "publish"),
                ("SHIPPERD_JOBS", "commit"),
            ] {
                if let Ok(mut c) = bus
                    .js
                    .get_stream(stream)
                    .await?
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
                    .await
                {
                    let i = c.info().await?;
                    why.push_str(&format!("\n{consumer}: pending {} ack-pending {} redelivered {} delivered {} ack floor {} leader {:?}", i.num_pending, i.num_ack_pending, i.num_redelivered, i.delivered.stream_sequence, i.ack_floor.stream_sequence, i.cluster.as_ref().and_then(|c| c.leader.clone())));
                }
            }
            anyhow::bail!("{why}\n{}", cluster.logs())
        }
    };
    assert_eq!(rec["phase"], "Published", "{version}: {}", rec["error"]);
    assert_eq!(rec["counts"]["published"], IMAGES as u64, "{version}");
    assert_eq!(rec["counts"]["failed"], 0, "{version}");
    let redrives = rec["redrives"].as_u64().unwrap_or(0);
    if !recount_allowed {
        assert_eq!(redrives, 0, "{version}: a current server loses no job");
    }
    // Identical digests: every tag, manifest and blob as the bundle holds them.
    app.assert_published(&b, "").await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_survives_losing_a_node_of_a_nats_2_9_cluster() -> anyhow::Result<()> {
    node_lost_mid_bundle(&nats_server_builds()?[0], true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_survives_losing_a_node_of_a_current_nats_cluster() -> anyhow::Result<()> {
    node_lost_mid_bundle(&nats_server_builds()?[1], false).await
}

/// A server that wants TLS with a client certificate, and one of two users.
const LOCKED: &str = r#"
host: 127.0.0.1
port: {port}
jetstream { store_dir: "{dir}/js" }
tls {
  cert_file: "{dir}/server.pem"
  key_file: "{dir}/server-key.pem"
  ca_file: "{dir}/ca.pem"
  verify: true
  timeout: 3
}
authorization {
  users = [
    { user: shipperd, password: "{password}" }
    { nkey: {nkey} }
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locked_down_nats_refuses_strangers_and_admits_shipperd() -> anyhow::Result<()> {
    shipperd_tests::init();
    let bin = &nats_server_builds()?[1];
    let ca = TestCa::new("nats test CA")?;
    let server = ca.server()?;
    let client = ca.client("shipperd")?;
    let password = "correct-horse-battery-staple";
    let nkey = nkeys::KeyPair::new_user();
    let files = tempfile::tempdir()?;
    let f = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
        let p = files.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let config = LOCKED
        .replace("{password}", password)
        .replace("{nkey}", &nkey.public_key());
    let nats = Nats::start_config(
        bin,
        &config,
        &[
            ("server.pem", &server.cert_pem),
            ("server-key.pem", &server.key_pem),
            ("ca.pem", &ca.pem),
        ],
    )
    .await?;
    let tls = NatsConfig {
        tls_ca_file: Some(f("ca.pem", &ca.pem)?),
        tls_cert_file: Some(f("client.pem", &client.cert_pem)?),
        tls_key_file: Some(f("client-key.pem", &client.key_pem)?),
        ..NatsConfig::new(nats.url())
    };

    // Strangers: no TLS; TLS but no client certificate; a certificate but no user; a
    // wrong password (whose error does not show it).
    let refused = |c: NatsConfig| async move {
        match Bus::connect_with(&c, "stranger").await {
            Ok(_) => None,
            Err(e) => Some(format!("{e:#}")),
        }
    };
    assert!(
        refused(NatsConfig::new(nats.url())).await.is_some(),
        "plain"
    );
    let no_cert = NatsConfig {
        tls_cert_file: None,
        tls_key_file: None,
        ..tls.clone()
    };
    assert!(
        refused(no_cert).await.is_some(),
        "TLS without a certificate"
    );
    assert!(refused(tls.clone()).await.is_some(), "no user");
    let wrong = NatsConfig {
        user: Some("shipperd".into()),
        password_file: Some(f("wrong", "not-the-password\n")?),
        ..tls.clone()
    };
    let e = refused(wrong).await.expect("a wrong password is refused");
    assert!(!e.contains("not-the-password"), "{e}");

    // The NKey user connects and may declare the topology.
    let by_nkey = NatsConfig {
        nkey_file: Some(f("seed", &nkey.seed()?)?),
        ..tls.clone()
    };
    Bus::connect_with(&by_nkey, "nkey")
        .await?
        .ensure_topology()
        .await?;

    // ShipperD, as the password user, takes a bundle through to the registry.
    let shipperd = NatsConfig {
        user: Some("shipperd".into()),
        password_file: Some(f("password", &format!("{password}\n"))?),
        ..tls
    };
    let app = spawn_app(Options {
        nats: Some(shipperd),
        ..Default::default()
    })
    .await?;
    let b = catalog(5, "locked");
    let (st, r) = app
        .put("locked.tar", tar_bytes(&b.oci_files(""))?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app
        .wait_done(r["id"].as_str().unwrap(), Duration::from_secs(60))
        .await?;
    assert_eq!(rec["phase"], "Published", "{}", rec["error"]);
    app.assert_published(&b, "").await?;
    app.stop().await?;

    // A token server: the token file admits, nothing else does.
    let token = Nats::start_config(
        bin,
        "host: 127.0.0.1\nport: {port}\nauthorization { token: \"s3cret-token\" }\n",
        &[],
    )
    .await?;
    assert!(refused(NatsConfig::new(token.url())).await.is_some());
    let by_token = NatsConfig {
        token_file: Some(f("token", "s3cret-token\n")?),
        ..NatsConfig::new(token.url())
    };
    Bus::connect_with(&by_token, "token").await?;
    Ok(())
}
