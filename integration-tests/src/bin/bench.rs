//! `gitproxy-bench`: gitproxy side by side with direct access, in one run.
//!
//! Starts on loopback a fast in-process upstream (`harness::upstream`), the
//! release broker and one agent, and measures for each scenario the same
//! workload three ways:
//!
//! - **direct**: straight to the upstream (or to the sandbox's `git http-backend`);
//! - **tunnel**: through the broker's front door, agent mode (`/gitlab/acme/...`);
//! - **front door (direct mode)**: through the broker, which calls the upstream
//!   itself (`/gitlab/acme-direct/...`).
//!
//! Scenarios: `small`, `bulk`, `inflight`, `hol`, `idle`, `reconnect`,
//! `clone`, `forward` (cluster mode: a request forwarded between replicas,
//! [`forward`]); and, only when asked for with `--only`, `scale` (thousands
//! of idle agents on one replica, [`scale`]; needs root for the file limit).
//! `--quick` shrinks every size and duration (seconds in all: the smoke test),
//! `--only a,b` runs some, `--out FILE` also writes the report there.
//! `--rathole PATH` (what `scripts/bench.sh --peers` passes) adds a plain TCP
//! tunnel, rathole 0.5.0, as a fourth column of the small and bulk tables,
//! measured in the same run ([`rathole`]).
//! Every table goes to stdout as Markdown as soon as its scenario is done.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::fake_agent::{hello, FakeAgent};
use gitproxy_integration_tests::harness::pattern::{crc_of, Pattern};
use gitproxy_integration_tests::harness::upstream::{blob_chunk, Upstream, JSON1K_LEN};
use gitproxy_integration_tests::harness::{client, init};
use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use gitproxy_proto::v1::{agent_message, broker_message, Pong};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;

#[path = "bench/forward.rs"]
mod forward;
#[path = "bench/rathole.rs"]
mod rathole;
#[path = "bench/scale.rs"]
mod scale;

const KEY: &str = "bench-access-key-0123456789abcdef";
const IDLE_KEY: &str = "bench-idle-access-key-0123456789ab";
const TOKEN: &str = "bench-connection-token-0123456789";

/// Every scenario, in the order they run.
const SCENARIOS: [&str; 9] = [
    "bulk",
    "small",
    "inflight",
    "hol",
    "idle",
    "reconnect",
    "clone",
    "forward",
    "scale",
];

/// Scenarios that run only when `--only` names them.
const ON_REQUEST: [&str; 1] = ["scale"];

#[derive(Parser, Debug)]
#[command(
    name = "gitproxy-bench",
    about = "gitproxy side by side with direct access"
)]
struct Args {
    /// Smoke mode: small sizes and short durations (seconds in all).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated or repeated): bulk, small,
    /// inflight, hol, idle, reconnect, clone, forward; scale runs only when
    /// named here.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Load generator for the small requests: `wrk` (default when installed)
    /// or `harness` (an in-process reqwest client).
    #[arg(long)]
    loadgen: Option<String>,
    /// Seconds per small-request run (default 5, quick 1).
    #[arg(long)]
    duration: Option<u64>,
    /// Bytes per bulk transfer (default 1 GiB, quick 32 MiB).
    #[arg(long)]
    bulk_bytes: Option<u64>,
    /// Tunnel streams for the idle scenario (default 1000, quick 50).
    #[arg(long)]
    idle_agents: Option<usize>,
    /// Agents for the scale scenario (default 20000, quick 200).
    #[arg(long)]
    scale_agents: Option<usize>,
    /// Seconds of the scale scenario's idle Redis window (default 30, quick 3).
    #[arg(long)]
    scale_window: Option<u64>,
    /// A rathole 0.5.0 binary: measure it as a reference TCP tunnel in the
    /// small and bulk tables (`scripts/bench.sh --peers` builds and passes it).
    #[arg(long)]
    rathole: Option<PathBuf>,
}

/// Sizes and durations of one run.
struct Plan {
    quick: bool,
    secs: u64,
    bulk: u64,
    inflight: usize,
    inflight_delay_ms: u64,
    hol_each: u64,
    idle: usize,
    reconnect_rounds: usize,
    clone_bytes: usize,
    scale_agents: usize,
    scale_window: u64,
    wrk: bool,
}

impl Plan {
    fn new(a: &Args) -> Plan {
        let q = a.quick;
        let wrk = match a.loadgen.as_deref() {
            Some("wrk") => true,
            Some("harness") => false,
            Some(o) => panic!("--loadgen {o}: expected wrk or harness"),
            None => which("wrk"),
        };
        Plan {
            quick: q,
            secs: a.duration.unwrap_or(if q { 1 } else { 5 }),
            bulk: a.bulk_bytes.unwrap_or(if q { 32 << 20 } else { 1 << 30 }),
            inflight: if q { 200 } else { 1000 },
            inflight_delay_ms: if q { 100 } else { 2000 },
            hol_each: if q { 2 << 20 } else { 64 << 20 },
            idle: a.idle_agents.unwrap_or(if q { 50 } else { 1000 }),
            reconnect_rounds: if q { 1 } else { 3 },
            clone_bytes: if q { 2 << 20 } else { 100 << 20 },
            scale_agents: a.scale_agents.unwrap_or(if q { 200 } else { 20_000 }),
            scale_window: a.scale_window.unwrap_or(if q { 3 } else { 30 }),
            wrk,
        }
    }
}

