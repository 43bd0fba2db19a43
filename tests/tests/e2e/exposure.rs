//! The ingest endpoint exposed to clients it cannot trust: TLS (rotated while running,
//! and mutual), slow and stalled clients cut off, connection and upload caps, a data
//! volume that would fill answered 507 with nothing kept.
//!
//! These start nats-server and the ingest service alone: nothing here needs a registry.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use shipperd_ingest::Config;
use shipperd_listener::{Bounds, TlsFiles};
use shipperd_tests::{
    pki::{Leaf, TestCa},
    servers::Nats,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

struct Running {
    _nats: Nats,
    addr: SocketAddr,
    health: Option<SocketAddr>,
    data: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), shipperd_ingest::StartError>>,
}

impl Running {
    async fn start(data: &Path, tune: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        shipperd_tests::init();
        let nats = Nats::start().await?;
        let mut config = Config::new(nats.url(), data, "127.0.0.1:0".parse()?);
        tune(&mut config);
        let ingest = shipperd_ingest::Ingest::start(config).await?;
        let addr = ingest.local_addr();
        let health = ingest.health_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ingest.serve(shutdown.clone()));
        Ok(Running {
            _nats: nats,
            addr,
            health,
            data: data.to_path_buf(),
            shutdown,
            task,
        })
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Files in every temp directory and stored bundles: what an upload left.
    fn kept(&self) -> usize {
        let count = |d: PathBuf| std::fs::read_dir(d).map(|d| d.count()).unwrap_or(0);
        let temp: usize = std::fs::read_dir(self.data.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| count(d.path()))
            .sum();
        temp + count(self.data.join("bundles")) + count(self.data.join("uploads"))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await???;
        Ok(())
    }
}

/// The store keeps no free-space reserve (a test's volume may have little).
fn no_reserve(c: &mut Config) {
    c.limits.min_free_bytes = 0;
}

fn write_leaf(dir: &Path, leaf: &Leaf) -> anyhow::Result<()> {
    // Key first, then the certificate: a reader between the two sees a pair that does
    // not match, as with a real rotation.
    std::fs::write(dir.join("tls.key"), &leaf.key_pem)?;
    std::fs::write(dir.join("tls.crt"), &leaf.cert_pem)?;
    Ok(())
}

