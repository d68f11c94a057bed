//! Cluster mode: several broker replicas sharing one Redis (or Valkey), so
//! the cloud side scales out and restarts without losing anyone's tunnel.
//!
//! Without `--redis-url` none of this runs: one process keeps its tunnels
//! in memory and its API store under `--data-dir`, as before.
//!
//! Layout:
//! - [`redis`]: the shared connection to Redis (lazy, reconnecting) and
//!   whether it currently answers.

pub mod redis;

use crate::config::cluster::ClusterSettings;
use std::sync::Arc;

/// This replica's part in the cluster.
pub struct Cluster {
    /// The validated settings.
    pub settings: ClusterSettings,
    /// The connection to Redis.
    pub redis: redis::RedisHandle,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica_id", &self.settings.replica_id)
            .field("redis", &self.settings.redis_url.as_str())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Sets up the cluster part of a replica. Redis is connected lazily: a
    /// replica starts (and serves its own agents) while Redis is down.
    pub fn new(settings: ClusterSettings, extra_ca_pem: &[u8]) -> anyhow::Result<Arc<Cluster>> {
        let redis = redis::RedisHandle::new(&settings, extra_ca_pem)?;
        Ok(Arc::new(Cluster { settings, redis }))
    }

    /// This replica's id in the registry.
    pub fn replica_id(&self) -> &str {
        &self.settings.replica_id
    }
}
