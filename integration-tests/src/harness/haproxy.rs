//! A real load balancer for the cluster tests: Debian's HAProxy on loopback,
//! in front of the replicas as a cloud load balancer would be.
//!
//! - [`Mode::Tcp`] (agent listeners): TCP passthrough, least connections;
//!   a replica counts as up while its api listener's `/readyz` answers 200,
//!   so a draining or dead replica gets no new agent streams while the
//!   streams it holds continue.
//! - [`Mode::Http`] (api listeners): HTTP/1.1, round robin over ready
//!   replicas; a request that could not be delivered (connection refused,
//!   closed before any answer) is sent to another replica, as Kubernetes
//!   Services with an ingress in front do.
//!
//! A connection attempt that fails (a replica stopped or restarting) is
//! retried on another replica at once (`option redispatch 1`), not after
//! HAProxy's one-second turn-around on the same one.
//!
//! [`Haproxy::tls_front`] is the other use: a TLS terminator, which in front
//! of tinyproxy makes an `https://` corporate proxy of real parts.

use super::broker::Broker;
use super::process::Proc;
use super::WAIT;
use std::net::SocketAddr;
use tokio::process::Command;

/// How HAProxy balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TCP passthrough (agent listeners: gRPC over HTTP/2, TLS or not).
    Tcp,
    /// HTTP/1.1 with retries on another replica (api listeners).
    Http,
}

/// One replica behind the balancer.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Name in HAProxy's log.
    pub name: String,
    /// Where traffic goes.
    pub addr: SocketAddr,
    /// The replica's api listener: its `/readyz` is the health check.
    pub health: SocketAddr,
}

/// A running HAProxy.
pub struct Haproxy {
    /// The process (its log lines: one per connection or request).
    pub proc: Proc,
    /// Where clients connect.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// The agent listeners of `replicas` (named `r0`, `r1`, ...), each checked
/// through its `/readyz`: for a [`Mode::Tcp`] balancer agents dial.
pub fn agent_backends(replicas: &[Broker]) -> Vec<Backend> {
    backends(replicas, |b| b.agent_addr)
}

/// The api listeners of `replicas` (named `r0`, `r1`, ...): for a
/// [`Mode::Http`] balancer callers go through.
pub fn api_backends(replicas: &[Broker]) -> Vec<Backend> {
    backends(replicas, |b| b.api_addr)
}

fn backends(replicas: &[Broker], addr: impl Fn(&Broker) -> SocketAddr) -> Vec<Backend> {
    replicas
        .iter()
        .enumerate()
        .map(|(i, b)| Backend {
            name: format!("r{i}"),
            addr: addr(b),
            health: b.api_addr,
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The configuration text for `mode` and `backends` on `port`.
pub fn config(mode: Mode, port: u16, backends: &[Backend]) -> String {
    let mut c = preamble(4000);
    c.push_str("  timeout check 1s\n  retries 3\n  option redispatch 1\n");
    match mode {
        Mode::Tcp => c.push_str("  mode tcp\n  option tcplog\n"),
        Mode::Http => c.push_str(
            "  mode http\n  option httplog\n  option http-buffer-request\n  \
             retry-on conn-failure empty-response\n  timeout http-request 30s\n",
        ),
    }
    c.push_str(&format!(
        "\nfrontend front\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
         backend replicas\n  balance {}\n  option httpchk GET /readyz\n  http-check expect status 200\n",
        if mode == Mode::Tcp {
            "leastconn"
        } else {
            "roundrobin"
        }
    ));
    for b in backends {
        c.push_str(&format!(
            "  server {} {} check addr {} port {} inter 200ms fall 1 rise 1\n",
            b.name,
            b.addr,
            b.health.ip(),
            b.health.port()
        ));
    }
    c
}

/// The configuration text of a TLS terminator on `port` in front of `to`.
pub fn tls_config(port: u16, pem: &std::path::Path, to: SocketAddr) -> String {
    let mut c = preamble(1000);
    c.push_str(&format!(
        "  mode tcp\n  option tcplog\n\n\
         frontend tls\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend plain\n\n\
         backend plain\n  server next {to}\n",
        pem.display()
    ));
    c
}

/// `global` (log to stdout, where the test reads it) and the start of
/// `defaults` shared by both uses: timeouts long enough for bulk transfers.
fn preamble(maxconn: u32) -> String {
    format!(
        "global\n  log stdout format raw local0 info\n  maxconn {maxconn}\n\n\
         defaults\n  log global\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n"
    )
}

impl Haproxy {
    /// Starts HAProxy in `mode` in front of `backends`.
    pub async fn start(mode: Mode, backends: &[Backend]) -> Haproxy {
        let port = free_port();
        Haproxy::spawn(port, &config(mode, port, backends)).await
    }

    /// Starts HAProxy as a TLS terminator: TLS on its port with the
    /// certificate and key in `pem` (one file, certificate first), plain TCP
    /// to `to`. In front of tinyproxy it makes an `https://` corporate proxy
    /// of real parts.
    pub async fn tls_front(pem: &std::path::Path, to: SocketAddr) -> Haproxy {
        let port = free_port();
        Haproxy::spawn(port, &tls_config(port, pem, to)).await
    }

    async fn spawn(port: u16, config: &str) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let bin = if std::path::Path::new("/usr/sbin/haproxy").exists() {
            "/usr/sbin/haproxy"
        } else {
            "haproxy"
        };
        let mut cmd = Command::new(bin);
        // -V prints "Using epoll() ..." once the configuration is loaded and
        // the frontend bound: the readiness signal.
        cmd.arg("-V").arg("-db").arg("-f").arg(&path);
        let proc = Proc::spawn("haproxy", cmd);
        proc.wait_for_text("as the polling mechanism", WAIT).await;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        Haproxy {
            proc,
            addr,
            _dir: dir,
        }
    }

    /// `http://addr` (agents dial it as their broker URL; clients as the
    /// front door).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
