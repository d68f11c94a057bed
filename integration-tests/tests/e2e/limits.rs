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

/// `--handshake-timeout` also bounds the wait for the agent's Hello: a
/// stream that authenticates and then says nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_must_arrive_within_the_handshake_timeout() {
    use gitproxy_proto::v1::tunnel_client::TunnelClient;
    let up = Upstream::start().await;
    let b = broker(&up, &["--handshake-timeout", "1s"]).await;
    let channel = tonic::transport::Endpoint::from_shared(b.agent_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let (_tx, rx) = tokio::sync::mpsc::channel::<gitproxy_proto::v1::AgentMessage>(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("metadata"),
    );
    let t = Instant::now();
    let r = tokio::time::timeout(WAIT, TunnelClient::new(channel).connect(req))
        .await
        .expect("the broker answers within the timeout");
    let status = r.expect_err("no Hello, no stream");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A gRPC message above 1 MiB (`MAX_MESSAGE_BYTES`) ends the agent's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_one_mib_end_the_stream() {
    use gitproxy_integration_tests::harness::fake_agent::{hello, FakeAgent};
    use gitproxy_proto::v1::{agent_message::Msg as Out, Data};
    let up = Upstream::start().await;
    let b = broker(&up, &[]).await;
    let mut fake = FakeAgent::connect(b.agent_addr, KEY, hello("big-frames"))
        .await
        .expect("connected");
    fake.send(Out::Data(Data {
        id: 1,
        data: bytes::Bytes::from(vec![0u8; (1 << 20) + 1]),
    }))
    .await;
    assert!(fake.wait_ended(WAIT).await, "the stream is still open");
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("agent disconnected: stream error"))
        })
        .await;
}

/// `--max-agent-connections`: an agent beyond the cap waits until a slot is
/// free, then connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connections_beyond_the_cap_wait() {
    let up = Upstream::start().await;
    let b = broker(&up, &["--max-agent-connections", "1"]).await;
    let mut first = Agent::start("agent-0", &b.agent_url(), KEY, &[]).await;
    let second = Agent::spawn(
        "agent-1",
        &b.agent_url(),
        KEY,
        &[("GITPROXY_CONNECT_TIMEOUT", "1s")],
    );
    // The second one's attempt times out: the broker does not serve it.
    second
        .proc
        .wait_for_nth(1, WAIT, |v| v["level"] == "ERROR")
        .await;
    let v: serde_json::Value = client()
        .get(format!("{}/v1/connections/acme", b.api()))
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("json");
    assert_eq!(v["agents"].as_array().map(Vec::len), Some(1), "{v}");
    first.proc.kill9().await;
    second.wait_connected(1).await;
}

/// `EVENT_BUFFER` (1024 events): a WatchTunnel caller that does not read
/// loses the oldest events (and the broker says how many); traffic never
/// waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_loses_events_and_never_slows_traffic() {
    use gitproxy_proto::v1::admin_client::AdminClient;
    use gitproxy_proto::v1::WatchTunnelRequest;
    let up = Upstream::start().await;
    let b = broker(&up, &[]).await;
    // A tiny HTTP/2 window: the broker can push only a few events before
    // the unread stream is full, as with a stalled watcher on a slow link.
    let channel = tonic::transport::Endpoint::from_shared(b.api())
        .expect("endpoint")
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut watch = AdminClient::new(channel)
        .watch_tunnel(WatchTunnelRequest {
            connection_id: "acme-direct".into(),
        })
        .await
        .expect("watching")
        .into_inner();
    // Events the broker can absorb without a lag: the event buffer (1024)
    // plus what hyper pulls into the stream's HTTP/2 send buffer (up to
    // 400 KiB) despite the closed window. A 3 KiB path makes every
    // RequestStarted event ~3 KiB, so that send buffer holds ~130 of them;
    // 1,500 requests = 3,000 events overflow both whatever the scheduling.
    let long = "a".repeat(3 * 1024);
    let c = client();
    let t = Instant::now();
    for _ in 0..1_500 {
        let r = c
            .get(format!("{}/api/v4/projects/{long}", b.front("acme-direct")))
            .send()
            .await
            .expect("answered");
        // Answered by GitLab (its 404), not by a stalled broker.
        assert_eq!(r.status(), 404);
    }
    eprintln!("1,500 requests with a stalled watcher: {:?}", t.elapsed());
    // Reading now: the first event the watcher gets is not the first sent.
    let first = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("an event")
        .expect("stream")
        .expect("event");
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "a WatchTunnel caller is too slow: events dropped"
                && v["lost"].as_u64().is_some_and(|n| n > 0)
        })
        .await;
    drop(first);
}

/// A GitLab stand-in answering every `GET /api/v4/projects` page with
/// `body` and a `Link: rel="next"` to the following page (forever).
async fn endless_catalogue(
    body: bytes::Bytes,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(move |uri: http::Uri| {
        let body = body.clone();
        async move {
            let page: u64 = uri
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id_after=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let next = format!(
                "<http://{addr}/api/v4/projects?membership=true&min_access_level=30&pagination=keyset&order_by=id&sort=asc&per_page=100&id_after={}>; rel=\"next\"",
                page + 1
            );
            (
                [
                    (http::header::CONTENT_TYPE, "application/json".to_string()),
                    (http::header::LINK, next),
                ],
                body,
            )
                .into_response()
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// `MAX_PAGES` (1000): a catalogue whose `Link: rel="next"` never ends is
/// cut with a clear error instead of looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_stops_after_max_pages() {
    let (addr, _server) = endless_catalogue(bytes::Bytes::from_static(b"[]")).await;
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::direct("acme", &format!("http://{addr}")).token("t0k3n-for-pages")
        ],
        ..BrokerSpec::default()
    })
    .await;
    let r = client()
        .get(format!("{}/v1/connections/acme/projects", b.api()))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 502);
    let text = r.text().await.expect("body");
    assert!(text.contains("more than 1000 pages"), "{text}");
}

/// `MAX_BODY` (32 MiB): an answer to a request the broker makes itself is
/// read up to the limit, then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_answers_are_read_up_to_32_mib() {
    let big = bytes::Bytes::from(vec![b' '; 33 << 20]);
    let (addr, _server) = endless_catalogue(big).await;
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::direct("acme", &format!("http://{addr}")).token("t0k3n-for-pages")
        ],
        ..BrokerSpec::default()
    })
    .await;
    let r = client()
        .get(format!("{}/v1/connections/acme/projects", b.api()))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.expect("body")).expect("json");
    assert_eq!(v["error"], "upstream_unreachable", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not be read")),
        "{v}"
    );
}
