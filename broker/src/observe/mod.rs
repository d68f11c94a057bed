//! What the broker tells about its traffic besides the log: Prometheus
//! metrics (`/metrics`, [`metrics`]) and the live event feed of
//! `Admin/WatchTunnel`.
//!
//! Both are fed at the same two places: the front door (a request finished,
//! in `frontdoor/body.rs`, or was refused/failed by gitproxy, in
//! `frontdoor/mod.rs`: both hand over the request's [`RequestRecord`],
//! which also writes the request's log line) and the tunnel (an agent connected or went away, or
//! broke the protocol: `tunnel/service.rs`, `tunnel/session.rs`). Recording
//! never waits: metrics are atomics (see [`metrics`] for the locks a lookup
//! takes), and events go into a bounded `broadcast` channel where a slow
//! watcher loses the oldest events (it lags) instead of slowing traffic.

pub mod metrics;
pub mod record;

pub use metrics::{Gauges, Metrics, LATENCY_BUCKETS};
pub use record::RequestRecord;

use gitproxy_proto::v1 as pb;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::broadcast;

/// Events buffered per watcher before the slowest one starts losing some.
pub const EVENT_BUFFER: usize = 1024;

/// One event of a connection's tunnel.
#[derive(Debug, Clone)]
pub struct Event {
    /// The connection it belongs to.
    pub connection: String,
    /// The wire form.
    pub event: pb::TunnelEvent,
}

/// Metrics and events.
pub struct Observer {
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Observer {
    /// An empty observer.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Observer {
            metrics: Metrics::new(),
            events,
            seq: AtomicU64::new(0),
        }
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

    /// A front-door request ended (answered by GitLab or by gitproxy):
    /// its metrics, and its event when someone watches.
    pub fn request_finished(&self, r: &RequestRecord) {
        self.metrics.request_finished(r);
        if self.events.receiver_count() > 0 {
            self.emit(
                &r.connection,
                pb::tunnel_event::Event::RequestFinished(r.event()),
            );
        }
    }

    /// An agent stream was accepted for `connection`.
    pub fn agent_connected(&self, connection: &str, instance: &str, version: &str) {
        self.metrics.series(connection).agent_connects.inc();
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
        self.metrics.series(connection).violations.inc();
    }

    /// Cluster mode: a request of `connection` was sent to another replica
    /// (`"out"`) or received from one (`"in"`).
    pub fn forwarded(&self, connection: &str, direction: &'static str) {
        self.metrics.forwarded(connection, direction);
    }

    /// Cluster mode: a request of `connection` on a connection this replica
    /// relays was answered `status` by the replica it is relayed to (so a
    /// relayed request is in `gitproxy_requests_total` of both replicas, as a
    /// request forwarded per request is).
    pub fn relayed_request(&self, connection: &str, status: u16) {
        self.metrics.relayed_request(connection, status);
    }

    /// Cluster mode: a caller connection was relayed whole to another
    /// replica (`"out"`) or received from one (`"in"`).
    pub fn relayed(&self, direction: &'static str) {
        self.metrics.relayed(direction);
    }

    /// An agent stream of `connection` ended.
    pub fn agent_disconnected(&self, connection: &str, instance: &str, reason: &str) {
        self.metrics.series(connection).agent_disconnects.inc();
        self.emit(
            connection,
            pb::tunnel_event::Event::AgentDisconnected(pb::AgentDisconnected {
                instance: instance.to_string(),
                reason: reason.to_string(),
            }),
        );
    }

    /// The OpenMetrics exposition (content type [`metrics::CONTENT_TYPE`]).
    pub fn render(&self, g: &Gauges) -> String {
        self.metrics.render(g, |_| {})
    }

    /// [`Observer::render`] with more scrape-time families (cluster mode).
    pub fn render_with(&self, g: &Gauges, more: impl FnOnce(&mut Registry)) -> String {
        self.metrics.render(g, more)
    }
}

/// Shared handle.
pub type SharedObserver = Arc<Observer>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn counts_and_renders() {
        let o = Observer::new();
        let mut rx = o.subscribe();
        let seq = o.request_started("acme", "GET", "/api/v4/version");
        let mut r = RequestRecord::new(
            "acme".into(),
            "GET".into(),
            "/api/v4/version".into(),
            std::time::Instant::now(),
        );
        (r.seq, r.mode, r.agent, r.status, r.bytes_out) = (seq, "agent", "a".into(), 200, 48);
        (r.request_id, r.duration_ms) = (1, 3);
        o.request_finished(&r);
        o.agent_connected("acme", "a", "0.1.0");
        o.protocol_violation("acme");
        o.protocol_violation("acme");
        o.forwarded("acme", "in");
        let g = Gauges {
            connections: vec![("acme".into(), "agent")],
            agents: [("acme".to_string(), 1)].into(),
            in_flight: BTreeMap::new(),
        };
        let text = o.render(&g);
        for line in [
            "# TYPE gitproxy_requests counter",
            "gitproxy_requests_total{connection=\"acme\",status_class=\"2xx\"} 1",
            "gitproxy_response_bytes_total{connection=\"acme\"} 48",
            "gitproxy_request_bytes_total{connection=\"acme\"} 0",
            "gitproxy_agents_connected{connection=\"acme\"} 1",
            "gitproxy_requests_in_flight{connection=\"acme\"} 0",
            "gitproxy_connection_info{connection=\"acme\",mode=\"agent\"} 1",
            "gitproxy_request_duration_seconds_bucket{le=\"0.005\",connection=\"acme\"} 1",
            "gitproxy_request_duration_seconds_count{connection=\"acme\"} 1",
            "gitproxy_protocol_violations_total{connection=\"acme\"} 2",
            "gitproxy_agent_disconnections_total{connection=\"acme\"} 0",
            "gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"in\"} 1",
            "gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"out\"} 0",
            "# HELP gitproxy_build_info The running gitproxy-broker.",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(rx.try_recv().is_ok());
    }
}
