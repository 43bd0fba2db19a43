//! Real servers for tests: nats-server (JetStream) and docker-registry (CNCF
//! distribution), each on a free 127.0.0.1 port with its own temp directory, killed on
//! drop. Binaries come from Debian packages (`scripts/install-deps.sh`); override with
//! `SHIPPERD_TEST_NATS_SERVER` / `SHIPPERD_TEST_REGISTRY`.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("can bind a loopback port")
}

fn binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: run scripts/install-deps.sh (or set {env})"))
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(mut cmd: Command, port: u16, dir: TempDir) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc { child, port, dir })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the process (a crash, as far as clients can tell).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_tcp(port: u16, proc: &mut Proc, what: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{what} exited with {status}: {}", proc.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{what} did not listen on 127.0.0.1:{port} within 10 s: {}",
        proc.log()
    )
}

/// nats-server with JetStream.
pub struct Nats(pub Proc);

impl Nats {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut cmd = Command::new(binary("SHIPPERD_TEST_NATS_SERVER", "nats-server")?);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("js"));
        let mut p = Proc::spawn(cmd, port, dir)?;
        wait_tcp(port, &mut p, "nats-server").await?;
        Ok(Nats(p))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }
}

/// docker-registry (distribution 2.8), plain http on loopback.
pub struct Registry(pub Proc);

impl Registry {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let config = registry_config(&dir.path().join("storage"), port);
        std::fs::write(dir.path().join("config.yml"), config)?;
        Self::serve(port, dir).await
    }

    async fn serve(port: u16, dir: TempDir) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary("SHIPPERD_TEST_REGISTRY", "docker-registry")?);
        cmd.arg("serve").arg(dir.path().join("config.yml"));
        let mut p = Proc::spawn(cmd, port, dir)?;
        wait_tcp(port, &mut p, "docker-registry").await?;
        Ok(Registry(p))
    }

    /// Kills the registry (as a crash would); [`Self::restart`] brings it back on the
    /// same port with the same storage.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.0.kill();
        let dir = std::mem::replace(&mut self.0.dir, tempfile::tempdir()?);
        *self = Self::serve(self.0.port, dir).await?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.0.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.0.port)
    }
}

/// A docker-registry configuration that listens on loopback only and needs no auth.
pub fn registry_config(root: &Path, port: u16) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: shipperd-test-secret\n\
         health:\n  storagedriver:\n    enabled: false\n",
        root.display()
    )
}
