//! The limits of docs/limits.md that no other test file covers, each set low
//! and seen to hold: the request timeout, the in-flight cap, heartbeats on
//! both sides (a frozen peer: SIGSTOP), the shutdown grace on both sides, and
//! the agent's connect timeout. Real binaries; every wait on a signal.

use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, WAIT};
use std::time::{Duration, Instant};

const KEY: &str = "limits-access-key-0123456789abcdef";

async fn broker(up: &Upstream, args: &[&str]) -> Broker {
    Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &up.url(), KEY),
            ConnSpec::direct("acme-direct", &up.url()),
        ],
        args: args.iter().map(|s| s.to_string()).collect(),
        ..BrokerSpec::default()
    })
    .await
}

/// `--request-timeout`: GitLab's head not there in time → 504 `timeout`, in
/// agent and direct mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504() {
    let up = Upstream::start().await;
    let b = broker(&up, &["--request-timeout", "1s"]).await;
    let _agent = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    for conn in ["acme", "acme-direct"] {
        let t = Instant::now();
        let r = tokio::time::timeout(
            WAIT,
            client()
                .get(format!("{}/api/v4/stall", b.front(conn)))
                .send(),
        )
        .await
        .expect("answered within the timeout")
        .expect("answered");
        assert_eq!(r.status(), 504, "{conn}");
        assert_eq!(r.headers()["x-gitproxy-error"], "timeout", "{conn}");
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{conn}: {:?}",
            t.elapsed()
        );
    }
}

/// `--max-in-flight`: one request more than the cap → 503 `overloaded` with
/// `Retry-After: 1`; a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_answers_overloaded() {
    let up = Upstream::start().await;
    let b = broker(&up, &["--max-in-flight", "2"]).await;
    let _agent = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    let c = client();
    let hold = || c.get(format!("{}/api/v4/hold", b.front("acme"))).send();
    let first = hold().await.expect("first");
    let second = hold().await.expect("second");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let r = c
        .get(format!("{}/api/v4/version", b.front("acme")))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "overloaded");
    assert_eq!(r.headers()["retry-after"], "1");
    drop(first);
    // The slot is released when the broker sees the caller go: wait for it.
    tokio::time::timeout(WAIT, async {
        loop {
            let r = c
                .get(format!("{}/api/v4/version", b.front("acme")))
                .send()
                .await
                .expect("answered");
            if r.status() == 200 {
                return;
            }
            assert_eq!(r.headers()["x-gitproxy-error"], "overloaded");
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a freed slot serves again");
}

/// `--heartbeat-interval` / `--heartbeat-timeout`, broker side: a frozen
/// agent (SIGSTOP) is declared dead within interval + timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_finds_a_frozen_agent() {
    let up = Upstream::start().await;
    let b = broker(
        &up,
        &["--heartbeat-interval", "200ms", "--heartbeat-timeout", "1s"],
    )
    .await;
    let agent = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    let stopped = Instant::now();
    agent.proc.signal(libc::SIGSTOP);
    let line = b
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("agent disconnected: no frame from the agent"))
        })
        .await;
    let took = stopped.elapsed();
    agent.proc.signal(libc::SIGCONT);
    assert!(took < Duration::from_secs(5), "{took:?}: {line}");
    // Thawed, the agent finds its stream gone and connects again.
    agent.wait_connected(2).await;
}

/// The same, agent side: a frozen broker is declared dead by the agent with
/// the timings the broker sent in Welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_finds_a_frozen_broker() {
    let up = Upstream::start().await;
    let b = broker(
        &up,
        &["--heartbeat-interval", "200ms", "--heartbeat-timeout", "1s"],
    )
    .await;
    let agent = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    let stopped = Instant::now();
    b.proc.signal(libc::SIGSTOP);
    agent
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("no frame from the broker"))
        })
        .await;
    let took = stopped.elapsed();
    b.proc.signal(libc::SIGCONT);
    assert!(took < Duration::from_secs(5), "{took:?}");
    agent.wait_connected(2).await;
}

/// `--shutdown-grace` (broker): a request that never ends does not hold a
/// stopping broker longer than the grace period (plus the agent listener's
/// bounded stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_shutdown_grace_bounds_the_drain() {
    let up = Upstream::start().await;
    let mut b = broker(&up, &["--shutdown-grace", "1s"]).await;
    let _agent = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    let r = client()
        .get(format!("{}/api/v4/hold", b.front("acme")))
        .send()
        .await
        .expect("answered");
    let mut body = r.bytes_stream();
    body.next()
        .await
        .expect("first bytes")
        .expect("first bytes");
    let t = Instant::now();
    b.proc.signal(libc::SIGTERM);
    let status = b
        .proc
        .wait_exit(WAIT)
        .await
        .expect("the broker stops within the grace period");
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let cut = tokio::time::timeout(WAIT, async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the body ends");
    assert!(cut, "a body cut by the shutdown ended cleanly");
}

/// `GITPROXY_SHUTDOWN_GRACE` (agent): the same on the agent's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_grace_bounds_the_drain() {
    let up = Upstream::start().await;
    let b = broker(&up, &[]).await;
    let mut agent = Agent::start(
        "agent-0",
        &b.agent_url(),
        KEY,
        &[("GITPROXY_SHUTDOWN_GRACE", "1s")],
    )
    .await;
    let r = client()
        .get(format!("{}/api/v4/hold", b.front("acme")))
        .send()
        .await
        .expect("answered");
    let mut body = r.bytes_stream();
    body.next()
        .await
        .expect("first bytes")
        .expect("first bytes");
    let t = Instant::now();
    agent.proc.signal(libc::SIGTERM);
    let status = agent
        .proc
        .wait_exit(WAIT)
        .await
        .expect("the agent stops after its grace period");
    assert!(status.success(), "{status:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(12),
        "{took:?}"
    );
}

/// `GITPROXY_CONNECT_TIMEOUT`: a broker address that never completes the
/// TCP handshake (a listener whose backlog is full drops the SYN) fails
/// within the timeout with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connect_timeout() {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let listener = sock.listen(0).expect("listen");
    // Fill the backlog (never accepted): later SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let t = Instant::now();
    let agent = Agent::spawn(
        "agent-0",
        &format!("http://{addr}"),
        KEY,
        &[("GITPROXY_CONNECT_TIMEOUT", "1s")],
    );
    let line = agent
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["level"] == "ERROR"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("timed out after 1s"))
        })
        .await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}: {line}");
    drop(listener);
}
