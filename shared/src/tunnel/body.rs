//! The receiving half of one request's body (the request body at the agent,
//! the response body at the broker), as an `http_body::Body`.
//!
//! The stream reader pushes chunks into a bounded channel whose capacity is
//! guaranteed by the credit rules (it never waits); this side hands credit
//! back through the [`Control`] table as its consumer reads.

use super::credit::{CreditReturner, RecvWindow};
use super::outbound::Control;
use super::FlowSettings;
use crate::errors::{ErrorCode, GitproxyError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// One item of a body channel.
#[derive(Debug)]
enum BodyItem {
    Data(Bytes),
    End,
    Failed(GitproxyError),
}

/// Creates the two halves of a body channel for request `id`. The sender is
/// for the stream reader ([`BodySender::push`]), the receiver for the consumer.
pub fn channel(
    id: u64,
    flow: FlowSettings,
    control: Arc<Control>,
    content_length: Option<u64>,
) -> (BodySender, BodyReceiver) {
    let (tx, rx) = mpsc::channel(flow.max_buffered_frames());
    let window = RecvWindow::new(flow.window_bytes as usize);
    let sender = BodySender {
        tx,
        window: window.clone(),
        flow,
    };
    let receiver = BodyReceiver {
        rx: Some(rx),
        whole: None,
        returner: Some(CreditReturner::new(window, flow.return_threshold())),
        control,
        id,
        flow,
        remaining: content_length,
        received: 0,
        finished: false,
        failed: false,
    };
    (sender, receiver)
}

/// The stream reader's half. Never waits.
#[derive(Debug)]
pub struct BodySender {
    tx: mpsc::Sender<BodyItem>,
    window: Arc<RecvWindow>,
    flow: FlowSettings,
}

/// Why a chunk could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The peer exceeded its credit: a protocol error for this request.
    Overrun,
    /// The consumer is gone (it no longer wants the body); drop the chunk.
    Gone,
}

impl BodySender {
    /// Queues a chunk, charging its cost to the window.
    pub fn push(&self, data: Bytes) -> Result<(), PushError> {
        if self.tx.is_closed() {
            return Err(PushError::Gone);
        }
        self.window
            .charge(self.flow.frame_cost(data.len()))
            .map_err(|_| PushError::Overrun)?;
        self.tx.try_send(BodyItem::Data(data)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PushError::Overrun,
            mpsc::error::TrySendError::Closed(_) => PushError::Gone,
        })
    }

    /// Cost of the chunks queued and not yet handed back as credit: at most
    /// the window while the peer keeps to its credit.
    pub fn buffered(&self) -> usize {
        self.window.outstanding()
    }

    /// Ends the body with an error. The channel keeps a slot for it
    /// (see [`FlowSettings::max_buffered_frames`]).
    pub fn fail(self, err: GitproxyError) {
        let _ = self.tx.try_send(BodyItem::Failed(err));
    }

    /// Ends the body cleanly (the peer sent End). Dropping a sender without
    /// `end` makes the consumer see an error, never a clean end.
    pub fn end(self) {
        let _ = self.tx.try_send(BodyItem::End);
    }
}

/// The consumer's half: an `http_body::Body` that ends cleanly only when the
/// peer sent End, and with an error otherwise, so a cut body is never
/// mistaken for a complete one.
#[derive(Debug)]
pub struct BodyReceiver {
    /// `None` for a whole body that came with its head.
    rx: Option<mpsc::Receiver<BodyItem>>,
    /// The whole body carried by the head, until it is read.
    whole: Option<Bytes>,
    /// Hands credit back as chunks are read (channel bodies only).
    returner: Option<CreditReturner>,
    control: Arc<Control>,
    id: u64,
    flow: FlowSettings,
    remaining: Option<u64>,
    received: u64,
    finished: bool,
    failed: bool,
}

