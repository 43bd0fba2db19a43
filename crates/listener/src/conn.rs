//! The API's connections: accepted up to a cap, TLS when configured, HTTP/1.1 with a
//! header-read timeout (which hyper also applies to a kept-alive connection waiting for
//! its next request), and request bodies that must keep a minimum rate ([`Paced`]).

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use bytes::Bytes;
use futures::Stream;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, time::Sleep};
use tokio_util::sync::CancellationToken;

use shipperd_telemetry::metrics::metrics;

use crate::tls::Tls;

/// What one client may hold and how slow it may be.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Time a client has to send a request's headers (and the TLS handshake); a
    /// kept-alive connection idle this long is closed.
    pub header_timeout: Duration,
    /// A request body must bring at least `min_body_rate` bytes/s, averaged over each
    /// `body_window` (and at least one byte in every window), or it is cut (408) and
    /// nothing of it kept.
    pub min_body_rate: u64,
    pub body_window: Duration,
    /// Connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Connections open at once from one client address: one client cannot take all
    /// of `max_connections` (nor starve the probes, which may have a listener of their
    /// own: `--health-listen`).
    pub max_connections_per_client: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            header_timeout: Duration::from_secs(30),
            min_body_rate: 16 << 10,
            body_window: Duration::from_secs(60),
            max_connections: 512,
            max_connections_per_client: 64,
        }
    }
}

/// How long a connection may send nothing once it has begun.
const IDLE: Duration = Duration::from_secs(90);

/// Requests at once on one HTTP/2 connection (watches included).
const MAX_STREAMS: u32 = 32;

/// The waits after a failed accept (out of file descriptors): 100 ms doubling to 2 s.
const ACCEPT_RETRY: shipperd_model::Backoff =
    shipperd_model::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Time connections get to finish their requests after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then gives open connections
