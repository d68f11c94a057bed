//! Changes of the connection table while the broker runs.
//!
//! The table is the config file merged with the API store
//! ([`ConnectionSet::from_sources`]). It is rebuilt whole and swapped in
//! atomically when the file changes (SIGHUP, or the file watcher: the file's
//! and its `token_file`s' size and modification time are polled every 2 s)
//! and after every API write. Requests already running keep the
//! `Arc<Connection>` they started with; the next request sees the new one, so
//! a rotated token is used at once and no request in flight fails. Agents
//! whose accessKey no longer matches their connection (rotated or deleted)
//! are disconnected.

use crate::config::file::FileConfig;
use crate::config::ConnectionSet;
use crate::state::AppState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// How often the config file is checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

type Fingerprint = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            (p.clone(), meta)
        })
        .collect()
}

fn watched(path: &Path, file: &FileConfig) -> Vec<PathBuf> {
    let mut v = vec![path.to_path_buf()];
    v.extend(ConnectionSet::token_files(file, path.parent()));
    v
}

/// Spawns the SIGHUP handler and the file watcher (no-op without a config file).
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
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = fingerprint(&watched(&path, &state.file()));
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => "SIGHUP",
                _ = tick.tick() => {
                    let now = fingerprint(&watched(&path, &state.file()));
                    if now == last {
                        continue;
                    }
                    "file changed"
                }
            };
            match reload_file(&state, &path).await {
                Ok(()) => {
                    info!(path = %path.display(), trigger = why, "configuration reloaded")
                }
                Err(e) => {
                    error!(path = %path.display(), trigger = why, "reload failed, keeping the previous configuration: {e:#}")
                }
            }
            last = fingerprint(&watched(&path, &state.file()));
        }
    });
}

/// Re-reads the config file and rebuilds the table.
pub async fn reload_file(state: &AppState, path: &Path) -> anyhow::Result<()> {
    let _w = state.write_lock.lock().await;
    let file = FileConfig::read(path)?;
    let set = ConnectionSet::from_sources(
        &file,
        path.parent(),
        &state.store.snapshot().connections,
        &state.config.extra_ca_pem,
        &state.config.policy,
    )?;
    state.set_file(file);
    apply(state, set);
    Ok(())
}

/// Swaps in a new table and disconnects agents it no longer admits.
pub fn apply(state: &AppState, set: ConnectionSet) {
    for s in state.registry.all() {
        let keep = set.get(&s.conn_id).is_some_and(|new| {
            new.mode == crate::config::Mode::Agent
                && state
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
