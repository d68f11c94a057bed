//! Bodies at the front door.
//!
//! [`Logged`] wraps a response body: it counts bytes, holds the request's
//! guards (in-flight slot, tunnel request) until the body is done, and when
//! dropped finishes the request's record (`observe::record`): metrics,
//! `WatchTunnel` event and the one log line, saying whether the body
//! completed.
//! [`CountedBody`] counts a caller's request body on its way to GitLab
//! (direct mode).

use crate::observe::{Observer, RequestRecord};
use crate::state::InFlightGuard;
use crate::tunnel::session::RequestGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a response body needs to finish the request's record.
pub struct Finish {
    /// The record, filled in up to the answer's head.
    pub record: RequestRecord,
    /// Request body bytes forwarded so far (counted by the request body).
    pub bytes_in: Arc<AtomicU64>,
    /// Where the record's metrics and event go.
    pub observer: Arc<Observer>,
}

/// A response body that logs and releases its guards when done.
pub struct Logged<B> {
    inner: B,
    finish: Finish,
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
    pub fn new(inner: B, finish: Finish, guards: Guards) -> Self {
        let expected = inner.size_hint().exact();
        Logged {
            inner,
            finish,
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
        let complete = self.complete || self.expected == Some(self.bytes_out);
        let r = &mut self.finish.record;
        r.bytes_in = self.finish.bytes_in.load(Ordering::Relaxed);
        r.bytes_out = self.bytes_out;
        r.stop_clock();
        // "aborted": the caller went away before the body was sent.
        r.error = match (complete, self.error_code) {
            (true, _) => "",
            (false, Some(c)) => c,
            (false, None) => "aborted",
        };
        self.finish.observer.request_finished(r);
        if complete {
            if let Some(g) = self.guards.request.as_mut() {
                g.mark_complete();
            }
            r.log(None);
        } else {
            r.log(Some(
                self.error.as_deref().unwrap_or("the caller went away"),
            ));
        }
    }
}

/// A caller's request body counting bytes, with a size hint fixed at
/// creation.
pub struct CountedBody<B> {
    inner: B,
    hint: SizeHint,
    counted: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    /// Wraps `inner` with its `Content-Length`, if any.
    pub fn new(inner: B, content_length: Option<u64>, counted: Arc<AtomicU64>) -> Self {
        let hint = content_length.map(SizeHint::with_exact).unwrap_or_default();
        CountedBody {
            inner,
            hint,
            counted,
        }
    }
}

impl<B> Body for CountedBody<B>
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
