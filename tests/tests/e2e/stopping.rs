//! Every daemon stops within seconds of SIGTERM whatever its NATS is doing: each
//! `shipperd` subcommand that runs until a signal is started on a real NATS, the NATS
//! is stopped, and the process is sent SIGTERM; it must exit within 10 s. The operator
//! runs against a fake API server, holding its leader Lease: it hands the Lease back on
//! the way out.

use std::{process::Stdio, time::Duration};

use shipperd_tests::servers::{Nats, free_port};

/// Starts `shipperd <args>`, waits `settle`, stops `nats`, sends SIGTERM: how long the
/// process took to exit, and its log.
async fn stop_without_nats(
    args: &[String],
    env: &[(&str, String)],
    mut nats: Nats,
    ready: impl Fn(&str) -> bool,
) -> anyhow::Result<(Duration, String)> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.path().join("err"))?)
        .kill_on_drop(true)
        .spawn()?;
    let read = || {
        std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
    };
    shipperd_tests::eventually(
        &format!("{args:?} is running"),
        Duration::from_secs(20),
        || async { ready(&read()).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}", read()))?;
    nats.0.kill();
    // Long enough for the clients to notice the connection is gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.id().expect("running");
    let started = std::time::Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("a pid"),
        rustix::process::Signal::TERM,
    )?;
    let ended = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let took = started.elapsed();
    if ended.is_err() {
        let _ = child.kill().await;
    }
    Ok((took, read()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_daemon_stops_soon_after_sigterm_with_nats_gone() -> anyhow::Result<()> {
    shipperd_tests::init();
    let data = tempfile::tempdir()?;
    let common = |nats: &Nats, dir: &std::path::Path| {
        vec![
            "--nats-url".to_string(),
            nats.url(),
            "--data-dir".into(),
            dir.display().to_string(),
        ]
    };
    let registry = "http://127.0.0.1:1".to_string();
    // The five daemons side by side (each with its own NATS and data directory): most of
    // each run is waiting.
    let daemons = ["ingest", "unpack", "publish", "notify", "all"].map(|daemon| {
        let (data, registry, common) = (data.path().join(daemon), registry.clone(), &common);
        async move {
            std::fs::create_dir(&data)?;
            let nats = Nats::start().await?;
            let mut args = vec![daemon.to_string()];
            args.extend(common(&nats, &data));
            if matches!(daemon, "ingest" | "all") {
                args.extend(["--listen".into(), format!("127.0.0.1:{}", free_port())]);
            }
            if matches!(daemon, "unpack" | "publish" | "all") {
                args.extend(["--registry".into(), registry]);
            }
            let started = |log: &str| match daemon {
                "ingest" => log.contains("ingest listening"),
                "notify" => log.contains("notify running"),
                "unpack" | "publish" => log.contains("stage running"),
                _ => log.contains("ingest listening") && log.contains("notify running"),
            };
            anyhow::Ok((daemon, stop_without_nats(&args, &[], nats, started).await?))
        }
    });
    // The operator's two runs, one after the other (they share the API server), beside
    // the daemons.
    let operator = async {
        // The operator, leading: its Lease is held when NATS goes.
        let own = data.path().join("operator");
        std::fs::create_dir(&own)?;
        let kube = tempfile::tempdir()?;
        let (_, api, kubeconfig) = shipperd_tests::kube_api::start(kube.path()).await?;
        let nats = Nats::start().await?;
        let mut args = vec!["operator".to_string()];
        args.extend(common(&nats, &own));
        args.extend([
            "--lease-namespace".into(),
            "shipperd".into(),
            "--identity".into(),
            "replica-1".into(),
        ]);
        let env = [("KUBECONFIG", kubeconfig.display().to_string())];
        let lease = "shipperd/shipperd-operator";
        let held =
            |_: &str| api.lock().unwrap().lease_holder(lease).as_deref() == Some("replica-1");
        let leading = (
            "operator",
            stop_without_nats(&args, &env, nats, held).await?,
        );
        // A single replica, without leader election, reconciling a Bundle of an upload.
        api.lock().unwrap().bundles.push(serde_json::json!({
            "apiVersion": "shipperd.io/v1alpha1", "kind": "Bundle",
            "metadata": {"name": "b", "namespace": "shipperd", "uid": "u-1", "generation": 1,
                         "resourceVersion": "1", "finalizers": ["shipperd.io/cleanup"]},
            "spec": {"source": {"upload": {"name": "b.tar", "bundleId": "a".repeat(64)}}},
        }));
        let nats = Nats::start().await?;
        let mut args = vec!["operator".to_string()];
        args.extend(common(&nats, &own));
        args.extend(["--leader-election".into(), "false".into()]);
        let reconciling = |log: &str| log.contains("reconciling Bundles");
        let single = (
            "operator, one replica",
            stop_without_nats(&args, &env, nats, reconciling).await?,
        );
        assert_eq!(
            api.lock().unwrap().lease_holder(lease),
            None,
            "the operator kept its Lease: {:?}",
            api.lock().unwrap().leases
        );
        anyhow::Ok([leading, single])
    };
    let (mut runs, operator) = tokio::try_join!(futures::future::try_join_all(daemons), operator)?;
    runs.extend(operator);
    for (daemon, (took, log)) in &runs {
        assert!(
            *took < Duration::from_secs(10),
            "{daemon} took {took:?} to stop after SIGTERM with NATS gone:\n{log}"
        );
    }
    Ok(())
}
