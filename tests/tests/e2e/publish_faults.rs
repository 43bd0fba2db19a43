//! Publishing through a fault-injecting proxy in front of the real docker-registry: a
//! large blob whose upload stalls while the registry restarts goes on from the offset
//! the registry reports; 429 with Retry-After is waited out; bursts of 5xx are retried;
//! a stalled request is abandoned and sent again; and a bundle whose images are all
//! there already costs one request per image (Day-2).

use std::time::Duration;

use futures::StreamExt as _;
use shipperd_tests::{
    app::{Options, TestApp, spawn_app_with},
    fixtures::{LayoutBuilder, TarCompression, compress, sample, tar_bytes},
    proxy::{Fault, Proxy},
    servers::Registry,
};

const DONE: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

/// A target through the proxy: 4 MiB chunks above 4 MiB, a 1 s stall timeout, quick
/// retries, upload leases taken over after 1 s.
fn targets(proxy: &Proxy) -> String {
    format!(
        r#"
        [[target]]
        name = "proxied"
        url = "{}"
        [target.transfer]
        chunk_threshold = {}
        chunk_size = {}
        stall_timeout = 1
        retries = 8
        retry_base = 0.05
        retry_max = 0.5
        lease_timeout = 1
        "#,
        proxy.url(),
        4 * MIB,
        4 * MIB
    )
}

async fn app_behind_proxy() -> anyhow::Result<(TestApp, Proxy)> {
    app_behind_proxy_with(Options::default()).await
}

async fn app_behind_proxy_with(opts: Options) -> anyhow::Result<(TestApp, Proxy)> {
    shipperd_tests::init();
    let registry = Registry::start().await?;
    let proxy = Proxy::start(&registry.url()).await?;
    let opts = Options {
        targets_toml: Some(targets(&proxy)),
        progress_interval: Some(Duration::from_millis(100)),
        ..opts
    };
    Ok((spawn_app_with(opts, registry).await?, proxy))
}

async fn publish(
    app: &TestApp,
    name: &str,
    b: &LayoutBuilder,
) -> anyhow::Result<serde_json::Value> {
    let body = tar_bytes(&b.oci_files(""))?;
    let (st, r) = app.put(name, body, None).await?;
    anyhow::ensure!(st == 202, "{st}: {r}");
    app.wait_done(r["id"].as_str().unwrap(), DONE).await
}