fn client(ca: &TestCa, identity: Option<&Leaf>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca.pem.as_bytes())?)
        .timeout(Duration::from_secs(10))
        // Each request on a new connection, so each sees the certificate served now.
        .pool_max_idle_per_host(0);
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(id.identity_pem().as_bytes())?);
    }
    Ok(b.build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_serves_the_certificate_of_the_moment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let first = TestCa::new("first CA")?;
    write_leaf(certs.path(), &first.server()?)?;
    let app = Running::start(dir.path(), |c| {
        c.tls = Some(TlsFiles {
            cert: certs.path().join("tls.crt"),
            key: certs.path().join("tls.key"),
            client_ca: None,
        });
        no_reserve(c);
    })
    .await?;
    let https = app.url("https", "/v1/bundles/tls.tar");
    let resp = client(&first, None)?
        .put(&https)
        .body(b"a bundle over TLS".to_vec())
        .send()
        .await?;
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
    // The gRPC API on the same port, over TLS (h2 by ALPN): `shipperd events`.
    std::fs::write(certs.path().join("ca.pem"), &first.pem)?;
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_shipperd-process"))
        .args(["events", "--server", &app.url("https", "")])
        .arg("--ca-file")
        .arg(certs.path().join("ca.pem"))
        .env_remove("SHIPPERD_SERVER")
        .output()
        .await?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("tls.tar") && out.contains("Received"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Plain HTTP to the TLS port gets no answer.
    assert!(
        reqwest::Client::new()
            .get(app.url("http", "/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );

    // The certificate is rotated (a new CA, as after a re-issue): new connections get
    // the new one, without a restart.
    let second = TestCa::new("second CA")?;
    write_leaf(certs.path(), &second.server()?)?;
    let healthz = app.url("https", "/healthz");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client(&second, None)?.get(&healthz).send().await {
            Ok(r) if r.status() == 200 => break,
            other => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the rotated certificate was not served: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let old = client(&first, None)?.get(&healthz).send().await;
    assert!(old.is_err(), "the old CA no longer verifies: {old:?}");

    // A broken rewrite (a key that is not the certificate's) keeps the current one.
    std::fs::write(
        certs.path().join("tls.key"),
        second.server()?.key_pem.as_bytes(),
    )?;
    let r = client(&second, None)?.get(&healthz).send().await?;
    assert_eq!(r.status(), 200);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_wants_a_client_certificate_from_the_client_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let server_ca = TestCa::new("server CA")?;
    let client_ca = TestCa::new("client CA")?;
    let stranger_ca = TestCa::new("someone else's CA")?;
    write_leaf(certs.path(), &server_ca.server()?)?;
    std::fs::write(certs.path().join("clients.pem"), &client_ca.pem)?;
    let app = Running::start(dir.path(), |c| {
        c.tls = Some(TlsFiles {
            cert: certs.path().join("tls.crt"),
            key: certs.path().join("tls.key"),
            client_ca: Some(certs.path().join("clients.pem")),
        });
        no_reserve(c);
    })
    .await?;
    let url = app.url("https", "/v1/bundles/mtls.tar");
    let body = b"a bundle over mutual TLS".to_vec();
    for (who, id) in [
        ("no certificate", None),
        ("a stranger's", Some(stranger_ca.client("mallory")?)),
    ] {
        let r = client(&server_ca, id.as_ref())?
            .put(&url)
            .body(body.clone())
            .send()
            .await;
        assert!(r.is_err(), "{who}: {r:?}");
    }
    assert_eq!(app.kept(), 0, "nothing of the refused uploads is kept");
    let alice = client_ca.client("alice")?;
    let r = client(&server_ca, Some(&alice))?
        .put(&url)
        .body(body)
        .send()
        .await?;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    app.stop().await
}

/// Reads until the peer closes the connection or `within` passes; returns what came and
/// whether it closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (got, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_idle_clients_are_cut_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Running::start(dir.path(), |c| {
        c.bounds = Bounds {
            header_timeout: Duration::from_secs(2),
            min_body_rate: 64 << 10,
            body_window: Duration::from_secs(1),
            ..Bounds::default()
        };
        no_reserve(c);
    })
    .await?;

    // Headers one byte a second: the connection is closed once the header time is up,
    // long before the headers are done.
    let started = Instant::now();
    let mut s = TcpStream::connect(app.addr).await?;
    let request =
        b"PUT /v1/bundles/slow.tar HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello";
    let mut closed = false;
    for b in request {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let (_, c) = read_until_closed(&mut s, Duration::from_secs(1)).await;
        if c {
            closed = true;
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(15), "never cut off");
    }
    assert!(closed, "a one-byte-a-second client was not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "cut off after {:?}",
        started.elapsed()
    );

    // A connection that sends nothing at all (its protocol unknown yet) is closed.
    let mut s = TcpStream::connect(app.addr).await?;
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    assert!(closed, "a silent connection stayed open");

    // A kept-alive connection that stays idle is closed too.
    let mut s = TcpStream::connect(app.addr).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(closed, "an idle kept-alive connection stayed open");

    // An upload that stalls mid-body is cut (408) and nothing of it is kept.
    let mut s = TcpStream::connect(app.addr).await?;
    s.write_all(
        b"PUT /v1/bundles/stalled.tar HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10485760\r\n\r\n",
    )
    .await?;
    s.write_all(&vec![7u8; 1 << 20]).await?;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(8)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("too slow"), "{answer}");
    assert!(closed);
    assert_eq!(app.kept(), 0, "the stalled upload left files");
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_and_uploads_are_capped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Running::start(dir.path(), |c| {
        no_reserve(c);
        c.bounds = Bounds {
            max_connections: 3,
            ..Bounds::default()
        };
        c.limits.max_uploads = 1;
    })
    .await?;
    // One upload in progress (its body half sent) holds the one upload slot.
    let mut uploading = TcpStream::connect(app.addr).await?;
    uploading
        .write_all(
            b"PUT /v1/bundles/first.tar HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200000\r\n\r\n",
        )
        .await?;
    uploading.write_all(&[1u8; 100_000]).await?;
    shipperd_tests::eventually(
        "the first upload holds its slot",
        Duration::from_secs(10),
        || async { (app.kept() == 1).then_some(()) },
    )
    .await?;
    // A second upload is answered 503 and its connection closed (its body was not
    // read, so the connection cannot carry another request).
    let mut second = TcpStream::connect(app.addr).await?;
    second
        .write_all(
            b"PUT /v1/bundles/second.tar HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\nsecond",
        )
        .await?;
    let (answer, _) = read_until_closed(&mut second, Duration::from_secs(2)).await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    drop(second);
    // Two more connections, answered and kept alive, fill the cap of three.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(app.addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(1)).await;
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200") && !closed);
        kept.push(s);
    }
    // The next is closed at once, unanswered.
    let mut extra = TcpStream::connect(app.addr).await?;
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(3)).await;
    assert!(answer.is_empty() && closed, "over the cap: {answer:?}");

    // The first upload ends; its slot is free again.
    uploading.write_all(&[1u8; 100_000]).await?;
    let (answer, _) = read_until_closed(&mut uploading, Duration::from_secs(3)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    app.stop().await
}