impl Plan {
    /// The small-request load generator's command lines, for the notes.
    fn tool(&self) -> String {
        if self.wrk {
            format!(
                "`wrk -t2 -c64 -d{s}s --latency URL` and `wrk -t1 -c1 -d{s}s --latency URL`",
                s = self.secs
            )
        } else {
            "the harness client".into()
        }
    }
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------- report

/// The Markdown report, printed as it grows.
struct Report {
    text: String,
    out: Option<PathBuf>,
}

impl Report {
    fn add(&mut self, s: &str) {
        print!("{s}");
        let _ = std::io::stdout().flush();
        self.text.push_str(s);
        if let Some(p) = &self.out {
            let _ = std::fs::write(p, &self.text);
        }
    }
}

/// One row: a metric measured three ways, and through rathole with
/// `--rathole` (the peer).
struct Row {
    metric: String,
    direct: Option<f64>,
    tunnel: Option<f64>,
    front: Option<f64>,
    peer: Option<f64>,
}

fn row(metric: &str, direct: Option<f64>, tunnel: Option<f64>, front: Option<f64>) -> Row {
    Row {
        metric: metric.to_string(),
        direct,
        tunnel,
        front,
        peer: None,
    }
}

impl Row {
    /// The same row with the rathole cell.
    fn peer(self, peer: Option<f64>) -> Row {
        Row { peer, ..self }
    }
}

/// A row of four cells in target order (see [`idx`]).
fn row4(metric: &str, v: Four) -> Row {
    row(metric, v[0], v[1], v[2]).peer(v[3])
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "–".into())
}

/// A Markdown table; the rathole column and its ratio only when a row has
/// a rathole cell (`--rathole`), so the default report keeps its shape.
fn table(title: &str, command: &str, rows: &[Row], notes: &[String]) -> String {
    let peers = rows.iter().any(|r| r.peer.is_some());
    let mut s = format!("\n### {title}\n\n");
    if peers {
        s.push_str("| metric | direct | tunnel (agent mode) | front door (direct mode) | rathole (TCP tunnel) | tunnel / direct | tunnel / rathole |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    } else {
        s.push_str(
            "| metric | direct | tunnel (agent mode) | front door (direct mode) | tunnel / direct |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|\n");
    }
    for r in rows {
        let mut line = format!(
            "| {} | {} | {} | {} |",
            r.metric,
            cell(r.direct),
            cell(r.tunnel),
            cell(r.front)
        );
        if peers {
            line.push_str(&format!(" {} |", cell(r.peer)));
        }
        line.push_str(&format!(" {} |", ratio(r.tunnel, r.direct)));
        if peers {
            line.push_str(&format!(" {} |", ratio(r.tunnel, r.peer)));
        }
        s.push_str(&line);
        s.push('\n');
    }
    s.push('\n');
    for n in notes {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str(&format!("- command: `{command}`\n"));
    s
}

fn machine(plan: &Plan, peer: Option<&str>) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    let loadgen = if plan.wrk {
        std::process::Command::new("wrk")
            .arg("-v")
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("wrk")
                    .split(" Copyright")
                    .next()
                    .unwrap_or("wrk")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "wrk".into())
    } else {
        "harness client (reqwest, in process)".into()
    };
    let peer = peer
        .map(|v| format!("| reference tunnel | {v}: TCP only, server + client on loopback |\n"))
        .unwrap_or_default();
    format!(
        "## Machine\n\n| | |\n|---|---|\n| CPU | {model} |\n| cores | {cores} |\n| memory | {mem} |\n| kernel | {kernel} |\n| load average at start | {} |\n| small-request load generator | {loadgen} |\n{peer}| mode | {} |\n\nAll processes on loopback: the upstream and the load/bulk clients run inside `gitproxy-bench`, the broker and agent are the release binaries (`RUST_LOG=info`, JSON logs: one line per request on each side, as in production).\n",
        loadavg(),
        if plan.quick { "--quick (smoke: sizes and durations shrunk, numbers not meaningful)" } else { "full" }
    )
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// CPU seconds of (bench, broker, agent, rathole server + client) spent
/// between `start` and `stop`; the last is 0 without `--rathole`.
struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<f64>,
}

