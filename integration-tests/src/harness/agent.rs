//! The agent started for a test, with its own state file.

use super::process::Proc;
use super::{bin, WAIT};
use std::path::PathBuf;
use tokio::process::Command;

/// A running agent.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its state file (for `gitproxy-agent health`).
    pub state_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent for `broker_url` with `key` and extra environment.
    pub fn spawn(name: &str, broker_url: &str, key: &str, env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_file = dir.path().join("state.json");
        let mut cmd = Command::new(bin("gitproxy-agent"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GITPROXY_BROKER_URL", broker_url)
            .env("GITPROXY_ACCESS_KEY", key)
            .env("GITPROXY_STATE_FILE", &state_file)
            .env("GITPROXY_INSTANCE", name)
            .env("GITPROXY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent {
            proc: Proc::spawn(name, cmd),
            state_file,
            _dir: dir,
        }
    }

    /// Starts an agent and waits until it is connected.
    pub async fn start(name: &str, broker_url: &str, key: &str, env: &[(&str, &str)]) -> Agent {
        let a = Agent::spawn(name, broker_url, key, env);
        a.wait_connected(1).await;
        a
    }

    /// Waits for the n-th "connected to the broker" line.
    pub async fn wait_connected(&self, n: usize) {
        self.proc
            .wait_for_nth(n, WAIT, |v| v["message"] == "connected to the broker")
            .await;
    }

    /// Runs `gitproxy-agent health` against this agent's state file.
    pub async fn health(&self) -> bool {
        Command::new(bin("gitproxy-agent"))
            .arg("health")
            .arg("--state-file")
            .arg(&self.state_file)
            .output()
            .await
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}