fn is_patch(m: &str, _: &str) -> bool {
    m == "PATCH"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_blob_resumes_from_the_registry_offset_after_a_stall_and_a_registry_restart()
-> anyhow::Result<()> {
    let (mut app, proxy) = app_behind_proxy().await?;
    let nats = async_nats::connect(app.nats.url()).await?;
    let mut progress = nats.subscribe("shipperd.events.image.progress").await?;
    // 24 MiB: six chunks. The third PATCH hangs before the registry sees a byte of it.
    let b = sample("resume", "resume", 24);
    let big = b
        .blobs
        .iter()
        .map(|(d, bytes)| (d.clone(), bytes.len() as u64))
        .max_by_key(|(_, s)| *s)
        .unwrap();
    assert!(big.1 > 20 * MIB);
    let mut patches = 0;
    proxy.rule(move |m, p| {
        if is_patch(m, p) {
            patches += 1;
            if patches == 3 {
                return Fault::HangBefore;
            }
        }
        Fault::Pass
    });
    let body = tar_bytes(&b.oci_files(""))?;
    let (st, r) = app.put("resume.tar", body, None).await?;
    assert_eq!(st, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    // While the third chunk hangs, the registry restarts (its sessions survive: it has
    // an http.secret).
    shipperd_tests::eventually("the hanging chunk", Duration::from_secs(30), || async {
        proxy
            .log()
            .iter()
            .any(|s| s.fault == Fault::HangBefore)
            .then_some(())
    })
    .await?;
    // Only once every other image is in: a registry killed while it writes a manifest
    // can keep a torn copy of it (docker-registry 2.8 writes in place), which is not
    // what this test is about.
    let others = b.images.len() as u64 - 1;
    shipperd_tests::eventually("the other images", Duration::from_secs(30), || async {
        let rec = app.bundle(&id).await.ok()??;
        (rec["counts"]["published"].as_u64() >= Some(others)).then_some(())
    })
    .await?;
    app.registry.restart().await?;
    let rec = app.wait_done(&id, DONE).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;

    let log = proxy.log();
    let hang = log
        .iter()
        .position(|s| s.fault == Fault::HangBefore)
        .unwrap();
    let patched: u64 = log
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| s.forwarded)
        .sum();
    let after: u64 = log[hang..]
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| s.forwarded)
        .sum();
    println!(
        "blob {} bytes; PATCH bytes to the registry: {patched} in all, {after} after the stall",
        big.1
    );
    // Nothing was sent twice, and after the stall only what the registry lacked.
    assert_eq!(
        patched, big.1,
        "every byte of the large blob went up exactly once"
    );
    assert_eq!(
        after,
        big.1 - 8 * MIB,
        "resumed at the registry's offset (8 MiB)"
    );
    assert!(
        log[hang..]
            .iter()
            .any(|s| s.method == "GET" && s.path.contains("/blobs/uploads/")),
        "the registry was asked where the upload got to"
    );
    // Progress was reported while it moved, and the status says all of it is done.
    let mut partial = false;
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(200), progress.next()).await
    {
        let ev: shipperd_proto::v1::ImageProgress = prost::Message::decode(msg.payload)?;
        partial |= ev.bytes_done > 0 && ev.bytes_done < ev.bytes_total;
        assert!(ev.bundle_bytes_total >= ev.bytes_total);
    }
    assert!(partial, "a progress event showed the push part-way");
    assert_eq!(rec["bytes_done"], rec["bytes_total"], "{rec:#}");
    assert!(rec["bytes_total"].as_u64().unwrap() > big.1);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_and_error_bursts_are_waited_out() -> anyhow::Result<()> {
    let (app, proxy) = app_behind_proxy().await?;
    // The first three blob checks get 429 with Retry-After: 1; then every other request
    // of the next twenty gets 503, 502 or 500.
    let (mut n, mut heads) = (0, 0);
    proxy.rule(move |m, p| {
        n += 1;
        if m == "HEAD" && p.contains("/blobs/") {
            heads += 1;
            if heads <= 3 {
                return Fault::Status(429, Some(1));
            }
        }
        if (4..24).contains(&n) && n % 2 == 0 {
            return Fault::Status([503, 502, 500][n % 3], None);
        }
        Fault::Pass
    });
    let b = sample("limits", "limits", 0);
    let rec = publish(&app, "limits.tar", &b).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    let log = proxy.log();
    let limited: Vec<_> = log
        .iter()
        .filter(|s| matches!(s.fault, Fault::Status(429, _)))
        .collect();
    assert_eq!(limited.len(), 3);
    for s in &limited {
        // The same request again came no sooner than Retry-After said.
        let again = log
            .iter()
            .find(|o| o.path == s.path && o.at > s.at && o.fault == Fault::Pass)
            .expect("the limited request was sent again");
        let waited = again.at - s.at;
        assert!(
            waited >= Duration::from_millis(950),
            "waited only {waited:?}"
        );
    }
    let errors = log
        .iter()
        .filter(|s| matches!(s.fault, Fault::Status(c, _) if c >= 500))
        .count();
    assert!(errors >= 8, "{errors} server errors injected");
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_requests_are_abandoned_and_sent_again() -> anyhow::Result<()> {
    let (app, proxy) = app_behind_proxy().await?;
    // The first blob upload and the first manifest put hang; the second of each, and a
    // whole-blob PUT, answer only after their bytes are in (the answer is lost).
    let (mut puts, mut manifests) = (0, 0);
    proxy.rule(move |m, p| {
        if m == "PUT" && p.contains("/blobs/uploads/") {
            puts += 1;
            return match puts {
                1 => Fault::HangBefore,
                2 => Fault::HangAfter,
                _ => Fault::Pass,
            };
        }
        if m == "PUT" && p.contains("/manifests/") {
            manifests += 1;
            if manifests == 1 {
                return Fault::HangBefore;
            }
        }
        Fault::Pass
    });
    let b = sample("stall", "stall", 0);
    let t = std::time::Instant::now();
    let rec = publish(&app, "stall.tar", &b).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    let hung = proxy
        .log()
        .iter()
        .filter(|s| matches!(s.fault, Fault::HangBefore | Fault::HangAfter))
        .count();
    assert_eq!(hung, 3);
    // Each stall cost about the 1 s stall timeout, not the proxy's 60 s hang.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn day_two_skips_images_already_there_with_one_request_each() -> anyhow::Result<()> {
    let (app, proxy) = app_behind_proxy().await?;
    let b = sample("day2", "day2", 6);
    // Both bundles are named day2, so images they name by tag only land in one place.
    let first = publish(&app, "day2.tar", &b).await?;
    assert_eq!(first["phase"], "Published", "{first:#}");
    let images = first["images"].as_array().unwrap();
    assert!(images.iter().all(|i| i["skipped"].is_null()), "{first:#}");

    // The same images in another container (zstd tar): another bundle, nothing new.
    proxy.clear_log();
    let body = compress(tar_bytes(&b.oci_files(""))?, TarCompression::Zstd)?;
    let (st, r) = app.put("day2.tar.zst", body, None).await?;
    assert_eq!(st, 202, "{r}");
    let second = app.wait_done(r["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(second["phase"], "Published", "{second:#}");
    let images = second["images"].as_array().unwrap();
    assert!(images.iter().all(|i| i["skipped"] == true), "{second:#}");
    let log = proxy.log();
    let mut methods: Vec<_> = log
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    methods.sort();
    assert_eq!(
        log.len(),
        images.len(),
        "one request per image: {methods:#?}"
    );
    assert!(
        log.iter()
            .all(|s| s.method == "HEAD" && s.path.contains("/manifests/"))
    );
    assert_eq!(second["bytes_done"], second["bytes_total"]);
    app.assert_published(&b, "").await?;
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_replicas_upload_a_shared_layer_once() -> anyhow::Result<()> {
    // Two publish services, one image at a time each: images needing the same layer
    // are worked on by both at once.
    let (app, proxy) = app_behind_proxy_with(Options {
        publish_concurrency: Some(1),
        extra_publishers: 1,
        ..Default::default()
    })
    .await?;
    let mut b = LayoutBuilder::new();
    let mut data = vec![0u8; 3 << 20];
    rand::Rng::fill(&mut rand::rng(), data.as_mut_slice());
    let shared = b.layer(&[("base.bin", data)], flate2::Compression::none());
    for i in 0..4 {
        let own = b.layer(
            &[("own.txt", format!("image {i}").into_bytes())],
            flate2::Compression::fast(),
        );
        let repo = format!("replicas/app{i}");
        b.image(
            serde_json::json!({ "io.containerd.image.name": format!("example.com/{repo}:1.0") }),
            &[shared.clone(), own],
            &repo,
            "1.0",
        );
    }
    let hex = shared.digest["sha256:".len()..].to_string();
    // The first upload of the shared layer is slow (under the 1 s stall timeout): the
    // other replica needs the layer meanwhile.
    let mut slowed = false;
    let digest = hex.clone();
    proxy.rule(move |m, p| {
        if m == "PUT" && p.contains(&digest) && !slowed {
            slowed = true;
            return Fault::Delay(Duration::from_millis(800));
        }
        Fault::Pass
    });
    let rec = publish(&app, "replicas.tar", &b).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    let uploads: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| matches!(s.method.as_str(), "PUT" | "PATCH") && s.forwarded > 0)
        .filter(|s| s.path.contains(&hex))
        .collect();
    assert_eq!(
        uploads.len(),
        1,
        "the shared layer went up {} times",
        uploads.len()
    );
    let mounts = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "POST" && s.path.contains("mount=") && s.path.contains(&hex))
        .count();
    assert!(mounts >= 3, "{mounts} mounts of the shared layer");

    // A replica died holding the lease on a layer: after `lease_timeout` (1 s) without
    // renewal the lease is taken over and the layer goes up, once. (Leases are for
    // layers above 256 KiB; smaller blobs go up without one.)
    proxy.rule(|_, _| Fault::Pass);
    proxy.clear_log();
    let mut b = LayoutBuilder::new();
    let mut left = vec![0u8; 512 << 10];
    rand::Rng::fill(&mut rand::rng(), left.as_mut_slice());
    let orphan = b.layer(&[("orphan.bin", left)], flate2::Compression::none());
    b.image(
        serde_json::json!({ "io.containerd.image.name": "example.com/replicas/orphan:1.0" }),
        std::slice::from_ref(&orphan),
        "replicas/orphan",
        "1.0",
    );
    let nats = async_nats::connect(app.nats.url()).await?;
    let kv = async_nats::jetstream::new(nats)
        .get_key_value("shipperd-blobs")
        .await?;
    let host = proxy.url().trim_start_matches("http://").to_string();
    kv.put(
        shipperd_registry::lease_key(&host, &shipperd_model::Digest::parse(&orphan.digest)?),
        "dead-replica".into(),
    )
    .await?;
    let t0 = std::time::Instant::now();
    let rec = publish(&app, "orphan.tar", &b).await?;
    assert_eq!(rec["phase"], "Published", "{rec:#}");
    app.assert_published(&b, "").await?;
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    let hex = &orphan.digest["sha256:".len()..];
    let uploads = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.forwarded > 0 && s.path.contains(hex))
        .count();
    assert_eq!(uploads, 1);
    app.stop().await
}
