//! Tunnel core acceptance: real broker and agent binaries, an in-process
//! upstream, every wait on a log line or a response (no sleeps).

use bytes::Bytes;
use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::pattern::{Pattern, Verifier};
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, WAIT};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "test-access-key-0123456789abcdef";
const TOKEN: &str = "conn-token-abcdef0123456789";

/// Bytes moved by the bulk tests (2 GiB unless overridden for quick runs).
fn bulk_bytes() -> u64 {
    std::env::var("GITPROXY_TEST_BULK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 << 30)
}

async fn setup_with(upstream: &Upstream, agents: usize, spec: BrokerSpec) -> (Broker, Vec<Agent>) {
    let mut spec = spec;
    if spec.connections.is_empty() {
        spec.connections = vec![
            ConnSpec::agent("acme", &upstream.url(), KEY).token(TOKEN),
            ConnSpec::direct("acme-direct", &upstream.url()).token(TOKEN),
        ];
    }
    let broker = Broker::start(spec).await;
    let mut v = Vec::new();
    for i in 0..agents {
        v.push(Agent::start(&format!("agent-{i}"), &broker.agent_url(), KEY, &[]).await);
    }
    (broker, v)
}

async fn setup(agents: usize) -> (Upstream, Broker, Vec<Agent>) {
    let up = Upstream::start().await;
    let (b, a) = setup_with(&up, agents, BrokerSpec::default()).await;
    (up, b, a)
}

fn no_secrets(broker: &Broker, agents: &[Agent]) {
    broker.proc.assert_no_secrets(&[KEY, TOKEN]);
    for a in agents {
        a.proc.assert_no_secrets(&[KEY, TOKEN]);
    }
}

async fn download(url: &str, seed: u64) -> (u64, bool) {
    let resp = client().get(url).send().await.expect("send");
    assert_eq!(resp.status(), 200, "{url}");
    let mut v = Verifier::new(seed);
    let mut ok = true;
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        ok &= v.feed(&c.expect("body chunk"));
    }
    let len = v.len;
    let (tail, _) = v.finish();
    (len, ok && tail)
}

/// Acceptance 1 (small): a GET and a POST with a JSON body, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_json_pass_through() {
    let (_up, broker, agents) = setup(1).await;
    let c = client();
    let r = c
        .get(format!("{}/api/v4/version", broker.front("acme")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"version":"17.5.0","revision":"test"}"#
    );

    let body =
        r#"{"title":"Bump lodash","changes":[{"path":"package.json","content":"{}"}],"n":12345}"#;
    let r = c
        .post(format!("{}/api/v4/echo", broker.front("acme")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-echo-method"], "POST");
    assert_eq!(r.headers()["x-echo-content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), body);
    no_secrets(&broker, &agents);
}

/// Acceptance 1 (bulk): a streamed download passes byte-exact with flat memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_download_is_byte_exact_with_flat_memory() {
    let (_up, broker, agents) = setup(1).await;
    let n = bulk_bytes();
    let (len, ok) = download(
        &format!("{}/api/v4/bytes?n={n}&seed=42", broker.front("acme")),
        42,
    )
    .await;
    assert_eq!(len, n);
    assert!(ok, "downloaded bytes differ from what the upstream sent");
    let (b, a) = (broker.proc.peak_rss_kib(), agents[0].proc.peak_rss_kib());
    eprintln!("download of {n} bytes: peak RSS broker {b} KiB, agent {a} KiB");
    assert!(
        b < 100 * 1024 && a < 100 * 1024,
        "peak RSS broker {b} KiB agent {a} KiB"
    );
}

/// Acceptance 1 (bulk): a streamed upload passes byte-exact with flat memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upload_is_byte_exact_with_flat_memory() {
    let (_up, broker, agents) = setup(1).await;
    let n = bulk_bytes();
    let mut p = Pattern::new(43);
    let mut left = n;
    let stream = futures::stream::poll_fn(move |_| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let k = left.min(256 * 1024);
        left -= k;
        std::task::Poll::Ready(Some(Ok::<Bytes, std::io::Error>(p.chunk(k as usize))))
    });
    let r = client()
        .post(format!("{}/api/v4/upload?seed=43", broker.front("acme")))
        .header("content-length", n)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["len"], n, "{v}");
    assert_eq!(v["matches"], true, "{v}");
    let (b, a) = (broker.proc.peak_rss_kib(), agents[0].proc.peak_rss_kib());
    eprintln!("upload of {n} bytes: peak RSS broker {b} KiB, agent {a} KiB");
    assert!(
        b < 100 * 1024 && a < 100 * 1024,
        "peak RSS broker {b} KiB agent {a} KiB"
    );
}

