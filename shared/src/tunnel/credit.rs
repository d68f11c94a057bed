//! Per-request credit, one instance per direction.
//!
//! The sender holds a [`SendCredit`]: it must acquire a frame's cost before
//! sending it, and the peer's Credit frames replenish it. The receiver holds a
//! [`RecvWindow`]: the stream reader charges every frame it queues (and ends
//! the request when the peer overruns the window), the consumer releases what
//! it has taken through a [`CreditReturner`], which says when to send Credit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The credit a sender may still spend on one request.
#[derive(Debug, Clone)]
pub struct SendCredit {
    sem: Arc<Semaphore>,
    window: usize,
}

/// The peer broke the flow-control rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    /// The peer granted more than its window.
    #[error("peer granted more credit than its window")]
    OverGranted,
    /// The peer sent more than the granted credit.
    #[error("peer sent more data than its credit allowed")]
    Overrun,
    /// The request ended; no more credit will come.
    #[error("request closed")]
    Closed,
}

impl SendCredit {
    /// Starts with the peer's full window.
    pub fn new(window: usize) -> Self {
        SendCredit {
            sem: Arc::new(Semaphore::new(window)),
            window,
        }
    }

    /// Waits until `cost` can be spent, then spends it.
    pub async fn acquire(&self, cost: usize) -> Result<(), CreditError> {
        let n = u32::try_from(cost.min(self.window)).map_err(|_| CreditError::Overrun)?;
        self.sem
            .acquire_many(n)
            .await
            .map(|p| p.forget())
            .map_err(|_| CreditError::Closed)
    }

    /// Adds credit the peer handed back.
    pub fn grant(&self, n: usize) -> Result<(), CreditError> {
        if self.sem.available_permits().saturating_add(n) > self.window {
            return Err(CreditError::OverGranted);
        }
        self.sem.add_permits(n);
        Ok(())
    }

    /// Wakes every waiter with [`CreditError::Closed`].
    pub fn close(&self) {
        self.sem.close();
    }

    /// Credit available now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// What a receiver has buffered for one request and not yet handed back.
#[derive(Debug)]
pub struct RecvWindow {
    outstanding: AtomicUsize,
    window: usize,
}

impl RecvWindow {
    /// A window of `window` bytes.
    pub fn new(window: usize) -> Arc<Self> {
        Arc::new(RecvWindow {
            outstanding: AtomicUsize::new(0),
            window,
        })
    }

    /// Charges a received frame; an error means the peer overran its credit.
    pub fn charge(&self, cost: usize) -> Result<(), CreditError> {
        let now = self.outstanding.fetch_add(cost, Ordering::AcqRel) + cost;
        if now > self.window {
            Err(CreditError::Overrun)
        } else {
            Ok(())
        }
    }

    fn release(&self, n: usize) {
        self.outstanding.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes buffered now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }
}

/// The consumer's side of a [`RecvWindow`]: batches consumed bytes into
/// Credit frames of at least the return threshold.
#[derive(Debug)]
pub struct CreditReturner {
    window: Arc<RecvWindow>,
    unreturned: usize,
    threshold: usize,
}

impl CreditReturner {
    /// A returner for `window`, handing back credit every `threshold` bytes.
    pub fn new(window: Arc<RecvWindow>, threshold: usize) -> Self {
        CreditReturner {
            window,
            unreturned: 0,
            threshold: threshold.max(1),
        }
    }

    /// Records a consumed frame; returns the credit to send, if it is time.
    pub fn consumed(&mut self, cost: usize) -> Option<u32> {
        self.unreturned += cost;
        if self.unreturned >= self.threshold {
            let n = self.unreturned.min(u32::MAX as usize);
            self.unreturned -= n;
            self.window.release(n);
            Some(n as u32)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sender_waits_for_credit_and_peer_cannot_overgrant() {
        let c = SendCredit::new(100);
        c.acquire(60).await.unwrap();
        c.acquire(40).await.unwrap();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.acquire(10).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.grant(50).unwrap();
        waiter.await.unwrap().unwrap();
        assert_eq!(c.grant(100), Err(CreditError::OverGranted));
        c.close();
        assert_eq!(c.acquire(1).await, Err(CreditError::Closed));
    }

    #[test]
    fn receiver_detects_overrun_and_returns_in_batches() {
        let w = RecvWindow::new(100);
        w.charge(60).unwrap();
        w.charge(40).unwrap();
        assert_eq!(w.charge(1), Err(CreditError::Overrun));
        let w = RecvWindow::new(100);
        let mut r = CreditReturner::new(w.clone(), 25);
        w.charge(20).unwrap();
        assert_eq!(r.consumed(20), None);
        w.charge(20).unwrap();
        assert_eq!(r.consumed(20), Some(40));
        assert_eq!(w.outstanding(), 0);
    }
}