/// A small tmpfs for the data directory when this machine lets us mount one.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Option<Self> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_that_would_fill_answers_507_and_keeps_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A 24 MiB tmpfs where the machine allows one; else the reserve is set so that the
    // real volume has only a few MiB to give.
    let tmpfs = Tmpfs::mount(dir.path(), 24 << 20);
    let reserve = match &tmpfs {
        Some(_) => 4 << 20,
        None => {
            let free = fs_free(dir.path())?;
            free.saturating_sub(20 << 20)
        }
    };
    eprintln!("tmpfs: {}", tmpfs.is_some());
    let app = Running::start(dir.path(), |c| {
        c.limits.min_free_bytes = reserve;
    })
    .await?;
    let http = reqwest::Client::new();
    let big = vec![3u8; 40 << 20];
    // Declared length, and `Expect: 100-continue` (as curl sends for large uploads):
    // refused before the body is even asked for.
    let mut s = TcpStream::connect(app.addr).await?;
    s.write_all(
        format!(
            "PUT /v1/bundles/declared.tar HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await?;
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("not enough room"), "{answer}");
    assert_eq!(app.kept(), 0);
    // No length (chunked): cut while it is written.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .put(app.url("http", "/v1/bundles/chunked.tar"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 507, "{:?}", r.text().await),
        // The server may close before the client is done sending: fine, if nothing stays.
        Err(e) => eprintln!("chunked upload ended with {e}"),
    }
    shipperd_tests::eventually(
        "nothing of the cut upload stays",
        Duration::from_secs(10),
        || async { (app.kept() == 0).then_some(()) },
    )
    .await?;
    // A bundle that fits is still taken.
    let r = http
        .put(app.url("http", "/v1/bundles/small.tar"))
        .body(vec![5u8; 1 << 20])
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    app.stop().await?;
    drop(tmpfs);
    Ok(())
}