impl CpuMeter {
    fn start(env: &Env) -> CpuMeter {
        let mut pids = vec![
            std::process::id(),
            env.broker.proc.pid(),
            env.agent.proc.pid(),
        ];
        if let Some(p) = &env.peer {
            pids.extend(p.pids());
        }
        CpuMeter {
            start: pids.iter().map(|&p| cpu_secs(p)).collect(),
            pids,
        }
    }
    fn stop(&self) -> [f64; 4] {
        let d: Vec<f64> = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|(&p, s)| cpu_secs(p) - s)
            .collect();
        [d[0], d[1], d[2], d[3..].iter().sum()]
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- setup

/// The three ways of reaching the upstream, and rathole with `--rathole`.
#[derive(Clone)]
struct Targets {
    direct: String,
    tunnel: String,
    front: String,
    rathole: Option<String>,
}

impl Targets {
    fn all(&self) -> [(&'static str, String); 3] {
        [
            ("direct", self.direct.clone()),
            ("tunnel", self.tunnel.clone()),
            ("front", self.front.clone()),
        ]
    }

    /// [`Targets::all`], then rathole when it runs (small and bulk).
    fn with_peer(&self) -> Vec<(&'static str, String)> {
        let mut v = self.all().to_vec();
        v.extend(self.rathole.clone().map(|u| ("rathole", u)));
        v
    }
}

struct Env {
    up: Upstream,
    broker: Broker,
    agent: Agent,
    /// The reference tunnel, with `--rathole`.
    peer: Option<rathole::Rathole>,
    t: Targets,
}

impl Env {
    async fn start(rathole_bin: Option<&std::path::Path>) -> Result<Env> {
        let up = Upstream::start().await;
        let broker = Broker::start(BrokerSpec {
            connections: vec![
                ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN),
                ConnSpec::direct("acme-direct", &up.url()).token(TOKEN),
            ],
            ..Default::default()
        })
        .await;
        let agent = Agent::start("bench-agent", &broker.agent_url(), KEY, &agent_env()).await;
        let peer = match rathole_bin {
            Some(bin) => Some(rathole::Rathole::start(bin, up.addr).await?),
            None => None,
        };
        let t = Targets {
            direct: up.url(),
            tunnel: broker.front("acme"),
            front: broker.front("acme-direct"),
            rathole: peer.as_ref().map(|p| p.url.clone()),
        };
        Ok(Env {
            up,
            broker,
            agent,
            peer,
            t,
        })
    }
}

impl Env {
    /// The command that measures `scenario` alone, as in this run.
    fn command(&self, scenario: &str) -> String {
        match self.peer {
            Some(_) => format!("scripts/bench.sh --peers --only {scenario}"),
            None => format!("gitproxy-bench --only {scenario}"),
        }
    }
}

/// Polls `url` until it answers 200 (a tunnel ready end to end).
async fn until_ok(url: &str, limit: Duration) -> Result<()> {
    let c = client();
    let t = Instant::now();
    loop {
        if let Ok(r) = c.get(url).send().await {
            if r.status() == 200 && r.bytes().await.is_ok() {
                return Ok(());
            }
        }
        if t.elapsed() > limit {
            bail!("{url} did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tuning variables passed on to the agents (the broker inherits this
/// process's environment), for experiments: `GITPROXY_WINDOW_BYTES`,
/// `GLIBC_TUNABLES`, `MALLOC_*` and `GITPROXY_WORKER_THREADS`.
fn agent_env() -> Vec<(&'static str, &'static str)> {
    static VARS: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
        std::sync::OnceLock::new();
    VARS.get_or_init(|| {
        std::env::vars()
            .filter(|(k, _)| {
                k == "GITPROXY_WINDOW_BYTES"
                    || k == "GLIBC_TUNABLES"
                    || k == "GITPROXY_WORKER_THREADS"
                    || k.starts_with("MALLOC_")
            })
            .map(|(k, v)| (&*k.leak(), &*v.leak()))
            .collect()
    })
    .clone()
}

/// Three values in target order.
type Three = [Option<f64>; 3];

/// Four values in target order, rathole last.
type Four = [Option<f64>; 4];

fn idx(name: &str) -> usize {
    match name {
        "direct" => 0,
        "tunnel" => 1,
        "front" => 2,
        "rathole" => 3,
        _ => unreachable!("target {name}"),
    }
}

// ---------------------------------------------------------------- small

struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    errors: u64,
}

fn parse_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (n, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e6)
    } else {
        return None;
    };
    n.trim().parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> Result<Load> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let (mut requests, mut errors) = (0u64, 0u64);
    for l in out.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_dur_us(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_dur_us(v);
        } else if t.contains(" requests in ") {
            requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok(Load {
        rps: rps.ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{out}"))?,
        p50_us: p50.ok_or_else(|| anyhow!("no 50% in wrk output:\n{out}"))?,
        p99_us: p99.ok_or_else(|| anyhow!("no 99% in wrk output:\n{out}"))?,
        requests,
        errors,
    })
}

async fn wrk(url: &str, conns: usize, secs: u64) -> Result<Load> {
    let threads = conns.clamp(1, 2);
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// Closed-loop load from this process: `conns` tasks for `secs`.
async fn harness_load(url: &str, conns: usize, secs: u64) -> Result<Load> {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_string());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(b) if b.len() == JSON1K_LEN => {
                                lat.push(t.elapsed().as_secs_f64() * 1e6)
                            }
                            _ => errors += 1,
                        },
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let el = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Load {
        rps: lat.len() as f64 / el,
        p50_us: percentile(&lat, 50.0),
        p99_us: percentile(&lat, 99.0),
        requests: lat.len() as u64 + errors,
        errors,
    })
}

async fn load(plan: &Plan, url: &str, conns: usize) -> Result<Load> {
    if plan.wrk {
        wrk(url, conns, plan.secs).await
    } else {
        harness_load(url, conns, plan.secs).await
    }
}

/// CPU seconds used by reaped children (wrk) so far.
fn children_cpu() -> f64 {
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

async fn small(plan: &Plan, env: &Env, r: &mut Report) -> Result<()> {
    let mut c64: Vec<Option<Load>> = vec![None, None, None, None];
    let mut c1: Vec<Option<Load>> = vec![None, None, None, None];
    let mut cpu = Vec::new();
    // CPU µs per request at c=64 of the processes that make up each path.
    let mut path_cpu: Four = [None; 4];
    for (conns, slot) in [(64usize, &mut c64), (1, &mut c1)] {
        for (name, base) in env.t.with_peer() {
            let url = format!("{base}/api/v4/json1k");
            let m = CpuMeter::start(env);
            let w = children_cpu();
            let l = load(plan, &url, conns).await?;
            let c = m.stop();
            let w = children_cpu() - w;
            let n = l.requests.max(1) as f64;
            if conns == 64 {
                let peer = if env.peer.is_some() {
                    format!(", rathole server + client {:.1}", c[3] * 1e6 / n)
                } else {
                    String::new()
                };
                cpu.push(format!(
                    "{name}, c=64: CPU µs per request — load generator {:.1}, upstream (+ harness) {:.1}, broker {:.1}, agent {:.1}{peer}",
                    w * 1e6 / n,
                    c[0] * 1e6 / n,
                    c[1] * 1e6 / n,
                    c[2] * 1e6 / n
                ));
                path_cpu[idx(name)] = match name {
                    "tunnel" => Some(c[1] + c[2]),
                    "front" => Some(c[1]),
                    "rathole" => Some(c[3]),
                    _ => None,
                }
                .map(|s| s * 1e6 / n);
            }
            slot[idx(name)] = Some(l);
        }
    }
    let get = |v: &Vec<Option<Load>>, f: fn(&Load) -> f64| -> Four {
        [
            v[0].as_ref().map(f),
            v[1].as_ref().map(f),
            v[2].as_ref().map(f),
            v[3].as_ref().map(f),
        ]
    };
    let mk = row4;
    let errs: u64 = c64
        .iter()
        .chain(c1.iter())
        .flatten()
        .map(|l| l.errors)
        .sum();
    let reqs: u64 = c64
        .iter()
        .chain(c1.iter())
        .flatten()
        .map(|l| l.requests)
        .sum();
    let mut rows = vec![
        mk("requests/s, c=64", get(&c64, |l| l.rps)),
        mk("p50 latency µs, c=64", get(&c64, |l| l.p50_us)),
        mk("p99 latency µs, c=64", get(&c64, |l| l.p99_us)),
        mk("requests/s, c=1", get(&c1, |l| l.rps)),
        mk("p50 latency µs, c=1", get(&c1, |l| l.p50_us)),
        mk("p99 latency µs, c=1", get(&c1, |l| l.p99_us)),
    ];
    if env.peer.is_some() {
        rows.push(mk("CPU µs per request, c=64 (tunnel processes)", path_cpu));
    }
    let p50 = get(&c1, |l| l.p50_us);
    let added = |i: usize| match (p50[i], p50[0]) {
        (Some(t), Some(d)) => format!("{:.0} µs", t - d),
        _ => "–".into(),
    };
    let tool = plan.tool();
    let notes = vec![
        format!(
            "GET `/api/v4/json1k` (1 KiB JSON body); {} s per run; each run: {tool}",
            plan.secs
        ),
        format!(
            "added p50 latency at c=1: tunnel − direct = **{}**, front door − direct = {}",
            added(1),
            added(2)
        ),
        format!(
            "tunnel throughput at c=64 = **{:.0}%** of direct",
            100.0 * c64[1].as_ref().map(|l| l.rps).unwrap_or(0.0)
                / c64[0].as_ref().map(|l| l.rps).unwrap_or(f64::NAN)
        ),
        format!("errors (non-2xx + socket errors): {errs} of {reqs} requests"),
    ];
    let mut notes = notes;
    if env.peer.is_some() {
        let rps = get(&c64, |l| l.rps);
        notes.push(format!(
            "rathole (plain TCP tunnel, same run): added p50 at c=1 = {}; tunnel throughput at c=64 = **{} ×** rathole; tunnel processes = broker + agent, front door = broker, rathole = its server + client (the load generator and upstream are in the notes below)",
            added(3),
            ratio(rps[1], rps[3])
        ));
    }
    notes.extend(cpu);
    r.add(&table(
        "Small requests (1 KiB JSON)",
        &env.command("small"),
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- bulk

/// Whether `data`, found at offset `at` of a `/api/v4/blob` answer, is what
/// the upstream sent there (it repeats `blob`). A memory compare: much
/// cheaper than the transfer it checks.
fn is_blob_at(blob: &[u8], at: u64, data: &[u8]) -> bool {
    let mut pos = (at % blob.len() as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let k = rest.len().min(blob.len() - pos);
        if rest[..k] != blob[pos..pos + k] {
            return false;
        }
        rest = &rest[k..];
        pos = 0;
    }
    true
}

/// Reads a `/api/v4/blob` answer to the end, checking every byte; its
/// length and the seconds it took.
async fn download(c: &reqwest::Client, url: &str) -> Result<(u64, f64)> {
    let blob = blob_chunk();
    let t = Instant::now();
    let resp = c.get(url).send().await?;
    if resp.status() != 200 {
        bail!("{url}: {}", resp.status());
    }
    let mut n = 0u64;
    let mut s = resp.bytes_stream();
    while let Some(ch) = s.next().await {
        let ch = ch?;
        if !is_blob_at(&blob, n, &ch) {
            bail!(
                "{url}: the {} bytes at offset {n} differ from what the upstream sent",
                ch.len()
            );
        }
        n += ch.len() as u64;
    }
    Ok((n, t.elapsed().as_secs_f64()))
}

/// The chunk an upload repeats.
fn upload_chunk() -> Bytes {
    Pattern::new(5).chunk(64 * 1024)
}

/// CRC-32 of the first `n` bytes of an upload (see [`chunk_stream`]).
fn upload_crc(n: u64) -> u32 {
    let chunk = upload_chunk();
    let mut h = crc32fast::Hasher::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        h.update(&chunk[..k]);
        left -= k as u64;
    }
    h.finalize()
}

fn chunk_stream(n: u64) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let chunk = upload_chunk();
    let mut left = n;
    futures::stream::poll_fn(move |_| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let k = left.min(chunk.len() as u64) as usize;
        left -= k as u64;
        std::task::Poll::Ready(Some(Ok(chunk.slice(..k))))
    })
}

/// Streams `n` bytes to `/api/v4/sink`; checks the upstream got exactly
/// them (length and CRC-32); the seconds it took.
async fn upload(c: &reqwest::Client, url: &str, n: u64) -> Result<(u64, f64)> {
    let want_crc = upload_crc(n);
    let t = Instant::now();
    let resp = c
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunk_stream(n)))
        .send()
        .await?;
    if resp.status() != 200 {
        bail!("{url}: {}", resp.status());
    }
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
    let el = t.elapsed().as_secs_f64();
    let len = v["len"].as_u64().unwrap_or(0);
    if len != n {
        bail!("{url}: upstream received {len} of {n} bytes ({v})");
    }
    if v["crc"].as_u64() != Some(u64::from(want_crc)) {
        bail!("{url}: the upstream received other bytes than were sent: CRC-32 {want_crc} sent, {v} received");
    }
    Ok((len, el))
}

