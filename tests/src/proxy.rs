//! A fault-injecting HTTP proxy in front of the real registry. A rule looks at each
//! request (method, path and query) and says what to do: pass it on, answer with an
//! error status instead (429 with `Retry-After`, 503...), hang without reading the body
//! (a stalled connection), or pass it on and then hang instead of answering (the answer
//! is lost). It logs every request, with the body bytes it passed on, and rewrites
//! `Location` so the client keeps talking through it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Request, State},
    response::Response,
};
use futures::StreamExt as _;

/// What the proxy does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Answer this status (with `Retry-After: secs` when given) without passing it on.
    Status(u16, Option<u64>),
    /// Read nothing, answer nothing (until the client gives up).
    HangBefore,
    /// Pass the whole request on, then never answer.
    HangAfter,
    /// Wait this long before passing the request on (a slow registry).
    Delay(Duration),
    /// Pass it on, and break the connection after this many bytes of the answer's body
    /// (a connection dropped in the middle of a download).
    CutAfter(u64),
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub fault: Fault,
    /// Body bytes passed on to the registry.
    pub forwarded: u64,
    pub at: Instant,
    /// The request's `Range` header, if any.
    pub range: Option<String>,
}

type Rule = Box<dyn FnMut(&str, &str) -> Fault + Send>;

struct Inner {
    upstream: String,
    me: String,
    http: reqwest::Client,
    rule: Mutex<Rule>,
    log: Mutex<Vec<Seen>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a hanging request hangs at most (the client's stall timeout is far less).
const HANG: Duration = Duration::from_secs(60);

impl Proxy {
    /// A proxy on a free loopback port in front of `upstream` (`http://127.0.0.1:P`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_string(),
            me: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            rule: Mutex::new(Box::new(|_, _| Fault::Pass)),
            log: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Proxy { addr, inner, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the rule for the requests to come.
    pub fn rule(&self, rule: impl FnMut(&str, &str) -> Fault + Send + 'static) {
        *self.inner.rule.lock().unwrap() = Box::new(rule);
    }

    pub fn log(&self) -> Vec<Seen> {
        self.inner.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.inner.log.lock().unwrap().clear();
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let fault = (inner.rule.lock().unwrap())(&method, &path);
    let at = Instant::now();
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let forwarded = Arc::new(AtomicU64::new(0));
    let record = |inner: &Inner, forwarded: &AtomicU64| {
        inner.log.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            fault: fault.clone(),
            forwarded: forwarded.load(Ordering::Relaxed),
            at,
            range: range.clone(),
        });
    };
    match fault {
        Fault::Status(code, retry_after) => {
            record(&inner, &forwarded);
            let mut r = Response::builder().status(code);
            if let Some(s) = retry_after {
                r = r.header("retry-after", s.to_string());
            }
            return r
                .header("content-type", "application/json")
                .body(Body::from(
                    r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by the test proxy"}]}"#,
                ))
                .unwrap();
        }
        Fault::HangBefore => {
            record(&inner, &forwarded);
            tokio::time::sleep(HANG).await;
            return Response::builder().status(504).body(Body::empty()).unwrap();
        }
        Fault::Delay(d) => tokio::time::sleep(d).await,
        Fault::Pass | Fault::HangAfter | Fault::CutAfter(_) => {}
    }
    let mut out = inner
        .http
        .request(req.method().clone(), format!("{}{path}", inner.upstream));
    for (k, v) in req.headers() {
        if k != "host" {
            out = out.header(k, v);
        }
    }
    let counter = forwarded.clone();
    let body = req.into_body().into_data_stream().map(move |c| {
        if let Ok(b) = &c {
            counter.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        c
    });
    let result = out.body(reqwest::Body::wrap_stream(body)).send().await;
    record(&inner, &forwarded);
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Body::from(e.to_string()))
                .unwrap();
        }
    };
    if fault == Fault::HangAfter {
        tokio::time::sleep(HANG).await;
    }
    let mut r = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k == "location" {
            let l = v
                .to_str()
                .unwrap_or_default()
                .replace(&inner.upstream, &inner.me);
            r = r.header(k, l);
        } else {
            r = r.header(k, v);
        }
    }
    let Fault::CutAfter(limit) = fault else {
        return r.body(Body::from_stream(resp.bytes_stream())).unwrap();
    };
    // Up to `limit` bytes, then an error: the connection is dropped mid-body.
    let mut sent = 0u64;
    let cut = resp.bytes_stream().map(move |c| {
        let c = c.map_err(std::io::Error::other)?;
        if sent >= limit {
            return Err(std::io::Error::other("cut by the test proxy"));
        }
        let keep = (limit - sent).min(c.len() as u64) as usize;
        sent += keep as u64;
        Ok(c.slice(..keep))
    });
    r.body(Body::from_stream(cut)).unwrap()
}