/// Acceptance 2: 500 requests in flight at once over one agent stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests() {
    let (up, broker, agents) = setup(1).await;
    let c = client();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = Vec::new();
    for i in 0..500u64 {
        let (c, b) = (c.clone(), barrier.clone());
        // GitLab answers none before all 500 are there at once.
        let url = format!(
            "{}/api/v4/bytes?n={}&seed={i}&hold_until=500",
            broker.front("acme"),
            1000 + i * 37
        );
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = c.get(url).send().await.expect("send");
            let status = r.status();
            let body = r.bytes().await.expect("body");
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let mut v = Verifier::new(i);
            let ok = v.feed(&body);
            let (tail, _) = v.finish();
            assert!(
                ok && tail && body.len() as u64 == 1000 + i * 37,
                "request {i} body differs"
            );
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }
    assert_eq!(up.peak_concurrent(), 500, "requests at GitLab at once");
    // Every request has one log line at the agent (written just after End).
    agents[0]
        .proc
        .wait_for_nth(500, WAIT, |v| v["message"] == "request")
        .await;
    assert_eq!(agents[0].proc.count_message("request"), 500);
    no_secrets(&broker, &agents);
}

/// Acceptance 3: a response nobody reads does not stall the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_reader_does_not_stall_other_requests() {
    let (_up, broker, agents) = setup(1).await;
    let c = client();
    let big = 256u64 << 20;
    let stalled = c
        .get(format!(
            "{}/api/v4/bytes?n={big}&seed=5",
            broker.front("acme")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.status(), 200);
    let mut stalled = stalled.bytes_stream();
    let mut v = Verifier::new(5);
    assert!(v.feed(&stalled.next().await.unwrap().unwrap()));
    // The stalled body is now left unread while 50 others run to completion.
    let others = futures::future::join_all((0..50u64).map(|i| {
        let c = c.clone();
        let url = format!(
            "{}/api/v4/bytes?n={}&seed={}",
            broker.front("acme"),
            256 * 1024,
            100 + i
        );
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            let mut v = Verifier::new(100 + i);
            v.feed(&body) && v.finish().0 && body.len() == 256 * 1024
        }
    }));
    let results = tokio::time::timeout(WAIT, others)
        .await
        .expect("other requests stalled behind the paused reader");
    assert!(results.iter().all(|ok| *ok));
    // And the paused one still completes intact when read again.
    let rest = async {
        while let Some(c) = stalled.next().await {
            assert!(v.feed(&c.unwrap()));
        }
        v
    };
    let v = tokio::time::timeout(Duration::from_secs(120), rest)
        .await
        .expect("resumed body");
    assert_eq!(v.len, big);
    assert!(v.finish().0);
    no_secrets(&broker, &agents);
}