/// a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    bounds: &Bounds,
    shutdown: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let per_client = Arc::new(PerClient::new(bounds.max_connections_per_client.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 and HTTP/2 (gRPC) on one port: h2 by ALPN over TLS, by its preface
    // (prior knowledge) without.
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(64 << 10)
        .max_pending_accept_reset_streams(Some(MAX_STREAMS as usize))
        // A peer that stops answering pings is gone: its streams (a watch) end.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    // A flood of refused connections logs once in a while, not once each.
    let mut warned: Option<tokio::time::Instant> = None;
    let mut refused_in_a_row = 0;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors, most likely: wait a little rather than spin.
                    refused_in_a_row += 1;
                    let retry = ACCEPT_RETRY.retry(refused_in_a_row);
                    tracing::warn!(%error, delay = ?retry.delay(), "accept failed");
                    retry.wait().await;
                    continue;
                }
            },
        };
        refused_in_a_row = 0;
        let admitted = per_client
            .admit(peer.ip())
            .map(|mine| (mine, open.clone().try_acquire_owned()));
        let Some((mine, Ok(permit))) = admitted else {
            metrics().connections_refused.inc();
            if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                warned = Some(tokio::time::Instant::now());
                tracing::warn!(%peer, limit = bounds.max_connections, per_client = bounds.max_connections_per_client, "connection refused: too many open, in all or from this address (shipperd_ingest_connections_refused_total counts them)");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Silent too long, the connection goes: nothing in its first `header_timeout`
        // (before hyper knows its protocol, its own timeouts do not run), or nothing
        // for IDLE later (an HTTP/2 peer acknowledges the server's pings every 30 s).
        let stream = Quiet::new(stream, bounds.header_timeout, IDLE);
        let service =
            TowerToHyperService::new(app.clone().layer(axum::Extension(Client(peer.ip()))));
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake = bounds.header_timeout;
        tokio::spawn(async move {
            let _permit = (permit, mine);
            let result = match tls {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let stream =
                        match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {}s after shutdown; no longer waiting for them",
            DRAIN.as_secs()
        );
    }
}

/// The address a request came from (an extension of every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(pub IpAddr);

/// Connections open per client address, each at most `max`.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection of a client, counted until dropped.
struct Counted {
    of: Arc<PerClient>,
    ip: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl PerClient {
    fn new(max: usize) -> Self {
        PerClient {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a connection from `ip`, unless it has `max` open already. (The map holds
    /// only addresses with connections open, so it is bounded by the total cap.)
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Counted {
            of: self.clone(),
            ip,
        })
    }
}

/// Bodies read to their end after an early answer, at most.
pub const MAX_DRAIN: u64 = 1 << 30;
/// The longest an early answer waits for the rest of its request's body.
pub const DRAIN_TIME: Duration = Duration::from_secs(30);
/// The longest the rest of a body may bring nothing while it is waited for.
const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// An answer given before the request's body was read to its end (a refused upload is
/// answered before it is read, a known one by its checksum alone) waits for the rest of
/// the body, read and thrown away, when that is at most [`MAX_DRAIN`] and comes within
/// [`DRAIN_TIME`] (never idle for long): many clients read nothing until they have sent
/// their whole body (Python's `http.client`; curl over h2, which drops an answer that
/// came with `RST_STREAM(NO_ERROR)`), and would see a broken connection instead of the
/// answer. Not waited for: the rest of a body cut for being too slow (408), and a body
/// whose client asked `Expect: 100-continue` and was not told to go on (it sends none).
/// Past the bounds the answer goes at once, over h2 followed by `RST_STREAM(NO_ERROR)`
/// (RFC 9113, 8.1). Over HTTP/1.1 the connection is closed after such an answer either
/// way (`Connection: close`): a client that was refused keeps no connection.
pub async fn drain_unread_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header;
    use http_body::Body as _;
    let h1 = req.version() < axum::http::Version::HTTP_2;
    let expects = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let shared = Arc::new(Unread {
        read: std::sync::atomic::AtomicBool::new(body.is_end_stream()),
        polled: std::sync::atomic::AtomicBool::new(false),
        rest: Mutex::new(None),
    });
    let body = axum::body::Body::new(Tracked {
        inner: Some(body),
        shared: shared.clone(),
    });
    let mut resp = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if shared.read.load(std::sync::atomic::Ordering::Relaxed) {
        return resp;
    }
    let waits_for_go = expects && !shared.polled.load(std::sync::atomic::Ordering::Relaxed);
    let too_slow = resp.status() == axum::http::StatusCode::REQUEST_TIMEOUT;
    let rest = shared.rest.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(rest) = rest
        && !waits_for_go
        && !too_slow
        && declared.is_none_or(|n| n <= MAX_DRAIN)
    {
        let drained = tokio::time::timeout(DRAIN_TIME, drain(rest, MAX_DRAIN)).await;
        tracing::debug!(drained = ?drained, "the rest of an answered request's body");
    }
    if h1 {
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Reads `body` to its end and throws it away: `true` when it ended within `max` bytes,
/// never idle for [`DRAIN_IDLE`].
async fn drain(body: axum::body::Body, max: u64) -> bool {
    use futures::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    loop {
        match tokio::time::timeout(DRAIN_IDLE, stream.next()).await {
            Ok(None) => return true,
            Ok(Some(Ok(c))) => {
                n += c.len() as u64;
                if n > max {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// What [`Tracked`] tells the middleware: whether its body was read to the end, whether
/// it was read at all, and the rest of it when the handler let it go unread.
struct Unread {
    read: std::sync::atomic::AtomicBool,
    polled: std::sync::atomic::AtomicBool,
    rest: Mutex<Option<axum::body::Body>>,
}

/// A request body that notes how far it was read, and hands what was left unread back
/// when dropped.
struct Tracked {
    inner: Option<axum::body::Body>,
    shared: Arc<Unread>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.shared.read.load(std::sync::atomic::Ordering::Relaxed) {
            *self.shared.rest.lock().unwrap_or_else(|p| p.into_inner()) = self.inner.take();
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.shared
            .polled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.shared
                .read
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Why a paced body ended early.
#[derive(Debug, thiserror::Error)]
pub enum PacedError {
    /// It came slower than [`Bounds::min_body_rate`].
    #[error("{0}")]
    TooSlow(String),
    /// The stream under it broke.
    #[error("{0}")]
    Broken(String),
}

/// A request body that must keep a minimum rate (see [`Bounds::min_body_rate`]).
pub struct Paced<S> {
    inner: S,
    /// Bytes each window must bring (at least 1).
    needed: u64,
    window: Duration,
    got: u64,
    deadline: Pin<Box<Sleep>>,
}

impl<S> Paced<S> {
    pub fn new(inner: S, bounds: &Bounds) -> Self {
        let window = bounds.body_window.max(Duration::from_millis(100));
        Paced {
            inner,
            needed: ((bounds.min_body_rate as f64 * window.as_secs_f64()) as u64).max(1),
            window,
            got: 0,
            deadline: Box::pin(shipperd_model::deadline(window)),
        }
    }
}

impl<S, E> Stream for Paced<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, PacedError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while this.deadline.as_mut().poll(cx).is_ready() {
            if this.got < this.needed {
                return Poll::Ready(Some(Err(PacedError::TooSlow(format!(
                    "the upload brought {} bytes in {}s, less than the {} required",
                    this.got,
                    this.window.as_secs_f64(),
                    this.needed
                )))));
            }
            this.got = 0;
            let next = tokio::time::Instant::now() + this.window;
            this.deadline.as_mut().reset(next);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(b))) => {
                this.got += b.len() as u64;
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(PacedError::Broken(e.to_string())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A connection that is cut (its reads fail) when nothing passes: the client sends
/// nothing for `first` from the start, then no byte goes either way for `idle` (a
/// long download to an HTTP/1.1 client, which sends nothing meanwhile, is traffic).
pub(crate) struct Quiet<I> {
    io: I,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The client has sent its first byte.
    started: bool,
}

impl<I> Quiet<I> {
    pub(crate) fn new(io: I, first: Duration, idle: Duration) -> Self {
        Quiet {
            io,
            idle,
            deadline: Box::pin(shipperd_model::deadline(first)),
            started: false,
        }
    }

    /// Bytes went out: the connection is not idle (once the client has begun).
    fn sent(&mut self, written: &Poll<std::io::Result<usize>>) {
        if self.started && matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            let next = tokio::time::Instant::now() + self.idle;
            self.deadline.as_mut().reset(next);
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Quiet<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.started = true;
                    let next = tokio::time::Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Quiet<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.sent(&written);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.sent(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_connection_is_idle_only_when_nothing_passes_either_way() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let ms = Duration::from_millis;
        let (mut server_r, mut server_w) = tokio::io::split(Quiet::new(server, ms(300), ms(300)));
        client_w.write_all(b"GET /big").await.unwrap();
        let mut buf = [0u8; 8];
        server_r.read_exact(&mut buf).await.unwrap();
        // A download: the server writes for three idle periods, the client sends nothing;
        // the server's pending read (hyper's close detection) does not fail meanwhile.
        let reading = tokio::spawn(async move {
            let mut one = [0u8; 1];
            let r = server_r.read(&mut one).await;
            (r, std::time::Instant::now())
        });
        let began = std::time::Instant::now();
        for _ in 0..9 {
            server_w.write_all(&[7u8; 1024]).await.unwrap();
            let mut got = vec![0u8; 1024];
            client_r.read_exact(&mut got).await.unwrap();
            shipperd_model::pause(ms(100)).await;
        }
        // Then silence both ways: cut.
        let (r, at) = reading.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(at - began >= ms(900), "cut while bytes still went out");
    }

    #[tokio::test]
    async fn a_connection_that_never_speaks_is_cut() {
        let (_client, server) = tokio::io::duplex(64);
        let mut q = Quiet::new(server, Duration::from_millis(100), Duration::from_secs(60));
        let mut buf = [0u8; 1];
        let err = q.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
