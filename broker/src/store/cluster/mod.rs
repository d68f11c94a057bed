//! The store in Redis (cluster mode), shared by every replica.
//!
//! Keys (all written by this module):
//! - `gitproxy:store:connections`: hash, connection id → JSON of the fields
//!   set through the API; the GitLab token sealed ([`super::crypto`], the
//!   connection id as associated data), the accessKey as its SHA-256 only.
//! - `gitproxy:store:mrs`: hash, `{connection}/{project_id}/{iid}` → JSON of
//!   a tracked merge request (written with HSETNX: two replicas tracking the
//!   same MR keep the first).
//! - `gitproxy:store:version`: integer, INCR by every write in the same
//!   MULTI as the write, so a reader that gets version V with the data
//!   (also one MULTI) has every write up to V.
//! - `gitproxy:store:keycheck`: a constant sealed with the store key; a
//!   replica with another key is refused before it reads or writes a token.
//!
//! Channels: `gitproxy:store:changed` carries the version after each write;
//! `gitproxy:store:applied` carries `"{replica_id} {version}"` once a
//! replica's connection table holds that version ([`super::sync`]).
//!
//! Every replica keeps a copy ([`ClusterStore::snapshot`]); requests read
//! the copy, never Redis. A write waits (at most [`ACK_TIMEOUT`]) until every
//! replica that received the change said it applied it
//! ([`ClusterStore::wait_applied`]), so the next request through any replica
//! sees it.
//!
//! Redis coming back empty (no `gitproxy:store:version` while this replica
//! had loaded a version > 0) is data loss: the replica logs it as an error
//! and re-seeds Redis from its copy, atomically and only if the store is
//! still empty (a Lua script), so exactly one replica seeds and the others
//! load what it wrote.

use super::crypto::{CryptoError, StoreKey};
use super::{StoreData, StoreError, StoredConnection, TrackedMr, Written};
use crate::cluster::redis::RedisHandle;
use crate::cluster::Cluster;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::{error, info, warn};

/// Hash of API-made connection fields.
pub const KEY_CONNECTIONS: &str = "gitproxy:store:connections";
/// Hash of tracked merge requests.
pub const KEY_MRS: &str = "gitproxy:store:mrs";
/// The store's version (INCR on every write).
pub const KEY_VERSION: &str = "gitproxy:store:version";
/// The sealed key check.
pub const KEY_CHECK: &str = "gitproxy:store:keycheck";
/// Channel: the version after a write.
pub const CHANNEL_CHANGED: &str = "gitproxy:store:changed";
/// Channel: `"{replica_id} {version}"` once a replica applied a version.
pub const CHANNEL_APPLIED: &str = "gitproxy:store:applied";
/// Set of registered replica ids (registry; read only here).
const KEY_REPLICAS: &str = "gitproxy:replicas";
/// Prefix of a live replica's key (registry; read only here).
const REPLICA_PREFIX: &str = "gitproxy:replica:";

/// Longest a write waits for the other replicas to apply it before
/// answering anyway (a replica that missed the change reloads it within
/// [`super::sync::POLL_INTERVAL`]).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Acknowledgements buffered for writers waiting on them.
const ACK_BUFFER: usize = 1024;

/// Re-seeds an empty store: sets everything only if the version key is
/// absent. KEYS: version, key check, connections, mrs. ARGV: version, key
/// check, number of connections, then id/value pairs of connections, then
/// field/value pairs of merge requests.
const RESEED_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
local n = tonumber(ARGV[3])
local i = 4
for _ = 1, n do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i < #ARGV do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return 1
";

/// A connection as Redis holds it: the token sealed.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedConnection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gitlab_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_sealed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_key_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    #[serde(default)]
    updated_at: String,
}

/// A replica saying it applied a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Its id.
    pub replica: String,
    /// The version its table holds.
    pub version: u64,
}

