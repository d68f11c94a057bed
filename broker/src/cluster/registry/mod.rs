//! The tunnel registry in Redis: which replica holds which agent streams of
//! which connection, so a replica that holds none can forward a request to
//! one that does.
//!
//! Keys (all under `gitproxy:`; see docs/architecture.md, "Cluster mode"):
//! - `gitproxy:replica:{id}`: JSON `{"peer", "started", "relay"}`, TTL `--registry-ttl`
//!   ([`DEFAULT_REPLICA_TTL`]), refreshed every third of it. A replica is
//!   *live* while it exists.
//! - `gitproxy:replicas`: set of the replica ids registered (dead ones are
//!   removed by whoever notices).
//! - `gitproxy:agents:{connection}`: hash, field `{replica}/{session_no}`,
//!   value JSON `{"instance", "version", "connected_since", "draining",
//!   "holds_token"}`.
//! - channel [`CHANGED_CHANNEL`]: the connection id whose entries changed, so
//!   other replicas drop their cached lookup at once.
//!
//! Writing: the local registry (`crate::tunnel::Registry`) stays the source
//! of truth for this process's streams. It marks a connection as changed
//! when a stream opens, closes or starts draining; one task ([`run`]) writes
//! the difference between what it holds and what it last wrote, pipelined.
//! Entries carry no TTL of their own: they live as long as the replica key,
//! so upkeep costs one `SET` (and one `SADD`) per refresh and one
//! `EXISTS` per [`PROBE_EVERY`] per replica, whatever the number of agents.
//!
//! Reading ([`ClusterRegistry::lookup`]): the hash, then the replica keys of
//! the replicas it names. Entries of a replica whose key is gone (dead), or
//! older than the replica's `started` (a previous process with the same id),
//! are never returned; they are deleted in the background. Results are
//! cached for [`LOOKUP_CACHE_TTL`] and dropped as soon as a change of that
//! connection is published. A stale pick is safe: the peer answers
//! `agent_not_connected` (it never forwards again) and the forwarder reads
//! the registry afresh and tries once more (`crate::frontdoor::remote`).
//!
//! Redis down: writes are retried from the local truth (every stream is
//! written again once Redis answers; a Redis that lost its data is noticed
//! by the replica key being gone), and lookups fail at once with
//! [`RegistryError`], which the front door turns into `agent_not_connected`
//! naming the registry.
//!
//! Files: this one holds the keys, the entry types and the health counters;
//! [`write`] the upkeep task, [`read`] lookups and the change feed.
//!
//! [`run`]: ClusterRegistry::run

use super::redis::RedisHandle;
use crate::tunnel::Registry;
use gitproxy_shared::log_limit::{EpisodeLog, Report};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod read;
mod write;

/// Default lifetime of a replica key without refresh (`--registry-ttl`): a
/// replica that stops refreshing (killed, partitioned) is dead this long
/// after its last refresh. A replica refreshes every third of its TTL, so
/// two refreshes in a row may fail before its key expires.
pub const DEFAULT_REPLICA_TTL: Duration = Duration::from_secs(30);
/// How often a replica checks, between refreshes, that its key is still
/// there (a restarted, empty Redis): the bound on re-registering after Redis
/// comes back.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How soon a replica tries again while Redis fails.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How long a lookup is reused (changes published by other replicas drop it
/// sooner): the staleness of a pick when a change notice is lost.
pub const LOOKUP_CACHE_TTL: Duration = Duration::from_secs(1);
/// Most connections whose lookup is cached.
pub const LOOKUP_CACHE_MAX: usize = 10_000;
/// Most commands in one pipeline (a full re-registration is cut into these).
pub const MAX_PIPELINE: usize = 1_000;
/// Pub/sub channel: the id of a connection whose registry entries changed.
pub const CHANGED_CHANNEL: &str = "gitproxy:registry:changed";
/// The set of registered replica ids.
pub const REPLICAS_KEY: &str = "gitproxy:replicas";
/// Log a summary of a Redis outage at most this often.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

/// `gitproxy:replica:{id}`.
pub fn replica_key(id: &str) -> String {
    format!("gitproxy:replica:{id}")
}

/// `gitproxy:agents:{connection}`.
pub fn agents_key(conn: &str) -> String {
    format!("gitproxy:agents:{conn}")
}

/// The value of a replica key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// host:port other replicas dial.
    pub peer: String,
    /// RFC 3339 (milliseconds): when this process started.
    pub started: String,
    /// Its peer listener takes relayed caller connections
    /// (`cluster::relay`); absent (false) from replicas older than that, to
    /// which requests are forwarded one by one during a rolling upgrade.
    #[serde(default)]
    pub relay: bool,
}

/// The value of an agent stream's field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentEntry {
    /// Agent instance name.
    pub instance: String,
    /// Agent version.
    pub version: String,
    /// RFC 3339 (milliseconds).
    pub connected_since: String,
    /// Whether the stream takes no new work unless nothing else is left.
    pub draining: bool,
    /// Whether the agent injects its own token.
    pub holds_token: bool,
}

/// An agent stream held by another live replica.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    /// The replica holding it.
    pub replica: String,
    /// Where that replica's peer listener is.
    pub peer: String,
    /// That replica takes relayed caller connections.
    pub relay: bool,
    /// What the registry says about the stream.
    pub entry: AgentEntry,
}