impl BodyReceiver {
    /// A body that arrived whole with its head (`inline-body-v1`): no
    /// channel and no credit to hand back, since the peer's half of the
    /// request has already ended.
    pub fn whole(id: u64, data: Bytes, flow: FlowSettings, control: Arc<Control>) -> Self {
        BodyReceiver {
            rx: None,
            remaining: Some(data.len() as u64),
            whole: Some(data),
            returner: None,
            control,
            id,
            flow,
            received: 0,
            finished: false,
            failed: false,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// True once the body ended cleanly.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The request id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl http_body::Body for BodyReceiver {
    type Data = Bytes;
    type Error = GitproxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, GitproxyError>>> {
        let this = self.get_mut();
        if this.finished || this.failed {
            return Poll::Ready(None);
        }
        let Some(rx) = this.rx.as_mut() else {
            this.finished = true;
            let data = this.whole.take().unwrap_or_default();
            this.received = data.len() as u64;
            this.remaining = Some(0);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        };
        match rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(BodyItem::Data(data))) => {
                let cost = this.flow.frame_cost(data.len());
                if let Some(n) = this.returner.as_mut().and_then(|r| r.consumed(cost)) {
                    this.control.credit(this.id, n);
                }
                this.received += data.len() as u64;
                if let Some(r) = this.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(BodyItem::End)) => {
                this.finished = true;
                rx.close();
                Poll::Ready(None)
            }
            Poll::Ready(Some(BodyItem::Failed(e))) => {
                this.failed = true;
                rx.close();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.failed = true;
                Poll::Ready(Some(Err(GitproxyError::new(
                    ErrorCode::AgentDisconnected,
                    "the body was cut before its end",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util_lite::collect;

    mod http_body_util_lite {
        use super::*;
        pub async fn collect(mut b: BodyReceiver) -> (Vec<u8>, Option<GitproxyError>) {
            let mut out = Vec::new();
            loop {
                let f =
                    std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut b), cx))
                        .await;
                match f {
                    None => return (out, None),
                    Some(Ok(f)) => out.extend_from_slice(f.data_ref().unwrap()),
                    Some(Err(e)) => return (out, Some(e)),
                }
            }
        }
    }

    fn flow() -> FlowSettings {
        FlowSettings {
            window_bytes: 4096,
            min_frame_cost: 256,
            max_chunk_bytes: 1024,
        }
    }

    #[tokio::test]
    async fn delivers_and_returns_credit() {
        let control = Control::new();
        let (tx, rx) = channel(1, flow(), control.clone(), Some(2048));
        tx.push(Bytes::from(vec![1u8; 1024])).unwrap();
        tx.push(Bytes::from(vec![2u8; 1024])).unwrap();
        tx.end();
        let (data, err) = collect(rx).await;
        assert_eq!(data.len(), 2048);
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn a_whole_body_is_one_frame_then_a_clean_end() {
        let rx = BodyReceiver::whole(1, Bytes::from_static(b"{}"), flow(), Control::new());
        assert_eq!(http_body::Body::size_hint(&rx).exact(), Some(2));
        assert!(!http_body::Body::is_end_stream(&rx));
        let mut rx = rx;
        let f = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut rx), cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.data_ref().unwrap(), &Bytes::from_static(b"{}"));
        assert!(http_body::Body::is_end_stream(&rx));
        assert_eq!(rx.received(), 2);
        let (rest, err) = collect(rx).await;
        assert!(rest.is_empty() && err.is_none());
    }

    #[tokio::test]
    async fn overrun_is_detected() {
        let (tx, _rx) = channel(1, flow(), Control::new(), None);
        for _ in 0..16 {
            tx.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Overrun));
    }

    #[tokio::test]
    async fn error_ends_body_after_data() {
        let (tx, rx) = channel(1, flow(), Control::new(), None);
        tx.push(Bytes::from_static(b"abc")).unwrap();
        tx.fail(GitproxyError::new(ErrorCode::AgentDisconnected, "gone"));
        let (data, err) = collect(rx).await;
        assert_eq!(data, b"abc");
        assert_eq!(err.unwrap().error, ErrorCode::AgentDisconnected);
    }

    #[tokio::test]
    async fn dropped_sender_is_never_a_clean_end() {
        let (tx, rx) = channel(1, flow(), Control::new(), None);
        tx.push(Bytes::from_static(b"abc")).unwrap();
        drop(tx);
        let (data, err) = collect(rx).await;
        assert_eq!(data, b"abc");
        assert!(err.is_some());
    }
}