fn fs_free(path: &Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("df: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_keeps_to_its_total_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Running::start(dir.path(), |c| {
        no_reserve(c);
        c.limits.max_stored_bytes = 3 << 20;
    })
    .await?;
    let http = reqwest::Client::new();
    let put = |name: &str, fill: u8| {
        http.put(app.url("http", &format!("/v1/bundles/{name}")))
            .body(vec![fill; 2 << 20])
            .send()
    };
    assert_eq!(put("one.tar", 1).await?.status(), 202);
    let r = put("two.tar", 2).await?;
    assert_eq!(r.status(), 507);
    let error = r.text().await?;
    assert!(error.contains("over its limit"), "{error}");
    // Only the first is kept: its directory, nothing in the temp directory.
    assert_eq!(app.kept(), 1);
    app.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_part_upload_belongs_to_the_client_that_started_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Running::start(dir.path(), no_reserve).await?;
    let http = reqwest::Client::new();
    let part = |n: u32, id: Option<&str>, body: &'static [u8]| {
        let mut url = app.url("http", &format!("/v1/uploads/shared/parts/{n}"));
        if let Some(id) = id {
            url.push_str(&format!("?upload_id={id}"));
        }
        http.put(url).body(body).send()
    };
    // Alice starts the upload and gets its id.
    let first = part(1, None, b"alice's first part").await?;
    assert_eq!(first.status(), 201);
    let alice: serde_json::Value = first.json().await?;
    let id = alice["upload_id"].as_str().unwrap().to_string();
    assert!(id.len() >= 32, "{alice}");

    // Mallory cannot add to it, replace its parts or complete it.
    let r = part(1, None, b"mallory's part").await?;
    assert_eq!(r.status(), 409);
    assert!(r.text().await?.contains("in progress"));
    let r = part(
        1,
        Some("0123456789abcdef0123456789abcdef"),
        b"mallory's part",
    )
    .await?;
    assert_eq!(r.status(), 409);
    let r = part(2, Some("guess"), b"mallory's part").await?;
    assert_eq!(r.status(), 409);
    let complete = |id: &str| {
        http.post(app.url(
            "http",
            &format!("/v1/uploads/shared/complete?parts=2&upload_id={id}"),
        ))
        .send()
    };
    assert_eq!(complete("guess").await?.status(), 409);

    // Alice's second part and completion: the bundle is her two parts.
    let r = part(2, Some(&id), b"alice's second part").await?;
    assert_eq!(r.status(), 201);
    let r = complete(&id).await?;
    assert_eq!(r.status(), 202);
    let done: serde_json::Value = r.json().await?;
    let stored = app
        .data
        .join("bundles")
        .join(done["id"].as_str().unwrap())
        .join("parts");
    assert_eq!(
        std::fs::read(stored.join("000001"))?,
        b"alice's first part".to_vec()
    );
    assert_eq!(
        std::fs::read(stored.join("000002"))?,
        b"alice's second part".to_vec()
    );

    // A first part that fails (a wrong checksum) leaves the name free.
    let r = http
        .put(app.url(
            "http",
            &format!("/v1/uploads/other/parts/1?sha256={}", "0".repeat(64)),
        ))
        .body(b"x".to_vec())
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    assert!(!app.data.join("uploads/other").exists());
    app.stop().await
}

/// One address cannot take every connection: its connections are capped on their own
/// (and the probes have a listener of their own, answered whatever the API's clients
/// hold); a lower-case `bearer` scheme is a bearer token; an address that keeps
/// presenting bad tokens is told to wait (429) before its tokens are looked at, while a
/// good token from it still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_cannot_starve_the_others_nor_guess_tokens_fast() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("tokens"), "good-token\n")?;
    let tokens = dir.path().join("tokens");
    let app = Running::start(dir.path(), |c| {
        c.bounds = Bounds {
            max_connections: 10,
            max_connections_per_client: 3,
            ..Bounds::default()
        };
        no_reserve(c);
        c.auth_token_file = Some(tokens);
        c.health_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await?;
    let health = app.health.expect("a probes listener");
    // Three idle connections from this address fill its share; the fourth is closed
    // unanswered, though the total cap (10) is far.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(app.addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(1)).await;
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200") && !closed);
        idle.push(s);
    }
    let mut fourth = TcpStream::connect(app.addr).await?;
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let (answer, closed) = read_until_closed(&mut fourth, Duration::from_secs(3)).await;
    assert!(
        answer.is_empty() && closed,
        "over the per-client cap: {answer:?}"
    );
    // The probes answer on their own port meanwhile.
    let probe = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = probe.get(format!("http://{health}{path}")).send().await?;
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = probe
        .get(format!("http://{health}/v1/bundles"))
        .send()
        .await?;
    assert_eq!(r.status(), 404, "the probes' port serves no API");
    // One connection closed: room for one more.
    idle.pop();
    let api = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let list = format!("http://{}/v1/bundles", app.addr);
    let ok = shipperd_tests::eventually("a free connection", Duration::from_secs(5), || async {
        let r = api
            .get(&list)
            .header("authorization", "bearer good-token")
            .send()
            .await
            .ok()?;
        Some(r.status())
    })
    .await?;
    assert_eq!(ok, 200, "a lower-case scheme is a bearer token");
    // One kept-alive connection from here on: its first request waits for the server to
    // let go of the one just closed. One more idle connection goes too: when the server
    // closes a connection and the client opens the next at once, the old one may still
    // count against the address for a moment (seen on a loaded machine).
    idle.pop();
    let api = reqwest::Client::new();
    let first = shipperd_tests::eventually("the slot let go", Duration::from_secs(5), || async {
        let r = api.get(&list).bearer_auth("guess-0").send().await.ok()?;
        Some(r.status())
    })
    .await?;
    assert_eq!(first, 401);

    for i in 1..shipperd_listener::MAX_FAILURES {
        let r = api
            .get(&list)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await?;
        assert_eq!(r.status(), 401);
    }
    let r = api.get(&list).bearer_auth("guess-more").send().await?;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&wait), "{wait}");
    let r = api.get(&list).bearer_auth("good-token").send().await?;
    assert_eq!(r.status(), 200, "a good token is still let in");
    drop(idle);
    app.stop().await
}

