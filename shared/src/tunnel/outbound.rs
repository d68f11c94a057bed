//! The outbound side of one tunnel stream.
//!
//! Two sources feed the stream the gRPC library sends from:
//! - a queue of data-bearing messages (heads, body chunks, ends, errors,
//!   pings), bounded in messages and in body bytes ([`super::queue`]), which
//!   tasks await on; this is where backpressure from HTTP/2 reaches the
//!   request tasks;
//! - a [`Control`] table of credit, cancel and pong frames, posted without
//!   waiting (from `poll` or `Drop`), coalesced per request id, and sent
//!   before any queued data. Its size is bounded by the number of live
//!   requests, never by traffic.

use super::queue;
use futures::task::AtomicWaker;
use futures::Stream;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A control frame waiting to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlFrame {
    /// Hand `bytes` of credit back for request `id`.
    Credit {
        /// Request id.
        id: u64,
        /// Bytes.
        bytes: u32,
    },
    /// Cancel request `id`.
    Cancel(u64),
    /// Answer a ping.
    Pong(u64),
}

/// At most this many unanswered pongs are kept; older ones are useless.
const MAX_PONGS: usize = 4;

#[derive(Default)]
struct ControlState {
    credits: HashMap<u64, u64>,
    cancels: VecDeque<u64>,
    pongs: VecDeque<u64>,
}

/// Control frames waiting for the outbound stream.
#[derive(Default)]
pub struct Control {
    state: Mutex<ControlState>,
    waker: AtomicWaker,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// A new, shared table.
    pub fn new() -> Arc<Self> {
        Arc::new(Control::default())
    }

    fn with<R>(&self, f: impl FnOnce(&mut ControlState) -> R) -> R {
        let r = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s)
        };
        self.waker.wake();
        r
    }

    /// Queues credit for request `id`, merged with any credit not sent yet.
    pub fn credit(&self, id: u64, bytes: u32) {
        self.with(|s| *s.credits.entry(id).or_default() += u64::from(bytes));
    }

    /// Queues a cancel for request `id`; pending credit for it is dropped.
    pub fn cancel(&self, id: u64) {
        self.with(|s| {
            s.credits.remove(&id);
            s.cancels.push_back(id);
        });
    }

    /// Queues a pong.
    pub fn pong(&self, nonce: u64) {
        self.with(|s| {
            if s.pongs.len() >= MAX_PONGS {
                s.pongs.pop_front();
            }
            s.pongs.push_back(nonce);
        });
    }

    fn take(&self) -> Option<ControlFrame> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = s.cancels.pop_front() {
            return Some(ControlFrame::Cancel(id));
        }
        if let Some(n) = s.pongs.pop_front() {
            return Some(ControlFrame::Pong(n));
        }
        let id = *s.credits.keys().next()?;
        let total = s.credits.remove(&id).unwrap_or(0);
        let bytes = total.min(u64::from(u32::MAX));
        if total > bytes {
            s.credits.insert(id, total - bytes);
        }
        Some(ControlFrame::Credit {
            id,
            bytes: bytes as u32,
        })
    }
}

/// The stream handed to the gRPC library: control frames first, then data.
/// It ends when every data sender is dropped, or once `close` is cancelled
/// and everything queued before has been sent (a graceful half-close: the
/// peer receives every frame, then the end of the stream).
pub struct Outbound<M> {
    control: Arc<Control>,
    data: queue::Receiver<M>,
    to_msg: fn(ControlFrame) -> M,
    close: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<M> Outbound<M> {
    /// Builds the stream; `to_msg` turns a control frame into a wire message.
    pub fn new(
        control: Arc<Control>,
        data: queue::Receiver<M>,
        to_msg: fn(ControlFrame) -> M,
    ) -> Self {
        Outbound {
            control,
            data,
            to_msg,
            close: None,
        }
    }

    /// Ends the stream, after flushing what is queued, once `token` is cancelled.
    pub fn closed_by(mut self, token: CancellationToken) -> Self {
        self.close = Some(Box::pin(token.cancelled_owned()));
        self
    }
}

impl<M> Stream for Outbound<M> {
    type Item = M;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<M>> {
        let this = self.get_mut();
        // Register before looking, so a frame posted in between wakes us.
        this.control.waker.register(cx.waker());
        if let Some(frame) = this.control.take() {
            return Poll::Ready(Some((this.to_msg)(frame)));
        }
        match this.data.poll_recv(cx) {
            Poll::Pending => match this.close.as_mut().map(|c| c.as_mut().poll(cx)) {
                // Nothing queued and asked to close: end of stream.
                Some(Poll::Ready(())) => Poll::Ready(None),
                _ => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl<M> Unpin for Outbound<M> {}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn control_first_and_coalesced() {
        let control = Control::new();
        let (tx, rx) = queue::channel::<String>(4, 1024);
        let mut out = Outbound::new(control.clone(), rx, |f| format!("{f:?}"));
        tx.send("data".into()).await.unwrap();
        control.credit(7, 10);
        control.credit(7, 5);
        assert_eq!(out.next().await.unwrap(), "Credit { id: 7, bytes: 15 }");
        assert_eq!(out.next().await.unwrap(), "data");
        control.credit(8, 1);
        control.cancel(8);
        assert_eq!(out.next().await.unwrap(), "Cancel(8)");
        drop(tx);
        assert_eq!(out.next().await, None);
    }

    #[tokio::test]
    async fn close_flushes_then_ends() {
        let control = Control::new();
        let (tx, rx) = queue::channel::<String>(4, 1024);
        let close = CancellationToken::new();
        let mut out = Outbound::new(control, rx, |f| format!("{f:?}")).closed_by(close.clone());
        tx.send("a".into()).await.unwrap();
        tx.send("b".into()).await.unwrap();
        close.cancel();
        assert_eq!(out.next().await.unwrap(), "a");
        assert_eq!(out.next().await.unwrap(), "b");
        assert_eq!(out.next().await, None);
    }

    #[tokio::test]
    async fn posting_wakes_a_waiting_stream() {
        let control = Control::new();
        let (_tx, rx) = queue::channel::<String>(1, 1024);
        let mut out = Outbound::new(control.clone(), rx, |f| format!("{f:?}"));
        let c = control.clone();
        let h = tokio::spawn(async move { out.next().await });
        tokio::task::yield_now().await;
        c.pong(3);
        assert_eq!(h.await.unwrap().unwrap(), "Pong(3)");
    }
}
