//! One request's record on the agent, [`RequestRecord`]: filled in as the
//! request is replayed against GitLab (`request.rs`) or refused
//! (`session/reader.rs`), and the one source of the request's log line and
//! its metrics (`metrics::AgentMetrics::request_finished` reads it).
//!
//! The log line's fields are listed once, in [`record_line!`]: a new field
//! is a field of the struct, a line there and the code that fills it in.

use crate::metrics::AgentMetrics;
use gitproxy_shared::errors::ErrorCode;
use std::borrow::Cow;
use std::time::Instant;

/// One request served by the agent.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    /// The tunnel's request id.
    pub request_id: u64,
    /// HTTP method (sanitised for the log; borrowed from the request's
    /// head unless sanitising changed it).
    pub method: Cow<'a, str>,
    /// Path without query (sanitised for the log, borrowed likewise).
    pub path: Cow<'a, str>,
    /// GitLab's status (0 when no answer came).
    pub status: u16,
    /// Response body bytes sent to the broker.
    pub bytes_out: u64,
    /// Arrival to the end of the answer.
    pub duration_ms: u64,
    /// The agent's error code when it made or cut the answer.
    pub error: Option<ErrorCode>,
    /// The broker cancelled the request.
    pub cancelled: bool,
    started: Instant,
}

/// The request's log line at `$level` with `$msg`: every field of the
/// record, the error code only when there is one.
macro_rules! record_line {
    ($level:ident, $r:expr, $($msg:tt)+) => {
        tracing::$level!(
            request_id = $r.request_id,
            method = &*$r.method,
            path = &*$r.path,
            status = $r.status,
            bytes_out = $r.bytes_out,
            duration_ms = $r.duration_ms,
            error = $r.error.map(ErrorCode::as_str),
            $($msg)+
        )
    };
}

impl<'a> RequestRecord<'a> {
    /// The record of request `request_id` that just arrived.
    pub fn new(request_id: u64, method: Cow<'a, str>, path: Cow<'a, str>) -> Self {
        RequestRecord {
            request_id,
            method,
            path,
            status: 0,
            bytes_out: 0,
            duration_ms: 0,
            error: None,
            cancelled: false,
            started: Instant::now(),
        }
    }

    fn stop_clock(&mut self) {
        self.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    }

    /// The status class the metrics count: GitLab's status, the error's
    /// status when the agent answered, `None` when the broker cancelled
    /// before any answer.
    pub fn answered_status(&self) -> Option<u16> {
        match (self.status, self.error) {
            (0, Some(code)) => Some(code.http_status()),
            (0, None) => None,
            (status, _) => Some(status),
        }
    }

    /// The request ended: its metrics and its log line.
    pub fn finish(mut self, metrics: &AgentMetrics) {
        self.stop_clock();
        metrics.request_finished(&self);
        if self.cancelled {
            // A cancel may also end the relay with an error: the cancel
            // is what happened.
            self.error = None;
            record_line!(info, self, "request cancelled by the broker");
        } else if self.error.is_some() {
            record_line!(warn, self, "request failed");
        } else {
            record_line!(info, self, "request");
        }
    }

    /// The request was refused by the agent's policy before any GitLab
    /// request: its metrics and its log line naming `reason`.
    pub fn refused(mut self, metrics: &AgentMetrics, reason: &str) {
        self.error = Some(ErrorCode::BlockedByPolicy);
        self.stop_clock();
        metrics.request_finished(&self);
        record_line!(warn, self, "refused by policy: {reason}");
    }
}
