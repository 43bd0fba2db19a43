//! `--log-format json` (`SHIPPERD_LOG_FORMAT`): every log line is one JSON object a
//! collector can parse, with level, message, fields and target; the text format stays
//! the default.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use shipperd_tests::servers::Nats;

/// Starts `shipperd ingest` with `env`, returns its stderr lines up to "ingest listening".
fn ingest_lines(nats: &Nats, env: &[(&str, &str)]) -> anyhow::Result<Vec<String>> {
    let data = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["ingest", "--listen", "127.0.0.1:0", "--nats-url"])
        .arg(nats.url())
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let done = line.contains("ingest listening");
            lines.push(line);
            if done {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(
        lines.iter().any(|l| l.contains("ingest listening")),
        "ingest did not start: {lines:#?}"
    );
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() -> anyhow::Result<()> {
    let nats = Nats::start().await?;
    let lines = ingest_lines(&nats, &[("SHIPPERD_LOG_FORMAT", "json")])?;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
        // Dependencies speak at warn and above only, by default.
        let target = v["target"].as_str().unwrap_or_default();
        if !target.starts_with("shipperd") {
            assert!(
                matches!(v["level"].as_str(), Some("WARN" | "ERROR")),
                "{line}"
            );
        }
    }
    let listening: serde_json::Value = serde_json::from_str(lines.last().unwrap())?;
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["target"], "shipperd_ingest");
    assert!(
        listening["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // The default is text: not JSON.
    let text = ingest_lines(&nats, &[])?;
    assert!(serde_json::from_str::<serde_json::Value>(text.last().unwrap()).is_err());
    assert!(text.last().unwrap().contains("INFO"));
    Ok(())
}

/// A service run on its own serves its metrics with `--metrics-listen`: unpack's stage
/// appears there once it has run, in the OpenMetrics format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_its_own_serves_its_metrics() -> anyhow::Result<()> {
    shipperd_tests::init();
    let nats = Nats::start().await?;
    let data = tempfile::tempdir()?;
    let port = shipperd_tests::servers::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["unpack", "--nats-url", &nats.url(), "--data-dir"])
        .arg(data.path())
        .args(["--registry", "http://127.0.0.1:9"])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let got = shipperd_tests::eventually("unpack's /metrics", Duration::from_secs(20), || async {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?;
        let ct = r.headers().get("content-type")?.to_str().ok()?.to_string();
        let text = r.text().await.ok()?;
        // Once the stage runs.
        text.contains("stage=\"unpack\"").then_some((ct, text))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (ct, text) = got?;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(
        text.contains("# TYPE shipperd_stage_jobs counter"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // A bad address is refused at start, saying which flag.
    let o = Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["unpack", "--nats-url", &nats.url(), "--data-dir"])
        .arg(data.path())
        .args(["--registry", "http://127.0.0.1:9"])
        // Not an address of this machine (TEST-NET-1).
        .args(["--metrics-listen", "192.0.2.1:9"])
        .output()?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--metrics-listen"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
