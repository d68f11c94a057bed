//! The connection to Redis every cluster part shares: one multiplexed,
//! automatically reconnecting connection (redis-rs `ConnectionManager`),
//! short timeouts so a Redis outage costs a request milliseconds, not its
//! deadline, and a health flag for metrics and `/readyz` decisions.

use crate::config::cluster::ClusterSettings;
use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Limit on connecting to Redis.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit on one Redis command.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A cheap-to-clone handle on the shared Redis connection.
#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    manager: ConnectionManager,
    up: Arc<AtomicBool>,
}

impl RedisHandle {
    /// A lazily connected handle for `settings` (`extra_ca_pem`: CAs trusted
    /// besides the public roots for `rediss://`).
    pub fn new(settings: &ClusterSettings, extra_ca_pem: &[u8]) -> anyhow::Result<Self> {
        let mut info: redis::ConnectionInfo = settings
            .redis_url
            .as_str()
            .parse()
            .context("unusable --redis-url")?;
        if let Some(p) = &settings.redis_password {
            let with_password = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(with_password);
        }
        let client = if settings.redis_url.scheme() == "rediss" && !extra_ca_pem.is_empty() {
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(extra_ca_pem.to_vec()),
                },
            )
        } else {
            redis::Client::open(info)
        }
        .context("cannot set up the Redis client")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .context("cannot set up the Redis connection")?;
        Ok(RedisHandle {
            client,
            manager,
            up: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The multiplexed connection (clone it per use).
    pub fn conn(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// The client, for dedicated connections (e.g. subscriptions).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Records whether the last command reached Redis.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}
