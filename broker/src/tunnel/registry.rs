//! The agents connected for each connection, and the choice of one for a
//! request: the least busy open stream that is not draining, taking turns
//! among equals; a draining stream is used only when nothing else is left,
//! so a rolling restart never answers `agent_not_connected`. A retry skips
//! the sessions already tried.
//!
//! This registry is the source of truth for the streams held by this
//! process. In cluster mode it is mirrored into Redis
//! (`crate::cluster::registry`): every add, removal and drain marks the
//! connection in [`Changes`], and the mirror writes what changed.

use super::session::AgentSession;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Default)]
struct ConnAgents {
    sessions: Vec<Arc<AgentSession>>,
    turn: AtomicUsize,
}

/// Connections whose agent streams changed (one opened, closed or started
/// draining) since the mirror last looked. A set, not a queue: a burst of
/// changes of one connection is one entry, and memory is bounded by the
/// number of connections. Off (marking costs nothing) until enabled.
#[derive(Default)]
pub struct Changes {
    enabled: AtomicBool,
    dirty: Mutex<HashSet<String>>,
    notify: tokio::sync::Notify,
}

impl Changes {
    /// Starts recording (cluster mode).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Records that the streams of `conn` changed.
    pub fn mark(&self, conn: &str) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !d.contains(conn) {
            d.insert(conn.to_string());
        }
        drop(d);
        // A stored permit: a change made while nobody waits is not lost.
        self.notify.notify_one();
    }

    /// Records several connections at once (a failed write, retried later).
    pub fn mark_all<'a>(&self, conns: impl IntoIterator<Item = &'a String>) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.extend(conns.into_iter().cloned());
    }

    /// Takes the connections changed so far.
    pub fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits for the next change.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// Every connected agent, by connection id.
#[derive(Default)]
pub struct Registry {
    by_conn: RwLock<HashMap<String, ConnAgents>>,
    changes: Arc<Changes>,
}

impl Registry {
    /// Adds a session.
    pub fn add(&self, s: Arc<AgentSession>) {
        s.report_changes_to(self.changes.clone());
        let conn = s.conn_id.clone();
        {
            let mut map = self.by_conn.write().unwrap_or_else(|e| e.into_inner());
            map.entry(conn.clone()).or_default().sessions.push(s);
        }
        self.changes.mark(&conn);
    }

    /// Removes a session (idempotent).
    pub fn remove_session(&self, s: &AgentSession) {
        {
            let mut map = self.by_conn.write().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get_mut(&s.conn_id) {
                c.sessions.retain(|x| !std::ptr::eq(Arc::as_ptr(x), s));
                if c.sessions.is_empty() {
                    map.remove(&s.conn_id);
                }
            }
        }
        self.changes.mark(&s.conn_id);
    }

    /// The feed of changed connections (for the cluster mirror).
    pub fn changes(&self) -> &Arc<Changes> {
        &self.changes
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

    /// What this process holds for `conn_id`: (any open stream, any open
    /// stream that is not draining).
    pub fn local_state(&self, conn_id: &str) -> (bool, bool) {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        let Some(c) = map.get(conn_id) else {
            return (false, false);
        };
        let open = c.sessions.iter().filter(|s| !s.is_closed());
        let (mut any, mut ready) = (false, false);
        for s in open {
            any = true;
            ready |= !s.is_draining();
        }
        (any, ready)
    }

    /// The sessions of one connection.
    pub fn sessions(&self, conn_id: &str) -> Vec<Arc<AgentSession>> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        map.get(conn_id)
            .map(|c| c.sessions.clone())
            .unwrap_or_default()
    }

    /// The ids of the connections with at least one session.
    pub fn connection_ids(&self) -> Vec<String> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// Every session.
    pub fn all(&self) -> Vec<Arc<AgentSession>> {
        let map = self.by_conn.read().unwrap_or_else(|e| e.into_inner());
        map.values()
            .flat_map(|c| c.sessions.iter().cloned())
            .collect()
    }
}
