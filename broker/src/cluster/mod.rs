//! Cluster mode: several broker replicas sharing one Redis (or Valkey), so
//! the cloud side scales out and restarts without losing anyone's tunnel.
//!
//! Without `--redis-url` none of this runs: one process keeps its tunnels
//! in memory and its API store under `--data-dir`, as before.
//!
//! Layout:
//! - [`redis`]: the shared connection to Redis (lazy, reconnecting) and
//!   whether it currently answers.
//! - [`registry`]: the tunnel registry in Redis: which live replica holds
//!   which agent streams, written from the local registry, read (cached)
//!   when a request lands on a replica without a local agent.
//! - [`peer`]: the authenticated channel between replicas: the peer
//!   listener and the pooled client the front door forwards through
//!   (routing itself: `crate::frontdoor::route`).
//! - [`relay`]: an HTTP/1.1 caller's connection relayed whole to the
//!   replica holding the agent, following message boundaries (the cheap
//!   path; per-request forwarding remains for HTTP/2 and edge cases).

pub mod peer;
pub mod redis;
pub mod registry;
pub mod relay;

use crate::config::cluster::ClusterSettings;
use std::net::SocketAddr;
use std::sync::Arc;

/// This replica's part in the cluster.
pub struct Cluster {
    /// The validated settings.
    pub settings: ClusterSettings,
    /// The connection to Redis.
    pub redis: redis::RedisHandle,
    /// The tunnel registry.
    pub registry: Arc<registry::ClusterRegistry>,
    /// Connections to the other replicas.
    pub peers: peer::client::PeerClient,
    /// The address other replicas dial (the bound port when
    /// `--peer-listen` asked for port 0).
    pub advertise: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica_id", &self.settings.replica_id)
            .field("redis", &self.settings.redis_url.as_str())
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

/// The address to advertise: `--peer-advertise` (default `--peer-listen`),
/// with the bound port when it says port 0.
pub fn advertised(settings: &ClusterSettings, bound: SocketAddr) -> String {
    match settings.peer_advertise.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{}", bound.port()),
        _ => settings.peer_advertise.clone(),
    }
}

impl Cluster {
    /// Sets up the cluster part of a replica whose peer listener is bound
    /// at `peer_bound`. Redis is connected lazily: a replica starts (and
    /// serves its own agents) while Redis is down.
    pub fn new(
        settings: ClusterSettings,
        extra_ca_pem: &[u8],
        peer_bound: SocketAddr,
    ) -> anyhow::Result<Arc<Cluster>> {
        let redis = redis::RedisHandle::new(&settings, extra_ca_pem)?;
        let advertise = advertised(&settings, peer_bound);
        let registry = Arc::new(registry::ClusterRegistry::new(
            redis.clone(),
            &settings.replica_id,
            &advertise,
            settings.registry_ttl,
        ));
        let peers = peer::client::PeerClient::new(&settings.peer_secret, &settings.replica_id)?;
        Ok(Arc::new(Cluster {
            settings,
            redis,
            registry,
            peers,
            advertise,
        }))
    }

    /// This replica's id in the registry.
    pub fn replica_id(&self) -> &str {
        &self.settings.replica_id
    }
}
