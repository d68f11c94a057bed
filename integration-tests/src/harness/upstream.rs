//! An in-process upstream shaped like GitLab's API paths, for the tunnel
//! mechanics tests: streamed pattern downloads, checked uploads, an endless
//! stream that reports when its connection is dropped, and a request log.
//!
//! Endpoints (all under `/api/v4/`):
//! - `GET  /api/v4/version` — small JSON.
//! - `POST /api/v4/echo` — echoes the body and reports method and headers.
//! - `GET  /api/v4/bytes?n=N&seed=S` — N pattern bytes, `Content-Length: N`.
//! - `POST /api/v4/upload?seed=S` — reads the body; answers its length, CRC
//!   and whether it matched the pattern.
//! - `GET  /api/v4/endless` — streams until the client goes away, then
//!   reports on [`Upstream::dropped`].
//! - `GET  /api/v4/hold` — answers headers, then one chunk, then waits forever.
//! - `GET  /api/v4/stall` — never answers.
//! - `GET  /api/v4/json1k[?delay_ms=D]` — exactly 1 KiB of JSON (after D ms);
//!   the benchmark's small request. [`Upstream::peak_concurrent`] reports how
//!   many were being answered at once.
//! - `GET  /api/v4/blob?n=N` — N bytes cut from one prebuilt 64 KiB chunk
//!   (no per-byte work: the benchmark's fast bulk source).
//! - `POST /api/v4/sink` — reads and discards the body; answers
//!   `{"len": N, "crc": C}` (CRC-32 of what came, so a sender can check it
//!   byte for byte at a fraction of a pattern compare's cost).
//! - `GET  /api/v4/cut?n=N[&length=1]` — N pattern bytes (seed 5), then the
//!   connection is cut (GitLab dying mid-body); with `length=1` the head
//!   announces `Content-Length: 2N`, else the body is chunked.

use super::pattern::{Pattern, Verifier};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A running upstream; stops when dropped.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<(String, String, http::HeaderMap)>>>,
    dropped_rx: tokio::sync::Mutex<mpsc::Receiver<Instant>>,
    stop: CancellationToken,
    peak: Arc<AtomicUsize>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    log: Arc<Mutex<Vec<(String, String, http::HeaderMap)>>>,
    dropped: mpsc::Sender<Instant>,
    busy: AtomicUsize,
    peak: Arc<AtomicUsize>,
    /// `/api/v4/bytes?hold_until=N` requests that have arrived so far.
    held: AtomicUsize,
    held_changed: tokio::sync::Notify,
}

/// How long a `hold_until` request waits for the others.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Size of the `/api/v4/json1k` body.
pub const JSON1K_LEN: usize = 1024;

/// The `/api/v4/json1k` body: a GitLab-like JSON object of exactly 1 KiB.
pub fn json1k() -> Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| {
        let head = r#"{"id":42,"name":"webapp","path_with_namespace":"demo-group/webapp","default_branch":"main","description":""#;
        let tail = r#""}"#;
        let mut s = String::from(head);
        while s.len() + tail.len() < JSON1K_LEN {
            s.push('x');
        }
        s.push_str(tail);
        Bytes::from(s)
    })
    .clone()
}

/// The 64 KiB chunk `/api/v4/blob` repeats, for a reader that checks every
/// byte it receives.
pub fn blob_chunk() -> Bytes {
    static CHUNK: OnceLock<Bytes> = OnceLock::new();
    CHUNK
        .get_or_init(|| Pattern::new(99).chunk(64 * 1024))
        .clone()
}

