//! One front-door request's record, [`RequestRecord`]: filled in as the
//! request travels (the front door, the delivery in `frontdoor/forward.rs`
//! or `frontdoor/remote.rs`, and the response body of `frontdoor/body.rs`),
//! and the one source of the request's log line ([`RequestRecord::log`]),
//! its `WatchTunnel` `RequestFinished` event ([`RequestRecord::event`]) and
//! its metrics ([`RequestRecord::for_each_counter`], read by
//! `metrics::Metrics::request_finished`).
//!
//! The struct is declared through [`request_record!`], one line per field
//! saying where the field goes:
//! - `log yes|no`: a field of the log line, under the field's name;
//! - `event <proto field>|extra|no`: a fixed field of `RequestFinished`, or
//!   its `extra` map (name → text) for a field the `.proto` does not name;
//! - `metric no|(counter "<family>" "<help>")`: a per-connection counter
//!   family increased by the field's value.
//!
//! So a new field is one line here and the code that fills it in. The
//! status class and error code labels and the latency histogram are not
//! plain counters; `metrics.rs` derives them from the record.

use gitproxy_proto::v1 as pb;
use std::time::Instant;

/// A value the log line can carry (`tracing::Value` for the JSON and text
/// formats).
pub trait LogValue {
    /// The form given to `tracing`.
    type Out<'a>: tracing::Value
    where
        Self: 'a;
    /// `self` for the log line.
    fn log_value(&self) -> Self::Out<'_>;
}

impl LogValue for u64 {
    type Out<'a> = u64;
    fn log_value(&self) -> u64 {
        *self
    }
}

impl LogValue for u16 {
    type Out<'a> = u64;
    fn log_value(&self) -> u64 {
        u64::from(*self)
    }
}

impl LogValue for String {
    type Out<'a> = &'a str;
    fn log_value(&self) -> &str {
        self
    }
}

impl LogValue for &'static str {
    type Out<'a> = &'a str;
    fn log_value(&self) -> &str {
        self
    }
}

/// Conversion of a field into a fixed field of `RequestFinished`.
pub trait EventValue<T> {
    /// `self` as the proto field's type.
    fn event_value(&self) -> T;
}

impl EventValue<u64> for u64 {
    fn event_value(&self) -> u64 {
        *self
    }
}

impl EventValue<u32> for u16 {
    fn event_value(&self) -> u32 {
        u32::from(*self)
    }
}

impl EventValue<String> for String {
    fn event_value(&self) -> String {
        self.clone()
    }
}

impl EventValue<String> for &'static str {
    fn event_value(&self) -> String {
        (*self).to_string()
    }
}

/// A field as a counter increment.
pub trait CounterValue {
    /// `self` as an increment.
    fn counter_value(&self) -> u64;
}

impl CounterValue for u64 {
    fn counter_value(&self) -> u64 {
        *self
    }
}