/// Uploads `body` (a file) to `url` with `how`, with `token` if any: the status and body
/// the client read, or what it printed when it read none.
async fn refused_upload(
    how: &str,
    url: &str,
    ca: &Path,
    body: &Path,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let out = match how {
        "curl h2" | "curl http/1.1" => {
            let mut c = tokio::process::Command::new("curl");
            c.args(["-sS", "--max-time", "60", "--cacert"])
                .arg(ca)
                .arg("-T")
                .arg(body)
                .args(["-w", "\n%{http_code}", url]);
            c.arg(if how == "curl h2" {
                "--http2"
            } else {
                "--http1.1"
            });
            if let Some(a) = &auth {
                c.args(["-H", a]);
            }
            c.output().await?
        }
        "http.client" | "requests" => {
            const SCRIPT: &str = r#"
import json, os, ssl, sys, urllib.parse
how, url, ca, body, token = sys.argv[1:6]
headers = {"Authorization": "Bearer " + token} if token else {}
if how == "requests":
    import requests
    with open(body, "rb") as f:
        r = requests.put(url, data=f, headers=headers, verify=ca, timeout=60)
    print(r.text)
    print(r.status_code)
else:
    import http.client
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ssl.create_default_context(cafile=ca), timeout=60)
    headers["Content-Length"] = str(os.path.getsize(body))
    with open(body, "rb") as f:
        conn.request("PUT", u.path, body=f, headers=headers)
    r = conn.getresponse()
    print(r.read().decode())
    print(r.status)
"#;
            tokio::process::Command::new("python3")
                .env(
                    "PYTHONPATH",
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/pypi"),
                )
                .args(["-c", SCRIPT, how, url])
                .arg(ca)
                .arg(body)
                .arg(token.unwrap_or(""))
                .output()
                .await?
        }
        other => anyhow::bail!("no client {other}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (answer, status) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    let status = status.trim().parse().unwrap_or(0);
    if status == 0 {
        return Ok((0, format!("{text}{}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok((status, answer.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_upload_is_answered_whatever_the_client() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tempfile::tempdir()?;
    let ca = TestCa::new("refusals CA")?;
    write_leaf(certs.path(), &ca.server()?)?;
    std::fs::write(certs.path().join("ca.pem"), &ca.pem)?;
    std::fs::write(dir.path().join("tokens"), "good-token,alice\n")?;
    let tokens = dir.path().join("tokens");
    let app = Running::start(dir.path(), |c| {
        c.tls = Some(TlsFiles {
            cert: certs.path().join("tls.crt"),
            key: certs.path().join("tls.key"),
            client_ca: None,
        });
        c.auth_token_file = Some(tokens);
        no_reserve(c);
    })
    .await?;
    // 100 MB: far more than any socket buffer holds, so a client that is still sending
    // when the server stops reading sees the answer only if the server reads on.
    let body = certs.path().join("big.tar");
    std::fs::write(&body, vec![7u8; 100 << 20])?;
    let url = app
        .url("https", "/v1/bundles/big.tar")
        .replace("127.0.0.1", "localhost");
    let ca_file = certs.path().join("ca.pem");
    let clients = ["curl h2", "curl http/1.1", "http.client", "requests"];
    for token in [None, Some("wrong-token")] {
        let answers = futures::future::join_all(
            clients.map(|how| refused_upload(how, &url, &ca_file, &body, token)),
        )
        .await;
        for (how, answer) in clients.iter().zip(answers) {
            let (status, text) = answer?;
            assert_eq!(status, 401, "{how}, token {token:?}: {text}");
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{how}: not JSON ({e}): {text}"))?;
            assert!(
                v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("bearer token")),
                "{how}: {v}"
            );
        }
    }
    // Nothing of them was kept, and a good token still uploads.
    assert_eq!(app.kept(), 0);
    let resp = client(&ca, None)?
        .put(app.url("https", "/v1/bundles/small.tar"))
        .bearer_auth("good-token")
        .body(b"small".to_vec())
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    app.stop().await
}
