//! Idle, slow and too many connections (issue 10, defect 3): the broker's
//! two listeners under hostile or careless clients.
//!
//! - acceptance 3: the broker at its file-descriptor limit (`RLIMIT_NOFILE`
//!   256) with 300 idle connections stays cheap (CPU, log volume), closes
//!   every connection it accepted, and serves afterwards;
//! - slowloris (a header byte a second) cut by the header-read timeout;
//! - the agent listener closes a connection that never sends the HTTP/2
//!   preface, or never finishes its TLS handshake;
//! - idle HTTP/1.1 and h2c keep-alive connections closed after the idle
//!   timeout, while a request waiting longer than that for GitLab is not cut;
//! - the connection cap: a 5th connection waits in the listen queue until one
//!   of 4 closes.
//!
//! The limits are set through their `GITPROXY_*` variables, so a broker that
//! does not know them starts anyway and the test fails on behaviour. The
//! broker runs under this file's own process wrapper, which counts every log
//! byte but keeps at most [`KEPT_LOG_BYTES`] of them (a broker spinning on
//! `accept` writes gigabytes). Waits are on socket EOF, answers and log
//! lines, each bounded; the only timer-driven action is the slowloris
//! client's byte a second, which is the behaviour under test.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::pki::Ca;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, client, WAIT};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;

const KEY: &str = "limits-access-key-0123456789abcdef";
/// Log bytes kept in memory for assertions; the rest is only counted.
const KEPT_LOG_BYTES: u64 = 4 << 20;

// === a broker whose output is counted ===

/// A broker process: every stderr/stdout byte counted, lines kept up to
/// [`KEPT_LOG_BYTES`]. Killed when dropped.
struct Counted {
    child: Child,
    pid: u32,
    bytes: Arc<AtomicU64>,
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    agent_addr: SocketAddr,
    api_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Counted {
    /// Starts the broker with `spec`'s configuration file, extra `env`, and,
    /// when `nofile` is set, that `RLIMIT_NOFILE` (soft and hard).
    async fn start(spec: &BrokerSpec, env: &[(&str, &str)], nofile: Option<u64>) -> Counted {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("broker.toml");
        std::fs::write(&cfg, Broker::toml(spec)).expect("write broker.toml");
        let mut cmd = Command::new(bin("gitproxy-broker"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .args([
                "--agent-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(&spec.args)
            .env("GITPROXY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(n) = nofile {
            // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start gitproxy-broker");
        let pid = child.id().expect("pid");
        let bytes = Arc::new(AtomicU64::new(0));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let readers: [Box<dyn tokio::io::AsyncRead + Send + Unpin>; 2] = [
            Box::new(child.stderr.take().expect("stderr")),
            Box::new(child.stdout.take().expect("stdout")),
        ];
        for r in readers {
            let (bytes, lines, tx) = (bytes.clone(), lines.clone(), tx.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(r);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let total = bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                            if total <= KEPT_LOG_BYTES {
                                let n = {
                                    let mut v = lines.lock().unwrap();
                                    v.push(String::from_utf8_lossy(&line).trim_end().to_string());
                                    v.len()
                                };
                                let _ = tx.send(n);
                            }
                        }
                    }
                }
            });
        }
        let mut c = Counted {
            child,
            pid,
            bytes,
            lines,
            count: rx,
            agent_addr: "0.0.0.0:0".parse().unwrap(),
            api_addr: "0.0.0.0:0".parse().unwrap(),
            _dir: dir,
        };
        let addr =
            |v: Value| -> SocketAddr { v["addr"].as_str().expect("addr").parse().expect("addr") };
        c.agent_addr = addr(
            c.wait_for("the agent listener", WAIT, |v| {
                v["message"] == "listening" && v["listener"] == "agent"
            })
            .await,
        );
        c.api_addr = addr(
            c.wait_for("the api listener", WAIT, |v| {
                v["message"] == "listening" && v["listener"] == "api"
            })
            .await,
        );
        c
    }

    fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a JSON line matching `pred` (each new line is the signal).
    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut rx = self.count.clone();
        let look = async {
            loop {
                if let Some(v) = self.json_lines().into_iter().find(|v| pred(v)) {
                    return v;
                }
                if rx.changed().await.is_err() {
                    futures::future::pending::<()>().await;
                }
            }
        };
        match tokio::time::timeout(timeout, look).await {
            Ok(v) => v,
            Err(_) => panic!(
                "broker: no {what} within {timeout:?}; last lines:\n{}",
                self.tail(30)
            ),
        }
    }

    fn tail(&self, n: usize) -> String {
        let v = self.lines.lock().unwrap();
        v[v.len().saturating_sub(n)..].join("\n")
    }

    fn log_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    fn cpu(&self) -> Duration {
        cpu_time(self.pid)
    }

    fn front(&self, conn: &str) -> String {
        format!("http://{}/gitlab/{conn}", self.api_addr)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

// === socket helpers ===

/// How a connection ended for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// EOF or reset: the broker closed it.
    Closed,
    /// Still open when the wait ran out.
    Open,
}

/// Reads (discarding) until EOF or an error, at most `limit`.
async fn wait_closed(s: &mut TcpStream, limit: Duration) -> End {
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(limit, read).await {
        Ok(()) => End::Closed,
        Err(_) => End::Open,
    }
}

/// Sends a keep-alive HTTP/1.1 GET and reads one answer (head and
/// `Content-Length` body); returns the status and the body.
async fn h1_get(s: &mut TcpStream, path: &str) -> (u16, Vec<u8>) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: limits.test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if buf.len() >= end + 4 + len {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return (status, buf[end + 4..end + 4 + len].to_vec());
                }
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed before the answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("an answer")
}

/// Connections waiting in the kernel's accept queue of the listening socket
/// on `port` (the `rx_queue` of a LISTEN row of `/proc/net/tcp`).
fn accept_queue(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let listening = *f.get(3)? == "0A";
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && listening).then_some(rx)
        })
        .sum()
}