/// Decrements the busy gauge when dropped.
struct Busy<'a>(&'a AtomicUsize);
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends the instant it is dropped.
struct DropSignal(Option<mpsc::Sender<Instant>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.try_send(Instant::now());
        }
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    // The benchmark's endpoints skip the request log (it would grow by the
    // million).
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/api/v4/json1k") => {
            let n = shared.busy.fetch_add(1, Ordering::Relaxed) + 1;
            let _busy = Busy(&shared.busy);
            shared.peak.fetch_max(n, Ordering::Relaxed);
            let delay: u64 = query(&req, "delay_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            let mut r = Response::new(
                Full::new(json1k())
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            );
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            return Ok(r);
        }
        ("GET", "/api/v4/blob") => {
            let n: u64 = query(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let chunk = blob_chunk();
            let mut left = n;
            let stream = futures::stream::poll_fn(move |_| {
                if left == 0 {
                    return std::task::Poll::Ready(None);
                }
                let k = left.min(chunk.len() as u64) as usize;
                left -= k as u64;
                std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Frame::data(chunk.slice(..k)))))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-length", n.into());
            r.headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            return Ok(r);
        }
        ("POST", "/api/v4/sink") => {
            let mut len = 0u64;
            let mut crc = crc32fast::Hasher::new();
            let mut body = req.into_body();
            let mut failed = None;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            crc.update(d);
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            return Ok(full(
                200,
                serde_json::json!({"len": len, "crc": crc.finalize(), "error": failed}).to_string(),
            ));
        }
        _ => {}
    }
    shared.log.lock().unwrap().push((
        req.method().to_string(),
        req.uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        req.headers().clone(),
    ));
    let resp = match (req.method().as_str(), path.as_str()) {
        ("GET", "/api/v4/version") => full(200, r#"{"version":"17.5.0","revision":"test"}"#),
        ("POST", "/api/v4/echo") | ("PUT", "/api/v4/echo") => {
            let method = req.method().to_string();
            let ct = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut r = full(200, body);
            r.headers_mut()
                .insert("x-echo-method", method.parse().unwrap());
            if let Ok(v) = ct.parse() {
                r.headers_mut().insert("x-echo-content-type", v);
            }
            r
        }
        ("GET", "/api/v4/bytes") => {
            // `hold_until=N`: answer only once N such requests are here at
            // the same time (a 504 after HOLD_LIMIT says how many came), so
            // a 200 proves N requests were in flight at once.
            if let Some(want) = query(&req, "hold_until").and_then(|v| v.parse::<usize>().ok()) {
                let here = shared.held.fetch_add(1, Ordering::SeqCst) + 1;
                shared.peak.fetch_max(here, Ordering::Relaxed);
                shared.held_changed.notify_waiters();
                let all_here = async {
                    loop {
                        // Created before the check: notify_waiters reaches it.
                        let changed = shared.held_changed.notified();
                        if shared.held.load(Ordering::SeqCst) >= want {
                            return;
                        }
                        changed.await;
                    }
                };
                if tokio::time::timeout(HOLD_LIMIT, all_here).await.is_err() {
                    let came = shared.held.load(Ordering::SeqCst);
                    return Ok(full(
                        504,
                        format!(r#"{{"error":"only {came} of {want} requests arrived together"}}"#),
                    ));
                }
            }
            let n: u64 = query(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let seed: u64 = query(&req, "seed")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let mut p = Pattern::new(seed);
            let mut left = n;
            let stream = futures::stream::poll_fn(move |_| {
                if left == 0 {
                    return std::task::Poll::Ready(None);
                }
                let k = left.min(64 * 1024);
                left -= k;
                std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Frame::data(
                    p.chunk(k as usize),
                ))))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-length", n.into());
            r.headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            r
        }
        ("POST", "/api/v4/upload") => {
            let seed: u64 = query(&req, "seed")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let mut v = Verifier::new(seed);
            let mut ok = true;
            let mut body = req.into_body();
            let mut failed = None;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            ok &= v.feed(d);
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let len = v.len;
            let (tail_ok, crc) = v.finish();
            full(
                200,
                serde_json::json!({"len": len, "crc": crc, "matches": ok && tail_ok, "error": failed}).to_string(),
            )
        }
        ("GET", "/api/v4/endless") => {
            let signal = DropSignal(Some(shared.dropped.clone()));
            let mut p = Pattern::new(7);
            let stream = futures::stream::unfold((signal, 0u64), move |(sig, i)| {
                let chunk = p.chunk(16 * 1024);
                async move {
                    if i % 64 == 63 {
                        tokio::task::yield_now().await;
                    }
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk)), (sig, i + 1)))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        ("GET", "/api/v4/stall") => {
            futures::future::pending::<()>().await;
            full(500, "")
        }
        ("GET", "/api/v4/cut") => {
            let n: u64 = query(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let with_length = query(&req, "length").as_deref() == Some("1");
            let stream = futures::stream::unfold(
                (Pattern::new(5), n, false),
                |(mut p, left, done)| async move {
                    if done {
                        return None;
                    }
                    // Give the server a turn to flush what it has (head
                    // included) before the next step: GitLab died after
                    // sending these bytes, not before.
                    tokio::task::yield_now().await;
                    if left == 0 {
                        // An error mid-body makes hyper abort the connection.
                        let cut = std::io::Error::other("cut by the test");
                        return Some((Err(cut), (p, 0, true)));
                    }
                    let k = left.min(64 * 1024);
                    let chunk = Frame::data(p.chunk(k as usize));
                    Some((Ok(chunk), (p, left - k, false)))
                },
            );
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            if with_length {
                r.headers_mut().insert("content-length", (2 * n).into());
            }
            r
        }
        ("GET", "/api/v4/hold") => {
            let first = futures::stream::once(async {
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"first")))
            });
            let stream = first.chain(futures::stream::pending());
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => full(404, r#"{"error":"404 Not Found"}"#),
    };
    Ok(resp)
}

impl Upstream {
    /// Starts on an ephemeral port.
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(16);
        let peak = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            log: log.clone(),
            dropped: tx,
            busy: AtomicUsize::new(0),
            peak: peak.clone(),
            held: AtomicUsize::new(0),
            held_changed: tokio::sync::Notify::new(),
        });
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let _ = s.set_nodelay(true);
                let shared = shared.clone();
                let stop = stop2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            log,
            dropped_rx: tokio::sync::Mutex::new(rx),
            stop,
            peak,
        }
    }

    /// The most `/api/v4/json1k` requests answered at once, or the most
    /// `/api/v4/bytes?hold_until=` requests held at once, since the last call
    /// (the gauge is reset).
    pub fn peak_concurrent(&self) -> usize {
        self.peak.swap(0, Ordering::Relaxed)
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen: (method, path and query).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    }

    /// Headers of the last request to `path_prefix`.
    pub fn last_headers(&self, path_prefix: &str) -> Option<http::HeaderMap> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, p, _)| p.starts_with(path_prefix))
            .map(|(_, _, h)| h.clone())
    }

    /// Headers of every request to `path_prefix`, oldest first.
    pub fn all_headers(&self, path_prefix: &str) -> Vec<http::HeaderMap> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p.starts_with(path_prefix))
            .map(|(_, _, h)| h.clone())
            .collect()
    }

    /// Waits for the next "endless stream dropped" signal.
    pub async fn dropped(&self, timeout: std::time::Duration) -> Option<Instant> {
        let mut rx = self.dropped_rx.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }
}
