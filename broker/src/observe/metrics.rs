//! The broker's Prometheus metrics, kept in `prometheus-client` types and
//! written in the OpenMetrics text format.
//!
//! Recording takes no global mutex: counters and gauges are atomics, and a
//! histogram takes its own (per connection) lock for the few nanoseconds of
//! an observation. Finding a connection's series takes the read side of
//! one `RwLock` (the families' maps, and [`Metrics::series`]); the write
//! side is taken only the first time a connection or a label value is seen,
//! and no lock is held across an `.await`.
//!
//! The gauges read from live state (configured connections, connected
//! agents, requests in flight, cluster registry) are built at scrape time in
//! a second, short-lived registry, so they can never drift from the state
//! they describe.

use super::RequestRecord;
use gitproxy_shared::errors::status_class;
use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabel {
    connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    connection: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    connection: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    connection: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    connection: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type ConnCounters = Family<ConnLabel, Counter>;
type LatencyFamily = Family<ConnLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The series every connection has from its first event on (as the
/// hand-written exporter did): handles into the families, so recording is
/// atomics only.
#[derive(Clone)]
pub struct ConnSeries {
    /// The request record's counters, in the order of
    /// [`RequestRecord::counters`] (request and response body bytes).
    pub record: Vec<Counter>,
    /// Arrival to end of the response body.
    pub latency: Histogram,
    /// Agent streams accepted.
    pub agent_connects: Counter,
    /// Agent streams ended.
    pub agent_disconnects: Counter,
    /// Frames from agents the protocol does not allow.
    pub violations: Counter,
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

/// The broker's metric families.
pub struct Metrics {
    registry: Registry,
    uptime: Gauge<f64, AtomicU64>,
    started: Instant,
    requests: Family<StatusLabels, Counter>,
    errors: Family<CodeLabels, Counter>,
    forwarded: Family<DirectionLabels, Counter>,
    relayed: Family<RelayLabels, Counter>,
    /// The families of [`RequestRecord::counters`], in its order.
    record: Vec<ConnCounters>,
    latency: LatencyFamily,
    agent_connects: ConnCounters,
    agent_disconnects: ConnCounters,
    violations: ConnCounters,
    /// Each connection's [`ConnSeries`], found with one read lock.
    series: RwLock<HashMap<String, Arc<ConnSeries>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The families, registered under the names dashboards know (the
    /// library adds `_total` to counters; help texts get their final dot
    /// from it too).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: gitproxy_shared::VERSION,
            })
            .set(1);
        registry.register("gitproxy_build_info", "The running gitproxy-broker", build);
        let uptime = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "gitproxy_uptime_seconds",
            "Seconds since the broker started",
            uptime.clone(),
        );
        let m = Metrics {
            registry,
            uptime,
            started: Instant::now(),
            requests: Family::default(),
            errors: Family::default(),
            forwarded: Family::default(),
            relayed: Family::default(),
            record: RequestRecord::counters()
                .iter()
                .map(|_| Family::default())
                .collect(),
            latency: Family::new_with_constructor(latency_histogram),
            agent_connects: Family::default(),
            agent_disconnects: Family::default(),
            violations: Family::default(),
            series: RwLock::new(HashMap::new()),
        };
        m.register_families()
    }

    fn register_families(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "gitproxy_requests",
            "Front-door requests finished, by connection and status class",
            self.requests.clone(),
        );
        r.register(
            "gitproxy_errors",
            "Answers made or cut by gitproxy, by connection and error code",
            self.errors.clone(),
        );
        for ((name, help), family) in RequestRecord::counters().into_iter().zip(&self.record) {
            r.register(name, help, family.clone());
        }
        r.register(
            "gitproxy_request_duration_seconds",
            "Front-door request latency, arrival to end of the response body",
            self.latency.clone(),
        );
        r.register(
            "gitproxy_agent_connections",
            "Agent streams accepted (connects and reconnects), per connection",
            self.agent_connects.clone(),
        );
        r.register(
            "gitproxy_agent_disconnections",
            "Agent streams ended, per connection",
            self.agent_disconnects.clone(),
        );
        r.register(
            "gitproxy_protocol_violations",
            "Frames from agents the tunnel protocol does not allow (unknown ids, credit overruns, frame order, oversized or malformed heads, invalid statuses), per connection",
            self.violations.clone(),
        );
        r.register(
            "gitproxy_forwarded_requests",
            "Cluster mode: front-door requests sent to the replica holding the agent (out) and received from another replica (in), per connection",
            self.forwarded.clone(),
        );
        r.register(
            "gitproxy_relayed_connections",
            "Cluster mode: HTTP/1.1 caller connections relayed whole to the replica holding the agent (out) and received from another replica (in)",
            self.relayed.clone(),
        );
        self
    }

    /// The per-connection series of `conn`, created on its first event.
    pub fn series(&self, conn: &str) -> Arc<ConnSeries> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(conn)
        {
            return s.clone();
        }
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        map.entry(conn.to_string())
            .or_insert_with(|| {
                let l = ConnLabel {
                    connection: conn.to_string(),
                };
                Arc::new(ConnSeries {
                    record: self
                        .record
                        .iter()
                        .map(|f| f.get_or_create_owned(&l))
                        .collect(),
                    latency: self.latency.get_or_create_owned(&l),
                    agent_connects: self.agent_connects.get_or_create_owned(&l),
                    agent_disconnects: self.agent_disconnects.get_or_create_owned(&l),
                    violations: self.violations.get_or_create_owned(&l),
                })
            })
            .clone()
    }

    /// A front-door request ended: its status class, error code, the
    /// record's counters and its latency.
    /// Cluster mode: a request of `conn` this replica relayed to another
    /// one was answered `status` (counted with the requests it served).
    pub fn relayed_request(&self, conn: &str, status: u16) {
        self.requests
            .get_or_create(&StatusLabels {
                connection: conn.to_string(),
                status_class: status_class(status),
            })
            .inc();
    }

    pub fn request_finished(&self, r: &RequestRecord) {
        let conn = r.connection.as_str();
        self.requests
            .get_or_create(&StatusLabels {
                connection: conn.to_string(),
                status_class: status_class(r.status),
            })
            .inc();
        if !r.error.is_empty() {
            self.errors
                .get_or_create(&CodeLabels {
                    connection: conn.to_string(),
                    code: r.error.to_string(),
                })
                .inc();
        }
        let s = self.series(conn);
        let mut counters = s.record.iter();
        r.for_each_counter(|n| {
            if let Some(c) = counters.next() {
                c.inc_by(n);
            }
        });
        s.latency.observe(r.started.elapsed().as_secs_f64());
    }

    /// Cluster mode: a caller connection was relayed `"out"` to another
    /// replica or came `"in"` from one. Both directions appear from the first.
    pub fn relayed(&self, direction: &'static str) {
        for d in ["out", "in"] {
            let c = self.relayed.get_or_create(&RelayLabels { direction: d });
            if d == direction {
                c.inc();
            }
        }
    }

    /// Cluster mode: a request of `conn` went `"out"` to another replica
    /// or came `"in"` from one. Both directions appear from the first.
    pub fn forwarded(&self, conn: &str, direction: &'static str) {
        for d in ["out", "in"] {
            let c = self.forwarded.get_or_create(&DirectionLabels {
                connection: conn.to_string(),
                direction: d,
            });
            if d == direction {
                c.inc();
            }
        }
    }

    /// The OpenMetrics exposition: the families above, then the live
    /// gauges of `g`, then whatever `more` registers (cluster mode).
    pub fn render(&self, g: &Gauges, more: impl FnOnce(&mut Registry)) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut live = Registry::default();
        live_gauges(&mut live, g);
        more(&mut live);
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &live);
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// Registers the scrape-time gauges of `g` in `r`.
fn live_gauges(r: &mut Registry, g: &Gauges) {
    let info = Family::<ModeLabels, Gauge>::default();
    let agents = Family::<ConnLabel, Gauge>::default();
    let in_flight = Family::<ConnLabel, Gauge>::default();
    let n = |v: Option<&usize>| i64::try_from(v.copied().unwrap_or(0)).unwrap_or(i64::MAX);
    for (c, mode) in &g.connections {
        info.get_or_create(&ModeLabels {
            connection: c.clone(),
            mode,
        })
        .set(1);
        let l = ConnLabel {
            connection: c.clone(),
        };
        if *mode == "agent" {
            agents.get_or_create(&l).set(n(g.agents.get(c)));
        }
        in_flight.get_or_create(&l).set(n(g.in_flight.get(c)));
    }
    r.register("gitproxy_connection_info", "Configured connections", info);
    r.register(
        "gitproxy_agents_connected",
        "Agent streams connected, per connection",
        agents,
    );
    r.register(
        "gitproxy_requests_in_flight",
        "Front-door requests in flight, per connection",
        in_flight,
    );
}