impl CounterValue for u16 {
    fn counter_value(&self) -> u64 {
        u64::from(*self)
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __record_log {
    (yes, $v:expr) => {
        Some($crate::observe::record::LogValue::log_value($v))
    };
    (no, $v:expr) => {
        None::<u64>
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __record_event {
    (no, $ev:ident, $name:expr, $v:expr) => {};
    (extra, $ev:ident, $name:expr, $v:expr) => {
        $ev.extra.insert($name.to_string(), ($v).to_string());
    };
    ($field:ident, $ev:ident, $name:expr, $v:expr) => {
        $ev.$field = $crate::observe::record::EventValue::event_value($v);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __record_metric {
    (no) => {
        None::<(&'static str, &'static str)>
    };
    ((counter $family:literal $help:literal)) => {
        Some::<(&'static str, &'static str)>(($family, $help))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __record_count {
    (no, $f:ident, $v:expr) => {};
    ((counter $family:literal $help:literal), $f:ident, $v:expr) => {
        $f($crate::observe::record::CounterValue::counter_value($v))
    };
}

/// Declares [`RequestRecord`] and what it produces; see the module
/// documentation.
macro_rules! request_record {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty => log $log:tt, event $ev:tt, metric $metric:tt;
    )*) => {
        /// One front-door request, filled in as it travels.
        #[derive(Debug, Clone)]
        pub struct RequestRecord {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// When the request arrived.
            pub started: Instant,
        }

        impl RequestRecord {
            /// A record with every field empty (zero, "") that started at
            /// `started`.
            pub fn blank(started: Instant) -> Self {
                RequestRecord {
                    $( $name: Default::default(), )*
                    started,
                }
            }

            /// The request's one log line: `request` when the answer went
            /// out in full, a warning naming `aborted` (why the body was cut)
            /// otherwise.
            pub fn log(&self, aborted: Option<&str>) {
                match aborted {
                    None => tracing::info!(
                        $( $name = $crate::__record_log!($log, &self.$name), )*
                        "request"
                    ),
                    Some(why) => tracing::warn!(
                        $( $name = $crate::__record_log!($log, &self.$name), )*
                        "request aborted mid-body: {why}"
                    ),
                }
            }

            /// The `WatchTunnel` event.
            pub fn event(&self) -> pb::RequestFinished {
                let mut ev = pb::RequestFinished::default();
                $( $crate::__record_event!($ev, ev, stringify!($name), &self.$name); )*
                ev
            }

            /// The counter families the record feeds, (name, help), in the
            /// order [`RequestRecord::for_each_counter`] gives values.
            pub fn counters() -> Vec<(&'static str, &'static str)> {
                let mut v: Vec<(&'static str, &'static str)> = Vec::new();
                $( v.extend($crate::__record_metric!($metric)); )*
                v
            }

            /// Each counter's increment, in the order of
            /// [`RequestRecord::counters`].
            pub fn for_each_counter(&self, mut f: impl FnMut(u64)) {
                $( $crate::__record_count!($metric, f, &self.$name); )*
            }
        }
    };
}

request_record! {
    /// Broker-wide sequence number (also in `RequestStarted`).
    seq: u64 => log no, event request_id, metric no;
    /// Connection id.
    connection: String => log yes, event no, metric no;
    /// The tunnel's request id on the agent's stream (0 unless agent mode).
    request_id: u64 => log yes, event tunnel_request_id, metric no;
    /// "agent", "direct" or "forwarded" ("" when refused before delivery).
    mode: &'static str => log yes, event mode, metric no;
    /// The agent instance (agent mode) or the replica holding it (forwarded).
    agent: String => log yes, event agent, metric no;
    /// HTTP method.
    method: String => log yes, event method, metric no;
    /// Path without query.
    path: String => log yes, event path, metric no;
    /// Status sent to the caller.
    status: u16 => log yes, event status, metric no;
    /// Request body bytes forwarded.
    bytes_in: u64 => log yes, event bytes_in,
        metric (counter "gitproxy_request_bytes" "Request body bytes forwarded to GitLab");
    /// Response body bytes sent.
    bytes_out: u64 => log yes, event bytes_out,
        metric (counter "gitproxy_response_bytes" "Response body bytes sent to callers");
    /// Arrival to the end of the response body.
    duration_ms: u64 => log yes, event duration_ms, metric no;
    /// gitproxy's error code when gitproxy made or cut the answer ("" otherwise).
    error: &'static str => log no, event error, metric no;
}

impl RequestRecord {
    /// The record of a request of `connection` that just arrived.
    pub fn new(connection: String, method: String, path: String, started: Instant) -> Self {
        RequestRecord {
            connection,
            method,
            path,
            ..RequestRecord::blank(started)
        }
    }

    /// Moves the record out (into the answer's body), leaving an empty one
    /// with the same start (no allocation).
    pub fn take(&mut self) -> Self {
        std::mem::replace(self, RequestRecord::blank(self.started))
    }

    /// Sets `duration_ms` from `started`.
    pub fn stop_clock(&mut self) {
        self.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_reach_the_event_and_the_counters() {
        let mut r = RequestRecord::new("acme".into(), "GET".into(), "/p".into(), Instant::now());
        r.seq = 7;
        r.request_id = 3;
        r.status = 201;
        r.bytes_in = 5;
        r.bytes_out = 9;
        r.error = "timeout";
        let ev = r.event();
        assert_eq!(
            (ev.request_id, ev.tunnel_request_id, ev.status, ev.bytes_out),
            (7, 3, 201, 9)
        );
        assert_eq!((ev.error.as_str(), ev.path.as_str()), ("timeout", "/p"));
        assert!(ev.extra.is_empty());
        let names: Vec<_> = RequestRecord::counters().iter().map(|c| c.0).collect();
        assert_eq!(names, ["gitproxy_request_bytes", "gitproxy_response_bytes"]);
        let mut v = Vec::new();
        r.for_each_counter(|n| v.push(n));
        assert_eq!(v, [5, 9]);
    }
}
