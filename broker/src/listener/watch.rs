//! What an api connection is doing, and when it has been doing nothing for
//! too long.
//!
//! A [`ConnWatch`] per connection counts the requests in flight (from the
//! moment hyper hands the request to the service until the response body is
//! sent or dropped, see [`InFlightBody`]) and, for HTTP/1.x, notices the
//! first byte of the next request head ([`Tracked`]). From that it derives
//! one deadline ([`ConnWatch::expired`]):
//!
//! | state | deadline |
//! |---|---|
//! | a request in flight (reading its body, waiting for GitLab's head, streaming the answer) | none |
//! | HTTP/1.x, bytes of a request head received, head not complete | first byte + header-read timeout |
//! | nothing in flight, nothing received since | last request end (or connection start) + idle timeout |
//!
//! A long download, an upload, or a request waiting minutes for GitLab is
//! therefore never idle. (Bytes of a pipelined HTTP/1.1 head that arrive
//! while a request is in flight do not start the header clock; such a head
//! is bounded by the idle timeout instead.) For HTTP/2 only requests count: the broker's own
//! keep-alive PINGs are answered by the client, and those bytes must not keep
//! an unused connection open.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// No request head is being received.
const NONE: u64 = u64::MAX;

/// Why a connection's deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request in flight and nothing received for the idle timeout.
    Idle,
    /// A request head started but was not complete within the header-read
    /// timeout.
    HeadTimeout,
}

/// The activity of one api connection.
pub struct ConnWatch {
    epoch: Instant,
    /// HTTP/1.x: bytes read while nothing is in flight start a request head.
    track_reads: bool,
    idle_timeout: Duration,
    header_timeout: Duration,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when the last request ended.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` of the first byte of the head being
    /// received, or [`NONE`].
    head_since: AtomicU64,
    wake: Notify,
}

impl ConnWatch {
    /// A watch for a connection that starts now. `http1`: reads count as the
    /// start of a request head, and, since the protocol detection already
    /// read the first bytes, one is being received now.
    pub fn new(http1: bool, idle_timeout: Duration, header_timeout: Duration) -> Arc<Self> {
        Arc::new(ConnWatch {
            epoch: Instant::now(),
            track_reads: http1,
            idle_timeout,
            header_timeout,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(if http1 { 0 } else { NONE }),
            wake: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// A request reached the service; in flight until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_since.store(NONE, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn request_finished(&self) {
        // The idle clock is set before the count can reach zero, so the
        // watchdog never pairs "nothing in flight" with an older time.
        self.idle_since.store(self.now_ms(), Ordering::SeqCst);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.head_since.store(NONE, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        if !self.track_reads || self.in_flight.load(Ordering::SeqCst) > 0 {
            return;
        }
        if self
            .head_since
            .compare_exchange(NONE, self.now_ms(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Resolves when the connection's deadline passes (see the module doc).
    pub async fn expired(&self) -> Expiry {
        loop {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                self.wake.notified().await;
                continue;
            }
            let head = self.head_since.load(Ordering::SeqCst);
            let (deadline, why) = if head != NONE {
                (self.at(head) + self.header_timeout, Expiry::HeadTimeout)
            } else {
                let idle = self.idle_since.load(Ordering::SeqCst);
                (self.at(idle) + self.idle_timeout, Expiry::Idle)
            };
            if Instant::now() >= deadline {
                return why;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// One request in flight; dropping it ends the request for the watch.
pub struct RequestGuard(Arc<ConnWatch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

pin_project! {
    /// A response body that keeps its request in flight until it is sent
    /// in full or dropped.
    pub struct InFlightBody<B> {
        #[pin]
        inner: B,
        guard: RequestGuard,
    }
}

impl<B> InFlightBody<B> {
    /// `inner`, holding `guard` until it is dropped.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        InFlightBody { inner, guard }
    }
}

impl<B: Body<Data = Bytes>> Body for InFlightBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A stream that reports its reads to a [`ConnWatch`].
    pub struct Tracked<IO> {
        #[pin]
        inner: IO,
        watch: Arc<ConnWatch>,
    }
}

impl<IO> Tracked<IO> {
    /// `inner`, reporting to `watch`.
    pub fn new(inner: IO, watch: Arc<ConnWatch>) -> Self {
        Tracked { inner, watch }
    }
}

impl<IO: AsyncRead> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.project();
        let before = buf.filled().len();
        let r = me.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            me.watch.bytes_read();
        }
        r
    }
}

impl<IO: AsyncWrite> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const IDLE: Duration = Duration::from_secs(120);
    const HEAD: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn idle_after_the_last_request_ends() {
        let w = ConnWatch::new(false, IDLE, HEAD);
        let t0 = Instant::now();
        let g = w.request_started();
        // In flight: no deadline, however long it takes.
        let watching = {
            let w = w.clone();
            tokio::spawn(async move { (w.expired().await, Instant::now()) })
        };
        tokio::time::sleep(IDLE * 3).await;
        assert!(!watching.is_finished());
        drop(g);
        let ended = Instant::now();
        let (why, at) = watching.await.unwrap();
        assert_eq!(why, Expiry::Idle);
        assert_eq!(at - ended, IDLE);
        assert!(at - t0 >= IDLE * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn two_requests_the_later_end_counts() {
        let w = ConnWatch::new(false, IDLE, HEAD);
        let a = w.request_started();
        let b = w.request_started();
        drop(a);
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(w.in_flight(), 1);
        let ended = Instant::now();
        drop(b);
        assert_eq!(w.expired().await, Expiry::Idle);
        assert_eq!(Instant::now() - ended, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn http1_head_bytes_start_the_header_timeout() {
        // A new HTTP/1 connection has head bytes already (the detection).
        let w = ConnWatch::new(true, IDLE, HEAD);
        let t0 = Instant::now();
        assert_eq!(w.expired().await, Expiry::HeadTimeout);
        assert_eq!(Instant::now() - t0, HEAD);

        // After a request: idle until a byte arrives, then the head clock.
        let w = ConnWatch::new(true, IDLE, HEAD);
        drop(w.request_started());
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = Tracked::new(server, w.clone());
        tokio::time::sleep(IDLE / 2).await;
        client.write_all(b"G").await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
        let first_byte = Instant::now();
        assert_eq!(w.expired().await, Expiry::HeadTimeout);
        assert_eq!(Instant::now() - first_byte, HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_reads_do_not_count() {
        let w = ConnWatch::new(false, IDLE, HEAD);
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = Tracked::new(server, w.clone());
        let t0 = Instant::now();
        let pinger = tokio::spawn(async move {
            let mut b = [0u8; 1];
            loop {
                client.write_all(b"p").await.unwrap();
                server.read_exact(&mut b).await.unwrap();
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        assert_eq!(w.expired().await, Expiry::Idle);
        assert_eq!(Instant::now() - t0, IDLE);
        pinger.abort();
    }
}
