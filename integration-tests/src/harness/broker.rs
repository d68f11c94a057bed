//! The broker started for a test: a TOML file in a temporary directory,
//! ephemeral ports read back from its `listening` log lines.

use super::process::Proc;
use super::{bin, WAIT};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Command;

/// A connection of the test configuration.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    /// Id.
    pub id: String,
    /// "agent" or "direct".
    pub mode: String,
    /// GitLab base URL.
    pub gitlab_url: String,
    /// Token, if any.
    pub token: Option<String>,
    /// The accessKey (its hash goes in the file).
    pub access_key: Option<String>,
    /// The URL GitLab calls itself, when it differs from `gitlab_url`.
    pub external_url: Option<String>,
}

impl ConnSpec {
    /// An agent-mode connection.
    pub fn agent(id: &str, gitlab_url: &str, access_key: &str) -> Self {
        ConnSpec {
            id: id.into(),
            mode: "agent".into(),
            gitlab_url: gitlab_url.into(),
            token: None,
            access_key: Some(access_key.into()),
            external_url: None,
        }
    }

    /// A direct-mode connection.
    pub fn direct(id: &str, gitlab_url: &str) -> Self {
        ConnSpec {
            id: id.into(),
            mode: "direct".into(),
            gitlab_url: gitlab_url.into(),
            token: None,
            access_key: None,
            external_url: None,
        }
    }

    /// With a token.
    pub fn token(mut self, t: &str) -> Self {
        self.token = Some(t.into());
        self
    }

    /// With GitLab's external URL (what it writes into `Link`/`Location`).
    pub fn external_url(mut self, u: &str) -> Self {
        self.external_url = Some(u.into());
        self
    }
}

/// In [`BrokerSpec::args`], replaced by the broker's own temporary directory
/// (which survives [`Broker::restart`]); e.g. `["--data-dir", "{dir}/data"]`.
pub const DIR_PLACEHOLDER: &str = "{dir}";

/// Everything a broker needs.
#[derive(Debug, Clone, Default)]
pub struct BrokerSpec {
    /// Connections.
    pub connections: Vec<ConnSpec>,
    /// API keys (plain; hashes go in the file).
    pub api_keys: Vec<String>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
}

/// How the broker process is run, besides its [`BrokerSpec`].
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Log in the text format (`GITPROXY_LOG_FORMAT=text`, `NO_COLOR=1`)
    /// instead of JSON; only the `listening` lines are parsed then.
    pub text_log: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// A running broker.
pub struct Broker {
    /// The process.
    pub proc: Proc,
    /// Agent listener.
    pub agent_addr: SocketAddr,
    /// API listener.
    pub api_addr: SocketAddr,
    spec: BrokerSpec,
    opts: BrokerOptions,
    dir: tempfile::TempDir,
    starts: usize,
}

fn toml_for(spec: &BrokerSpec) -> String {
    let mut s = String::new();
    if !spec.api_keys.is_empty() {
        let hashes: Vec<String> = spec
            .api_keys
            .iter()
            .map(|k| format!("\"{}\"", gitproxy_shared::secret::sha256_hex(k.as_bytes())))
            .collect();
        s.push_str(&format!("api_keys_sha256 = [{}]\n", hashes.join(", ")));
    }
    for c in &spec.connections {
        s.push_str(&format!(
            "[[connection]]\nid = \"{}\"\nmode = \"{}\"\ngitlab_url = \"{}\"\n",
            c.id, c.mode, c.gitlab_url
        ));
        if let Some(t) = &c.token {
            s.push_str(&format!("token = \"{t}\"\n"));
        }
        if let Some(u) = &c.external_url {
            s.push_str(&format!("external_url = \"{u}\"\n"));
        }
        if let Some(k) = &c.access_key {
            s.push_str(&format!(
                "access_key_sha256 = \"{}\"\n",
                gitproxy_shared::secret::sha256_hex(k.as_bytes())
            ));
        }
    }
    s
}

/// The address in a text-format `listening` line of `listener`.
fn text_listening_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
}

/// What the broker logs when a listener address is taken.
const BIND_FAILED: &str = "cannot bind";

/// The end of a start whose listener address was taken.
fn taken(p: Proc) -> (SocketAddr, Proc, SocketAddr) {
    panic!(
        "{}: a listener address is taken: {:?}",
        p.name,
        p.lines().last()
    )
}

