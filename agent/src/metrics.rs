//! The agent's own metrics, in `prometheus-client` types.
//!
//! The agent opens no port, so nothing scrapes it: the running agent writes
//! the OpenMetrics text into a file beside its state file ([`path_for`]),
//! at most once a second and only when something changed, and
//! `gitproxy-agent health --metrics` prints it (for an exec probe, a
//! sidecar or a node exporter's text-file collector).
//!
//! Recording is atomics only, plus the read side of the `RwLock` of a
//! labelled family (`requests`, `errors`) to find the series; its write
//! side is taken only the first time a label value is seen.

use crate::record::RequestRecord;
use gitproxy_shared::errors::status_class;
use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The file the metrics of the agent whose state file is `state_file` are
/// written to: the same name with the extension `metrics`.
pub fn path_for(state_file: &Path) -> PathBuf {
    state_file.with_extension("metrics")
}

/// The agent's metric families.
pub struct AgentMetrics {
    registry: Registry,
    requests: Family<ClassLabel, Counter>,
    errors: Family<CodeLabel, Counter>,
    request_bytes: Counter,
    response_bytes: Counter,
    reconnects: Counter,
    connected: Gauge,
    streams: Gauge,
    in_flight: Gauge,
    /// Something changed since the file was last written.
    dirty: AtomicBool,
    /// A stream was established since the agent started.
    ever_connected: AtomicBool,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Zeroed families (the library adds `_total` to counters and the final
    /// dot to help texts).
    pub fn new() -> Self {
        let m = AgentMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            errors: Family::default(),
            request_bytes: Counter::default(),
            response_bytes: Counter::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            streams: Gauge::default(),
            in_flight: Gauge::default(),
            dirty: AtomicBool::new(true),
            ever_connected: AtomicBool::new(false),
        };
        m.registered()
    }

    fn registered(mut self) -> Self {
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: gitproxy_shared::VERSION,
            })
            .set(1);
        let r = &mut self.registry;
        r.register(
            "gitproxy_agent_build_info",
            "The running gitproxy-agent",
            build,
        );
        r.register(
            "gitproxy_agent_requests",
            "Requests served, by the status class of the answer sent to the broker (cancelled: the broker cancelled it before any answer)",
            self.requests.clone(),
        );
        r.register(
            "gitproxy_agent_errors",
            "Answers made or cut by the agent, by error code",
            self.errors.clone(),
        );
        r.register(
            "gitproxy_agent_request_bytes",
            "Request body bytes received from the broker for GitLab",
            self.request_bytes.clone(),
        );
        r.register(
            "gitproxy_agent_response_bytes",
            "Response body bytes sent to the broker",
            self.response_bytes.clone(),
        );
        r.register(
            "gitproxy_agent_reconnects",
            "Tunnel streams established after the first one (reconnects and drain hand-overs)",
            self.reconnects.clone(),
        );
        r.register(
            "gitproxy_agent_connected",
            "1 while the agent is connected to the broker",
            self.connected.clone(),
        );
        r.register(
            "gitproxy_agent_streams",
            "Tunnel streams open now (two while a drained stream finishes its requests)",
            self.streams.clone(),
        );
        r.register(
            "gitproxy_agent_requests_in_flight",
            "Requests being served now",
            self.in_flight.clone(),
        );
        self
    }

    fn touched(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// A tunnel stream completed its handshake (every one after the
    /// agent's first counts as a reconnect). The stream counts as open until
    /// the returned guard is dropped.
    pub fn stream_opened(&self) -> StreamGuard<'_> {
        if self.ever_connected.swap(true, Ordering::Relaxed) {
            self.reconnects.inc();
        }
        self.streams.inc();
        self.touched();
        StreamGuard(self)
    }

    /// Whether the agent is connected now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
        self.touched();
    }

    /// A request starts; it is in flight until the guard is dropped.
    pub fn request_started(&self) -> InFlightGuard<'_> {
        self.in_flight.inc();
        self.touched();
        InFlightGuard(self)
    }

    /// Request body bytes received from the broker.
    pub fn request_bytes(&self, n: usize) {
        self.request_bytes.inc_by(n as u64);
        self.touched();
    }

    /// A request ended: the status class of the answer sent to the broker
    /// ("cancelled": none, the broker cancelled it), its error code and its
    /// response bytes.
    pub fn request_finished(&self, r: &RequestRecord<'_>) {
        let class = r.answered_status().map_or("cancelled", status_class);
        self.requests
            .get_or_create(&ClassLabel {
                status_class: class,
            })
            .inc();
        if let Some(code) = r.error {
            self.errors
                .get_or_create(&CodeLabel {
                    code: code.as_str(),
                })
                .inc();
        }
        self.response_bytes.inc_by(r.bytes_out);
        self.touched();
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        // Writing to a String cannot fail.
        let _ = text::encode(&mut out, &self.registry);
        out
    }

    /// Writes the text to `path` (temporary file, then rename) when
    /// something changed since the last write.
    pub fn flush(&self, path: &Path) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = crate::health::write_atomic(path, self.render().as_bytes()) {
            self.touched();
            tracing::warn!(path = %path.display(), "cannot write the metrics file: {e}");
        }
    }
}

/// An open tunnel stream (see [`AgentMetrics::stream_opened`]).
pub struct StreamGuard<'a>(&'a AgentMetrics);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.streams.dec();
        self.0.touched();
    }
}

/// A request in flight (see [`AgentMetrics::request_started`]).
pub struct InFlightGuard<'a>(&'a AgentMetrics);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
        self.0.touched();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = AgentMetrics::new();
        let s = m.stream_opened();
        let s2 = m.stream_opened();
        drop(s);
        {
            let _r = m.request_started();
            m.request_bytes(10);
            let mut r = RequestRecord::new(1, "GET".into(), "/".into());
            (r.status, r.bytes_out) = (200, 48);
            m.request_finished(&r);
        }
        let mut r = RequestRecord::new(2, "GET".into(), "/".into());
        r.error = Some(gitproxy_shared::errors::ErrorCode::UpstreamUnreachable);
        m.request_finished(&r);
        r.error = None;
        m.request_finished(&r);
        let text = m.render();
        for line in [
            "gitproxy_agent_requests_total{status_class=\"2xx\"} 1",
            "gitproxy_agent_requests_total{status_class=\"5xx\"} 1",
            "gitproxy_agent_requests_total{status_class=\"cancelled\"} 1",
            "gitproxy_agent_errors_total{code=\"upstream_unreachable\"} 1",
            "gitproxy_agent_request_bytes_total 10",
            "gitproxy_agent_response_bytes_total 48",
            "gitproxy_agent_reconnects_total 1",
            "gitproxy_agent_streams 1",
            "gitproxy_agent_requests_in_flight 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        drop(s2);
        let dir = std::env::temp_dir().join(format!("gitproxy-metrics-{}", std::process::id()));
        let p = path_for(&dir.join("state.json"));
        m.flush(&p);
        let written = std::fs::read_to_string(&p).expect("written");
        assert!(written.contains("gitproxy_agent_streams 0"), "{written}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
