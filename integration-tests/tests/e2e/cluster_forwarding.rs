//! Cluster mode (issue 11): the tunnel registry in a real `redis-server` and
//! front-door requests forwarded between real broker replicas. Agents are
//! connected straight to one replica, except in the acceptance-1 test where
//! a real HAProxy in front of the agent listeners picks it. Every wait is
//! on a log line, a response or a Redis/API state reached within a deadline.

use bytes::Bytes;
use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{
    peer_addr, start_replicas, ClusterFiles, PEER_SECRET,
};
use gitproxy_integration_tests::harness::haproxy::{agent_backends, Haproxy, Mode};
use gitproxy_integration_tests::harness::pattern::{Pattern, Verifier};
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, until, WAIT};
use serde_json::Value;
use std::time::{Duration, Instant};

const KEY: &str = "cluster-access-key-0123456789abcdef";
const TOKEN: &str = "cluster-conn-token-abcdef0123456789";

/// Bytes moved by the bulk tests (1 GiB unless overridden for quick runs).
fn bulk_bytes() -> u64 {
    std::env::var("GITPROXY_TEST_BULK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

/// The replicas `GET /v1/connections/{conn}` on `b` names for the agents.
async fn agent_replicas(b: &Broker, conn: &str) -> Vec<String> {
    let r = client()
        .get(format!("{}/v1/connections/{conn}", b.api()))
        .send()
        .await
        .expect("send");
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    v["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["replica"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `b` sees the agents of `conn` on exactly `replicas`.
async fn wait_view(b: &Broker, conn: &str, replicas: &[&str]) {
    until(
        &format!("{} to see the agents of {conn} on {replicas:?}", b.api()),
        WAIT,
        || async {
            let mut got = agent_replicas(b, conn).await;
            got.sort();
            (got == replicas).then_some(())
        },
    )
    .await
}

async fn metrics(b: &Broker) -> String {
    client()
        .get(format!("{}/metrics", b.api()))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text")
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

struct Cluster {
    redis: Redis,
    up: Upstream,
    replicas: Vec<Broker>,
    _files: ClusterFiles,
}

/// Redis, an upstream, `n` replicas serving connection `acme` (agent mode)
/// with `--replica-header`.
async fn cluster(n: usize) -> Cluster {
    cluster_with(n, &[]).await
}

/// [`cluster`] with extra broker arguments.
async fn cluster_with(n: usize, extra: &[&str]) -> Cluster {
    let redis = Redis::start(None).await;
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let mut args = vec!["--replica-header".to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN)],
        args,
        ..Default::default()
    };
    let replicas = start_replicas(n, &spec, &Default::default(), &redis, &files).await;
    Cluster {
        redis,
        up,
        replicas,
        _files: files,
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

async fn upload(url: &str, n: u64, seed: u64) -> Value {
    let mut p = Pattern::new(seed);
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
        .post(url)
        .header("content-length", n)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.expect("body")).expect("json")
}

/// Acceptance 1: one agent connected through a real TCP load balancer
/// (HAProxy) to whichever replica it picks (the owner); REST through every
/// replica, the answer naming the owner as the replica that served it; the
/// connection view of every replica shows the agent on the owner; a 1 GiB
/// download and upload byte-exact through the next replica with its peak RSS < 64 MiB;
/// the forwarded-requests metric counts both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_a_connection_whose_agent_is_on_one() {
    let c = cluster(3).await;
    let lb = Haproxy::start(Mode::Tcp, &agent_backends(&c.replicas)).await;
    let agent = Agent::start("agent-0", &lb.url(), KEY, &[]).await;
    let holder = until("the agent to be registered", WAIT, || async {
        agent_replicas(&c.replicas[0], "acme").await.pop()
    })
    .await;
    for b in &c.replicas {
        wait_view(b, "acme", &[holder.as_str()]).await;
    }
    let o: usize = holder[1..].parse().expect("replica id rN");
    let (owner, fwd) = (&c.replicas[o], &c.replicas[(o + 1) % 3]);
    eprintln!("the balancer sent the agent to {holder}");
    let http = client();
    for (i, b) in c.replicas.iter().enumerate() {
        let r = http
            .get(format!("{}/api/v4/version", b.front("acme")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "via r{i}");
        assert_eq!(
            r.headers()["x-gitproxy-replica"],
            holder.as_str(),
            "via r{i}"
        );
        assert!(r.text().await.unwrap().contains("17.5.0"));
        let body = format!(r#"{{"title":"Bump lodash via r{i}"}}"#);
        let r = http
            .post(format!("{}/api/v4/echo", b.front("acme")))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "via r{i}");
        assert_eq!(r.headers()["x-echo-method"], "POST");
        assert_eq!(r.text().await.unwrap(), body, "via r{i}");
    }
    // The caller's credentials reach GitLab as the connection says (the
    // connection's token), never the replicas' secret.
    let seen = c.up.all_headers("/api/v4/echo");
    assert_eq!(seen.len(), 3);
    for h in &seen {
        assert!(h.get("x-gitproxy-peer-auth").is_none(), "{h:?}");
        assert!(!format!("{h:?}").contains(PEER_SECRET));
    }

    // Informal: the added latency of a forwarded hop (printed, never
    // asserted; the benchmark measures it properly).
    let mut median = Vec::new();
    for b in [owner, fwd] {
        let url = format!("{}/api/v4/version", b.front("acme"));
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let r = http.get(&url).send().await.expect("send");
            r.bytes().await.expect("body");
            times.push(t.elapsed());
        }
        times.sort();
        median.push(times[times.len() / 2]);
    }
    eprintln!(
        "p50 of 200 sequential GETs: local ({holder}) {:?}, forwarded {:?}",
        median[0], median[1]
    );

    let n = bulk_bytes();
    let t = Instant::now();
    let (len, ok) = download(
        &format!("{}/api/v4/bytes?n={n}&seed=42", fwd.front("acme")),
        42,
    )
    .await;
    assert_eq!(len, n);
    assert!(ok, "downloaded bytes differ from what the upstream sent");
    eprintln!("forwarded download of {n} bytes in {:?}", t.elapsed());
    let t = Instant::now();
    let v = upload(
        &format!("{}/api/v4/upload?seed=43", fwd.front("acme")),
        n,
        43,
    )
    .await;
    assert_eq!(v["len"], n, "{v}");
    assert_eq!(v["matches"], true, "{v}");
    eprintln!("forwarded upload of {n} bytes in {:?}", t.elapsed());
    let rss = fwd.proc.peak_rss_kib();
    eprintln!(
        "peak RSS: forwarding replica {rss} KiB, owner {holder} {} KiB",
        owner.proc.peak_rss_kib()
    );
    assert!(rss < 64 * 1024, "forwarding replica peak RSS {rss} KiB");

    let m1 = metrics(fwd).await;
    let out = metric(
        &m1,
        "gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"out\"}",
    );
    assert_eq!(out, Some(204.0), "{m1}");
    assert_eq!(metric(&m1, "gitproxy_registry_up "), Some(1.0), "{m1}");
    let m0 = metrics(owner).await;
    let inn = metric(
        &m0,
        "gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"in\"}",
    );
    // The forwarder's 204, and the third replica's two REST requests.
    assert_eq!(inn, Some(206.0), "{m0}");
    for b in &c.replicas {
        b.proc.assert_no_secrets(&[KEY, TOKEN, PEER_SECRET]);
    }
    agent.proc.assert_no_secrets(&[KEY, TOKEN]);
}

/// The peer listener serves replicas only: no secret or a wrong one gets
/// 401 whatever the path; with the secret, a request for a connection whose
/// agent is on another replica is not forwarded again (503
/// `agent_not_connected` from the receiver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_listener_requires_the_secret_and_never_forwards_again() {
    let c = cluster(2).await;
    let _agent = Agent::start("agent-0", &c.replicas[0].agent_url(), KEY, &[]).await;
    wait_view(&c.replicas[1], "acme", &["r0"]).await;
    let peer1 = peer_addr(&c.replicas[1]).await;
    let http = client();
    let url = format!("http://{peer1}/gitlab/acme/api/v4/version");
    for secret in [None, Some("wrong-secret"), Some("")] {
        let mut rq = http
            .get(&url)
            .header("x-gitproxy-peer-base", "http://x/gitlab/acme");
        if let Some(s) = secret {
            rq = rq.header("x-gitproxy-peer-auth", s);
        }
        let r = rq.send().await.expect("send");
        assert_eq!(r.status(), 401, "secret {secret:?}");
        assert_eq!(r.headers()["x-gitproxy-error"], "unauthorized");
    }
    let r = http
        .get(format!("http://{peer1}/v1/connections"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    c.replicas[1]
        .proc
        .wait_for_text("peer listener refused a request", WAIT)
        .await;

    // Authenticated, but r1 holds no agent of acme: answered here, not
    // forwarded to r0.
    let r = http
        .get(&url)
        .header("x-gitproxy-peer-auth", PEER_SECRET)
        .header("x-gitproxy-peer-base", "http://front.example/gitlab/acme")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_not_connected");
    let m1 = metrics(&c.replicas[1]).await;
    assert!(
        !m1.contains("direction=\"out\"} 1"),
        "r1 forwarded a peer's request: {m1}"
    );
    // The front door of r1 still forwards (the refusal above was the
    // peer path only).
    let r = http
        .get(format!("{}/api/v4/version", c.replicas[1].front("acme")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    c.replicas[1].proc.assert_no_secrets(&[PEER_SECRET]);
}

/// The owner replica SIGKILLed: a download through a forwarder is cut (an
/// error, never a clean short end); a request waiting for its head gets 502
/// `agent_disconnected`; once r0's registry key expired the answer is 503
/// `agent_not_connected` at once; an agent on another replica restores
/// service. The registry TTL is the shortest allowed (3 s), so the expiry
/// comes within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_mid_request() {
    let mut c = cluster_with(3, &["--registry-ttl", "3s"]).await;
    let agent = Agent::start("agent-0", &c.replicas[0].agent_url(), KEY, &[]).await;
    wait_view(&c.replicas[1], "acme", &["r0"]).await;
    let http = client();
    let fwd = c.replicas[1].front("acme");

    // An endless download and a request whose answer never comes.
    let resp = http
        .get(format!("{fwd}/api/v4/endless"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a chunk").expect("bytes");
    assert!(!first.is_empty());
    let stalled = tokio::spawn({
        let http = http.clone();
        let url = format!("{fwd}/api/v4/stall");
        async move { http.get(url).send().await }
    });
    until("the stalled request to reach GitLab", WAIT, || async {
        c.up.requests()
            .iter()
            .any(|(_, p)| p.starts_with("/api/v4/stall"))
            .then_some(())
    })
    .await;
    c.replicas[0].proc.kill9().await;

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
    .expect("the download ends");
    assert!(cut, "the download ended cleanly instead of being cut");
    let r = tokio::time::timeout(WAIT, stalled)
        .await
        .expect("answered")
        .expect("task")
        .expect("an answer");
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_disconnected");

    // Until r0's key expires its entries are known dead only by the failed
    // dial; after, they are never used. Either way: 503 agent_not_connected,
    // promptly.
    let t = Instant::now();
    let r = http
        .get(format!("{fwd}/api/v4/version"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_not_connected");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    until(
        "r0's replica key to expire",
        Duration::from_secs(10),
        || async {
            (c.redis.cli(&["exists", "gitproxy:replica:r0"]).await.trim() == "0").then_some(())
        },
    )
    .await;
    let t = Instant::now();
    let r = http
        .get(format!("{fwd}/api/v4/version"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_not_connected");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(agent_replicas(&c.replicas[1], "acme").await.is_empty());
    // The reader deleted the dead replica's entries.
    until("r0's entries to be cleaned", WAIT, || async {
        let h = c.redis.cli(&["hgetall", "gitproxy:agents:acme"]).await;
        (!h.contains("r0/")).then_some(())
    })
    .await;

    // The agent comes back on r2: every surviving replica serves again.
    drop(agent);
    let _agent2 = Agent::start("agent-1", &c.replicas[2].agent_url(), KEY, &[]).await;
    wait_view(&c.replicas[1], "acme", &["r2"]).await;
    for b in &c.replicas[1..] {
        let r = http
            .get(format!("{}/api/v4/version", b.front("acme")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-gitproxy-replica"], "r2");
    }
}

/// Redis down: the agent held by r0 is still served through r0; through r1
/// the answer is 503 `agent_not_connected` naming the registry; Redis back
/// (empty): r0 registers its stream again and r1 forwards within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back() {
    let mut c = cluster(2).await;
    let _agent = Agent::start("agent-0", &c.replicas[0].agent_url(), KEY, &[]).await;
    wait_view(&c.replicas[1], "acme", &["r0"]).await;
    let http = client();
    let get = |b: &Broker| {
        let url = format!("{}/api/v4/version", b.front("acme"));
        let http = http.clone();
        async move { http.get(url).send().await.expect("send") }
    };
    assert_eq!(get(&c.replicas[1]).await.status(), 200);

    c.redis.kill().await;
    // r1 notices (its registry upkeep fails) and drops what it cached.
    until("r1 to see the registry down", WAIT, || async {
        (metric(&metrics(&c.replicas[1]).await, "gitproxy_registry_up ") == Some(0.0)).then_some(())
    })
    .await;
    let r = get(&c.replicas[0]).await;
    assert_eq!(r.status(), 200, "the local agent keeps working");
    let r = get(&c.replicas[1]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-gitproxy-error"], "agent_not_connected");
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let hint = v["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("registry") && hint.contains("Redis"), "{v}");
    for _ in 0..5 {
        assert_eq!(get(&c.replicas[0]).await.status(), 200);
    }

    c.redis.restart().await;
    let back = Instant::now();
    until("r1 to forward again", Duration::from_secs(5), || async {
        (get(&c.replicas[1]).await.status() == 200).then_some(())
    })
    .await;
    eprintln!(
        "forwarding again {:?} after Redis came back",
        back.elapsed()
    );
    let h = c.redis.cli(&["hgetall", "gitproxy:agents:acme"]).await;
    assert!(h.contains("r0/"), "r0's stream re-registered: {h}");
    assert_eq!(
        c.redis.cli(&["exists", "gitproxy:replica:r1"]).await.trim(),
        "1"
    );
}

/// Registry upkeep costs Redis a few commands per replica, whatever the
/// number of agents (acceptance 7 allows 50 commands/s per 1,000 agents):
/// idle, 2 replicas with 10 agent streams on r0, over 12 s (more than one
/// refresh period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_upkeep_does_not_grow_with_agents() {
    let c = cluster(2).await;
    let mut agents = Vec::new();
    for i in 0..10 {
        agents.push(Agent::spawn(
            &format!("agent-{i}"),
            &c.replicas[0].agent_url(),
            KEY,
            &[],
        ));
    }
    for a in &agents {
        a.wait_connected(1).await;
    }
    until("r1 to see 10 agents on r0", WAIT, || async {
        (agent_replicas(&c.replicas[1], "acme").await.len() == 10).then_some(())
    })
    .await;
    let before = c.redis.commands_processed().await;
    let t = Instant::now();
    // A measurement window, not a wait for readiness.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = c.redis.commands_processed().await;
    let secs = t.elapsed().as_secs_f64();
    // Minus the INFO command of the second measurement.
    let rate = (after - before - 1) as f64 / secs;
    eprintln!(
        "registry upkeep: {} commands in {secs:.1} s = {rate:.2}/s for 2 replicas and 10 agents",
        after - before - 1
    );
    assert!(rate < 4.0, "{rate:.2} commands/s");
}
