//! The agents connected for each connection, and the choice of one for a
//! request: the least busy open stream that is not draining, taking turns
//! among equals; a draining stream is used only when nothing else is left,
//! so a rolling restart never answers `agent_not_connected`. A retry skips
//! the sessions already tried.

use super::session::AgentSession;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Default)]
struct ConnAgents {
    sessions: Vec<Arc<AgentSession>>,
    turn: AtomicUsize,
}

/// Every connected agent, by connection id.
#[derive(Default)]
pub struct Registry {
    by_conn: RwLock<HashMap<String, ConnAgents>>,
}

impl Registry {
    /// Adds a session.
    pub fn add(&self, s: Arc<AgentSession>) {
        let mut map = self.by_conn.write().unwrap_or_else(|e| e.into_inner());
        map.entry(s.conn_id.clone()).or_default().sessions.push(s);
    }

    /// Removes a session (idempotent).
    pub fn remove_session(&self, s: &AgentSession) {
        let mut map = self.by_conn.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get_mut(&s.conn_id) {
            c.sessions.retain(|x| !std::ptr::eq(Arc::as_ptr(x), s));
            if c.sessions.is_empty() {
                map.remove(&s.conn_id);
            }
        }
    }

    /// Picks the session for a new request of `conn_id`.
    pub fn pick(&self, conn_id: &str) -> Option<Arc<AgentSession>> {
        self.pick_excluding(conn_id, &[])
    }

    /// Picks the session for a new request of `conn_id` among those not in
    /// `tried` (the retry of a request goes to another agent, never back to
    /// the one that failed it).
    pub fn pick_excluding(
        &self,
        conn_id: &str,
        tried: &[Arc<AgentSession>],
    ) -> Option<Arc<AgentSession>> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        let c = map.get(conn_id)?;
        let n = c.sessions.len();
        if n == 0 {
            return None;
        }
        let start = c.turn.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<&Arc<AgentSession>> = None;
        for i in 0..n {
            let s = &c.sessions[(start + i) % n];
            if s.is_closed() || tried.iter().any(|t| Arc::ptr_eq(t, s)) {
                continue;
            }
            best = match best {
                None => Some(s),
                Some(b) => {
                    let key = |x: &AgentSession| (x.is_draining(), x.in_flight());
                    if key(s) < key(b) {
                        Some(s)
                    } else {
                        Some(b)
                    }
                }
            };
        }
        best.cloned()
    }

    /// The sessions of one connection.
    pub fn sessions(&self, conn_id: &str) -> Vec<Arc<AgentSession>> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        map.get(conn_id)
            .map(|c| c.sessions.clone())
            .unwrap_or_default()
    }

    /// Every session.
    pub fn all(&self) -> Vec<Arc<AgentSession>> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .flat_map(|c| c.sessions.iter().cloned())
            .collect()
    }
}
