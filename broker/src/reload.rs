//! Reloads the connection table from the config file on SIGHUP, so tokens
//! rotate without a restart. Agents whose accessKey no longer matches their
//! connection (rotated or deleted) are disconnected.

use crate::config::file::FileConfig;
use crate::config::ConnectionSet;
use crate::state::AppState;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Spawns the SIGHUP handler (no-op without a config file).
pub fn spawn(state: Arc<AppState>, shutdown: CancellationToken) {
    let Some(path) = state.config.config_file.clone() else {
        return;
    };
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            error!("cannot install the SIGHUP handler");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => {}
            }
            let base = path.parent().map(|p| p.to_path_buf());
            match FileConfig::read(&path).and_then(|f| {
                ConnectionSet::from_file(&f, base.as_deref(), &state.config.extra_ca_pem)
            }) {
                Ok(set) => {
                    apply(&state, set);
                    info!(path = %path.display(), "configuration reloaded");
                }
                Err(e) => {
                    error!(path = %path.display(), "reload failed, keeping the previous configuration: {e:#}")
                }
            }
        }
    });
}

/// Swaps in a new table and disconnects agents it no longer admits.
pub fn apply(state: &AppState, set: ConnectionSet) {
    for s in state.registry.all() {
        let keep = set.get(&s.conn_id).is_some_and(|new| {
            state
                .connections()
                .get(&s.conn_id)
                .is_some_and(|old| old.access_key_sha256 == new.access_key_sha256)
        });
        if !keep {
            info!(connection = %s.conn_id, instance = %s.instance, "disconnecting agent: its accessKey is no longer valid");
            s.close();
        }
    }
    state.set_connections(set);
}
