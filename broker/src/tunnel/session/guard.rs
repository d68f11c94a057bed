//! The handle that keeps one request alive at the agent.

use super::AgentSession;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Keeps a request alive; dropping it before the response ended cancels the
/// request at the agent (which aborts the upstream request).
pub struct RequestGuard {
    pub(super) session: Arc<AgentSession>,
    pub(super) id: u64,
    pub(super) pump: CancellationToken,
    pub(super) complete: bool,
}

impl RequestGuard {
    /// The caller received the whole response (its length was known, so the
    /// server stopped reading before End arrived): do not cancel on drop.
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// The request id on the stream.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The serving agent instance.
    pub fn instance(&self) -> &str {
        &self.session.instance
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.pump.cancel();
        let unfinished = self.session.lock().remove(&self.id);
        if let Some(p) = unfinished {
            p.credit.close();
            if !self.complete && !self.session.is_closed() {
                self.session.control.cancel(self.id);
            }
        }
        self.session.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