impl Ack {
    /// Parses an `applied` message (`"{replica_id} {version}"`).
    pub fn parse(payload: &[u8]) -> Option<Ack> {
        let text = std::str::from_utf8(payload).ok()?;
        let (replica, version) = text.split_once(' ')?;
        if replica.is_empty() || replica.len() > 64 {
            return None;
        }
        Some(Ack {
            replica: replica.to_string(),
            version: version.parse().ok()?,
        })
    }
}

/// A write whose acknowledgements are awaited.
pub struct Pending {
    /// The version the write made.
    pub version: u64,
    /// How many subscribers received the change (this replica's included).
    receivers: usize,
    /// Subscribed before the write, so no acknowledgement is missed.
    acks: broadcast::Receiver<Ack>,
    started: tokio::time::Instant,
}

#[derive(Debug, Default)]
struct Copy {
    data: StoreData,
    /// The Redis version `data` (and the connection table built from it)
    /// holds.
    version: u64,
    /// Whether Redis was ever read.
    loaded: bool,
}

/// What one atomic read of the store returns.
struct Raw {
    version: Option<u64>,
    key_check: Option<String>,
    connections: HashMap<String, String>,
    mrs: HashMap<String, String>,
}

/// The Redis backend.
pub struct ClusterStore {
    redis: RedisHandle,
    replica_id: String,
    key: StoreKey,
    copy: Mutex<Copy>,
    /// Serialises the operations that read Redis and replace the copy, so a
    /// reload never lands between a write and its update of the copy.
    io: tokio::sync::Mutex<()>,
    acks: broadcast::Sender<Ack>,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("replica_id", &self.replica_id)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

fn unavailable(redis: &RedisHandle, e: redis::RedisError) -> StoreError {
    redis.set_up(false);
    StoreError::Unavailable(e.to_string())
}

fn sealing(e: CryptoError) -> StoreError {
    StoreError::Unavailable(format!("cannot seal the token: {e}"))
}

/// A serde error without the input it choked on.
fn json_why(e: &serde_json::Error) -> String {
    format!(
        "{:?} JSON error at line {}, column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// One command or one pipeline, for [`ClusterStore::query`].
#[derive(Clone, Copy)]
enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl ClusterStore {
    /// Runs `q`, once more on a fresh connection when Redis dropped the one
    /// it went out on: after a Redis restart the shared connection fails its
    /// first command and reconnects, and an API write must not answer
    /// `store_unavailable` for that. Running a write twice is harmless: its
    /// `HSET`/`HDEL`/`HSETNX` are idempotent and the version only needs to
    /// grow. A refused connection (Redis down) is not retried.
    async fn query<T: redis::FromRedisValue>(&self, q: Query<'_>) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let mut con = self.redis.conn();
            let r = match q {
                Query::Cmd(c) => c.query_async(&mut con).await,
                Query::Pipe(p) => p.query_async(&mut con).await,
            };
            match r {
                Ok(v) => {
                    self.redis.set_up(true);
                    return Ok(v);
                }
                Err(e) if !retried && e.is_connection_dropped() && !e.is_connection_refusal() => {
                    tracing::debug!("Redis dropped the store's connection ({e}); trying once more");
                    retried = true;
                }
                Err(e) => return Err(unavailable(&self.redis, e)),
            }
        }
    }

    /// The store of `cluster`, empty until [`ClusterStore::load`].
    pub fn new(cluster: &Cluster) -> anyhow::Result<ClusterStore> {
        let key = StoreKey::new(&cluster.settings.store_key_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (acks, _) = broadcast::channel(ACK_BUFFER);
        Ok(ClusterStore {
            redis: cluster.redis.clone(),
            replica_id: cluster.replica_id().to_string(),
            key,
            copy: Mutex::new(Copy::default()),
            io: tokio::sync::Mutex::new(()),
            acks,
        })
    }

    fn copy(&self) -> std::sync::MutexGuard<'_, Copy> {
        self.copy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the local copy.
    pub fn snapshot(&self) -> StoreData {
        self.copy().data.clone()
    }

    /// The Redis version the local copy holds.
    pub fn version(&self) -> u64 {
        self.copy().version
    }

    /// Whether Redis was read at least once.
    pub fn loaded(&self) -> bool {
        self.copy().loaded
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    async fn fetch(&self) -> Result<Raw, StoreError> {
        type Hash = HashMap<String, String>;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(KEY_VERSION)
            .cmd("GET")
            .arg(KEY_CHECK)
            .cmd("HGETALL")
            .arg(KEY_CONNECTIONS)
            .cmd("HGETALL")
            .arg(KEY_MRS);
        let (version, key_check, connections, mrs): (Option<u64>, Option<String>, Hash, Hash) =
            self.query(Query::Pipe(&pipe)).await?;
        Ok(Raw {
            version,
            key_check,
            connections,
            mrs,
        })
    }

    /// Reads the store from Redis into the local copy; true when the copy
    /// changed (another version, or the first read). A value that does not
    /// open leaves the copy as it was.
    pub async fn load(&self) -> Result<bool, StoreError> {
        let _io = self.io.lock().await;
        let mut raw = self.fetch().await?;
        let (had, had_version, had_loaded) = {
            let c = self.copy();
            (c.data.clone(), c.version, c.loaded)
        };
        match raw.version {
            None if had_loaded && had_version > 0 => {
                error!(
                    version = had_version,
                    connections = had.connections.len(),
                    merge_requests = had.merge_requests.len(),
                    "Redis lost the API store ({KEY_VERSION} is gone: Redis restarted without persistence, or was flushed); re-seeding it from this replica's copy. Turn on Redis persistence (AOF or RDB) to keep it across restarts"
                );
                if self.reseed(&had, had_version + 1).await? {
                    error!(
                        version = had_version + 1,
                        "re-seeded the API store in Redis from this replica's copy"
                    );
                    self.publish(CHANNEL_CHANGED, (had_version + 1).to_string())
                        .await;
                } else {
                    info!("another replica re-seeded the API store first; loading its copy");
                }
                raw = self.fetch().await?;
                if raw.version.is_none() {
                    return Err(StoreError::Unavailable(
                        "the store vanished from Redis again while it was re-seeded".into(),
                    ));
                }
            }
            Some(v) if had_loaded && v < had_version => {
                error!(
                    from = had_version,
                    to = v,
                    "the API store in Redis went back to an older version (Redis restored from an older snapshot?): loading it; API changes made after that snapshot are lost"
                );
            }
            _ => {}
        }
        let version = raw.version.unwrap_or(0);
        let data = self.open(raw)?;
        let mut c = self.copy();
        let changed = !c.loaded || c.version != version;
        *c = Copy {
            data,
            version,
            loaded: true,
        };
        Ok(changed)
    }

    /// Writes `data` into an empty store as version `version`; false when
    /// the store was not empty (another replica re-seeded it first).
    async fn reseed(&self, data: &StoreData, version: u64) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RESEED_SCRIPT)
            .arg(4)
            .arg(KEY_VERSION)
            .arg(KEY_CHECK)
            .arg(KEY_CONNECTIONS)
            .arg(KEY_MRS)
            .arg(version)
            .arg(self.key.key_check().map_err(sealing)?)
            .arg(data.connections.len());
        for (id, c) in &data.connections {
            cmd.arg(id).arg(self.seal(id, c)?);
        }
        for mr in &data.merge_requests {
            let json = serde_json::to_string(mr).map_err(|e| StoreError::Corrupt {
                what: format!("merge request {:?}", Self::mr_field(mr)),
                why: json_why(&e),
            })?;
            cmd.arg(Self::mr_field(mr)).arg(json);
        }
        let done: i64 = self.query(Query::Cmd(&cmd)).await?;
        Ok(done == 1)
    }
}

mod seal;
#[cfg(test)]
mod tests;
mod write;
