//! `shipperd all` as a child process, for tests that kill it (`kill -9`, as the kernel's
//! OOM killer or a lost node would) and start it again on the same data directory and
//! port.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::servers::free_port;

/// The arguments of `shipperd all` on the test's own NATS, data directory and registry,
/// followed by `more`.
pub fn all_args(
    nats: &crate::servers::Nats,
    data: &std::path::Path,
    registry: &crate::servers::Registry,
    more: &[&str],
) -> Vec<String> {
    let mut args = vec![
        "--nats-url".to_string(),
        nats.url(),
        "--data-dir".into(),
        data.display().to_string(),
        "--registry".into(),
        registry.url(),
    ];
    args.extend(more.iter().map(|a| a.to_string()));
    args
}

pub struct ShipperdProcess {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    pub port: u16,
    /// Its log, every run appended.
    pub log_dir: tempfile::TempDir,
    /// How many times it was started.
    pub starts: u32,
    /// Environment variables it gets.
    pub env: Vec<(String, String)>,
}

impl ShipperdProcess {
    /// Starts `binary all` with `args` (its `--listen` is added), and waits until the
    /// API listens.
    pub async fn start(binary: impl Into<PathBuf>, args: Vec<String>) -> anyhow::Result<Self> {
        Self::start_env(binary, args, Vec::new()).await
    }

    /// [`ShipperdProcess::start`] with these environment variables.
    pub async fn start_env(
        binary: impl Into<PathBuf>,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let mut p = ShipperdProcess {
            env,
            child: None,
            binary: binary.into(),
            args,
            port: free_port(),
            log_dir: tempfile::tempdir()?,
            starts: 0,
        };
        p.restart().await?;
        Ok(p)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `kill -9`, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again), and waits until its API listens.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.path().join("shipperd.log"))?;
        let mut child = Command::new(&self.binary)
            .arg("all")
            .args(&self.args)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env("RUST_LOG", "info,backhand=warn")
            .env("SHIPPERD_INSTANCE", "child")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.starts += 1;
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!("shipperd exited with {status}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        bail!("shipperd did not listen within 20 s: {}", self.log())
    }

    /// Its peak resident memory so far, in bytes (`VmHWM` of `/proc/<pid>/status`).
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let pid = self.child.as_ref().context("not running")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM")?;
        Ok(kib * 1024)
    }

    /// Everything it logged, every run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("shipperd.log")).unwrap_or_default()
    }
}

impl Drop for ShipperdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
