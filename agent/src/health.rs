//! The agent's state, published in a small JSON file so that
//! `gitproxy-agent health` (a Kubernetes exec probe) can tell whether it is
//! connected without the agent opening any port; `health --metrics` prints
//! the agent's metrics, written beside it (see `metrics`).

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
    if let Err(e) = write_atomic(path, &serde_json::to_vec(&state).unwrap_or_default()) {
        tracing::warn!(path = %path.display(), "cannot write the state file: {e}");
    }
}

/// Writes `bytes` to `path` atomically: a reader sees the old or the new
/// content, never half of it.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = PathBuf::from(path);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    tmp.set_extension(format!("{ext}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The `health` command: exit 0 when a fresh state says connected. With
/// `metrics`, the agent's metrics go to stdout (OpenMetrics text) and the
/// verdict to stderr, with the same exit status.
pub fn probe(path: &Path, max_age: Duration, metrics: bool) -> ExitCode {
    if !metrics {
        let (code, verdict) = verdict(path, max_age);
        println!("{verdict}");
        return code;
    }
    let file = crate::metrics::path_for(path);
    match std::fs::read_to_string(&file) {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!(
                "FAIL: no agent metrics at {} ({e}); is the agent running?",
                file.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let (code, verdict) = verdict(path, max_age);
    eprintln!("{verdict}");
    code
}

/// Whether the agent is healthy, and the line that says so.
fn verdict(path: &Path, max_age: Duration) -> (ExitCode, String) {
    match std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
    {
        Some(s) if s.connected && now().saturating_sub(s.updated) <= max_age.as_secs() => {
            (ExitCode::SUCCESS, "ok: connected to the broker".into())
        }
        Some(s) if s.connected => (
            ExitCode::FAILURE,
            format!("FAIL: the agent's state is stale (no update for more than {max_age:?}); is it still running?"),
        ),
        Some(s) => (
            ExitCode::FAILURE,
            format!(
                "FAIL: not connected to the broker{}",
                s.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        ),
        None => (
            ExitCode::FAILURE,
            format!(
                "FAIL: no agent state at {} (is the agent running?)",
                path.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("gitproxy-health-{}", std::process::id()));
        let p = dir.join("state.json");
        assert_eq!(probe(&p, Duration::from_secs(60), false), ExitCode::FAILURE);
        publish(&p, true, None);
        assert_eq!(probe(&p, Duration::from_secs(60), false), ExitCode::SUCCESS);
        publish(&p, false, Some("x".into()));
        assert_eq!(probe(&p, Duration::from_secs(60), false), ExitCode::FAILURE);
        let _ = std::fs::remove_dir_all(dir);
    }
}
