//! What the broker tells about its traffic besides the log: Prometheus
//! metrics (`/metrics`) and the live event feed of `Admin/WatchTunnel`.
//!
//! Both are fed at the same two places: the front door (a request finished,
//! in `frontdoor/body.rs`, or was refused/failed by gitproxy, in
//! `frontdoor/mod.rs`) and the tunnel (an agent connected or went away, or
//! broke the protocol: `tunnel/service.rs`, `tunnel/session.rs`). Recording never waits: counters are atomics, and events go into a
//! bounded `broadcast` channel where a slow watcher loses the oldest events
//! (it lags) instead of slowing traffic.
//!
//! The metrics are written by hand in the Prometheus text format (version
//! 0.0.4): the set is small and fixed, the gauges are read from live state at
//! scrape time, and it keeps the dependency tree unchanged.

use gitproxy_proto::v1 as pb;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast;

/// Events buffered per watcher before the slowest one starts losing some.
pub const EVENT_BUFFER: usize = 1024;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One event of a connection's tunnel.
#[derive(Debug, Clone)]
pub struct Event {
    /// The connection it belongs to.
    pub connection: String,
    /// The wire form.
    pub event: pb::TunnelEvent,
}

/// How a front-door request ended, for metrics and events.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Broker-wide sequence number of the request (also in `RequestStarted`).
    pub seq: u64,
    /// Connection id (`None` when the connection is unknown).
    pub connection: Option<String>,
    /// "agent" or "direct" ("" when it never got that far).
    pub mode: &'static str,
    /// Method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Status sent to the caller.
    pub status: u16,
    /// Request body bytes forwarded.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Time from arrival to the end of the response body.
    pub duration: Duration,
    /// gitproxy's error code when gitproxy made or cut the answer.
    pub error: String,
    /// The tunnel request id (agent mode).
    pub tunnel_request_id: u64,
    /// The agent instance (agent mode).
    pub agent: String,
}

#[derive(Default)]
struct ConnMetrics {
    /// By status class ("2xx", ...).
    requests: BTreeMap<&'static str, u64>,
    /// By gitproxy error code.
    errors: BTreeMap<String, u64>,
    bytes_in: u64,
    bytes_out: u64,
    latency_buckets: [u64; LATENCY_BUCKETS.len()],
    latency_count: u64,
    latency_sum: f64,
    agent_connects: u64,
    agent_disconnects: u64,
    protocol_violations: u64,
    /// Cluster mode: requests sent to another replica / received from one.
    forwarded_out: u64,
    forwarded_in: u64,
}

/// Live values read at scrape time.
pub struct Gauges {
    /// Connection ids and their mode.
    pub connections: Vec<(String, &'static str)>,
    /// Connected agent streams per connection.
    pub agents: BTreeMap<String, usize>,
    /// Requests in flight per connection.
    pub in_flight: BTreeMap<String, usize>,
}

/// Metrics and events.
pub struct Observer {
    metrics: Mutex<BTreeMap<String, ConnMetrics>>,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
    started: SystemTime,
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new()
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Observer {
    /// An empty observer.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Observer {
            metrics: Mutex::new(BTreeMap::new()),
            events,
            seq: AtomicU64::new(0),
            started: SystemTime::now(),
        }
    }

