//! The reference tunnel of `--peers`: rathole 0.5.0, plain TCP, on loopback.
//!
//! `scripts/bench.sh --peers` builds the binary once outside the repository
//! (`scripts/lib/rathole.sh`) and passes it as `--rathole PATH`. Here a
//! rathole server (the public side, in the broker's place) and a rathole
//! client (next to the upstream, in the agent's place) are started with one
//! service that forwards a loopback port to the benchmark's upstream, so the
//! small-request and bulk tables measure a plain TCP tunnel in the same run
//! as gitproxy and the direct path. Configs are TOML files in a temporary
//! directory; ports are ephemeral; the tunnel is ready when a request through
//! it answers 200.

use super::until_ok;
use anyhow::{bail, Context, Result};
use gitproxy_integration_tests::harness::process::Proc;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// The version `scripts/lib/rathole.sh` builds; the binary must report it.
pub const VERSION: &str = "0.5.0";

/// The one service of the tunnel (its name in both configs).
const SERVICE: &str = "upstream";

/// The `[server]` config: the control channel and the service's public port.
pub fn server_config(control: SocketAddr, service: SocketAddr, token: &str) -> String {
    format!(
        "[server]\nbind_addr = \"{control}\"\n\n[server.services.{SERVICE}]\ntoken = \"{token}\"\nbind_addr = \"{service}\"\n"
    )
}

/// The `[client]` config: where the server is and what the service reaches.
pub fn client_config(control: SocketAddr, upstream: SocketAddr, token: &str) -> String {
    format!(
        "[client]\nremote_addr = \"{control}\"\n\n[client.services.{SERVICE}]\ntoken = \"{token}\"\nlocal_addr = \"{upstream}\"\n"
    )
}

/// Checks that `bin` runs and is rathole [`VERSION`]; names it for the report.
pub fn check_binary(bin: &Path) -> Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "--rathole {}: cannot run it (scripts/bench.sh --peers builds it with scripts/lib/rathole.sh)",
                bin.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match describe(&text) {
        Some(name) if out.status.success() => Ok(name),
        _ => bail!(
            "--rathole {}: expected rathole {VERSION}, `--version` said {:?} ({})",
            bin.display(),
            text.trim(),
            out.status
        ),
    }
}

/// `rathole 0.5.0 (features ...)` from the output of `rathole --version`,
/// which prints its build facts one per line (`Build Version:       0.5.0`,
/// `cargo Features:      client,server`); `None` for another version.
fn describe(version_output: &str) -> Option<String> {
    let field = |name: &str| {
        version_output
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
    };
    (field("Build Version:")? == VERSION).then(|| {
        format!(
            "rathole {VERSION} (features {})",
            field("cargo Features:").unwrap_or("?")
        )
    })
}

/// A free loopback port (bound, then released for the child to take).
fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A running rathole server and client; both killed when dropped.
pub struct Rathole {
    pub server: Proc,
    pub client: Proc,
    /// `http://` base URL of the forwarded port (reaches the upstream).
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Rathole {
    /// Starts the pair in front of `upstream` and waits until a request
    /// through the tunnel answers 200.
    pub async fn start(bin: &Path, upstream: SocketAddr) -> Result<Rathole> {
        let dir = tempfile::tempdir()?;
        let (control, service) = (free_addr()?, free_addr()?);
        // Made at run time: no credential-shaped literal in the source.
        let token = format!("testpat-rathole-{:016x}", rand::random::<u64>());
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let server_toml = write("server.toml", server_config(control, service, &token))?;
        let client_toml = write("client.toml", client_config(control, upstream, &token))?;
        let spawn = |name: &str, mode: &str, cfg: &Path| {
            let mut cmd = Command::new(bin);
            // The same log level as the broker and agent get.
            cmd.arg(mode).arg(cfg).env("RUST_LOG", "info");
            Proc::spawn(name, cmd)
        };
        let server = spawn("rathole-server", "--server", &server_toml);
        let client = spawn("rathole-client", "--client", &client_toml);
        let url = format!("http://{service}");
        if let Err(e) = until_ok(&format!("{url}/api/v4/json1k"), Duration::from_secs(30)).await {
            bail!(
                "rathole tunnel not ready: {e:#}\nserver log:\n{}\nclient log:\n{}",
                server.lines().join("\n"),
                client.lines().join("\n")
            );
        }
        Ok(Rathole {
            server,
            client,
            url,
            _dir: dir,
        })
    }

    /// Process ids: server, client.
    pub fn pids(&self) -> [u32; 2] {
        [self.server.pid(), self.client.pid()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<'a>(cfg: &'a str, section: &str, key: &str) -> &'a str {
        let body = cfg
            .split(&format!("[{section}]\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no [{section}] in {cfg}"));
        let body = body.split("\n[").next().unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in [{section}] of {cfg}"))
            .trim_matches('"')
    }

    #[test]
    fn configs_pair_a_server_and_a_client_on_one_token() {
        let control: SocketAddr = "127.0.0.1:4100".parse().unwrap();
        let service: SocketAddr = "127.0.0.1:4101".parse().unwrap();
        let upstream: SocketAddr = "127.0.0.1:4102".parse().unwrap();
        let s = server_config(control, service, "testpat-t1");
        let c = client_config(control, upstream, "testpat-t1");
        assert_eq!(value(&s, "server", "bind_addr"), "127.0.0.1:4100");
        assert_eq!(value(&c, "client", "remote_addr"), "127.0.0.1:4100");
        let (ss, cs) = (
            format!("server.services.{SERVICE}"),
            format!("client.services.{SERVICE}"),
        );
        assert_eq!(value(&s, &ss, "bind_addr"), "127.0.0.1:4101");
        assert_eq!(value(&c, &cs, "local_addr"), "127.0.0.1:4102");
        assert_eq!(value(&s, &ss, "token"), "testpat-t1");
        assert_eq!(value(&c, &cs, "token"), "testpat-t1");
        // Plain TCP, the default transport: no transport section at all.
        for cfg in [&s, &c] {
            assert!(!cfg.contains("transport"), "{cfg}");
            assert_eq!(cfg.matches('[').count(), 2, "{cfg}");
        }
    }

    #[test]
    fn the_version_is_read_from_the_build_facts() {
        let out = "rathole \nBuild Timestamp:     2026-01-01T00:00:00Z\nBuild Version:       0.5.0\nCommit SHA:          None\ncargo Features:      client,server\n";
        assert_eq!(
            describe(out).as_deref(),
            Some("rathole 0.5.0 (features client,server)")
        );
        assert_eq!(describe(&out.replace("0.5.0", "0.4.8")), None);
        assert_eq!(describe("rathole 0.5.0\n"), None);
    }

    #[test]
    fn a_missing_binary_is_named_with_how_to_build_it() {
        let e = check_binary(Path::new("/nonexistent/rathole")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("/nonexistent/rathole"), "{msg}");
        assert!(msg.contains("scripts/lib/rathole.sh"), "{msg}");
    }

    #[test]
    fn another_program_is_not_taken_for_rathole() {
        // `true --version` exits 0 and prints no rathole build facts.
        let e = check_binary(Path::new("/bin/true")).unwrap_err();
        assert!(format!("{e:#}").contains("expected rathole 0.5.0"), "{e:#}");
    }
}