/// The registry could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the tunnel registry (Redis) is unreachable: {0}")]
pub struct RegistryError(pub String);

fn err(e: redis::RedisError) -> RegistryError {
    RegistryError(e.to_string())
}

struct Cached {
    at: Instant,
    agents: Arc<[RemoteAgent]>,
}

/// This replica's side of the registry.
pub struct ClusterRegistry {
    redis: RedisHandle,
    replica_id: String,
    /// Our replica key's value.
    info: String,
    started: SystemTime,
    /// Lifetime of our replica key without a refresh.
    ttl: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    /// Bumped by every invalidation: a lookup that started before one does
    /// not fill the cache with what it read.
    epoch: AtomicU64,
    commands: AtomicU64,
    errors: AtomicU64,
    outage: Mutex<EpisodeLog>,
    cleaning: Arc<AtomicBool>,
    /// Local streams written to Redis after the last (re-)registration.
    registered: AtomicU64,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

impl ClusterRegistry {
    /// The registry of replica `replica_id`, reachable by the other
    /// replicas at `peer` (host:port), whose key lives `ttl` without a
    /// refresh (whole seconds; Redis expires with that granularity).
    pub fn new(redis: RedisHandle, replica_id: &str, peer: &str, ttl: Duration) -> Self {
        let started = SystemTime::now();
        let info = serde_json::to_string(&ReplicaInfo {
            peer: peer.to_string(),
            started: rfc3339(started),
            relay: true,
        })
        .unwrap_or_default();
        ClusterRegistry {
            redis,
            replica_id: replica_id.to_string(),
            info,
            started,
            ttl: ttl.max(Duration::from_secs(1)),
            cache: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            outage: Mutex::new(EpisodeLog::new(OUTAGE_LOG_EVERY)),
            cleaning: Arc::new(AtomicBool::new(false)),
            registered: AtomicU64::new(0),
        }
    }

    /// How often our replica key is refreshed: a third of its TTL.
    pub fn refresh_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Lifetime of our replica key without a refresh.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Whether the last Redis command succeeded.
    pub fn is_up(&self) -> bool {
        self.redis.is_up()
    }

    fn sent(&self, n: usize) {
        self.commands.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn succeeded(&self) {
        self.redis.set_up(true);
        let ended = self
            .outage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .success(Instant::now());
        if let Some(end) = ended {
            info!(
                errors = end.total,
                lasted_ms = end.lasted.as_millis() as u64,
                "tunnel registry: Redis reachable again"
            );
        }
    }

    fn failed(&self, what: &str, e: &RegistryError) {
        self.redis.set_up(false);
        // What was read before the outage is not trusted during it.
        self.invalidate_all();
        self.errors.fetch_add(1, Ordering::Relaxed);
        let report = self
            .outage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure(Instant::now());
        match report {
            Report::Started => warn!(
                error = %e.0,
                "tunnel registry: Redis unreachable ({what}); agents held here keep working, requests for agents on other replicas get agent_not_connected until it is back"
            ),
            Report::Ongoing {
                count,
                total,
                lasted,
            } => warn!(
                error = %e.0,
                errors = count,
                total,
                lasted_ms = lasted.as_millis() as u64,
                "tunnel registry: Redis still unreachable"
            ),
            Report::Suppressed => {}
        }
    }

    /// Registers the registry's scrape-time metrics (for `/metrics`).
    pub fn register_metrics(&self, r: &mut MetricsRegistry) {
        r.register(
            "gitproxy_registry_up",
            "Whether the last command to the tunnel registry (Redis) succeeded",
            ConstGauge::new(i64::from(self.is_up())),
        );
        r.register(
            "gitproxy_registry_errors",
            "Failed tunnel registry operations (Redis unreachable or failing)",
            ConstCounter::new(self.errors.load(Ordering::Relaxed)),
        );
        r.register(
            "gitproxy_registry_streams",
            "Agent streams of this replica written to the tunnel registry",
            ConstGauge::new(
                i64::try_from(self.registered.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            ),
        );
        r.register(
            "gitproxy_registry_commands",
            "Redis commands sent by the tunnel registry (upkeep, writes, lookups)",
            ConstCounter::new(self.commands.load(Ordering::Relaxed)),
        );
    }

    /// When this process started (as written in its replica key).
    pub fn started(&self) -> SystemTime {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_older_than_the_relay_is_not_relayed_to() {
        // What a replica of the previous version writes: no `relay`.
        let old: ReplicaInfo = serde_json::from_str(
            r#"{"peer":"10.0.0.1:8444","started":"2026-12-01T00:00:00.000Z"}"#,
        )
        .expect("parses");
        assert!(!old.relay);
        let new = ReplicaInfo {
            peer: "10.0.0.2:8444".into(),
            started: "2026-12-03T00:00:00.000Z".into(),
            relay: true,
        };
        let text = serde_json::to_string(&new).expect("json");
        assert!(text.contains(r#""relay":true"#), "{text}");
        // And the previous version (this struct without `relay`) reads it.
        #[derive(Deserialize)]
        struct Previous {
            peer: String,
            started: String,
        }
        let p: Previous = serde_json::from_str(&text).expect("the previous version reads it");
        assert_eq!(
            (p.peer.as_str(), p.started.as_str()),
            ("10.0.0.2:8444", "2026-12-03T00:00:00.000Z")
        );
    }
}
