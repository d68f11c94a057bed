//! A real Redis for the cluster-mode tests: Debian's `redis-server` on an
//! ephemeral port, no persistence, its log read for readiness; `redis-cli`
//! for what the tests inspect.

use super::process::Proc;
use super::WAIT;
use std::time::Duration;
use tokio::process::Command;

/// A running `redis-server`.
pub struct Redis {
    /// The process (its log lines).
    pub proc: Proc,
    /// Port on 127.0.0.1.
    pub port: u16,
    password: Option<String>,
    starts: usize,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// What `redis-server` logs when its port was taken between `free_port()`
/// and its own bind (another test's process got there first).
const PORT_TAKEN: &str = "Could not create server TCP listening socket";

/// Starts `redis-server` on `port`; `None` when the port was taken.
async fn try_spawn(
    port: u16,
    password: Option<&str>,
    dir: &std::path::Path,
    n: usize,
) -> Option<Proc> {
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--loglevel", "notice"]);
    if let Some(p) = password {
        cmd.arg("--requirepass").arg(p);
    }
    let proc = Proc::spawn(&format!("redis#{n}"), cmd);
    let line = proc
        .wait_for_any_text(&["Ready to accept connections", PORT_TAKEN], WAIT)
        .await;
    (!line.contains(PORT_TAKEN)).then_some(proc)
}

async fn spawn(port: u16, password: Option<&str>, dir: &std::path::Path, n: usize) -> Proc {
    try_spawn(port, password, dir, n)
        .await
        .unwrap_or_else(|| panic!("redis-server: port {port} is taken by another process"))
}

impl Redis {
    /// Starts Redis on a free port (with `requirepass` when `password` is set).
    pub async fn start(password: Option<&str>) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        // The port is free when picked but may be taken before redis-server
        // binds it (tests run in parallel): then pick another.
        let mut attempt = 0;
        let (port, proc) = loop {
            attempt += 1;
            let port = free_port();
            match try_spawn(port, password, dir.path(), 1).await {
                Some(p) => break (port, p),
                None if attempt < 5 => continue,
                None => {
                    panic!("redis-server: 5 free ports in a row were taken before it bound them")
                }
            }
        };
        Redis {
            proc,
            port,
            password: password.map(str::to_string),
            starts: 1,
            _dir: dir,
        }
    }

    /// `redis://127.0.0.1:port` (without the password: brokers read it from
    /// `GITPROXY_REDIS_PASSWORD_FILE`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops Redis hard (SIGKILL), as a crash or a network cut would.
    pub async fn kill(&mut self) {
        self.proc.kill9().await;
    }

    /// Starts Redis again on the same port, empty (no persistence), after
    /// [`Redis::kill`].
    pub async fn restart(&mut self) {
        self.proc.kill9().await;
        self.starts += 1;
        self.proc = spawn(
            self.port,
            self.password.as_deref(),
            self._dir.path(),
            self.starts,
        )
        .await;
    }

    /// Runs `redis-cli` with `args` and returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.env("REDISCLI_AUTH", p);
        }
        let out = tokio::time::timeout(WAIT, cmd.args(args).output())
            .await
            .expect("redis-cli answers in time")
            .expect("redis-cli runs (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key and value in the database as `redis-cli --no-raw` prints
    /// them (strings, hashes, lists, sets): what an attacker with read
    /// access to Redis would see.
    pub async fn dump(&self) -> String {
        let keys = self.cli(&["--scan"]).await;
        let mut out = String::new();
        for k in keys.lines().filter(|k| !k.is_empty()) {
            let kind = self.cli(&["type", k]).await;
            let v = match kind.trim() {
                "string" => self.cli(&["get", k]).await,
                "hash" => self.cli(&["hgetall", k]).await,
                "list" => self.cli(&["lrange", k, "0", "-1"]).await,
                "set" => self.cli(&["smembers", k]).await,
                "zset" => self.cli(&["zrange", k, "0", "-1", "withscores"]).await,
                other => format!("({other})\n"),
            };
            out.push_str(&format!("{k}:\n{v}"));
        }
        out
    }

    /// Commands Redis processed so far (`INFO stats` total_commands_processed).
    pub async fn commands_processed(&self) -> u64 {
        let info = self.cli(&["info", "stats"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Limit on a Redis-dependent change becoming visible in a test.
pub const SETTLE: Duration = Duration::from_secs(10);