fn upstream_spec(up: &Upstream) -> BrokerSpec {
    BrokerSpec {
        connections: vec![ConnSpec::direct("acme-direct", &up.url())],
        ..Default::default()
    }
}

// === tests ===

/// Acceptance 3: at the file-descriptor limit, 300 idle connections cost
/// little CPU and little log, every one is closed by the broker within the
/// timeouts, and the broker serves normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance3_idle_connections_at_the_fd_limit() {
    const CONNECTIONS: usize = 300;
    // A connection waits in the listen queue while the broker is out of
    // descriptors, then gets its own timeout: two rounds, the accept
    // back-off (at most 1 s), and a wide margin for a loaded machine.
    const CLOSE_WITHIN: Duration = Duration::from_secs(2 * 2 + 1 + 8);
    let up = Upstream::start().await;
    let broker = Counted::start(
        &upstream_spec(&up),
        &[
            ("GITPROXY_HEADER_READ_TIMEOUT", "2s"),
            ("GITPROXY_HANDSHAKE_TIMEOUT", "2s"),
        ],
        Some(256),
    )
    .await;

    let (cpu0, log0, t0) = (broker.cpu(), broker.log_bytes(), Instant::now());
    let mut readers = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(broker.api_addr).await.expect("connect");
        let opened = Instant::now();
        readers.push(tokio::spawn(async move {
            let end = wait_closed(&mut s, CLOSE_WITHIN).await;
            (end, opened.elapsed())
        }));
    }
    let mut closed_after = Vec::with_capacity(CONNECTIONS);
    let mut still_open = 0;
    for r in readers {
        match r.await.expect("reader") {
            (End::Closed, d) => closed_after.push(d),
            (End::Open, _) => still_open += 1,
        }
    }
    let wall = t0.elapsed();
    let cpu = broker.cpu().saturating_sub(cpu0);
    let log = broker.log_bytes() - log0;
    let cpu_pct = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    closed_after.sort();
    let pct = |p: usize| {
        closed_after
            .get((closed_after.len() * p / 100).min(closed_after.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "acceptance 3: {CONNECTIONS} idle connections, RLIMIT_NOFILE 256, timeouts 2s: episode {wall:.2?}, broker CPU {cpu:.2?} = {cpu_pct:.1}% of one core, log {log} bytes; closed {} (first {:.2?}, median {:.2?}, last {:.2?}), still open {still_open}",
        closed_after.len(),
        pct(0),
        pct(50),
        pct(100)
    );
    assert_eq!(
        still_open,
        0,
        "connections not closed by the broker within {CLOSE_WITHIN:?}; log tail:\n{}",
        broker.tail(10)
    );
    assert!(
        cpu_pct < 25.0,
        "broker CPU {cpu_pct:.1}% of one core over {wall:?}"
    );
    assert!(log < 1_000_000, "{log} log bytes during the episode");

    // The episode really hit the descriptor limit, and was logged once (a
    // start line and an end line), not once per failed accept.
    let errors = broker
        .wait_for("the accept-error summary", WAIT, |v| {
            v["message"] == "accept errors ended" && v["listener"] == "api"
        })
        .await;
    eprintln!("summary line: {errors}");
    let starts = broker
        .json_lines()
        .iter()
        .filter(|v| v["message"] == "accept failing" && v["listener"] == "api")
        .count();
    assert!(
        starts >= 1,
        "no accept error was logged: the limit was never hit"
    );

    // Afterwards a normal front-door request succeeds.
    let r = client()
        .get(format!("{}/api/v4/version", broker.front("acme-direct")))
        .send()
        .await
        .expect("front door answers");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("17.5.0"));
}