/// Acceptance 4: a caller leaving mid-download aborts the upstream request
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_disconnect_aborts_upstream_within_a_second() {
    let (up, broker, agents) = setup(1).await;
    let r = client()
        .get(format!("{}/api/v4/endless", broker.front("acme")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let mut got = 0;
    while got < 1 << 20 {
        got += s.next().await.unwrap().unwrap().len();
    }
    let left = Instant::now();
    drop(s);
    let dropped = up
        .dropped(Duration::from_secs(5))
        .await
        .expect("the upstream never saw the caller leave");
    let took = dropped.duration_since(left);
    assert!(
        took < Duration::from_secs(1),
        "upstream aborted after {took:?}"
    );
    agents[0]
        .proc
        .wait_for_message("request cancelled by the broker", WAIT)
        .await;
    no_secrets(&broker, &agents);
}

/// Acceptance 5: the agent killed mid-response; restarted; the broker restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_broker_restarts() {
    let (_up, mut broker, mut agents) = setup(1).await;
    let c = client();
    // One request with headers sent, one without.
    let held = c
        .get(format!("{}/api/v4/hold", broker.front("acme")))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let mut held = held.bytes_stream();
    assert_eq!(&held.next().await.unwrap().unwrap()[..], b"first");
    let stalled = tokio::spawn({
        let c = c.clone();
        let url = format!("{}/api/v4/stall", broker.front("acme"));
        async move { c.get(url).send().await.unwrap() }
    });
    // Both requests are in flight at the agent before it is killed.
    wait_in_flight(&broker, 2).await;
    let mut agent = agents.remove(0);
    agent.proc.kill9().await;

    // Headers sent: the body ends in an error, never a clean short end.
    let rest = tokio::time::timeout(WAIT, async {
        loop {
            match held.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("body did not end");
    assert!(rest, "a body cut by the agent's death ended as if complete");
    // No headers yet: 502 agent_disconnected.
    let r = tokio::time::timeout(WAIT, stalled).await.unwrap().unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_disconnected");

    // The agent restarted: requests succeed again.
    let agent = Agent::start("agent-0b", &broker.agent_url(), KEY, &[]).await;
    let r = c
        .get(format!("{}/api/v4/version", broker.front("acme")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The broker restarted: the running agent is back within 5 seconds.
    broker.restart().await;
    let back = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), agent.wait_connected(2))
        .await
        .expect("the agent did not reconnect within 5s of the broker restart");
    eprintln!(
        "agent reconnected {:?} after the broker was back",
        back.elapsed()
    );
    let r = c
        .get(format!("{}/api/v4/version", broker.front("acme")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    no_secrets(&broker, &[agent]);
}

async fn wait_in_flight(broker: &Broker, n: u64) {
    let c = client();
    let url = format!("{}/v1/connections/acme", broker.api());
    tokio::time::timeout(WAIT, async {
        loop {
            let v: serde_json::Value = c.get(&url).send().await.unwrap().json_value().await;
            if v["agents"][0]["in_flight"].as_u64() == Some(n) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("in-flight count never reached");
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}
impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

/// Acceptance 6: gitproxy's own errors, and a wrong accessKey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_named_and_wrong_key_backs_off() {
    let up = Upstream::start().await;
    let spec = BrokerSpec {
        api_keys: vec!["the-api-key-42".into()],
        ..BrokerSpec::default()
    };
    let (broker, _) = setup_with(&up, 0, spec).await;
    let c = client();
    let url = format!("{}/api/v4/version", broker.front("acme"));
    let r = c
        .get(&url)
        .header("x-gitproxy-key", "the-api-key-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_not_connected");
    assert!(r.headers().contains_key("retry-after"));
    let v = r.json_value().await;
    assert_eq!(v["error"], "agent_not_connected");
    assert!(v["hint"].as_str().unwrap().contains("gitproxy-agent"));

    let r = c
        .get(format!("{}/api/v4/version", broker.front("nope")))
        .header("x-gitproxy-key", "the-api-key-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-gitproxy-error"], "unknown_connection");

    for key in [Some("wrong"), None] {
        let mut rq = c.get(&url);
        if let Some(k) = key {
            rq = rq.header("x-gitproxy-key", k);
        }
        let r = rq.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["x-gitproxy-error"], "unauthorized");
    }

    // A wrong accessKey: a clear error, retried with growing delays.
    let agent = Agent::spawn("agent-wrong", &broker.agent_url(), "not-the-key", &[]);
    let is_auth_error = |v: &serde_json::Value| {
        v["level"] == "ERROR"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("rejected the accessKey"))
    };
    let mut times = Vec::new();
    for n in 1..=3 {
        let v = agent.proc.wait_for_nth(n, WAIT, is_auth_error).await;
        times.push(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).unwrap());
    }
    let gaps: Vec<Duration> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap())
        .collect();
    // Equal jitter: retry k waits at least half of 500 ms * 2^k, so the
    // agent never spins however fast the refusal comes back.
    assert!(gaps[0] >= Duration::from_millis(245), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(495), "{gaps:?}");
    broker
        .proc
        .wait_for_nth(3, WAIT, |v| {
            v["message"] == "agent refused: unknown accessKey"
        })
        .await;
    broker
        .proc
        .assert_no_secrets(&[KEY, TOKEN, "the-api-key-42", "not-the-key"]);
    agent.proc.assert_no_secrets(&["not-the-key"]);
    assert!(
        !agent.health().await,
        "health must fail while not connected"
    );
}

/// Acceptance 7: two agents share the load; one dies, the other serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_and_survive_one_death() {
    let (_up, broker, mut agents) = setup(2).await;
    let c = client();
    for _ in 0..20 {
        let r = c
            .get(format!("{}/api/v4/version", broker.front("acme")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("17.5.0"));
    }
    // The broker's request lines name the agent that served each request.
    broker
        .proc
        .wait_for_nth(20, WAIT, |v| v["message"] == "request")
        .await;
    let served_by = |name: &str| {
        broker
            .proc
            .json_lines()
            .iter()
            .filter(|v| v["message"] == "request" && v["agent"] == name)
            .count()
    };
    let (a0, a1) = (served_by("agent-0"), served_by("agent-1"));
    assert_eq!(a0 + a1, 20);
    assert!(a0 >= 5 && a1 >= 5, "load not spread: {a0} / {a1}");
    assert!(agents[0].health().await && agents[1].health().await);

    agents[0].proc.kill9().await;
    for i in 0..20 {
        let r = c
            .get(format!("{}/api/v4/version", broker.front("acme")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} after one agent died");
        assert!(r.text().await.unwrap().contains("17.5.0"));
    }
    broker
        .proc
        .wait_for_nth(40, WAIT, |v| v["message"] == "request")
        .await;
    assert_eq!(served_by("agent-1"), a1 + 20);
    no_secrets(&broker, &agents);
}

/// Sends raw bytes (so nothing normalises the request line) and returns the
/// status and the `X-Gitproxy-Error` header.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let err = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-gitproxy-error: ")
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    (status, err)
}

/// Acceptance 8: policy refusals never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_never_reach_upstream() {
    let (up, broker, agents) = setup(1).await;
    let a = broker.api_addr;
    for (name, req) in [
        (
            "traversal",
            "GET /gitlab/acme/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "traversal in api",
            "GET /gitlab/acme/api/v4/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "encoded traversal",
            "GET /gitlab/acme/api/v4/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_string(),
        ),
        (
            "absolute form",
            format!(
                "GET http://{}/gitlab/acme/api/v4/version HTTP/1.1\r\nHost: x\r\n\r\n",
                up.addr
            ),
        ),
        (
            "connect",
            format!("CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n", up.addr, up.addr),
        ),
        (
            "outside api",
            "GET /gitlab/acme/admin/users HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "direct mode too",
            "GET /gitlab/acme-direct/users/sign_in HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
    ] {
        let (status, err) = raw(a, &req).await;
        assert_eq!((status, err.as_str()), (403, "blocked_by_policy"), "{name}");
    }
    assert!(
        up.requests().is_empty(),
        "refused requests reached the upstream: {:?}",
        up.requests()
    );
    no_secrets(&broker, &agents);
}

/// Acceptance 9: the same front-door requests in direct mode, no agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_front_door() {
    let (up, broker, _) = setup(0).await;
    let c = client();
    let front = broker.front("acme-direct");
    let r = c
        .get(format!("{front}/api/v4/version"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"version":"17.5.0","revision":"test"}"#
    );
    let r = c
        .post(format!("{front}/api/v4/echo"))
        .header("content-type", "application/json")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"a":1}"#);
    // The connection token is added when the caller sends none.
    assert_eq!(
        up.last_headers("/api/v4/echo").unwrap()["private-token"],
        TOKEN
    );
    let n = 64u64 << 20;
    let (len, ok) = download(&format!("{front}/api/v4/bytes?n={n}&seed=9"), 9).await;
    assert!(len == n && ok);
    broker.proc.assert_no_secrets(&[TOKEN]);
}

/// Drain: at max connection age the agent opens a new stream first, then
/// finishes in-flight requests on the old one; no request is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_to_a_new_stream_without_losing_requests() {
    let up = Upstream::start().await;
    let spec = BrokerSpec {
        args: vec!["--max-connection-age".into(), "2s".into()],
        ..BrokerSpec::default()
    };
    let (broker, agents) = setup_with(&up, 1, spec).await;
    let c = client();
    // A download in flight across the drain, left unread until after it.
    let n = 64u64 << 20;
    let r = c
        .get(format!(
            "{}/api/v4/bytes?n={n}&seed=11",
            broker.front("acme")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut long = r.bytes_stream();
    let mut v = Verifier::new(11);
    assert!(v.feed(&long.next().await.unwrap().unwrap()));
    // Requests keep succeeding while the stream is replaced.
    let second_stream = agents[0].wait_connected(2);
    tokio::pin!(second_stream);
    let mut sent = 0;
    loop {
        tokio::select! {
            _ = &mut second_stream => break,
            r = c.get(format!("{}/api/v4/version", broker.front("acme"))).send() => {
                let r = r.unwrap();
                assert_eq!(r.status(), 200, "request {sent} during the drain");
                assert!(r.text().await.unwrap().contains("17.5.0"));
                sent += 1;
                assert!(sent < 1_000_000, "no drain happened");
            }
        }
    }
    broker
        .proc
        .wait_for_message("asking the agent to drain", WAIT)
        .await;
    for i in 0..20 {
        let r = c
            .get(format!("{}/api/v4/version", broker.front("acme")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} after the drain");
        r.text().await.unwrap();
    }
    while let Some(chunk) = long.next().await {
        assert!(v.feed(&chunk.expect("the in-flight download was cut by the drain")));
    }
    assert_eq!(v.len, n);
    assert!(v.finish().0);
    // The old stream ends once its work is done.
    agents[0]
        .proc
        .wait_for_message("session ended: Drained", WAIT)
        .await;
    no_secrets(&broker, &agents);
}

/// The agent's own shutdown (SIGTERM) drains: an in-flight download
/// completes intact, then the agent exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_finishes_in_flight_requests() {
    let (_up, broker, mut agents) = setup(1).await;
    let c = client();
    let n = 32u64 << 20;
    let r = c
        .get(format!(
            "{}/api/v4/bytes?n={n}&seed=21",
            broker.front("acme")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut v = Verifier::new(21);
    assert!(v.feed(&body.next().await.unwrap().unwrap()));
    agents[0].proc.signal(libc::SIGTERM);
    broker
        .proc
        .wait_for_message("the agent is draining", WAIT)
        .await;
    while let Some(chunk) = body.next().await {
        assert!(v.feed(&chunk.expect("the download was cut by the agent's shutdown")));
    }
    assert_eq!(v.len, n);
    assert!(v.finish().0);
    let status = agents[0]
        .proc
        .wait_exit(WAIT)
        .await
        .expect("the agent did not exit");
    assert!(status.success(), "{status:?}");
    agents[0]
        .proc
        .wait_for_message("gitproxy-agent stopped", WAIT)
        .await;
    no_secrets(&broker, &agents);
}