    fn with<R>(&self, conn: &str, f: impl FnOnce(&mut ConnMetrics) -> R) -> R {
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(conn.to_string()).or_default())
    }

    fn emit(&self, connection: &str, event: pb::tunnel_event::Event) {
        // No receiver is fine: nobody watches.
        let _ = self.events.send(Event {
            connection: connection.to_string(),
            event: pb::TunnelEvent {
                time: now_rfc3339(),
                event: Some(event),
            },
        });
    }

    /// A new watcher of every connection's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A front-door request of `connection` starts; returns its sequence number.
    pub fn request_started(&self, connection: &str, method: &str, path: &str) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.emit(
            connection,
            pb::tunnel_event::Event::RequestStarted(pb::RequestStarted {
                request_id: seq,
                method: method.to_string(),
                path: path.to_string(),
            }),
        );
        seq
    }

    /// A front-door request ended (answered by GitLab or by gitproxy).
    pub fn request_finished(&self, f: Finished) {
        // Unknown connection ids come from callers: never make them labels.
        let Some(conn) = f.connection.as_deref() else {
            return;
        };
        let secs = f.duration.as_secs_f64();
        self.with(conn, |m| {
            *m.requests.entry(status_class(f.status)).or_default() += 1;
            if !f.error.is_empty() {
                *m.errors.entry(f.error.clone()).or_default() += 1;
            }
            m.bytes_in += f.bytes_in;
            m.bytes_out += f.bytes_out;
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                if secs <= *b {
                    m.latency_buckets[i] += 1;
                }
            }
            m.latency_count += 1;
            m.latency_sum += secs;
        });
        self.emit(
            conn,
            pb::tunnel_event::Event::RequestFinished(pb::RequestFinished {
                request_id: f.seq,
                method: f.method,
                path: f.path,
                status: f.status as u32,
                bytes_in: f.bytes_in,
                bytes_out: f.bytes_out,
                duration_ms: f.duration.as_millis() as u64,
                error: f.error,
                tunnel_request_id: f.tunnel_request_id,
                mode: f.mode.to_string(),
                agent: f.agent,
            }),
        );
    }

    /// An agent stream was accepted for `connection`.
    pub fn agent_connected(&self, connection: &str, instance: &str, version: &str) {
        self.with(connection, |m| m.agent_connects += 1);
        self.emit(
            connection,
            pb::tunnel_event::Event::AgentConnected(pb::AgentConnected {
                instance: instance.to_string(),
                version: version.to_string(),
            }),
        );
    }

    /// An agent of `connection` broke the tunnel protocol once.
    pub fn protocol_violation(&self, connection: &str) {
        self.with(connection, |m| m.protocol_violations += 1);
    }

    /// Cluster mode: a request of `connection` was sent to another replica
    /// (`"out"`) or received from one (`"in"`).
    pub fn forwarded(&self, connection: &str, direction: &'static str) {
        self.with(connection, |m| {
            if direction == "in" {
                m.forwarded_in += 1
            } else {
                m.forwarded_out += 1
            }
        });
    }

    /// An agent stream of `connection` ended.
    pub fn agent_disconnected(&self, connection: &str, instance: &str, reason: &str) {
        self.with(connection, |m| m.agent_disconnects += 1);
        self.emit(
            connection,
            pb::tunnel_event::Event::AgentDisconnected(pb::AgentDisconnected {
                instance: instance.to_string(),
                reason: reason.to_string(),
            }),
        );
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = String::with_capacity(4096);
        let _ = writeln!(
            o,
            "# HELP gitproxy_build_info The running gitproxy-broker.\n# TYPE gitproxy_build_info gauge\ngitproxy_build_info{{version=\"{}\"}} 1",
            label(gitproxy_shared::VERSION)
        );
        let up = self.started.elapsed().unwrap_or_default().as_secs_f64();
        let _ = writeln!(
            o,
            "# HELP gitproxy_uptime_seconds Seconds since the broker started.\n# TYPE gitproxy_uptime_seconds gauge\ngitproxy_uptime_seconds {up:.3}"
        );

        let _ = writeln!(o, "# HELP gitproxy_connection_info Configured connections.\n# TYPE gitproxy_connection_info gauge");
        for (c, mode) in &g.connections {
            let _ = writeln!(
                o,
                "gitproxy_connection_info{{connection=\"{}\",mode=\"{mode}\"}} 1",
                label(c)
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_agents_connected Agent streams connected, per connection.\n# TYPE gitproxy_agents_connected gauge");
        for (c, mode) in &g.connections {
            if *mode == "agent" {
                let n = g.agents.get(c).copied().unwrap_or(0);
                let _ = writeln!(
                    o,
                    "gitproxy_agents_connected{{connection=\"{}\"}} {n}",
                    label(c)
                );
            }
        }
        let _ = writeln!(o, "# HELP gitproxy_requests_in_flight Front-door requests in flight, per connection.\n# TYPE gitproxy_requests_in_flight gauge");
        for (c, _) in &g.connections {
            let n = g.in_flight.get(c).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "gitproxy_requests_in_flight{{connection=\"{}\"}} {n}",
                label(c)
            );
        }

        let _ = writeln!(o, "# HELP gitproxy_requests_total Front-door requests finished, by connection and status class.\n# TYPE gitproxy_requests_total counter");
        for (c, cm) in m.iter() {
            for (class, n) in &cm.requests {
                let _ = writeln!(
                    o,
                    "gitproxy_requests_total{{connection=\"{}\",status_class=\"{class}\"}} {n}",
                    label(c)
                );
            }
        }
        let _ = writeln!(o, "# HELP gitproxy_errors_total Answers made or cut by gitproxy, by connection and error code.\n# TYPE gitproxy_errors_total counter");
        for (c, cm) in m.iter() {
            for (code, n) in &cm.errors {
                let _ = writeln!(
                    o,
                    "gitproxy_errors_total{{connection=\"{}\",code=\"{}\"}} {n}",
                    label(c),
                    label(code)
                );
            }
        }
        let _ = writeln!(o, "# HELP gitproxy_request_bytes_total Request body bytes forwarded to GitLab.\n# TYPE gitproxy_request_bytes_total counter");
        for (c, cm) in m.iter() {
            let _ = writeln!(
                o,
                "gitproxy_request_bytes_total{{connection=\"{}\"}} {}",
                label(c),
                cm.bytes_in
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_response_bytes_total Response body bytes sent to callers.\n# TYPE gitproxy_response_bytes_total counter");
        for (c, cm) in m.iter() {
            let _ = writeln!(
                o,
                "gitproxy_response_bytes_total{{connection=\"{}\"}} {}",
                label(c),
                cm.bytes_out
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_request_duration_seconds Front-door request latency, arrival to end of the response body.\n# TYPE gitproxy_request_duration_seconds histogram");
        for (c, cm) in m.iter() {
            let c = label(c);
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "gitproxy_request_duration_seconds_bucket{{connection=\"{c}\",le=\"{b}\"}} {}",
                    cm.latency_buckets[i]
                );
            }
            let _ = writeln!(
                o,
                "gitproxy_request_duration_seconds_bucket{{connection=\"{c}\",le=\"+Inf\"}} {}",
                cm.latency_count
            );
            let _ = writeln!(
                o,
                "gitproxy_request_duration_seconds_sum{{connection=\"{c}\"}} {:.6}",
                cm.latency_sum
            );
            let _ = writeln!(
                o,
                "gitproxy_request_duration_seconds_count{{connection=\"{c}\"}} {}",
                cm.latency_count
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_agent_connections_total Agent streams accepted (connects and reconnects), per connection.\n# TYPE gitproxy_agent_connections_total counter");
        for (c, cm) in m.iter() {
            let _ = writeln!(
                o,
                "gitproxy_agent_connections_total{{connection=\"{}\"}} {}",
                label(c),
                cm.agent_connects
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_agent_disconnections_total Agent streams ended, per connection.\n# TYPE gitproxy_agent_disconnections_total counter");
        for (c, cm) in m.iter() {
            let _ = writeln!(
                o,
                "gitproxy_agent_disconnections_total{{connection=\"{}\"}} {}",
                label(c),
                cm.agent_disconnects
            );
        }
        let _ = writeln!(o, "# HELP gitproxy_protocol_violations_total Frames from agents the tunnel protocol does not allow (unknown ids, credit overruns, frame order, oversized or malformed heads, invalid statuses), per connection.\n# TYPE gitproxy_protocol_violations_total counter");
        for (c, cm) in m.iter() {
            let _ = writeln!(
                o,
                "gitproxy_protocol_violations_total{{connection=\"{}\"}} {}",
                label(c),
                cm.protocol_violations
            );
        }
        let forwarded: Vec<_> = m
            .iter()
            .filter(|(_, cm)| cm.forwarded_in + cm.forwarded_out > 0)
            .collect();
        if !forwarded.is_empty() {
            let _ = writeln!(o, "# HELP gitproxy_forwarded_requests_total Cluster mode: front-door requests sent to the replica holding the agent (out) and received from another replica (in), per connection.\n# TYPE gitproxy_forwarded_requests_total counter");
            for (c, cm) in forwarded {
                for (dir, n) in [("out", cm.forwarded_out), ("in", cm.forwarded_in)] {
                    let _ = writeln!(
                        o,
                        "gitproxy_forwarded_requests_total{{connection=\"{}\",direction=\"{dir}\"}} {n}",
                        label(c)
                    );
                }
            }
        }
        o
    }
}

/// Shared handle.
pub type SharedObserver = Arc<Observer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let o = Observer::new();
        let mut rx = o.subscribe();
        let seq = o.request_started("acme", "GET", "/api/v4/version");
        o.request_finished(Finished {
            seq,
            connection: Some("acme".into()),
            mode: "agent",
            method: "GET".into(),
            path: "/api/v4/version".into(),
            status: 200,
            bytes_in: 0,
            bytes_out: 48,
            duration: Duration::from_millis(3),
            error: String::new(),
            tunnel_request_id: 1,
            agent: "a".into(),
        });
        o.agent_connected("acme", "a", "0.1.0");
        o.protocol_violation("acme");
        o.protocol_violation("acme");
        let g = Gauges {
            connections: vec![("acme".into(), "agent")],
            agents: [("acme".to_string(), 1)].into(),
            in_flight: BTreeMap::new(),
        };
        let text = o.render(&g);
        assert!(
            text.contains("gitproxy_requests_total{connection=\"acme\",status_class=\"2xx\"} 1")
        );
        assert!(text.contains("gitproxy_response_bytes_total{connection=\"acme\"} 48"));
        assert!(text.contains("gitproxy_agents_connected{connection=\"acme\"} 1"));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("gitproxy_protocol_violations_total{connection=\"acme\"} 2"));
        assert!(rx.try_recv().is_ok());
    }
}