/// Slowloris: a client sending one header byte a second is cut by the
/// header-read timeout long before its head is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_by_the_header_read_timeout() {
    let up = Upstream::start().await;
    let broker = Counted::start(
        &upstream_spec(&up),
        &[("GITPROXY_HEADER_READ_TIMEOUT", "2s")],
        None,
    )
    .await;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: slow.test\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(40)
    );
    let s = TcpStream::connect(broker.api_addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sent = 0;
        for b in head.bytes() {
            tick.tick().await;
            if wr.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut answer = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(2 + 6), rd.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    writer.abort();
    assert!(
        cut.is_ok(),
        "the slow client was still connected after {elapsed:?}"
    );
    eprintln!("slowloris cut after {elapsed:.2?}");
    assert!(
        !String::from_utf8_lossy(&answer).contains(" 200 "),
        "the slow request was served: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// The agent listener closes a TCP connection that never sends the HTTP/2
/// preface (nothing at all, or half of it) within the handshake timeout;
/// real agents still connect and their address is still logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_listener_closes_connections_without_a_preface() {
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", "http://127.0.0.1:9", KEY)],
        ..Default::default()
    };
    let broker = Counted::start(&spec, &[("GITPROXY_HANDSHAKE_TIMEOUT", "2s")], None).await;
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("half a preface", &b"PRI * HTTP/2.0\r\n"[..]),
    ] {
        let mut s = TcpStream::connect(broker.agent_addr)
            .await
            .expect("connect");
        s.write_all(bytes).await.expect("write");
        let t = Instant::now();
        let end = wait_closed(&mut s, Duration::from_secs(2 + 6)).await;
        eprintln!("agent listener, {what}: {end:?} after {:.2?}", t.elapsed());
        assert_eq!(
            end,
            End::Closed,
            "{what}: still open after {:?}",
            t.elapsed()
        );
    }
    let agent = Agent::start(
        "agent-ok",
        &format!("http://{}", broker.agent_addr),
        KEY,
        &[],
    )
    .await;
    let line = broker
        .wait_for("agent connected", WAIT, |v| {
            v["message"] == "agent connected"
        })
        .await;
    assert!(
        line["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "the agent's address is not logged: {line}"
    );
    drop(agent);
}

/// With TLS on the agent listener, a client that never finishes the TLS
/// handshake is closed within the handshake timeout; agents trusting the CA
/// still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_listener_closes_unfinished_tls_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let (cert, key) = ca
        .leaf(&["localhost", "127.0.0.1"])
        .write(dir.path(), "broker");
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", "http://127.0.0.1:9", KEY)],
        args: vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        ..Default::default()
    };
    let broker = Counted::start(&spec, &[("GITPROXY_HANDSHAKE_TIMEOUT", "2s")], None).await;
    // A TLS record header announcing a 512-byte ClientHello, then silence.
    let partial_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("a partial ClientHello", partial_hello),
    ] {
        let mut s = TcpStream::connect(broker.agent_addr)
            .await
            .expect("connect");
        s.write_all(bytes).await.expect("write");
        let t = Instant::now();
        let end = wait_closed(&mut s, Duration::from_secs(2 + 6)).await;
        eprintln!(
            "agent listener (TLS), {what}: {end:?} after {:.2?}",
            t.elapsed()
        );
        assert_eq!(
            end,
            End::Closed,
            "{what}: still open after {:?}",
            t.elapsed()
        );
    }
    let ca_file = ca.write(dir.path(), "ca.pem");
    let agent = Agent::start(
        "agent-tls",
        &format!("https://localhost:{}", broker.agent_addr.port()),
        KEY,
        &[("GITPROXY_CA_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let line = broker
        .wait_for("agent connected", WAIT, |v| {
            v["message"] == "agent connected"
        })
        .await;
    assert!(
        line["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "the agent's address is not logged: {line}"
    );
    drop(agent);
}

/// Idle keep-alive connections (HTTP/1.1 and h2c) are closed after the idle
/// timeout; a request waiting longer than that for GitLab's answer is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_but_slow_answers_do_not() {
    const IDLE: Duration = Duration::from_secs(2);
    const SLOW_MS: u64 = 4000;
    let up = Upstream::start().await;
    let broker = Counted::start(
        &upstream_spec(&up),
        &[("GITPROXY_IDLE_TIMEOUT", "2s")],
        None,
    )
    .await;
    let slow = "/gitlab/acme-direct/api/v4/json1k?delay_ms=4000";

    // HTTP/1.1: a slow answer on a keep-alive connection, then idleness.
    let mut s = TcpStream::connect(broker.api_addr).await.expect("connect");
    let (status, _) = h1_get(&mut s, "/healthz").await;
    assert_eq!(status, 200);
    let t = Instant::now();
    let (status, body) = h1_get(&mut s, slow).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.len(), 1024);
    assert!(
        t.elapsed() >= Duration::from_millis(SLOW_MS),
        "the answer was not slow"
    );
    let idle_from = Instant::now();
    let end = wait_closed(&mut s, IDLE + Duration::from_secs(6)).await;
    let idle_for = idle_from.elapsed();
    eprintln!("HTTP/1.1 keep-alive: {end:?} after {idle_for:.2?} idle");
    assert_eq!(
        end,
        End::Closed,
        "HTTP/1.1: still open after {idle_for:?} idle"
    );
    assert!(
        idle_for >= IDLE - Duration::from_millis(500),
        "HTTP/1.1: closed after {idle_for:?}, before the idle timeout"
    );

    // h2c with prior knowledge: the same.
    let tcp = TcpStream::connect(broker.api_addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = conn.await;
        let _ = done_tx.send((Instant::now(), r.map_err(|e| e.to_string())));
    });
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", broker.api_addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let r = send.send_request(get("/healthz")).await.expect("h2 answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    r.into_body().collect().await.expect("body");
    let t = Instant::now();
    let r = send.send_request(get(slow)).await.expect("slow h2 answer");
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.len(), 1024);
    assert!(
        t.elapsed() >= Duration::from_millis(SLOW_MS),
        "the answer was not slow"
    );
    let idle_from = Instant::now();
    let (closed_at, result) = tokio::time::timeout(IDLE + Duration::from_secs(6), done_rx)
        .await
        .unwrap_or_else(|_| panic!("h2c: still open after {:?} idle", idle_from.elapsed()))
        .expect("connection task");
    let idle_for = closed_at - idle_from;
    eprintln!("h2c: closed after {idle_for:.2?} idle ({result:?})");
    assert!(
        idle_for >= IDLE - Duration::from_millis(500),
        "h2c: closed after {idle_for:?}, before the idle timeout"
    );
}

