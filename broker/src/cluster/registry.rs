//! The tunnel registry in Redis: which replica holds which agent streams of
//! which connection, so a replica that holds none can forward a request to
//! one that does.
//!
//! Keys (all under `gitproxy:`; see docs/architecture.md, "Cluster mode"):
//! - `gitproxy:replica:{id}`: JSON `{"peer", "started"}`, TTL `--registry-ttl`
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

    fn entry_of(&self, s: &crate::tunnel::AgentSession) -> (String, String) {
        let field = format!("{}/{}", self.replica_id, s.session_no);
        let value = serde_json::to_string(&AgentEntry {
            instance: s.instance.clone(),
            version: s.version.clone(),
            connected_since: rfc3339(s.connected_since),
            draining: s.is_draining(),
            holds_token: s.holds_token,
        })
        .unwrap_or_default();
        (field, value)
    }

    /// Keeps this replica registered and its streams written until `stop`,
    /// then removes them (a clean exit leaves nothing behind).
    pub async fn run(self: Arc<Self>, local: Arc<Registry>, stop: CancellationToken) {
        let changes = local.changes().clone();
        changes.enable();
        let mut written: HashMap<String, HashMap<String, String>> = HashMap::new();
        // Everything is (re)written at start, after any failure, and when
        // our replica key turns out to be gone (a restarted Redis).
        let mut full = true;
        let mut ok = false;
        let mut registered_once = false;
        let mut last_refresh: Option<Instant> = None;
        let mut next_check = tokio::time::Instant::now();
        let refresh_every = self.refresh_every();
        // With a short TTL the refresh comes more often than the probe.
        let check_every = PROBE_EVERY.min(refresh_every);
        loop {
            let check = tokio::select! {
                _ = stop.cancelled() => break,
                _ = changes.changed(), if ok => false,
                _ = tokio::time::sleep_until(next_check) => true,
            };
            if check {
                let refresh = !ok || last_refresh.is_none_or(|t| t.elapsed() >= refresh_every);
                let r = if refresh {
                    self.refresh(registered_once).await
                } else {
                    self.probe().await
                };
                match r {
                    Ok(present) => {
                        self.succeeded();
                        if refresh {
                            last_refresh = Some(Instant::now());
                            registered_once = true;
                        }
                        if !present {
                            if ok {
                                warn!("tunnel registry: this replica's key is gone from Redis (restarted or flushed?); writing every local agent stream again");
                            }
                            full = true;
                        }
                        ok = true;
                        next_check = tokio::time::Instant::now() + check_every;
                    }
                    Err(e) => {
                        self.failed("refreshing this replica's key", &e);
                        ok = false;
                        full = true;
                        // While Redis fails: retry soon (recovery within
                        // seconds), but not on every agent change meanwhile.
                        next_check = tokio::time::Instant::now() + RETRY_EVERY;
                        continue;
                    }
                }
            }
            let mut dirty = changes.take();
            if full {
                dirty.extend(local.connection_ids());
                dirty.extend(written.keys().cloned());
            }
            let r = if dirty.is_empty() {
                Ok(0)
            } else {
                self.sync(&local, &mut written, &dirty, full).await
            };
            match r {
                Ok(n) => {
                    self.succeeded();
                    let streams: usize = written.values().map(HashMap::len).sum();
                    self.registered.store(streams as u64, Ordering::Relaxed);
                    if full {
                        info!(
                            replica = %self.replica_id,
                            streams,
                            connections = written.len(),
                            "tunnel registry: local agent streams registered"
                        );
                        full = false;
                    } else if n > 0 {
                        debug!(commands = n, "tunnel registry updated");
                    }
                }
                Err(e) => {
                    self.failed("writing agent streams", &e);
                    changes.mark_all(dirty.iter());
                    ok = false;
                    full = true;
                    next_check = tokio::time::Instant::now() + RETRY_EVERY;
                }
            }
        }
        self.deregister(&written).await;
    }

    /// `SET replica EX ttl GET` + `SADD replicas`: true when our key was
    /// still there.
    async fn refresh(&self, registered_once: bool) -> Result<bool, RegistryError> {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(replica_key(&self.replica_id))
            .arg(&self.info)
            .arg("EX")
            .arg(self.ttl.as_secs())
            .arg("GET")
            .cmd("SADD")
            .arg(REPLICAS_KEY)
            .arg(&self.replica_id)
            .ignore();
        self.sent(2);
        let (prev,): (Option<String>,) = p.query_async(&mut c).await.map_err(err)?;
        if let Some(prev) = &prev {
            if registered_once && *prev != self.info {
                warn!(
                    replica = %self.replica_id,
                    "tunnel registry: another broker process uses this replica id; give every replica its own --replica-id (GITPROXY_REPLICA_ID)"
                );
            }
        }
        Ok(prev.is_some())
    }

    /// `EXISTS replica`.
    async fn probe(&self) -> Result<bool, RegistryError> {
        let mut c = self.redis.conn();
        self.sent(1);
        let n: i64 = c.exists(replica_key(&self.replica_id)).await.map_err(err)?;
        Ok(n > 0)
    }

    /// Writes the difference between the local streams of `dirty` and what
    /// was written (`force`: everything again). Returns the command count.
    async fn sync(
        &self,
        local: &Registry,
        written: &mut HashMap<String, HashMap<String, String>>,
        dirty: &HashSet<String>,
        force: bool,
    ) -> Result<usize, RegistryError> {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        let mut total = 0;
        // Connections whose new state goes out with the current pipeline.
        let mut pending: Vec<(String, HashMap<String, String>)> = Vec::new();
        for conn in dirty {
            let desired: HashMap<String, String> = local
                .sessions(conn)
                .iter()
                .filter(|s| !s.is_closed())
                .map(|s| self.entry_of(s))
                .collect();
            let have = written.get(conn);
            let sets: Vec<(&String, &String)> = desired
                .iter()
                .filter(|(f, v)| force || have.and_then(|h| h.get(*f)) != Some(*v))
                .collect();
            let dels: Vec<&String> = have
                .map(|h| h.keys().filter(|f| !desired.contains_key(*f)).collect())
                .unwrap_or_default();
            if sets.is_empty() && dels.is_empty() {
                continue;
            }
            let key = agents_key(conn);
            if !sets.is_empty() {
                let cmd = p.cmd("HSET").arg(&key);
                for (f, v) in &sets {
                    cmd.arg(*f).arg(*v);
                }
                cmd.ignore();
            }
            if !dels.is_empty() {
                p.cmd("HDEL").arg(&key).arg(&dels).ignore();
            }
            p.cmd("PUBLISH").arg(CHANGED_CHANNEL).arg(conn).ignore();
            pending.push((conn.clone(), desired));
            if p.len() >= MAX_PIPELINE {
                total += p.len();
                self.flush(&mut p, &mut c).await?;
                for (conn, desired) in pending.drain(..) {
                    set_written(written, conn, desired);
                }
            }
        }
        if !p.is_empty() {
            total += p.len();
            self.flush(&mut p, &mut c).await?;
        }
        for (conn, desired) in pending {
            set_written(written, conn, desired);
        }
        Ok(total)
    }

    async fn flush(
        &self,
        p: &mut redis::Pipeline,
        c: &mut redis::aio::ConnectionManager,
    ) -> Result<(), RegistryError> {
        self.sent(p.len());
        let r: redis::RedisResult<()> = p.query_async(c).await;
        p.clear();
        r.map_err(err)
    }

    /// Removes this replica and its streams (clean exit; best effort).
    async fn deregister(&self, written: &HashMap<String, HashMap<String, String>>) {
        let mut c = self.redis.conn();
        let mut p = redis::pipe();
        p.cmd("DEL").arg(replica_key(&self.replica_id)).ignore();
        p.cmd("SREM")
            .arg(REPLICAS_KEY)
            .arg(&self.replica_id)
            .ignore();
        for (conn, fields) in written.iter().filter(|(_, f)| !f.is_empty()) {
            let fields: Vec<&String> = fields.keys().collect();
            p.cmd("HDEL").arg(agents_key(conn)).arg(fields).ignore();
            p.cmd("PUBLISH").arg(CHANGED_CHANNEL).arg(conn).ignore();
        }
        self.sent(p.len());
        match tokio::time::timeout(
            super::redis::RESPONSE_TIMEOUT,
            p.query_async::<()>(&mut c),
        )
        .await
        {
            Ok(Ok(())) => info!(replica = %self.replica_id, "tunnel registry: replica removed"),
            Ok(Err(e)) => {
                warn!(error = %e, "tunnel registry: could not remove this replica (its entries expire with its key)")
            }
            Err(_) => warn!(
                "tunnel registry: Redis did not answer the removal of this replica (its entries expire with its key)"
            ),
        }
    }

    /// Follows [`CHANGED_CHANNEL`] until `stop`, dropping the cached lookup
    /// of each connection named there. While the subscription is down (Redis
    /// unreachable) lookups are cached for [`LOOKUP_CACHE_TTL`] only, and
    /// everything cached is dropped when it comes back (changes may have
    /// been missed).
    pub async fn follow_changes(self: Arc<Self>, stop: CancellationToken) {
        use futures::StreamExt;
        loop {
            let connected = async {
                let mut ps = tokio::time::timeout(
                    super::redis::CONNECT_TIMEOUT,
                    self.redis.client().get_async_pubsub(),
                )
                .await
                .map_err(|_| RegistryError("connecting timed out".into()))?
                .map_err(err)?;
                ps.subscribe(CHANGED_CHANNEL).await.map_err(err)?;
                Ok::<_, RegistryError>(ps)
            };
            let ps = tokio::select! {
                _ = stop.cancelled() => return,
                r = connected => r,
            };
            match ps {
                Ok(ps) => {
                    self.invalidate_all();
                    debug!("tunnel registry: following changes");
                    let mut msgs = ps.into_on_message();
                    loop {
                        let m = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = msgs.next() => m,
                        };
                        let Some(m) = m else { break };
                        match m.get_payload::<String>() {
                            Ok(conn) => self.invalidate(&conn),
                            Err(_) => self.invalidate_all(),
                        }
                    }
                    self.invalidate_all();
                    debug!("tunnel registry: change feed interrupted");
                }
                Err(e) => debug!(error = %e.0, "tunnel registry: cannot follow changes"),
            }
            // Back-off before subscribing again (Redis is down or restarting).
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Drops the cached lookup of `conn` (its entries changed).
    pub fn invalidate(&self, conn: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(conn);
    }

    /// Drops every cached lookup (the change feed was interrupted).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The agent streams of `conn` held by other live replicas, non-draining
    /// first. `fresh`: read Redis even if a cached answer exists.
    pub async fn lookup(
        &self,
        conn: &str,
        fresh: bool,
    ) -> Result<Arc<[RemoteAgent]>, RegistryError> {
        if !fresh {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache
                .get(conn)
                .filter(|c| c.at.elapsed() < LOOKUP_CACHE_TTL)
            {
                return Ok(c.agents.clone());
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut all = self.lookup_many(&[conn.to_string()]).await?;
        let agents: Arc<[RemoteAgent]> = all.remove(conn).unwrap_or_default().into();
        if self.epoch.load(Ordering::SeqCst) == epoch {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= LOOKUP_CACHE_MAX {
                cache.retain(|_, c| c.at.elapsed() < LOOKUP_CACHE_TTL);
                if cache.len() >= LOOKUP_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(
                conn.to_string(),
                Cached {
                    at: Instant::now(),
                    agents: agents.clone(),
                },
            );
        }
        Ok(agents)
    }

    /// The agent streams held by other live replicas for each of `conns`
    /// (two round trips whatever their number; not cached).
    pub async fn lookup_many(
        &self,
        conns: &[String],
    ) -> Result<HashMap<String, Vec<RemoteAgent>>, RegistryError> {
        let r = self.read(conns).await;
        match &r {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed("reading agent streams", e),
        }
        r
    }

    async fn read(
        &self,
        conns: &[String],
    ) -> Result<HashMap<String, Vec<RemoteAgent>>, RegistryError> {
        if conns.is_empty() {
            return Ok(HashMap::new());
        }
        let mut c = self.redis.conn();
        let hashes: Vec<HashMap<String, String>> = if conns.len() == 1 {
            self.sent(1);
            vec![c.hgetall(agents_key(&conns[0])).await.map_err(err)?]
        } else {
            let mut p = redis::pipe();
            for conn in conns {
                p.cmd("HGETALL").arg(agents_key(conn));
            }
            self.sent(p.len());
            p.query_async(&mut c).await.map_err(err)?
        };
        let ids: BTreeSet<String> = hashes
            .iter()
            .flat_map(|h| h.keys())
            .filter_map(|f| f.rsplit_once('/').map(|(r, _)| r.to_string()))
            .collect();
        let ids: Vec<String> = ids.into_iter().collect();
        let infos: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<String> = ids.iter().map(|id| replica_key(id)).collect();
            self.sent(1);
            redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .map_err(err)?
        };
        let live: HashMap<String, (ReplicaInfo, SystemTime)> = ids
            .into_iter()
            .zip(infos)
            .filter_map(|(id, v)| {
                let info: ReplicaInfo = serde_json::from_str(v.as_deref()?).ok()?;
                let started = parse_time(&info.started)?;
                Some((id, (info, started)))
            })
            .collect();
        let mut out: HashMap<String, Vec<RemoteAgent>> = HashMap::new();
        let mut stale: Vec<(String, String)> = Vec::new();
        let mut dead: BTreeSet<String> = BTreeSet::new();
        for (conn, hash) in conns.iter().zip(hashes) {
            let list = out.entry(conn.clone()).or_default();
            for (field, value) in hash {
                let Some((replica, _)) = field.rsplit_once('/') else {
                    continue;
                };
                let entry: Option<AgentEntry> = serde_json::from_str(&value).ok();
                let since = entry.as_ref().and_then(|e| parse_time(&e.connected_since));
                let Some((info, started)) = live.get(replica) else {
                    dead.insert(replica.to_string());
                    stale.push((conn.clone(), field));
                    continue;
                };
                // Written by an earlier process with the same replica id.
                if since.is_none_or(|s| s < *started) {
                    stale.push((conn.clone(), field));
                    continue;
                }
                if replica == self.replica_id {
                    continue;
                }
                if let Some(entry) = entry {
                    list.push(RemoteAgent {
                        replica: replica.to_string(),
                        peer: info.peer.clone(),
                        entry,
                    });
                }
            }
            list.sort_by(|a, b| {
                (a.entry.draining, &a.replica, &a.entry.connected_since).cmp(&(
                    b.entry.draining,
                    &b.replica,
                    &b.entry.connected_since,
                ))
            });
        }
        if !stale.is_empty() {
            self.clean(stale, dead);
        }
        Ok(out)
    }

    /// Deletes entries of dead replicas in the background (one clean-up at
    /// a time; the next reader does what this one skipped).
    fn clean(&self, stale: Vec<(String, String)>, dead: BTreeSet<String>) {
        if self.cleaning.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut p = redis::pipe();
        let mut by_conn: HashMap<String, Vec<String>> = HashMap::new();
        for (conn, field) in stale {
            by_conn.entry(conn).or_default().push(field);
        }
        for (conn, fields) in &by_conn {
            p.cmd("HDEL").arg(agents_key(conn)).arg(fields).ignore();
        }
        if !dead.is_empty() {
            p.cmd("SREM")
                .arg(REPLICAS_KEY)
                .arg(dead.iter().collect::<Vec<_>>())
                .ignore();
        }
        self.sent(p.len());
        let mut c = self.redis.conn();
        let flag = Cleaning(self.cleaning.clone());
        tokio::spawn(async move {
            let r: redis::RedisResult<()> = p.query_async(&mut c).await;
            match r {
                Ok(()) => debug!(
                    connections = by_conn.len(),
                    dead = dead.len(),
                    "tunnel registry: removed entries of dead replicas"
                ),
                Err(e) => debug!(error = %e, "tunnel registry: clean-up failed"),
            }
            drop(flag);
        });
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

/// Clears the clean-up flag however the clean-up task ends.
struct Cleaning(Arc<AtomicBool>);

impl Drop for Cleaning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn set_written(
    written: &mut HashMap<String, HashMap<String, String>>,
    conn: String,
    desired: HashMap<String, String>,
) {
    if desired.is_empty() {
        written.remove(&conn);
    } else {
        written.insert(conn, desired);
    }
}
