//! The broker's shared state: configuration, the live connection table
//! (swapped whole on reload), the agent registry and the drain flag.

use crate::config::{BrokerConfig, ConnectionSet};
use crate::tunnel::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// Shared by every listener and task.
pub struct AppState {
    /// Static configuration (listeners, tuning).
    pub config: BrokerConfig,
    connections: RwLock<Arc<ConnectionSet>>,
    /// Connected agents.
    pub registry: Arc<Registry>,
    draining: AtomicBool,
    /// Parent of every agent session's token: cancelling it ends all streams.
    pub shutdown_children: CancellationToken,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl AppState {
    /// State for `config`.
    pub fn new(config: BrokerConfig) -> Arc<Self> {
        let connections = RwLock::new(Arc::new(config.connections.clone()));
        Arc::new(AppState {
            config,
            connections,
            registry: Arc::new(Registry::default()),
            draining: AtomicBool::new(false),
            shutdown_children: CancellationToken::new(),
            in_flight: Mutex::new(HashMap::new()),
        })
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
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: readiness goes false and every agent is asked to drain.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for s in self.registry.all() {
            s.drain("broker shutting down");
        }
    }

    /// Takes one in-flight slot of `conn_id`, or `None` when `max` are taken.
    pub fn try_acquire(&self, conn_id: &str, max: usize) -> Option<InFlightGuard> {
        let counter = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(conn_id.to_string()).or_default().clone()
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
