//! Scenario `forward`: the cost of one hop between broker replicas.
//!
//! Cluster mode on loopback: a real `redis-server`, two replicas (`r0`,
//! `r1`) and one agent connected to `r0`. The same small requests go to
//! `r0`'s front door (**local**: the agent is on the replica asked) and to
//! `r1`'s (**forwarded**: `r1` finds the agent in the registry and relays
//! the load generator's HTTP/1.1 connections whole to `r0`'s peer listener,
//! `broker/src/cluster/relay`), in the same run; direct access to the
//! upstream is measured alongside as the floor.

use super::{agent_env, cpu_secs, load, loadavg, num, until_ok, Load, Plan, Report, TOKEN};
use anyhow::Result;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{start_replicas, ClusterFiles};
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use std::time::Duration;

const KEY: &str = "testpat-bench-forward-access-key-0123";

/// One figure of a load run.
type Metric = fn(&Load) -> f64;

fn cell(v: f64) -> String {
    num(v)
}

/// Runs the scenario and adds its table to `r`.
pub async fn forward(plan: &Plan, r: &mut Report) -> Result<()> {
    let redis = Redis::start(None).await;
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN)],
        ..Default::default()
    };
    let replicas = start_replicas(2, &spec, &Default::default(), &redis, &files).await;
    let agent = Agent::start(
        "bench-fwd-agent",
        &replicas[0].agent_url(),
        KEY,
        &agent_env(),
    )
    .await;
    let urls = [
        format!("{}/api/v4/json1k", up.url()),
        format!("{}/api/v4/json1k", replicas[0].front("acme")),
        format!("{}/api/v4/json1k", replicas[1].front("acme")),
    ];
    until_ok(&urls[2], Duration::from_secs(20)).await?;
    let pids = [
        std::process::id(),
        replicas[0].proc.pid(),
        replicas[1].proc.pid(),
        agent.proc.pid(),
    ];
    let mut c64: Vec<Load> = Vec::new();
    let mut c1: Vec<Load> = Vec::new();
    let mut cpu = Vec::new();
    let names = ["direct", "local", "forwarded"];
    for conns in [64usize, 1] {
        for (name, url) in names.iter().zip(&urls) {
            let before = pids.map(cpu_secs);
            let l = load(plan, url, conns).await?;
            let after = pids.map(cpu_secs);
            if conns == 64 && *name != "direct" {
                let n = l.requests.max(1) as f64;
                let us = |i: usize| (after[i] - before[i]) * 1e6 / n;
                cpu.push(format!(
                    "{name}, c=64: CPU µs per request — upstream (+ harness) {:.1}, r0 (holds the agent) {:.1}, r1 {:.1}, agent {:.1}",
                    us(0),
                    us(1),
                    us(2),
                    us(3)
                ));
            }
            if conns == 64 {
                c64.push(l);
            } else {
                c1.push(l);
            }
        }
    }
    let mut s = "\n### Forwarded between replicas (cluster mode)\n\n".to_string();
    s.push_str("| metric | direct | local (agent on the replica asked) | forwarded (agent on the other replica) | forwarded / local |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    let rows: [(&str, &Vec<Load>, Metric); 6] = [
        ("requests/s, c=64", &c64, |l| l.rps),
        ("p50 latency µs, c=64", &c64, |l| l.p50_us),
        ("p99 latency µs, c=64", &c64, |l| l.p99_us),
        ("requests/s, c=1", &c1, |l| l.rps),
        ("p50 latency µs, c=1", &c1, |l| l.p50_us),
        ("p99 latency µs, c=1", &c1, |l| l.p99_us),
    ];
    for (metric, v, f) in rows {
        s.push_str(&format!(
            "| {metric} | {} | {} | {} | {:.2} |\n",
            cell(f(&v[0])),
            cell(f(&v[1])),
            cell(f(&v[2])),
            f(&v[2]) / f(&v[1])
        ));
    }
    let errors: u64 = c64.iter().chain(&c1).map(|l| l.errors).sum();
    let requests: u64 = c64.iter().chain(&c1).map(|l| l.requests).sum();
    let tool = plan.tool();
    let notes = [
        format!("GET `/api/v4/json1k` (1 KiB JSON); a real `redis-server`, replicas r0 and r1 in cluster mode, one agent connected to r0; local = r0's front door, forwarded = r1's (the load generator's HTTP/1.1 connections are relayed whole to r0: `broker/src/cluster/relay`); {} s per run with {tool}", plan.secs),
        format!(
            "added p50 latency of the forwarded hop at c=1: forwarded − local = **{:.0} µs** (target ≤ 150 µs)",
            c1[2].p50_us - c1[1].p50_us
        ),
        format!(
            "forwarded throughput at c=64 = **{:.0} %** of local, i.e. the hop costs {:.0} % (target ≤ 30 %)",
            100.0 * c64[2].rps / c64[1].rps,
            100.0 - 100.0 * c64[2].rps / c64[1].rps
        ),
        format!("errors (non-2xx + socket errors): {errors} of {requests} requests"),
        format!("load average when done: {}", loadavg()),
    ];
    for n in notes.iter().chain(&cpu) {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str("- command: `gitproxy-bench --only forward`\n");
    r.add(&s);
    Ok(())
}
