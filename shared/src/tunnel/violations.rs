//! A peer's protocol violations on one stream: counted, logged without
//! flooding, and, past [`MAX_PROTOCOL_VIOLATIONS`], the end of the stream.
//!
//! A violation is a frame the protocol does not allow: for an id never
//! issued, beyond the granted credit, out of order, oversized, with an
//! invalid status or unusable headers. The request it concerns (if any)
//! ends with `protocol_error` where it is detected; this counter is about
//! the stream. A buggy peer makes a few (and the stream goes on); a hostile
//! one could send millions, each worth a log line. So the first is logged
//! with its detail, later ones are summed into one summary line at most
//! every [`SUMMARY_EVERY`] (and when the stream ends), and at the limit the
//! stream is ended with one clear line.

use super::limits::MAX_PROTOCOL_VIOLATIONS;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// Shortest time between two summary lines of one stream.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What to do after a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the stream.
    Continue,
    /// The limit is reached: end the stream, for this reason.
    End(String),
}

#[derive(Debug, Default)]
struct State {
    total: u32,
    unreported: u32,
    last: String,
    last_report: Option<Instant>,
}

/// The violations of one stream by `peer` ("agent" or "broker").
#[derive(Debug)]
pub struct Violations {
    peer: &'static str,
    limit: u32,
    state: Mutex<State>,
}

impl Violations {
    /// A counter for a stream whose other end is `peer`, ending it at
    /// [`MAX_PROTOCOL_VIOLATIONS`].
    pub fn new(peer: &'static str) -> Self {
        Violations::with_limit(peer, MAX_PROTOCOL_VIOLATIONS)
    }

    /// The same with another limit (at least 1).
    pub fn with_limit(peer: &'static str, limit: u32) -> Self {
        Violations {
            peer,
            limit: limit.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one violation about request `id` (`what` is already free of
    /// peer-controlled text or sanitised). Logs the first one, a summary at
    /// most every [`SUMMARY_EVERY`], and the end at the limit.
    pub fn record(&self, id: u64, what: &str) -> Verdict {
        let mut s = self.lock();
        s.total = s.total.saturating_add(1);
        s.last.clear();
        s.last.push_str(what);
        let peer = self.peer;
        if s.total >= self.limit {
            warn!(
                peer,
                request_id = id,
                violations = s.total,
                limit = self.limit,
                "ending the stream: the {peer} broke the tunnel protocol {} times (the limit); last: {what}",
                s.total
            );
            s.unreported = 0;
            return Verdict::End(format!(
                "the {peer} broke the tunnel protocol {} times (limit {}); last: {what}",
                s.total, self.limit
            ));
        }
        if s.total == 1 {
            warn!(
                peer,
                request_id = id,
                violations = 1,
                "protocol violation by the {peer}: {what} (further ones are summarised)"
            );
            s.last_report = Some(Instant::now());
            return Verdict::Continue;
        }
        s.unreported += 1;
        if s.last_report.is_none_or(|t| t.elapsed() >= SUMMARY_EVERY) {
            Self::summary(peer, &mut s);
        }
        Verdict::Continue
    }

    /// Logs the summary of violations not reported yet, if any.
    pub fn flush(&self) {
        let mut s = self.lock();
        if s.unreported > 0 {
            Self::summary(self.peer, &mut s);
        }
    }

    /// Violations so far.
    pub fn total(&self) -> u32 {
        self.lock().total
    }

    /// The limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    fn summary(peer: &'static str, s: &mut State) {
        warn!(
            peer,
            violations = s.total,
            "{} more protocol violations by the {peer} ({} in total); last: {}",
            s.unreported,
            s.total,
            s.last
        );
        s.unreported = 0;
        s.last_report = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ends_at_the_limit() {
        let v = Violations::with_limit("agent", 5);
        for i in 0..4 {
            assert_eq!(
                v.record(i, "Data for a request never sent"),
                Verdict::Continue
            );
        }
        assert!(matches!(v.record(9, "End"), Verdict::End(r) if r.contains("5 times")));
        assert_eq!(v.total(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn default_limit_is_the_documented_one() {
        let v = Violations::new("broker");
        assert_eq!(v.limit(), MAX_PROTOCOL_VIOLATIONS);
        v.flush();
    }
}
