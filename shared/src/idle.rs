//! The body idle timeout: a body that has nothing to give for too long,
//! *while someone is waiting for it*, ends with a `timeout` error.
//!
//! A frozen GitLab (or a peer that keeps a body open without data) would
//! otherwise hold a request, its in-flight slot and its buffers forever: the
//! request timeout only bounds the wait for the response head. The timer
//! runs only while the body is polled and has nothing ready — it starts at
//! the first `Pending` of a wait and is cleared by the next frame — so a
//! consumer that is slow to read (and therefore does not poll) never trips
//! it. Zero disables it.
//!
//! - [`IdleTimeout`]: an `http_body::Body` wrapper (the broker's response
//!   bodies in both modes, the agent's request bodies to GitLab);
//! - [`within`]: the same rule for one awaited step (the agent reading
//!   GitLab's next chunk, the broker reading the caller's next upload chunk),
//!   where waiting on the other side (credit) is not counted.

use crate::errors::{ErrorCode, GitproxyError};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default idle time (`--body-idle-timeout`, `GITPROXY_BODY_IDLE_TIMEOUT`).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The error of a body that stayed idle: `timeout`, naming what was silent.
pub fn idle_error(what: &str, idle: Duration) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::Timeout,
        format!(
            "{what} sent no data for {}s (body idle timeout, GITPROXY_BODY_IDLE_TIMEOUT)",
            idle.as_secs_f32()
        ),
    )
}

/// Awaits `f`, giving up after `idle` (never when `idle` is zero).
pub async fn within<F: Future>(idle: Duration, f: F) -> Option<F::Output> {
    if idle.is_zero() {
        Some(f.await)
    } else {
        tokio::time::timeout(idle, f).await.ok()
    }
}

/// A body that fails with [`idle_error`] when it stays `Pending` for
/// `idle` while being polled.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    what: &'static str,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    expired: bool,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; `what` names the silent side in the error
    /// ("GitLab's response body").
    pub fn new(inner: B, idle: Duration, what: &'static str) -> Self {
        IdleTimeout {
            inner,
            idle,
            what,
            timer: None,
            armed: false,
            expired: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
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
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending if this.idle.is_zero() => Poll::Pending,
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.expired = true;
                        Poll::Ready(Some(Err(Box::new(idle_error(this.what, this.idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed by a channel: `Pending` until something is sent.
    struct Fed(mpsc::Receiver<Bytes>);
    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_while_polled_is_an_error() {
        let (tx, rx) = mpsc::channel(4);
        let mut b = IdleTimeout::new(Fed(rx), Duration::from_secs(10), "GitLab");
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let g = e.downcast_ref::<GitproxyError>().unwrap();
        assert_eq!(g.error, ErrorCode::Timeout);
        assert!(b.frame().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn time_not_polled_does_not_count_and_data_rearms() {
        let (tx, rx) = mpsc::channel(4);
        let mut b = IdleTimeout::new(Fed(rx), Duration::from_secs(10), "GitLab");
        // The consumer does not poll for a long time (a slow caller).
        tokio::time::sleep(Duration::from_secs(100)).await;
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        // Waits shorter than the idle time, each ended by data, never trip.
        for _ in 0..5 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                let _ = tx.send(Bytes::from_static(b"b")).await;
            });
            assert!(b.frame().await.unwrap().is_ok());
        }
        drop(tx);
        assert!(b.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_disables() {
        let (tx, rx) = mpsc::channel(4);
        let mut b = IdleTimeout::new(Fed(rx), Duration::ZERO, "GitLab");
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100_000)).await;
            let _ = tx2.send(Bytes::from_static(b"late")).await;
        });
        assert!(b.frame().await.unwrap().is_ok());
        assert!(within(Duration::ZERO, async { 1 }).await == Some(1));
        assert!(within(Duration::from_secs(1), std::future::pending::<()>())
            .await
            .is_none());
        drop(tx);
    }
}
