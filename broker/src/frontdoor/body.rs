//! Bodies at the front door.
//!
//! [`Logged`] wraps a response body: it counts bytes, holds the request's
//! guards (in-flight slot, tunnel request) until the body is done, and writes
//! the request's one log line when dropped, saying whether the body completed.
//! [`SyncBody`] makes a caller's request body `Sync` for the HTTP client.

use crate::state::InFlightGuard;
use crate::tunnel::session::RequestGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::{info, warn};

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the request line says.
pub struct RequestLog {
    /// Connection id.
    pub connection: String,
    /// Tunnel request id (0 in direct mode).
    pub request_id: u64,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Status sent to the caller.
    pub status: u16,
    /// "agent" or "direct".
    pub mode: &'static str,
    /// Agent instance (agent mode).
    pub agent: String,
    /// Request body bytes forwarded.
    pub bytes_in: Arc<AtomicU64>,
    /// When the request arrived.
    pub started: Instant,
    /// Where metrics and events go.
    pub obs: Option<Obs>,
}

/// The request's link to metrics and the WatchTunnel feed.
pub struct Obs {
    /// The broker's observer.
    pub observer: Arc<crate::observe::Observer>,
    /// Sequence number given by `request_started`.
    pub seq: u64,
    /// When the request arrived.
    pub started: Instant,
}

/// A response body that logs and releases its guards when done.
pub struct Logged<B> {
    inner: B,
    log: RequestLog,
    bytes_out: u64,
    expected: Option<u64>,
    complete: bool,
    error: Option<String>,
    error_code: Option<&'static str>,
    guards: Guards,
}

/// What a response body keeps alive until it is done.
pub struct Guards {
    /// The tunnel request (agent mode).
    pub request: Option<RequestGuard>,
    /// The connection's in-flight slot.
    pub slot: InFlightGuard,
}

impl<B: Body> Logged<B> {
    /// Wraps `inner`; `guards` are dropped with the body. A body with a
    /// known length counts as complete once that many bytes went out (the
    /// server stops polling then).
    pub fn new(inner: B, log: RequestLog, guards: Guards) -> Self {
        let expected = inner.size_hint().exact();
        Logged {
            inner,
            log,
            bytes_out: 0,
            expected,
            complete: false,
            error: None,
            error_code: None,
            guards,
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.error = Some(e.to_string());
                this.error_code = Some(
                    e.downcast_ref::<gitproxy_shared::errors::GitproxyError>()
                        .map(|g| g.error.as_str())
                        .unwrap_or("upstream_unreachable"),
                );
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.complete = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Also true once a body of known length has gone out in full, so that
    /// an HTTP/2 server (the peer listener, an h2 caller) marks the last DATA
    /// frame END_STREAM instead of sending an empty frame after it, and the
    /// receiving side never resets a stream it has read to its end. HTTP/1.1
    /// stops at `Content-Length` the same way.
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() || self.expected.is_some_and(|n| n == self.bytes_out)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        let l = &self.log;
        let duration_ms = l.started.elapsed().as_millis() as u64;
        let bytes_in = l.bytes_in.load(Ordering::Relaxed);
        let complete = self.complete || self.expected == Some(self.bytes_out);
        if let Some(o) = &l.obs {
            o.observer.request_finished(crate::observe::Finished {
                seq: o.seq,
                connection: Some(l.connection.clone()),
                mode: l.mode,
                method: l.method.clone(),
                path: l.path.clone(),
                status: l.status,
                bytes_in,
                bytes_out: self.bytes_out,
                duration: l.started.elapsed(),
                // "aborted": the caller went away before the body was sent.
                error: match (complete, self.error_code) {
                    (true, _) => String::new(),
                    (false, Some(c)) => c.to_string(),
                    (false, None) => "aborted".to_string(),
                },
                tunnel_request_id: l.request_id,
                agent: l.agent.clone(),
            });
        }
        if complete {
            if let Some(g) = self.guards.request.as_mut() {
                g.mark_complete();
            }
            info!(connection = %l.connection, request_id = l.request_id, mode = l.mode, agent = %l.agent, method = %l.method, path = %l.path, status = l.status, bytes_in, bytes_out = self.bytes_out, duration_ms, "request");
        } else {
            let why = self.error.as_deref().unwrap_or("the caller went away");
            warn!(connection = %l.connection, request_id = l.request_id, mode = l.mode, agent = %l.agent, method = %l.method, path = %l.path, status = l.status, bytes_in, bytes_out = self.bytes_out, duration_ms, "request aborted mid-body: {why}");
        }
    }
}

/// A caller's request body made `Sync` (it is only ever polled through
/// `&mut`), counting bytes, with a size hint fixed at creation.
pub struct SyncBody<B> {
    inner: sync_wrapper::SyncWrapper<B>,
    hint: SizeHint,
    counted: Arc<AtomicU64>,
}

impl<B> SyncBody<B> {
    /// Wraps `inner` with its `Content-Length`, if any.
    pub fn new(inner: B, content_length: Option<u64>, counted: Arc<AtomicU64>) -> Self {
        let hint = content_length.map(SizeHint::with_exact).unwrap_or_default();
        SyncBody {
            inner: sync_wrapper::SyncWrapper::new(inner),
            hint,
            counted,
        }
    }
}

impl<B> Body for SyncBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(this.inner.get_mut()).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.counted.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