/// Starts the broker; `Err` (with the exited process) when one of its
/// listener addresses is taken.
async fn try_spawn(
    spec: &BrokerSpec,
    opts: &BrokerOptions,
    dir: &std::path::Path,
    agent: &str,
    api: &str,
    n: usize,
) -> Result<(SocketAddr, Proc, SocketAddr), Proc> {
    let cfg = dir.join("broker.toml");
    std::fs::write(&cfg, toml_for(spec)).expect("write broker.toml");
    let mut cmd = Command::new(bin("gitproxy-broker"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--agent-listen")
        .arg(agent)
        .arg("--api-listen")
        .arg(api)
        .args(
            spec.args
                .iter()
                .map(|a| a.replace(DIR_PLACEHOLDER, &dir.display().to_string())),
        )
        .env(
            "GITPROXY_LOG_FORMAT",
            if opts.text_log { "text" } else { "json" },
        )
        .env(
            "RUST_LOG",
            std::env::var("GITPROXY_TEST_BROKER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("http_proxy");
    if opts.text_log {
        cmd.env("NO_COLOR", "1");
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let proc = Proc::spawn(&format!("broker#{n}"), cmd);
    if opts.text_log {
        let agent = proc
            .wait_for_any_text(&["listening listener=\"agent\"", BIND_FAILED], WAIT)
            .await;
        if agent.contains(BIND_FAILED) {
            return Err(proc);
        }
        let api = proc.wait_for_text("listening listener=\"api\"", WAIT).await;
        let parse = |l: &str| text_listening_addr(l).expect("addr in the listening line");
        return Ok((parse(&agent), proc, parse(&api)));
    }
    let a = proc
        .wait_for_nth(1, WAIT, |v| {
            (v["message"] == "listening" && v["listener"] == "agent")
                || v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(BIND_FAILED))
        })
        .await;
    if a["message"] != "listening" {
        return Err(proc);
    }
    let b = proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "listening" && v["listener"] == "api"
        })
        .await;
    let parse = |v: &serde_json::Value| {
        v["addr"]
            .as_str()
            .expect("addr")
            .parse::<SocketAddr>()
            .expect("addr")
    };
    Ok((parse(&a), proc, parse(&b)))
}

impl Broker {
    /// Starts a broker on ephemeral ports.
    pub async fn start(spec: BrokerSpec) -> Broker {
        Broker::start_with(spec, BrokerOptions::default()).await
    }

    /// Starts a broker on ephemeral ports, run as `opts` says.
    pub async fn start_with(spec: BrokerSpec, opts: BrokerOptions) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let (agent_addr, proc, api_addr) =
            try_spawn(&spec, &opts, dir.path(), "127.0.0.1:0", "127.0.0.1:0", 1)
                .await
                .unwrap_or_else(taken);
        Broker {
            proc,
            agent_addr,
            api_addr,
            spec,
            opts,
            dir,
            starts: 1,
        }
    }

    /// Kills the broker (SIGKILL) and starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.proc.kill9().await;
        self.starts += 1;
        let (a, p, b) = try_spawn(
            &self.spec,
            &self.opts,
            self.dir.path(),
            &self.agent_addr.to_string(),
            &self.api_addr.to_string(),
            self.starts,
        )
        .await
        .unwrap_or_else(taken);
        assert_eq!((a, b), (self.agent_addr, self.api_addr));
        self.proc = p;
    }

    /// Stops the broker as an orchestrator does (SIGTERM: its drain) and
    /// waits for it to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.proc.signal(libc::SIGTERM);
        match self.proc.wait_exit(timeout).await {
            Some(s) => s,
            None => panic!(
                "{}: did not exit within {timeout:?} of SIGTERM",
                self.proc.name
            ),
        }
    }

    /// Starts the broker again on the same agent and api ports (a load
    /// balancer names them) after it exited. A port taken meanwhile by
    /// another process (tests run in parallel on ephemeral ports) is tried
    /// again for a while.
    pub async fn start_again(&mut self) {
        self.starts += 1;
        let (agent, api) = (self.agent_addr.to_string(), self.api_addr.to_string());
        let mut attempts = 0;
        loop {
            attempts += 1;
            match try_spawn(
                &self.spec,
                &self.opts,
                self.dir.path(),
                &agent,
                &api,
                self.starts,
            )
            .await
            {
                Ok((a, p, b)) => {
                    assert_eq!((a, b), (self.agent_addr, self.api_addr));
                    self.proc = p;
                    return;
                }
                Err(p) if attempts < 50 => {
                    eprintln!(
                        "{}: port taken, trying again: {:?}",
                        p.name,
                        p.lines().last()
                    );
                    // No signal tells when another process frees a port:
                    // a short pause between bind attempts (at most ~5 s).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(p) => panic!(
                    "{}: the ports stayed taken for 50 attempts: {:?}",
                    p.name,
                    p.lines().last()
                ),
            }
        }
    }

    /// `http://agent-listener` for agents.
    pub fn agent_url(&self) -> String {
        format!("http://{}", self.agent_addr)
    }

    /// Front-door base of a connection.
    pub fn front(&self, conn: &str) -> String {
        format!("http://{}/gitlab/{conn}", self.api_addr)
    }

    /// The API base.
    pub fn api(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The TOML file the broker reads (rewrite it to test reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("broker.toml")
    }

    /// The TOML text for `spec` (as written at start).
    pub fn toml(spec: &BrokerSpec) -> String {
        toml_for(spec)
    }

    /// The temporary directory of this broker.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}
