//! The agent's state, published in a small JSON file so that
//! `gitproxy-agent health` (a Kubernetes exec probe) can tell whether it is
//! connected without the agent opening any port.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// Connected to the broker now.
    pub connected: bool,
    /// Unix seconds of the last refresh.
    pub updated: u64,
    /// Process id of the agent.
    pub pid: u32,
    /// Last error, when disconnected (never holds secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes the state atomically (temporary file, then rename).
pub fn publish(path: &Path, connected: bool, last_error: Option<String>) {
    let state = State {
        connected,
        updated: now(),
        pid: std::process::id(),
        last_error,
    };
    if let Err(e) = write_atomic(path, &state) {
        tracing::warn!(path = %path.display(), "cannot write the state file: {e}");
    }
}

fn write_atomic(path: &Path, state: &State) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = PathBuf::from(path);
    tmp.set_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(state).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

/// The `health` command: exit 0 when a fresh state says connected.
pub fn probe(path: &Path, max_age: Duration) -> ExitCode {
    match std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
    {
        Some(s) if s.connected && now().saturating_sub(s.updated) <= max_age.as_secs() => {
            println!("ok: connected to the broker");
            ExitCode::SUCCESS
        }
        Some(s) if s.connected => {
            println!("FAIL: the agent's state is stale (no update for more than {max_age:?}); is it still running?");
            ExitCode::FAILURE
        }
        Some(s) => {
            println!(
                "FAIL: not connected to the broker{}",
                s.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        None => {
            println!(
                "FAIL: no agent state at {} (is the agent running?)",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("gitproxy-health-{}", std::process::id()));
        let p = dir.join("state.json");
        assert_eq!(probe(&p, Duration::from_secs(60)), ExitCode::FAILURE);
        publish(&p, true, None);
        assert_eq!(probe(&p, Duration::from_secs(60)), ExitCode::SUCCESS);
        publish(&p, false, Some("x".into()));
        assert_eq!(probe(&p, Duration::from_secs(60)), ExitCode::FAILURE);
        let _ = std::fs::remove_dir_all(dir);
    }
}
