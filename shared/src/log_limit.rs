//! Rate-limited logging of an error that repeats: one line when an episode of
//! failures starts, at most one summary line per period while it lasts, and
//! one line with the count when it ends (the next success).
//!
//! A failing loop (`accept` out of file descriptors, a peer refusing every
//! dial) would otherwise write a line per attempt. [`EpisodeLog`] only
//! decides; the caller writes the line, so each keeps its own level, message
//! and fields:
//!
//! ```
//! use gitproxy_shared::log_limit::{EpisodeLog, Report};
//! use std::time::{Duration, Instant};
//!
//! let mut errors = EpisodeLog::new(Duration::from_secs(10));
//! match errors.failure(Instant::now()) {
//!     Report::Started => { /* warn!("accept failing: {e}") */ }
//!     Report::Ongoing { count, .. } => { /* warn!(count, "accept still failing") */ let _ = count; }
//!     Report::Suppressed => {}
//! }
//! if let Some(end) = errors.success(Instant::now()) {
//!     /* warn!(errors = end.total, "accept errors ended") */ let _ = end;
//! }
//! ```
//!
//! Time is passed in, so the decisions are plain functions of their inputs.

use std::time::{Duration, Instant};

/// What the caller should log for one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The first failure of an episode: log it in full.
    Started,
    /// The episode goes on and a period has passed since the last line: log
    /// a summary.
    Ongoing {
        /// Failures since the previous line (this one included).
        count: u64,
        /// Failures since the episode started.
        total: u64,
        /// How long the episode has lasted.
        lasted: Duration,
    },
    /// Counted; nothing to log.
    Suppressed,
}

/// An episode that just ended: log it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Failures during the episode.
    pub total: u64,
    /// Failures not yet reported in a line (since the last one).
    pub unreported: u64,
    /// From the first failure to the success that ended it.
    pub lasted: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    started: Instant,
    last_line: Instant,
    total: u64,
    since_line: u64,
}

/// Decides which failures of a repeating error are logged.
#[derive(Debug, Clone)]
pub struct EpisodeLog {
    every: Duration,
    episode: Option<Episode>,
}

impl EpisodeLog {
    /// A limiter writing at most one summary per `every` during an episode.
    pub fn new(every: Duration) -> Self {
        EpisodeLog {
            every,
            episode: None,
        }
    }

    /// Records a failure at `now`.
    pub fn failure(&mut self, now: Instant) -> Report {
        let Some(ep) = self.episode.as_mut() else {
            self.episode = Some(Episode {
                started: now,
                last_line: now,
                total: 1,
                since_line: 0,
            });
            return Report::Started;
        };
        ep.total += 1;
        ep.since_line += 1;
        if now.saturating_duration_since(ep.last_line) >= self.every {
            let count = ep.since_line;
            ep.since_line = 0;
            ep.last_line = now;
            return Report::Ongoing {
                count,
                total: ep.total,
                lasted: now.saturating_duration_since(ep.started),
            };
        }
        Report::Suppressed
    }

    /// Records a success at `now`; returns the episode it ends, if any.
    pub fn success(&mut self, now: Instant) -> Option<Ended> {
        self.episode.take().map(|ep| Ended {
            total: ep.total,
            unreported: ep.since_line,
            lasted: now.saturating_duration_since(ep.started),
        })
    }

    /// Whether failures are being counted now.
    pub fn in_episode(&self) -> bool {
        self.episode.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn one_line_per_episode_start_period_and_end() {
        let t0 = Instant::now();
        let mut l = EpisodeLog::new(10 * S);
        assert_eq!(l.success(t0), None, "no episode, nothing ended");
        assert_eq!(l.failure(t0), Report::Started);
        assert!(l.in_episode());
        // A thousand failures inside the first period: all silent.
        for i in 1..=1000 {
            assert_eq!(l.failure(t0 + Duration::from_millis(i)), Report::Suppressed);
        }
        assert_eq!(
            l.failure(t0 + 10 * S),
            Report::Ongoing {
                count: 1001,
                total: 1002,
                lasted: 10 * S
            }
        );
        assert_eq!(l.failure(t0 + 11 * S), Report::Suppressed);
        assert_eq!(
            l.success(t0 + 12 * S),
            Some(Ended {
                total: 1003,
                unreported: 1,
                lasted: 12 * S
            })
        );
        assert!(!l.in_episode());
        // The next failure starts a new episode.
        assert_eq!(l.failure(t0 + 13 * S), Report::Started);
        assert_eq!(
            l.success(t0 + 13 * S),
            Some(Ended {
                total: 1,
                unreported: 0,
                lasted: Duration::ZERO
            })
        );
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + 100 * S;
        let mut l = EpisodeLog::new(S);
        assert_eq!(l.failure(t0), Report::Started);
        assert_eq!(l.failure(t0 - 50 * S), Report::Suppressed);
        assert_eq!(
            l.success(t0 - 60 * S).map(|e| e.lasted),
            Some(Duration::ZERO)
        );
    }
}
