//! The cluster test harness itself: a real redis-server that restarts on its
//! port, and a real HAProxy that sends agent connections only to ready
//! replicas.

use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::haproxy::{Backend, Haproxy, Mode};
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{agent::Agent, WAIT};

const KEY: &str = "harness-access-key-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_on_its_port_and_answers() {
    let mut r = Redis::start(Some("harness-redis-pass")).await;
    assert_eq!(r.cli(&["set", "k", "v"]).await.trim(), "OK");
    assert!(r.dump().await.contains("k:\nv"));
    r.kill().await;
    r.restart().await;
    assert_eq!(r.cli(&["get", "k"]).await.trim(), "", "no persistence");
    assert!(r.commands_processed().await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sends_agents_to_ready_replicas_only() {
    let up = Upstream::start().await;
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY)],
        ..BrokerSpec::default()
    };
    let mut b0 = Broker::start(spec.clone()).await;
    let b1 = Broker::start(spec).await;
    let lb = Haproxy::start(
        Mode::Tcp,
        &[
            Backend {
                name: "r0".into(),
                addr: b0.agent_addr,
                health: b0.api_addr,
            },
            Backend {
                name: "r1".into(),
                addr: b1.agent_addr,
                health: b1.api_addr,
            },
        ],
    )
    .await;
    // r0 goes away: HAProxy marks it down, agents land on r1.
    b0.proc.kill9().await;
    lb.proc
        .wait_for_text("Server replicas/r0 is DOWN", WAIT)
        .await;
    let agent = Agent::start("agent-0", &lb.url(), KEY, &[]).await;
    b1.proc
        .wait_for_nth(1, WAIT, |v| v["message"] == "agent connected")
        .await;
    drop(agent);
}