/// With `--max-api-connections 4`, a 5th connection waits in the listen
/// queue (it is not accepted, so not served) until one of the 4 closes; the
/// broker keeps serving the 4 and logs no accept errors meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifth_connection_waits_for_a_free_slot() {
    let up = Upstream::start().await;
    let broker = Counted::start(
        &upstream_spec(&up),
        &[("GITPROXY_MAX_API_CONNECTIONS", "4")],
        None,
    )
    .await;
    let port = broker.api_addr.port();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(broker.api_addr).await.expect("connect");
        assert_eq!(h1_get(&mut s, "/healthz").await.0, 200);
        held.push(s);
    }
    assert_eq!(accept_queue(port), 0);
    let lines_before = broker.json_lines().len();
    let mut fifth = TcpStream::connect(broker.api_addr).await.expect("connect");
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: limits.test\r\n\r\n")
        .await
        .expect("write");
    // The broker keeps serving the 4 (a round trip on each), and the 5th is
    // still in the kernel's accept queue afterwards, unanswered.
    for s in held.iter_mut() {
        assert_eq!(h1_get(s, "/healthz").await.0, 200);
    }
    assert_eq!(
        accept_queue(port),
        1,
        "the 5th connection was accepted beyond the cap of 4"
    );
    let mut probe = [0u8; 1];
    assert!(
        matches!(fifth.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the 5th connection got an answer beyond the cap"
    );

    // One of the 4 closes: the 5th is accepted and served.
    drop(held.remove(0));
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = fifth.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the 5th connection is served once a slot is free");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert_eq!(accept_queue(port), 0);
    let errors: Vec<Value> = broker
        .json_lines()
        .into_iter()
        .skip(lines_before)
        .filter(|v| v["level"] == "WARN" || v["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "warnings while at the cap: {errors:?}");
}