async fn bulk(plan: &Plan, env: &Env, r: &mut Report) -> Result<()> {
    let n = plan.bulk;
    let mut down: Four = [None; 4];
    let mut up: Four = [None; 4];
    let mut broker_hwm: Four = [None; 4];
    let mut agent_hwm: Four = [None; 4];
    // CPU seconds per GiB of the processes that make up each path.
    let mut down_cpu: Four = [None; 4];
    let mut up_cpu: Four = [None; 4];
    let mut cpu = Vec::new();
    for (name, base) in env.t.with_peer() {
        let c = client();
        let m = CpuMeter::start(env);
        let (got, s) = download(&c, &format!("{base}/api/v4/blob?n={n}")).await?;
        if got != n {
            bail!("{name}: downloaded {got} of {n} bytes");
        }
        let dc = m.stop();
        down[idx(name)] = Some(n as f64 / 1e6 / s);
        let m = CpuMeter::start(env);
        let (_, s2) = upload(&c, &format!("{base}/api/v4/sink"), n).await?;
        let uc = m.stop();
        up[idx(name)] = Some(n as f64 / 1e6 / s2);
        let gb = n as f64 / 1e9;
        let fmt = |what: &str, c: [f64; 4], wall: f64| {
            let peer = if env.peer.is_some() {
                format!(", rathole server + client {:.2}", c[3] / gb)
            } else {
                String::new()
            };
            format!(
                "{name} {what}: CPU seconds per GB — bench process (client + upstream) {:.2}, broker {:.2}, agent {:.2}{peer}; total {:.2} CPU s over {:.2} s wall ({:.0}% of the machine's cores)",
                c[0] / gb,
                c[1] / gb,
                c[2] / gb,
                c.iter().sum::<f64>(),
                wall,
                100.0 * c.iter().sum::<f64>() / wall / cores() as f64
            )
        };
        cpu.push(fmt("download", dc, s));
        cpu.push(fmt("upload", uc, s2));
        let i = idx(name);
        let gib = n as f64 / (1u64 << 30) as f64;
        let per_gib = |c: [f64; 4]| match name {
            "tunnel" => Some((c[1] + c[2]) / gib),
            "front" => Some(c[1] / gib),
            "rathole" => Some(c[3] / gib),
            _ => None,
        };
        (down_cpu[i], up_cpu[i]) = (per_gib(dc), per_gib(uc));
        match (name, &env.peer) {
            ("tunnel" | "front", _) => {
                broker_hwm[i] = Some(mib(env.broker.proc.peak_rss_kib()));
                if name == "tunnel" {
                    agent_hwm[i] = Some(mib(env.agent.proc.peak_rss_kib()));
                }
            }
            ("rathole", Some(p)) => {
                broker_hwm[i] = Some(mib(p.server.peak_rss_kib()));
                agent_hwm[i] = Some(mib(p.client.peak_rss_kib()));
            }
            _ => {}
        }
    }
    let mut rows = vec![
        row4(&format!("download {} MiB, MB/s", n >> 20), down),
        row4(&format!("upload {} MiB, MB/s", n >> 20), up),
    ];
    if env.peer.is_some() {
        rows.push(row4("download CPU s per GiB (tunnel processes)", down_cpu));
        rows.push(row4("upload CPU s per GiB (tunnel processes)", up_cpu));
    }
    rows.push(row4("broker peak RSS (VmHWM), MiB", broker_hwm));
    rows.push(row4("agent peak RSS (VmHWM), MiB", agent_hwm));
    let notes = vec![
        "download: `GET /api/v4/blob?n=N` (the upstream repeats one prebuilt 64 KiB chunk), read as a stream by reqwest, every byte compared with what was sent; upload: `POST /api/v4/sink`, a chunked body streamed by reqwest in 64 KiB chunks, the upstream counts it and takes its CRC-32, compared with the sent bytes'. Byte-exact: any difference fails the scenario".to_string(),
        "MB/s = 10^6 bytes per second of wall time from sending the request to the last byte (download) or the upstream's answer (upload)".to_string(),
        "peak RSS is read right after the tunnel runs (broker and agent), then again after the front-door runs (broker, cumulative since start); the bulk scenario runs first, on fresh processes".to_string(),
    ];
    let mut notes = notes;
    if env.peer.is_some() {
        notes.push("rathole column (plain TCP tunnel, same run): the broker rows hold the rathole server (the public side) and the agent rows the rathole client (next to the upstream); tunnel processes = broker + agent, front door = broker, rathole = its server + client".to_string());
    }
    notes.extend(cpu);
    r.add(&table(
        &format!("Bulk transfer ({} MiB each way)", n >> 20),
        &env.command("bulk"),
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- in flight

async fn inflight(plan: &Plan, env: &Env, r: &mut Report) -> Result<()> {
    let n = plan.inflight;
    let d = plan.inflight_delay_ms;
    let mut ok: Three = [None; 3];
    let mut p50: Three = [None; 3];
    let mut p99: Three = [None; 3];
    let mut max: Three = [None; 3];
    let mut peak: Three = [None; 3];
    let mut broker_hwm: Three = [None; 3];
    let mut agent_hwm: Three = [None; 3];
    let mut first_err = Vec::new();
    for (name, base) in env.t.all() {
        let c = client();
        let url = format!("{base}/api/v4/json1k?delay_ms={d}");
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        env.up.peak_concurrent();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (c, url, b) = (c.clone(), url.clone(), barrier.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    let t = Instant::now();
                    let res = async {
                        let resp = c.get(&url).send().await?;
                        let st = resp.status();
                        let body = resp.bytes().await?;
                        if st != 200 || body.len() != JSON1K_LEN {
                            bail!("status {st}, {} bytes", body.len());
                        }
                        Ok(())
                    }
                    .await;
                    (res, t.elapsed().as_secs_f64() * 1e3)
                })
            })
            .collect();
        let mut lat = Vec::new();
        let mut good = 0usize;
        for t in tasks {
            let (res, ms) = t.await?;
            match res {
                Ok(()) => good += 1,
                Err(e) => {
                    if first_err.len() < 3 {
                        first_err.push(format!("{name}: {e:#}"));
                    }
                }
            }
            lat.push(ms);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        let i = idx(name);
        ok[i] = Some(100.0 * good as f64 / n as f64);
        p50[i] = Some(percentile(&lat, 50.0));
        p99[i] = Some(percentile(&lat, 99.0));
        max[i] = lat.last().copied();
        peak[i] = Some(env.up.peak_concurrent() as f64);
        if name != "direct" {
            broker_hwm[i] = Some(mib(env.broker.proc.peak_rss_kib()));
        }
        if name == "tunnel" {
            agent_hwm[i] = Some(mib(env.agent.proc.peak_rss_kib()));
        }
    }
    let rows = vec![
        row("success, %", ok[0], ok[1], ok[2]),
        row("p50 latency, ms", p50[0], p50[1], p50[2]),
        row("p99 latency, ms", p99[0], p99[1], p99[2]),
        row(
            "p99 latency minus the upstream's hold, ms",
            p99[0].map(|v| v - d as f64),
            p99[1].map(|v| v - d as f64),
            p99[2].map(|v| v - d as f64),
        ),
        row("max latency, ms", max[0], max[1], max[2]),
        row(
            "most requests at the upstream at once",
            peak[0],
            peak[1],
            peak[2],
        ),
        row(
            "broker peak RSS (VmHWM) after, MiB",
            None,
            broker_hwm[1],
            broker_hwm[2],
        ),
        row(
            "agent peak RSS (VmHWM) after, MiB",
            None,
            agent_hwm[1],
            None,
        ),
    ];
    let mut notes = vec![format!(
        "{n} concurrent `GET /api/v4/json1k?delay_ms={d}` released together (a barrier), one HTTP/1.1 connection each; the upstream holds each answer {d} ms so all are in flight at once (its gauge is the last row); one agent"
    )];
    notes.extend(first_err.into_iter().map(|e| format!("first errors: {e}")));
    r.add(&table(
        &format!("{n} requests in flight at once"),
        "gitproxy-bench --only inflight",
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- head of line

async fn sixteen(base: &str, each: u64) -> Result<f64> {
    let c = client();
    let t = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{base}/api/v4/blob?n={each}"));
            tokio::spawn(async move { download(&c, &url).await })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??.0;
    }
    if total != 16 * each {
        bail!("{base}: 16 downloads got {total} bytes");
    }
    Ok(total as f64 / 1e6 / t.elapsed().as_secs_f64())
}

async fn hol(plan: &Plan, env: &Env, r: &mut Report) -> Result<()> {
    let each = plan.hol_each;
    let mut free: Three = [None; 3];
    let mut stalled: Three = [None; 3];
    let mut kept: Three = [None; 3];
    let mut broker_hwm: Three = [None; 3];
    let mut agent_hwm: Three = [None; 3];
    for (name, base) in env.t.all() {
        let i = idx(name);
        // Warm-up (connections, allocator, TCP windows), not counted.
        sixteen(&base, each / 4).await?;
        let before = sixteen(&base, each).await?;
        // One reader that never reads: the head arrives, the body waits.
        let c = client();
        let stuck = c
            .get(format!("{base}/api/v4/blob?n={}", 64u64 << 30))
            .send()
            .await?;
        if stuck.status() != 200 {
            bail!("{name}: stalled request got {}", stuck.status());
        }
        // Let the stalled request fill every buffer on its path.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stalled[i] = Some(sixteen(&base, each).await?);
        drop(stuck);
        let after = sixteen(&base, each).await?;
        // The baseline is the mean of the runs just before and just after.
        free[i] = Some((before + after) / 2.0);
        if name != "direct" {
            broker_hwm[i] = Some(mib(env.broker.proc.peak_rss_kib()));
        }
        if name == "tunnel" {
            agent_hwm[i] = Some(mib(env.agent.proc.peak_rss_kib()));
        }
        kept[i] = Some(100.0 * stalled[i].unwrap() / free[i].unwrap());
    }
    let rows = vec![
        row("16 downloads, aggregate MB/s", free[0], free[1], free[2]),
        row(
            "16 downloads + 1 stalled reader, aggregate MB/s",
            stalled[0],
            stalled[1],
            stalled[2],
        ),
        row(
            "throughput kept with the stalled reader, %",
            kept[0],
            kept[1],
            kept[2],
        ),
        row(
            "broker peak RSS (VmHWM) after, MiB",
            None,
            broker_hwm[1],
            broker_hwm[2],
        ),
        row(
            "agent peak RSS (VmHWM) after, MiB",
            None,
            agent_hwm[1],
            None,
        ),
    ];
    let notes = vec![format!(
        "after a warm-up round, 16 concurrent `GET /api/v4/blob?n={}` ({} MiB each, {} MiB in all) read to the end, every byte checked (the baseline is the mean of one such run just before and one just after); then the same while one more request (64 GiB) has its head received and its body never read; through the tunnel all 17 share the agent's one gRPC stream",
        each,
        each >> 20,
        (16 * each) >> 20
    )];
    r.add(&table(
        "Head-of-line blocking (one stalled reader)",
        "gitproxy-bench --only hol",
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- idle agents

/// One fake agent: a tunnel stream that said Hello, got Welcome and answers
/// pings until dropped.
struct IdleAgent {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdleAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn open_idle(addr: std::net::SocketAddr, i: usize) -> Result<IdleAgent> {
    let mut agent = FakeAgent::connect(addr, IDLE_KEY, hello(&format!("idle-{i}"))).await?;
    let task = tokio::spawn(async move {
        while let Some(m) = agent.next().await {
            if let Some(broker_message::Msg::Ping(p)) = m.msg {
                agent
                    .send(agent_message::Msg::Pong(Pong { nonce: p.nonce }))
                    .await;
            }
        }
    });
    Ok(IdleAgent { task })
}

async fn idle(plan: &Plan, up_url: &str, r: &mut Report) -> Result<()> {
    let limit = gitproxy_integration_tests::harness::fdlimit::raise(plan.idle as u64 * 2 + 1024);
    // This process and the broker each hold one socket per stream.
    let want = plan.idle.min((limit.saturating_sub(256)) as usize);
    // A broker of its own: memory freed by other scenarios would hide growth.
    let broker = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("idle", up_url, IDLE_KEY).token(TOKEN)],
        ..Default::default()
    })
    .await;
    let pid = broker.proc.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = status_kib(pid, "VmRSS:");
    let t = Instant::now();
    let addr = broker.agent_addr;
    let results: Vec<Result<IdleAgent>> = futures::stream::iter(0..want)
        .map(|i| open_idle(addr, i))
        .buffer_unordered(32)
        .collect()
        .await;
    let open_s = t.elapsed().as_secs_f64();
    let mut agents = Vec::new();
    let mut errors = Vec::new();
    for res in results {
        match res {
            Ok(a) => agents.push(a),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = status_kib(pid, "VmRSS:");
    let n = agents.len();
    let per = (after.saturating_sub(before)) as f64 / n.max(1) as f64;
    drop(agents);
    let rows = vec![
        row(
            "tunnel streams connected (Welcome received)",
            None,
            Some(n as f64),
            None,
        ),
        row("broker VmRSS before, MiB", None, Some(mib(before)), None),
        row(
            &format!("broker VmRSS with {n} streams, MiB"),
            None,
            Some(mib(after)),
            None,
        ),
        row(
            "broker memory per connected agent, KiB",
            None,
            Some(per),
            None,
        ),
        row(
            "streams opened per second",
            None,
            Some(n as f64 / open_s),
            None,
        ),
    ];
    let mut notes = vec![format!(
        "{want} streams wanted (fd limit {limit}); each is a separate TCP connection from this process with its own HTTP/2 connection, `Tunnel/Connect` with `authorization: Bearer <key>`, a Hello, and the broker's Welcome awaited; they answer Pings. A fresh broker is used so memory freed by other scenarios does not hide growth"
    )];
    if !errors.is_empty() {
        notes.push(format!("{} failed; first: {}", errors.len(), errors[0]));
    }
    r.add(&table(
        "Idle agents on one broker",
        "gitproxy-bench --only idle",
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- reconnect

async fn first_ok(url: String) -> f64 {
    let c = client();
    let t = Instant::now();
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(2), async {
            match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                _ => false,
            }
        })
        .await
        .unwrap_or(false);
        if ok {
            return t.elapsed().as_secs_f64() * 1e3;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return f64::NAN;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn reconnect(plan: &Plan, env: &mut Env, r: &mut Report) -> Result<()> {
    let mut back = Vec::new();
    let mut front_back = Vec::new();
    let mut from_kill = Vec::new();
    for round in 0..plan.reconnect_rounds {
        if round > 0 {
            // The agent's backoff step resets after a session stayed up 10 s.
            tokio::time::sleep(Duration::from_secs(11)).await;
        }
        let t_kill = Instant::now();
        env.broker.restart().await;
        let up_since_kill = t_kill.elapsed().as_secs_f64() * 1e3;
        let (a, b) = tokio::join!(
            first_ok(format!("{}/api/v4/json1k", env.t.tunnel)),
            first_ok(format!("{}/api/v4/json1k", env.t.front)),
        );
        back.push(a);
        front_back.push(b);
        from_kill.push(up_since_kill + a);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (percentile(v, 50.0), *v.last().unwrap())
    };
    let (b50, bmax) = med(&mut back);
    let (f50, fmax) = med(&mut front_back);
    let (k50, kmax) = med(&mut from_kill);
    let rows = vec![
        row(
            "broker back → first 200, ms (median)",
            None,
            Some(b50),
            Some(f50),
        ),
        row(
            "broker back → first 200, ms (worst)",
            None,
            Some(bmax),
            Some(fmax),
        ),
        row(
            "broker killed → first 200, ms (median)",
            None,
            Some(k50),
            None,
        ),
        row(
            "broker killed → first 200, ms (worst)",
            None,
            Some(kmax),
            None,
        ),
    ];
    let notes = vec![format!(
        "{} round(s), 11 s apart (the agent's backoff resets after 10 s up): SIGKILL the broker, start it again on the same ports (`Broker::restart`; \"back\" = both listeners logged `listening`), then poll `GET /api/v4/json1k` every 5 ms through the tunnel and the direct-mode front door until one answers 200",
        plan.reconnect_rounds
    )];
    r.add(&table(
        "Reconnect after a broker restart",
        "gitproxy-bench --only reconnect",
        &rows,
        &notes,
    ));
    Ok(())
}

// ---------------------------------------------------------------- git clone

async fn git_clone(dir: &std::path::Path, extra: &[String], url: &str, into: &str) -> Result<f64> {
    let mut cmd = Command::new("git");
    for e in extra {
        cmd.arg("-c").arg(e);
    }
    cmd.args(["clone", "-q", url, into])
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let t = Instant::now();
    let out = cmd.output().await?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("git clone {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(s)
}

fn pack_bytes(repo: &std::path::Path) -> u64 {
    std::fs::read_dir(repo.join(".git/objects/pack"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

async fn clone(plan: &Plan, r: &mut Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab"))).await?;
    let uid = sb.add_user("bench");
    sb.add_token(TokenSpec::new(
        TOKEN,
        uid,
        &["api", "read_repository", "write_repository"],
    ));
    let size = plan.clone_bytes;
    let sb2 = sb.clone();
    let t = Instant::now();
    tokio::task::spawn_blocking(move || {
        let mut data = vec![0u8; size];
        Pattern::new(7).fill(&mut data);
        sb2.add_project(
            ProjectSpec::new("team/big")
                .member(uid, access::DEVELOPER)
                .file("assets/blob.bin", data),
        )
    })
    .await?;
    let created = t.elapsed().as_secs_f64();
    let want_crc = crc_of(7, size as u64);
    let gitlab = format!("http://{addr}");
    let broker = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("gl", &gitlab, KEY).token(TOKEN),
            ConnSpec::direct("gl-direct", &gitlab).token(TOKEN),
        ],
        ..Default::default()
    })
    .await;
    let _agent = Agent::start("bench-agent-gl", &broker.agent_url(), KEY, &agent_env()).await;
    let work = tempfile::tempdir()?;
    let basic = format!(
        "http.extraHeader=Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{TOKEN}"))
    );
    let runs = [
        ("direct", format!("{gitlab}/team/big.git"), vec![basic]),
        (
            "tunnel",
            format!("{}/team/big.git", broker.front("gl")),
            vec![],
        ),
        (
            "front",
            format!("{}/team/big.git", broker.front("gl-direct")),
            vec![],
        ),
    ];
    let mut secs: Three = [None; 3];
    let mut mbs: Three = [None; 3];
    let mut pack: Three = [None; 3];
    // A warm-up clone (page cache, git's first run), not counted.
    git_clone(work.path(), &runs[0].2, &runs[0].1, "warm-up").await?;
    std::fs::remove_dir_all(work.path().join("warm-up"))?;
    for _round in 0..2 {
        for (name, url, extra) in &runs {
            let s = git_clone(work.path(), extra, url, name).await?;
            let repo = work.path().join(name);
            let p = pack_bytes(&repo);
            let file = std::fs::read(repo.join("assets/blob.bin"))?;
            if file.len() != size || crc32fast::hash(&file) != want_crc {
                bail!("{name}: the cloned assets/blob.bin differs from the file committed ({} of {size} bytes)", file.len());
            }
            let i = idx(name);
            if secs[i].is_none_or(|best| s < best) {
                secs[i] = Some(s);
                pack[i] = Some(p as f64 / 1e6);
                mbs[i] = Some(p as f64 / 1e6 / s);
            }
            std::fs::remove_dir_all(&repo)?;
        }
    }
    let rows = vec![
        row("git clone wall time, s", secs[0], secs[1], secs[2]),
        row("pack size, MB", pack[0], pack[1], pack[2]),
        row("pack MB per second of clone", mbs[0], mbs[1], mbs[2]),
    ];
    let notes = vec![format!(
        "best of 2 rounds (direct, tunnel, front door in turn) after one warm-up clone; `git clone -q` of `team/big` (one commit with a {} MiB random file, created in {created:.1} s) from the sandbox GitLab (in this process; `git http-backend` does the serving, so `git pack-objects` runs for every clone); each clone's file is compared (length, CRC-32) with the one committed; direct = the sandbox itself with `Authorization: Basic oauth2:<token>`; through gitproxy the broker injects the token; a fresh broker and agent for this scenario",
        size >> 20
    )];
    r.add(&table(
        &format!("git clone of a {} MiB pack", size >> 20),
        "gitproxy-bench --only clone",
        &rows,
        &notes,
    ));
    sb.shutdown();
    Ok(())
}

// ---------------------------------------------------------------- main

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init();
    let plan = Plan::new(&args);
    for o in &args.only {
        if !SCENARIOS.contains(&o.as_str()) {
            bail!(
                "--only {o}: unknown scenario (one of {})",
                SCENARIOS.join(", ")
            );
        }
    }
    let wanted = |s: &str| {
        args.only.iter().any(|o| o == s) || (args.only.is_empty() && !ON_REQUEST.contains(&s))
    };
    // A rathole that cannot run fails the run before anything starts: its
    // column must not silently go missing.
    let peer_version = match &args.rathole {
        Some(bin) => Some(rathole::check_binary(bin)?),
        None => None,
    };
    let mut r = Report {
        text: String::new(),
        out: args.out.clone(),
    };
    let cmdline: Vec<String> = std::env::args().collect();
    r.add(&format!(
        "# gitproxy benchmark run\n\n`{}` — {}\n\n",
        cmdline.join(" "),
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    ));
    r.add(&machine(&plan, peer_version.as_deref()));
    r.add("\n## Results\n");

    let needs_env = ["bulk", "small", "inflight", "hol", "reconnect"]
        .iter()
        .any(|s| wanted(s));
    let mut env = if needs_env {
        Some(Env::start(args.rathole.as_deref()).await?)
    } else {
        None
    };
    let mut failed = Vec::new();
    for s in SCENARIOS {
        if !wanted(s) {
            continue;
        }
        eprintln!("gitproxy-bench: {s} (load {})", loadavg());
        let res = match s {
            "bulk" => bulk(&plan, env.as_ref().unwrap(), &mut r).await,
            "small" => small(&plan, env.as_ref().unwrap(), &mut r).await,
            "inflight" => inflight(&plan, env.as_ref().unwrap(), &mut r).await,
            "hol" => hol(&plan, env.as_ref().unwrap(), &mut r).await,
            "idle" => {
                let up = Upstream::start().await;
                idle(&plan, &up.url(), &mut r).await
            }
            "reconnect" => reconnect(&plan, env.as_mut().unwrap(), &mut r).await,
            "clone" => clone(&plan, &mut r).await,
            "forward" => forward::forward(&plan, &mut r).await,
            "scale" => scale::scale(&plan, &mut r).await,
            _ => unreachable!(),
        };
        if let Err(e) = res {
            eprintln!("gitproxy-bench: {s} failed: {e:#}");
            r.add(&format!("\n### {s}: FAILED\n\n```\n{e:#}\n```\n"));
            failed.push(s);
        }
    }
    if let Some(env) = &env {
        let peer = env
            .peer
            .as_ref()
            .map(|p| {
                format!(
                    ", rathole server {:.1} MiB and client {:.1} MiB (whole run)",
                    mib(p.server.peak_rss_kib()),
                    mib(p.client.peak_rss_kib())
                )
            })
            .unwrap_or_default();
        r.add(&format!(
            "\nPeak RSS at the end (VmHWM): broker {:.1} MiB (since its restart in `reconnect`, if that ran), agent {:.1} MiB (whole run){peer}. Load average at the end: {}.\n",
            mib(env.broker.proc.peak_rss_kib()),
            mib(env.agent.proc.peak_rss_kib()),
            loadavg()
        ));
    }
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}
