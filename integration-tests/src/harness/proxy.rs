//! A real corporate proxy for the tests: Debian's tinyproxy on an ephemeral
//! port, optionally with basic auth, logging every request (CONNECT lines
//! included) to stderr, where the test reads them.

use super::process::Proc;
use super::WAIT;
use std::os::unix::fs::PermissionsExt;
use tokio::process::Command;

/// A running tinyproxy.
pub struct Proxy {
    /// The process (its log lines).
    pub proc: Proc,
    /// Port.
    pub port: u16,
    auth: Option<(String, String)>,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts tinyproxy; with `auth`, clients must send basic credentials.
    pub async fn start(auth: Option<(&str, &str)>) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        // tinyproxy takes its port from the config file: take a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Info\nMaxClients 200\nDisableViaHeader Yes\n"
        );
        if nix_is_root() {
            conf.push_str("User nobody\nGroup nogroup\n");
        }
        if let Some((u, p)) = auth {
            conf.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).expect("write conf");
        let proc = spawn(&path).await;
        Proxy {
            proc,
            port,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            conf: path,
            _dir: dir,
        }
    }

    /// Kills the proxy (SIGKILL), as a crashing proxy would die.
    pub async fn kill(&mut self) {
        self.proc.kill9().await;
    }

    /// Starts the proxy again on the same port, after [`Proxy::kill`].
    pub async fn restart(&mut self) {
        self.proc.kill9().await;
        self.proc = spawn(&self.conf).await;
    }

    /// The proxy URL, with credentials when configured.
    pub fn url(&self) -> String {
        match &self.auth {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// Log lines mentioning a CONNECT to `host_port`.
    pub fn connects_to(&self, host_port: &str) -> usize {
        self.proc
            .lines()
            .iter()
            .filter(|l| l.contains("CONNECT") && l.contains(host_port))
            .count()
    }
}

async fn spawn(conf: &std::path::Path) -> Proc {
    let mut cmd = Command::new("tinyproxy");
    cmd.arg("-d").arg("-c").arg(conf);
    let proc = Proc::spawn("tinyproxy", cmd);
    proc.wait_for_text("Accepting connections", WAIT).await;
    proc
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
