//! A request body that can be sent a second time: the bytes read from the
//! caller are kept (up to a limit) so that, when a peer refuses a request
//! before using it (`agent_not_connected`) or cannot be reached, the same
//! request goes to another replica. Past the limit nothing more is kept and
//! no further attempt is possible.
//!
//! Each attempt gets a [`ReplayView`]: it yields the kept bytes first, then
//! reads on from the caller (keeping what it reads while under the limit).
//! Starting an attempt supersedes the previous one: a view of an older
//! attempt that is still polled gets an error instead of stealing bytes.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct State<B> {
    inner: B,
    kept: Vec<Bytes>,
    kept_len: usize,
    limit: usize,
    /// More than `limit` bytes were read (or the body failed): no replay.
    spent: bool,
    ended: bool,
    attempt: u32,
}

/// The caller's body, shared by the attempts.
pub struct Replay<B> {
    state: Arc<Mutex<State<B>>>,
    hint: SizeHint,
    counted: Arc<AtomicU64>,
}

impl<B> Replay<B> {
    /// Wraps `inner`, keeping up to `limit` bytes; `content_length` is the
    /// caller's, if any; `counted` adds up the bytes read from the caller.
    pub fn new(
        inner: B,
        limit: usize,
        content_length: Option<u64>,
        counted: Arc<AtomicU64>,
    ) -> Self {
        Replay {
            state: Arc::new(Mutex::new(State {
                inner,
                kept: Vec::new(),
                kept_len: 0,
                limit,
                spent: false,
                ended: false,
                attempt: 0,
            })),
            hint: content_length.map(SizeHint::with_exact).unwrap_or_default(),
            counted,
        }
    }

    /// The body of the next attempt, or `None` when what was read already
    /// cannot be sent again.
    pub fn next_attempt(&self) -> Option<ReplayView<B>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.spent {
            return None;
        }
        s.attempt += 1;
        Some(ReplayView {
            state: self.state.clone(),
            attempt: s.attempt,
            pos: 0,
            hint: self.hint,
            counted: self.counted.clone(),
        })
    }
}

/// One attempt's view of the body.
pub struct ReplayView<B> {
    state: Arc<Mutex<State<B>>>,
    attempt: u32,
    pos: usize,
    hint: SizeHint,
    counted: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body moved to another attempt")]
struct Superseded;

impl<B> Body for ReplayView<B>
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
        let mut s = this.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if !s.spent && this.pos < s.kept.len() {
            let d = s.kept[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.counted.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if !s.spent {
                        s.kept_len += d.len();
                        if s.kept_len > s.limit {
                            s.spent = true;
                            s.kept = Vec::new();
                        } else {
                            s.kept.push(d.clone());
                            this.pos += 1;
                        }
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                s.spent = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(chunks: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn read<B>(v: ReplayView<B>) -> Result<Vec<u8>, BoxError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        Ok(v.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_whole() {
        let n = Arc::new(AtomicU64::new(0));
        let r = Replay::new(body(&[b"hello ", b"world"]), 64, Some(11), n.clone());
        let mut first = r.next_attempt().unwrap();
        // The first attempt read one chunk before the peer refused it.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hello ");
        let second = r.next_attempt().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "superseded");
        assert_eq!(read(second).await.unwrap(), b"hello world");
        assert_eq!(n.load(Ordering::Relaxed), 11);
        // Read whole: still replayable.
        assert_eq!(
            read(r.next_attempt().unwrap()).await.unwrap(),
            b"hello world"
        );
    }

    #[tokio::test]
    async fn past_the_limit_no_second_attempt() {
        let n = Arc::new(AtomicU64::new(0));
        let r = Replay::new(body(&[b"0123456789", b"abcdefghij"]), 15, None, n);
        assert_eq!(
            read(r.next_attempt().unwrap()).await.unwrap(),
            b"0123456789abcdefghij"
        );
        assert!(r.next_attempt().is_none());
    }

    #[tokio::test]
    async fn an_untouched_body_can_always_go_elsewhere() {
        let n = Arc::new(AtomicU64::new(0));
        let r = Replay::new(body(&[b"x"]), 0, None, n);
        let _unused = r.next_attempt().unwrap();
        assert_eq!(read(r.next_attempt().unwrap()).await.unwrap(), b"x");
    }
}
