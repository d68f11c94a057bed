//! The broker's shared state: the read-only settings, the live connection
//! table (swapped whole on reload), the agent registry and the drain token.

use crate::config::file::FileConfig;
use crate::config::{BrokerConfig, ConnectionSet};
use crate::observe::Observer;
use crate::store::Store;
use crate::tunnel::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// Shared by every listener and task.
pub struct AppState {
    /// Settings (listeners, tuning, policy): read-only after start.
    pub config: BrokerConfig,
    connections: RwLock<Arc<ConnectionSet>>,
    /// Connected agents.
    pub registry: Arc<Registry>,
    /// Parent of every agent session's token: cancelling it ends all streams.
    pub shutdown_children: CancellationToken,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// The API store (connections made through the API, tracked MRs).
    pub store: Store,
    /// Metrics and the WatchTunnel event feed.
    pub observer: Arc<Observer>,
    /// The config file as last read successfully.
    file: Mutex<FileConfig>,
    /// Serialises changes of the connection table (file reloads, API writes).
    pub write_lock: tokio::sync::Mutex<()>,
    /// The broker's one "draining" state: cancelled when shutdown begins.
    /// `/readyz` fails, new agent streams are refused, every agent is asked
    /// to drain and `WatchTunnel` streams end (they would otherwise hold the
    /// api listener's graceful drain). An agent stream's own draining flag
    /// (`AgentSession::is_draining`) is another thing: one stream asked to
    /// drain (max connection age, or the agent's own restart) while the
    /// broker keeps serving.
    pub draining: CancellationToken,
    /// Cluster mode (several replicas on Redis); `None`: one process.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl AppState {
    /// State for `config`, the opened store and the merged table.
    pub fn new(
        config: BrokerConfig,
        file: FileConfig,
        store: Store,
        connections: ConnectionSet,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Self> {
        let file = Mutex::new(file);
        Arc::new(AppState {
            config,
            connections: RwLock::new(Arc::new(connections)),
            registry: Arc::new(Registry::default()),
            shutdown_children: CancellationToken::new(),
            in_flight: Mutex::new(HashMap::new()),
            store,
            observer: Arc::new(Observer::new()),
            file,
            write_lock: tokio::sync::Mutex::new(()),
            draining: CancellationToken::new(),
            cluster,
        })
    }

    /// The config file as last read successfully.
    pub fn file(&self) -> FileConfig {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a newly read config file.
    pub fn set_file(&self, f: FileConfig) {
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// Requests in flight per connection.
    pub fn in_flight_counts(&self) -> std::collections::BTreeMap<String, usize> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    /// The current connection table.
    pub fn connections(&self) -> Arc<ConnectionSet> {
        self.connections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the connection table.
    pub fn set_connections(&self, set: ConnectionSet) {
        *self.connections.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }

    /// True once shutdown began (`/readyz` fails, agents are drained).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Starts draining: readiness goes false and every agent is asked to drain.
    pub fn begin_drain(&self) {
        self.draining.cancel();
        for s in self.registry.all() {
            s.drain("broker shutting down");
        }
    }

    /// Takes one in-flight slot of `conn_id`, or `None` when `max` are taken.
    pub fn try_acquire(&self, conn_id: &str, max: usize) -> Option<InFlightGuard> {
        let counter = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            // Look up first: the key is allocated once per connection, not per request.
            match map.get(conn_id) {
                Some(c) => c.clone(),
                None => map.entry(conn_id.to_string()).or_default().clone(),
            }
        };
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlightGuard { counter })
    }
}

/// One request's in-flight slot.
pub struct InFlightGuard {
    counter: Arc<AtomicUsize>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}
