//! The data queue of one tunnel stream, bounded in messages and in bytes.
//!
//! Request tasks queue heads, body chunks, ends and errors here; the stream's
//! writer ([`super::outbound::Outbound`]) takes them out for encoding. A
//! bound on the message count alone lets a queue full of body chunks hold
//! `count × largest chunk` (256 × 64 KiB = 16 MiB per stream), so Data frames
//! also take their payload size from a byte budget (a semaphore whose
//! permits are bytes) before they are queued, and give it back as soon as
//! the writer has taken them out. Messages without a body payload (heads,
//! ends, errors, pings, drain) take no budget and so never wait behind data
//! bytes, only for a free slot, as before. A chunk larger than the whole
//! budget takes the whole budget: it passes alone, never waits forever.
//! Control frames (credit, cancel, pong) do not go through this queue at all
//! (see [`super::outbound::Control`]).

use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Messages queued per stream before senders wait for a slot.
pub const QUEUE_MESSAGES: usize = 256;

/// Body bytes queued per stream before senders of Data frames wait.
///
/// 1 MiB: twice the default per-request window (512 KiB) and 16 chunks of
/// the largest size (64 KiB), so one bulk transfer is never held back by the
/// queue (its own window stops it first) and the writer always has a
/// backlog to encode while request tasks refill it; more than that only
/// adds memory, since what leaves the queue still has to fit through
/// HTTP/2 and the socket at the same rate. Before this bound, a stream's
/// queue could hold up to the sum of all its requests' windows.
pub const QUEUE_BYTES: usize = 1024 * 1024;

/// A queued message and the budget it holds until the writer takes it.
struct Queued<M> {
    msg: M,
    _charge: Option<OwnedSemaphorePermit>,
}

/// The sending half; cheap to clone.
pub struct Sender<M> {
    tx: mpsc::Sender<Queued<M>>,
    budget: Arc<Semaphore>,
    /// The whole budget: the most one message is charged.
    capacity: u32,
}

impl<M> Clone for Sender<M> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
            capacity: self.capacity,
        }
    }
}

impl<M> std::fmt::Debug for Sender<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("queue::Sender")
            .field("free_bytes", &self.budget.available_permits())
            .finish_non_exhaustive()
    }
}

/// The receiving half: the stream's writer.
pub struct Receiver<M> {
    rx: mpsc::Receiver<Queued<M>>,
    budget: Arc<Semaphore>,
}

/// A queue holding at most `messages` messages and `bytes` bytes of Data
/// payload (`bytes` is capped at `u32::MAX`, and is at least 1).
pub fn channel<M>(messages: usize, bytes: usize) -> (Sender<M>, Receiver<M>) {
    let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
    let budget = Arc::new(Semaphore::new(capacity as usize));
    let (tx, rx) = mpsc::channel(messages);
    (
        Sender {
            tx,
            budget: budget.clone(),
            capacity,
        },
        Receiver { rx, budget },
    )
}

impl<M> Sender<M> {
    /// Queues a message that carries no body payload, waiting only for a
    /// free slot. Fails (giving the message back) once the writer is gone.
    pub async fn send(&self, msg: M) -> Result<(), SendError<M>> {
        self.tx
            .send(Queued { msg, _charge: None })
            .await
            .map_err(|e| SendError(e.0.msg))
    }

    /// Queues a message carrying `bytes` of body payload: waits for that
    /// much budget (the whole budget if `bytes` exceeds it), then for a
    /// slot. Fails (giving the message back) once the writer is gone.
    pub async fn send_data(&self, msg: M, bytes: usize) -> Result<(), SendError<M>> {
        let charge = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.capacity);
        let charge = if charge == 0 {
            None
        } else {
            match self.budget.clone().acquire_many_owned(charge).await {
                Ok(permit) => Some(permit),
                // Closed: the writer is gone.
                Err(_) => return Err(SendError(msg)),
            }
        };
        self.tx
            .send(Queued {
                msg,
                _charge: charge,
            })
            .await
            .map_err(|e| SendError(e.0.msg))
    }

    /// Queues a message without body payload if a slot is free now.
    pub fn try_send(&self, msg: M) -> Result<(), TrySendError<M>> {
        self.tx
            .try_send(Queued { msg, _charge: None })
            .map_err(|e| match e {
                TrySendError::Full(q) => TrySendError::Full(q.msg),
                TrySendError::Closed(q) => TrySendError::Closed(q.msg),
            })
    }

    /// Whether the writer is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<M> Receiver<M> {
    /// The next message; its budget is given back as it is taken out.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<M>> {
        self.rx.poll_recv(cx).map(|q| q.map(|q| q.msg))
    }

    /// Waits for the next message (`None` once every sender is gone).
    pub async fn recv(&mut self) -> Option<M> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Result<M, TryRecvError> {
        self.rx.try_recv().map(|q| q.msg)
    }
}

impl<M> Drop for Receiver<M> {
    fn drop(&mut self) {
        // Senders waiting for budget learn that the writer is gone.
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `f` is still waiting after every other task had its turn.
    async fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        tokio::time::timeout(Duration::from_millis(1), f)
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_holds_and_comes_back_as_the_writer_reads() {
        let (tx, mut rx) = channel::<u32>(16, 100);
        tx.send_data(1, 60).await.unwrap();
        tx.send_data(2, 40).await.unwrap();
        // 100 of 100 bytes queued: the next chunk waits although slots are free.
        let third = tx.send_data(3, 10);
        tokio::pin!(third);
        assert!(pending(third.as_mut()).await);
        // Messages without payload still pass.
        tx.send(9).await.unwrap();
        // The writer takes 1 out: its 60 bytes come back, 3 goes in.
        assert_eq!(rx.recv().await, Some(1));
        third.await.unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(9));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(tx.budget.available_permits(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_budget_passes_alone() {
        let (tx, mut rx) = channel::<u32>(16, 100);
        tx.send_data(1, 10).await.unwrap();
        let big = tx.send_data(2, 1_000);
        tokio::pin!(big);
        // It waits for the whole budget...
        assert!(pending(big.as_mut()).await);
        assert_eq!(rx.recv().await, Some(1));
        // ...and gets it once the queue is empty of data.
        big.await.unwrap();
        let small = tx.send_data(3, 1);
        tokio::pin!(small);
        assert!(pending(small.as_mut()).await);
        assert_eq!(rx.recv().await, Some(2));
        small.await.unwrap();
        assert_eq!(rx.try_recv(), Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_count_still_bounds() {
        let (tx, mut rx) = channel::<u32>(2, 100);
        tx.send(1).await.unwrap();
        tx.send_data(2, 1).await.unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(rx.try_recv(), Ok(1));
        tx.try_send(3).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_wakes_senders_and_gives_messages_back() {
        let (tx, rx) = channel::<u32>(16, 10);
        tx.send_data(1, 10).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send_data(2, 5).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(SendError(2)));
        assert_eq!(tx.send(3).await, Err(SendError(3)));
        assert!(matches!(tx.try_send(4), Err(TrySendError::Closed(4))));
        assert!(tx.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_receiver_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel::<u32>(4, 10);
        tx.send_data(1, 3).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
    }
}
