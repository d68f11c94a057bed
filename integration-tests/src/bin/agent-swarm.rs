//! `gitproxy-agent-swarm`: many idle agents in one process, for the scale
//! benchmark (`gitproxy-bench --only scale`, scripts/bench-scale.sh).
//!
//! Each agent is what the real agent is on the wire: its own TCP connection
//! and HTTP/2 connection, made by the agent's own code
//! (`gitproxy_agent::dial::over`: same windows and keep-alives), one
//! `Tunnel/Connect` stream with `authorization: Bearer <accessKey>` and a
//! Hello, the broker's Welcome awaited; then it holds the stream idle,
//! answering heartbeats. When the stream ends it reconnects after the
//! agent's own backoff (`gitproxy_agent::backoff`: capped exponential with
//! equal jitter, reset after a healthy session), at once when drained.
//!
//! Agent `i` uses the accessKey `{key-prefix}{i % connections}`; agents
//! bind to `--sources` loopback addresses in turn (127.0.0.1, 127.0.0.2,
//! ...) so that many connections to one broker port do not exhaust one
//! source address's ephemeral ports.
//!
//! Output (stderr, JSON lines): `swarm status` whenever the number of
//! connected agents changed (at most every 250 ms), and `all connected` each
//! time that number reaches `--agents`, with the wall-clock time
//! (`unix_ms`) so a driver can time a reconnect storm.

use anyhow::{bail, Context, Result};
use clap::Parser;
use gitproxy_agent::backoff::{Backoff, HEALTHY_AFTER};
use gitproxy_integration_tests::harness::fake_agent::{hello, FakeAgent};
use gitproxy_proto::v1::{agent_message::Msg as Out, broker_message, Pong};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(name = "gitproxy-agent-swarm", about = "many idle gitproxy agents")]
struct Args {
    /// The broker's agent listener, host:port (plain h2c).
    #[arg(long)]
    broker: SocketAddr,
    /// Number of agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Number of connections the agents spread over (agent i uses key i % connections).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Prefix of the accessKeys.
    #[arg(long)]
    key_prefix: String,
    /// Loopback source addresses to use in turn (127.0.0.1 ...).
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Most first connection attempts in progress at once (the initial
    /// ramp; reconnects are spread by the backoff's jitter alone).
    #[arg(long, default_value_t = 256)]
    ramp: usize,
    /// Limit on dialling, the HTTP/2 handshake and the Welcome, in seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
}

/// Counters shared by every agent.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    welcomes: AtomicU64,
    failures: AtomicU64,
}

/// How a session ended.
enum End {
    /// The broker asked for a drain: reconnect at once.
    Drained,
    /// The stream ended after being connected this long.
    Closed(Duration),
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn source(args: &Args, i: usize) -> IpAddr {
    let n = args.sources.max(1) as usize;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8))
}

/// Dials, says Hello, waits for Welcome; then answers pings until the
/// stream ends. `first` (the ramp permit) is released once connected.
async fn session(
    i: usize,
    args: &Args,
    stats: &Stats,
    first: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<End> {
    let up = async {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source(args, i), 0))?;
        let tcp = sock.connect(args.broker).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let client = gitproxy_agent::dial::over(Box::new(tcp)).await?;
        let key = format!("{}{}", args.key_prefix, i % args.connections.max(1));
        let agent = FakeAgent::handshake(client, &key, hello(&format!("swarm-{i}"))).await?;
        Ok::<_, anyhow::Error>(agent)
    };
    let mut agent = tokio::time::timeout(Duration::from_secs(args.connect_timeout), up)
        .await
        .context("timed out")??;
    let since = Instant::now();
    stats.welcomes.fetch_add(1, Ordering::Relaxed);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    first.take();
    let mut drained = false;
    while let Some(m) = agent.next().await {
        match m.msg {
            Some(broker_message::Msg::Ping(p))
                if !agent.send(Out::Pong(Pong { nonce: p.nonce })).await =>
            {
                break;
            }
            Some(broker_message::Msg::Drain(_)) => {
                drained = true;
                break;
            }
            _ => {}
        }
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    Ok(if drained {
        End::Drained
    } else {
        End::Closed(since.elapsed())
    })
}

/// One agent, forever: connect, hold, reconnect with the agent's backoff.
async fn agent(i: usize, args: Arc<Args>, stats: Arc<Stats>, ramp: Arc<Semaphore>) {
    let mut first = ramp.acquire_owned().await.ok();
    let mut backoff = Backoff::default();
    loop {
        let delay = match session(i, &args, &stats, &mut first).await {
            Ok(End::Drained) => Duration::ZERO,
            Ok(End::Closed(lived)) => {
                if lived >= HEALTHY_AFTER {
                    backoff.reset();
                }
                backoff.next_delay()
            }
            Err(_) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                backoff.next_delay()
            }
        };
        // A failed first attempt gives its ramp slot to the next agent.
        first.take();
        tokio::time::sleep(delay).await;
    }
}

/// Prints `swarm status` on change and `all connected` when all are up.
async fn report(want: u64, stats: Arc<Stats>) {
    let mut printed = u64::MAX;
    let mut all = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last_status = Instant::now() - Duration::from_secs(1);
    loop {
        tick.tick().await;
        let c = stats.connected.load(Ordering::Relaxed);
        let line = |message: &str| {
            serde_json::json!({
                "message": message,
                "connected": c,
                "welcomes": stats.welcomes.load(Ordering::Relaxed),
                "failures": stats.failures.load(Ordering::Relaxed),
                "unix_ms": unix_ms() as u64,
            })
        };
        if c == want && !all {
            eprintln!("{}", line("all connected"));
        }
        all = c == want;
        if c != printed && last_status.elapsed() >= Duration::from_millis(250) {
            eprintln!("{}", line("swarm status"));
            last_status = Instant::now();
            printed = c;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let limit = gitproxy_integration_tests::harness::fdlimit::raise(args.agents as u64 + 200);
    if limit < args.agents as u64 + 64 {
        bail!(
            "open-file limit {limit} is too low for {} agents (run as root or raise `ulimit -n`)",
            args.agents
        );
    }
    let stats = Arc::new(Stats::default());
    let ramp = Arc::new(Semaphore::new(args.ramp.max(1)));
    for i in 0..args.agents {
        tokio::spawn(agent(i, args.clone(), stats.clone(), ramp.clone()));
    }
    report(args.agents as u64, stats).await;
    Ok(())
}
