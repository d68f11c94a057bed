//! Scenario `scale`: many idle agents on one replica in cluster mode.
//!
//! A real `redis-server` and one broker replica whose file holds one agent
//! connection per agent (each agent its own customer, as in production);
//! `gitproxy-agent-swarm` (a separate process) connects them all, each on
//! its own TCP connection. Measured: the broker's memory per agent, Redis's
//! memory and keys per agent, the commands Redis serves per second while
//! everything is idle, then, after the broker is killed and started again,
//! the time until every agent is connected again and Redis's busiest second
//! meanwhile. Run as root (scripts/bench-scale.sh): both processes need one
//! file descriptor per agent.

use super::{loadavg, mib, status_kib, Plan, Report};
use anyhow::{bail, Context, Result};
use gitproxy_integration_tests::harness::broker::{BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{start_replicas, ClusterFiles};
use gitproxy_integration_tests::harness::process::Proc;
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, fdlimit};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::process::Command;

const KEY_PREFIX: &str = "testpat-swarm-access-key-";

/// Limit on connecting every agent (first time or after the restart).
const CONNECT_LIMIT: Duration = Duration::from_secs(600);

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

async fn redis_info(redis: &Redis, section: &str, field: &str) -> f64 {
    redis
        .cli(&["info", section])
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Samples `total_commands_processed` every 500 ms until `stop`; returns the
/// highest rate over one sample interval (commands/s; the sampling command
/// itself is not counted).
async fn peak_rate(redis: &Redis, stop: Arc<AtomicBool>) -> f64 {
    let mut last = (Instant::now(), redis.commands_processed().await);
    let mut peak: f64 = 0.0;
    while !stop.load(Ordering::Relaxed) {
        // Sampling interval of the rate, not a wait for readiness.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = (Instant::now(), redis.commands_processed().await);
        let rate = (now.1.saturating_sub(last.1).saturating_sub(1)) as f64
            / now.0.duration_since(last.0).as_secs_f64();
        peak = peak.max(rate);
        last = now;
    }
    peak
}

/// The `n`-th `all connected` line of the swarm.
async fn all_connected(swarm: &Proc, n: usize) -> Value {
    swarm
        .wait_for_nth(n, CONNECT_LIMIT, |v| v["message"] == "all connected")
        .await
}

/// Runs the scenario and adds its table to `r`.
pub async fn scale(plan: &Plan, r: &mut Report) -> Result<()> {
    let want = plan.scale_agents;
    // The broker and the swarm inherit this limit: one socket per agent
    // each, plus a few dozen of their own (listeners, Redis, pipes).
    let limit = fdlimit::raise(want as u64 + 1024);
    let n = want.min(limit.saturating_sub(200) as usize);
    if n < want {
        eprintln!("gitproxy-bench: scale: open-file limit {limit}: {n} agents instead of {want}");
    }
    let sources = n.div_ceil(5000).clamp(1, 200) as u8;
    let redis = Arc::new(Redis::start(None).await);
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: (0..n)
            .map(|i| {
                ConnSpec::agent(
                    &format!("swarm-{i}"),
                    &up.url(),
                    &format!("{KEY_PREFIX}{i}"),
                )
            })
            .collect(),
        // The default cap (16,384) is below what this scenario holds.
        args: vec!["--max-agent-connections".into(), (n + 1000).to_string()],
        ..Default::default()
    };
    let mut replicas = start_replicas(1, &spec, &Default::default(), &redis, &files).await;
    let broker = &mut replicas[0];
    let pid = broker.proc.pid();
    // Measurement settle: the replica registers itself, its tasks start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = status_kib(pid, "VmRSS:");
    let redis_mem_idle = redis_info(&redis, "memory", "used_memory").await;

    let mut cmd = Command::new(bin("gitproxy-agent-swarm"));
    cmd.arg("--broker")
        .arg(broker.agent_addr.to_string())
        .arg("--agents")
        .arg(n.to_string())
        .arg("--connections")
        .arg(n.to_string())
        .arg("--key-prefix")
        .arg(KEY_PREFIX)
        .arg("--sources")
        .arg(sources.to_string());
    let t = Instant::now();
    let swarm = Proc::spawn("agent-swarm", cmd);
    let first = all_connected(&swarm, 1).await;
    let first_s = t.elapsed().as_secs_f64();
    // Measurement settle: the registry writes the last streams to Redis.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_n = status_kib(pid, "VmRSS:");
    let per_agent = (rss_n.saturating_sub(rss_idle)) as f64 / n as f64;
    let redis_mem_n = redis_info(&redis, "memory", "used_memory").await;
    let keys: f64 = redis
        .cli(&["dbsize"])
        .await
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    let swarm_rss = status_kib(swarm.pid(), "VmRSS:");

    // Idle upkeep: commands Redis processed over the window.
    let window = plan.scale_window;
    let c0 = redis.commands_processed().await;
    let t0 = Instant::now();
    // The measurement window itself.
    tokio::time::sleep(Duration::from_secs(window)).await;
    let c1 = redis.commands_processed().await;
    let idle_rate = (c1.saturating_sub(c0).saturating_sub(1)) as f64 / t0.elapsed().as_secs_f64();

    // Restart: SIGKILL, start again on the same ports, time the storm.
    let before = swarm.count_message("all connected");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, redis) = (stop.clone(), redis.clone());
        tokio::spawn(async move { peak_rate(&redis, stop).await })
    };
    let killed_ms = unix_ms();
    broker.restart().await;
    let back_ms = unix_ms();
    let again = all_connected(&swarm, before + 1).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.context("sampler")?;
    let all_ms = again["unix_ms"].as_f64().unwrap_or(f64::NAN);
    let reconnect_s = (all_ms - back_ms) / 1e3;
    let from_kill_s = (all_ms - killed_ms) / 1e3;
    let failures = again["failures"].as_u64().unwrap_or(0);
    if first["connected"].as_u64() != Some(n as u64) {
        bail!("swarm reported {first}");
    }

    let per_1000 = idle_rate * 1000.0 / n as f64;
    let mut s = format!("\n### Scale: {n} idle agents on one replica (cluster mode)\n\n");
    s.push_str("| metric | value | target |\n|---|---:|---|\n");
    let rows = [
        (
            "agents connected (each its own TCP connection and tunnel stream)",
            format!("{n}"),
            format!("{want}"),
        ),
        (
            "first connection of all, s (ramp: 256 dials in flight)",
            format!("{first_s:.1}"),
            "–".into(),
        ),
        (
            "broker VmRSS idle (config with {n} connections loaded), MiB",
            format!("{:.1}", mib(rss_idle)),
            "–".into(),
        ),
        (
            "broker VmRSS with every agent connected, MiB",
            format!("{:.1}", mib(rss_n)),
            "–".into(),
        ),
        (
            "**broker memory per agent, KiB**",
            format!("**{per_agent:.1}**"),
            "≤ 32".into(),
        ),
        (
            "Redis used_memory per agent, bytes",
            format!("{:.0}", (redis_mem_n - redis_mem_idle) / n as f64),
            "–".into(),
        ),
        ("Redis keys (DBSIZE)", format!("{keys:.0}"), "–".into()),
        (
            &*format!("**Redis commands/s while idle** ({window} s window)"),
            format!("**{idle_rate:.2}**"),
            "–".into(),
        ),
        (
            "Redis commands/s per 1,000 agents while idle",
            format!("{per_1000:.3}"),
            "≤ 50".into(),
        ),
        (
            "**broker back → every agent connected again, s**",
            format!("**{reconnect_s:.1}**"),
            "≤ 60".into(),
        ),
        (
            "broker killed → every agent connected again, s",
            format!("{from_kill_s:.1}"),
            "–".into(),
        ),
        (
            "failed connection attempts during the storm (swarm total)",
            format!("{failures}"),
            "–".into(),
        ),
        (
            "Redis peak commands/s during the reconnect (500 ms samples)",
            format!("{peak:.0}"),
            "–".into(),
        ),
        (
            "swarm process VmRSS, MiB (not the broker)",
            format!("{:.0}", mib(swarm_rss)),
            "–".into(),
        ),
    ];
    for (m, v, t) in rows {
        s.push_str(&format!(
            "| {} | {v} | {t} |\n",
            m.replace("{n}", &n.to_string())
        ));
    }
    s.push_str(&format!(
        "\n- `gitproxy-agent-swarm --agents {n} --connections {n} --sources {sources}`: one agent connection per agent in the broker's file; every agent dials with the agent's own code (`gitproxy_agent::dial::over`), says Hello, waits for Welcome, answers Pings; reconnects with the agent's backoff (500 ms base, equal jitter, cap 30 s)\n- memory per agent = (VmRSS with all connected, 3 s after the last Welcome − VmRSS idle) / {n}\n- broker run with `--max-agent-connections {}` (the default cap is 16,384 connections)\n- restart = SIGKILL, then the same binary on the same ports (\"back\" = both listeners logged `listening`); the replica's old registry entries stay until its key expires\n- open-file limit {limit}; load average when done: {}\n- command: `gitproxy-bench --only scale --scale-agents {want}`\n",
        n + 1000,
        loadavg()
    ));
    r.add(&s);
    Ok(())
}
