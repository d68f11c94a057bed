//! Cluster mode: an HTTP/1.1 caller connection relayed whole to the replica
//! holding the agent (`broker/src/cluster/relay`), with real replicas, a real
//! `redis-server`, reqwest and the real curl as callers.
//!
//! What could go wrong and is checked: a relayed connection whose next
//! request is for an agent held here must continue here (not at the peer);
//! message boundaries must be followed exactly (chunked uploads, `HEAD`,
//! `Expect: 100-continue`, many requests on one connection), or answers
//! would be cut or mixed up; HTTP/2 callers are not relayed; the peer
//! listener serves a relayed connection only with the shared secret.

use bytes::Bytes;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{
    peer_addr, start_replicas, ClusterFiles, PEER_SECRET,
};
use gitproxy_integration_tests::harness::pki::Ca;
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{until, WAIT};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const KEY_ACME: &str = "relay-acme-access-key-0123456789ab";
const KEY_BETA: &str = "relay-beta-access-key-0123456789ab";
const TOKEN: &str = "relay-conn-token-abcdef0123456789ab";
/// The callers' API key (front door and `/v1`).
const API_KEY: &str = "relay-api-key-0123456789abcdefghij";

/// A reqwest builder with the harness's TLS set-up, no proxy.
fn plain_builder() -> reqwest::ClientBuilder {
    gitproxy_integration_tests::harness::init();
    reqwest::Client::builder()
        .tls_backend_preconfigured(
            gitproxy_shared::tls::client_config(b"", &[b"http/1.1"]).expect("tls config"),
        )
        .no_proxy()
}

/// A client sending the API key; `h2`: HTTP/2 with prior knowledge, else
/// HTTP/1.1 only, one connection at a time (consecutive requests share it).
fn caller(h2: bool) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-gitproxy-key", API_KEY.parse().expect("value"));
    let b = plain_builder().default_headers(headers);
    let b = if h2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only().pool_max_idle_per_host(1)
    };
    b.build().expect("client")
}

/// How the tests reach a replica's api listener: plain, or TLS with a CA
/// made in the test (`https://localhost:PORT`).
#[derive(Clone, Default)]
struct Api {
    ca_pem: Option<Vec<u8>>,
}

impl Api {
    fn base(&self, b: &Broker) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", b.api_addr.port()),
            None => b.api(),
        }
    }

    /// A client sending the API key; `alpn` for TLS.
    fn client(&self, b: &Broker, alpn: &[u8]) -> reqwest::Client {
        let Some(ca) = &self.ca_pem else {
            return caller(false);
        };
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-gitproxy-key", API_KEY.parse().expect("value"));
        plain_builder()
            .tls_backend_preconfigured(
                gitproxy_shared::tls::client_config(ca, &[alpn]).expect("tls config"),
            )
            .resolve("localhost", b.api_addr)
            .default_headers(headers)
            .build()
            .expect("client")
    }
}

async fn metric(b: &Broker, line_prefix: &str) -> f64 {
    metric_via(&Api::default(), b, line_prefix).await
}

async fn metric_via(api: &Api, b: &Broker, line_prefix: &str) -> f64 {
    let text = api
        .client(b, b"http/1.1")
        .get(format!("{}/metrics", api.base(b)))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in {text}"))
}

async fn relayed(b: &Broker, direction: &str) -> f64 {
    metric(
        b,
        &format!("gitproxy_relayed_connections_total{{direction=\"{direction}\"}}"),
    )
    .await
}

/// Waits until `b` sees the agent of `conn` on `replica`.
async fn wait_agent_on(api: &Api, b: &Broker, conn: &str, replica: &str) {
    let http = api.client(b, b"http/1.1");
    until(
        &format!("{} to see the agent of {conn} on {replica}", b.api()),
        WAIT,
        || async {
            let r = http
                .get(format!("{}/v1/connections/{conn}", api.base(b)))
                .send()
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            let on = v["agents"]
                .as_array()?
                .iter()
                .any(|a| a["replica"] == replica);
            on.then_some(())
        },
    )
    .await
}

/// The replica that served `resp` (`--replica-header`).
fn served_by(resp: &reqwest::Response) -> String {
    resp.headers()["x-gitproxy-replica"]
        .to_str()
        .expect("ascii")
        .to_string()
}

/// Two replicas; connection `acme` has its agent on r0, `beta` on r1.
async fn two_replicas() -> (Redis, Upstream, Vec<Broker>, ClusterFiles, [Agent; 2]) {
    two_replicas_with(&Api::default(), &[]).await
}

/// [`two_replicas`] with extra broker arguments, reached through `api`.
async fn two_replicas_with(
    api: &Api,
    extra: &[&str],
) -> (Redis, Upstream, Vec<Broker>, ClusterFiles, [Agent; 2]) {
    let redis = Redis::start(None).await;
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &up.url(), KEY_ACME).token(TOKEN),
            ConnSpec::agent("beta", &up.url(), KEY_BETA).token(TOKEN),
        ],
        args: std::iter::once("--replica-header")
            .chain(extra.iter().copied())
            .map(String::from)
            .collect(),
        api_keys: vec![API_KEY.into()],
    };
    let replicas = start_replicas(2, &spec, &Default::default(), &redis, &files).await;
    let agents = [
        Agent::start("agent-acme", &replicas[0].agent_url(), KEY_ACME, &[]).await,
        Agent::start("agent-beta", &replicas[1].agent_url(), KEY_BETA, &[]).await,
    ];
    wait_agent_on(api, &replicas[1], "acme", "r0").await;
    wait_agent_on(api, &replicas[0], "beta", "r1").await;
    (redis, up, replicas, files, agents)
}

/// One HTTP/1.1 connection, kept by the test: a request that cannot be
/// sent on it fails the test (a pooled client could open another one).
struct OneConnection {
    tx: hyper::client::conn::http1::SendRequest<BoxBody<Bytes, std::io::Error>>,
    authority: String,
    /// Ends when the connection does.
    conn: tokio::task::JoinHandle<()>,
}

/// What came back.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Got {
    fn served_by(&self) -> &str {
        self.headers["x-gitproxy-replica"].to_str().expect("ascii")
    }
}

impl OneConnection {
    async fn open(front: &str) -> Self {
        let authority = front
            .strip_prefix("http://")
            .and_then(|r| r.split('/').next())
            .expect("http URL")
            .to_string();
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("the test's connection failed: {e:?}");
            }
        });
        OneConnection {
            tx,
            authority,
            conn,
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: BoxBody<Bytes, std::io::Error>,
    ) -> Got {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("x-gitproxy-key", API_KEY)
            .body(body)
            .expect("request");
        // The previous exchange may still be finishing on the connection.
        if let Err(e) = self.tx.ready().await {
            panic!("the connection closed before {method} {path}: {e}");
        }
        let resp = match self.tx.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                panic!("{method} {path} on the same connection: {e}")
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }
}

fn empty() -> BoxBody<Bytes, std::io::Error> {
    Empty::new().map_err(|e| match e {}).boxed()
}

fn full(b: Bytes) -> BoxBody<Bytes, std::io::Error> {
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// A connection to r1 whose first request is for r0's agent is relayed
/// once and carries every following request for that agent; a request for
/// r1's own agent on the same connection is served by r1, and the
/// connection stays with r1 from then on (per-request forwarding). Bodies
/// cross the relay exactly: fixed length, chunked, `HEAD`. HTTP/2 callers
/// are forwarded per request, never relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_connection_is_relayed_whole_and_continues_here_when_it_must() {
    let (_redis, _up, replicas, _files, _agents) = two_replicas().await;
    let (r0, r1) = (&replicas[0], &replicas[1]);
    let mut c = OneConnection::open(&r1.front("acme")).await;
    let version = "/gitlab/acme/api/v4/version";

    for _ in 0..3 {
        let g = c.send("GET", version, empty()).await;
        assert_eq!((g.status, g.served_by()), (200, "r0"));
        assert_eq!(g.body, r#"{"version":"17.5.0","revision":"test"}"#);
    }
    // Fixed-length and chunked uploads, then a HEAD (an answer with a
    // length and no body), on the same connection.
    let body = Bytes::from(vec![b'x'; 200_000]);
    let g = c
        .send("POST", "/gitlab/acme/api/v4/echo", full(body.clone()))
        .await;
    assert_eq!((g.status, g.served_by()), (200, "r0"));
    assert_eq!(g.body, body);
    let chunks = futures::stream::iter(
        ["first,", "second,", "third"]
            .map(|s| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(s)))),
    );
    let g = c
        .send(
            "POST",
            "/gitlab/acme/api/v4/echo",
            StreamBody::new(chunks).boxed(),
        )
        .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "first,second,third");
    let g = c.send("HEAD", version, empty()).await;
    // (The simulated GitLab answers HEAD with a 404 of some length.)
    assert_eq!(g.served_by(), "r0");
    assert_ne!(g.headers["content-length"], "0");
    assert!(g.body.is_empty());
    let g = c.send("GET", version, empty()).await;
    assert_eq!(g.status, 200, "the HEAD answer was followed exactly");
    assert_eq!(
        relayed(r1, "out").await,
        1.0,
        "one connection, relayed once"
    );
    assert_eq!(relayed(r0, "in").await, 1.0);
    let in_r0 = r#"gitproxy_forwarded_requests_total{connection="acme",direction="in"}"#;
    assert_eq!(metric(r0, in_r0).await, 7.0, "every request counted at r0");
    // And by status at both ends, as a request forwarded per request is.
    for (b, n) in [(r0, 6.0), (r1, 6.0)] {
        let ok = r#"gitproxy_requests_total{connection="acme",status_class="2xx"}"#;
        assert_eq!(metric(b, ok).await, n);
        let nf = r#"gitproxy_requests_total{connection="acme",status_class="4xx"}"#;
        assert_eq!(metric(b, nf).await, 1.0);
    }

    // Same connection, a request for r1's own agent: served by r1.
    let g = c.send("GET", "/gitlab/beta/api/v4/version", empty()).await;
    assert_eq!((g.status, g.served_by()), (200, "r1"));
    // And acme again: still answered by r0, now forwarded per request.
    let g = c.send("GET", version, empty()).await;
    assert_eq!((g.status, g.served_by()), (200, "r0"));
    assert_eq!(
        relayed(r1, "out").await,
        1.0,
        "the connection stayed with r1"
    );

    // HTTP/2 (h2c): forwarded per request, not relayed.
    let acme = r1.front("acme");
    let r = caller(true)
        .get(format!("{acme}/api/v4/version"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!((r.status().as_u16(), served_by(&r)), (200, "r0".into()));
    assert_eq!(relayed(r1, "out").await, 1.0);

    // The caller's key is checked where the connection is served.
    let r = plain_builder()
        .http1_only()
        .build()
        .expect("client")
        .get(format!("{acme}/api/v4/version"))
        .header("x-gitproxy-key", "not-the-key")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-gitproxy-error"], "unauthorized");
    assert_eq!(relayed(r1, "out").await, 2.0);
    for b in &replicas {
        b.proc
            .assert_no_secrets(&[KEY_ACME, KEY_BETA, TOKEN, PEER_SECRET, API_KEY]);
    }
}

/// An idle relayed connection is closed by the relaying replica at the
/// caller's `--idle-timeout`, not by the replica it is relayed to (which
/// waits 30 s longer, so that its close never races a caller's request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relaying_replica_closes_an_idle_relayed_connection() {
    let (_redis, _up, replicas, _files, _agents) =
        two_replicas_with(&Api::default(), &["--idle-timeout", "1s"]).await;
    let mut c = OneConnection::open(&replicas[1].front("acme")).await;
    let g = c.send("GET", "/gitlab/acme/api/v4/version", empty()).await;
    assert_eq!((g.status, g.served_by()), (200, "r0"));
    let t = std::time::Instant::now();
    let closed = tokio::time::timeout(WAIT, c.conn).await;
    assert!(
        closed.is_ok(),
        "the idle relayed connection is still open after {WAIT:?}"
    );
    let after = t.elapsed();
    assert!(
        after >= std::time::Duration::from_millis(900),
        "closed after {after:?}, before the idle timeout"
    );
    // A new connection is relayed again.
    let mut c = OneConnection::open(&replicas[1].front("acme")).await;
    let g = c.send("GET", "/gitlab/acme/api/v4/version", empty()).await;
    assert_eq!((g.status, g.served_by()), (200, "r0"));
    assert_eq!(relayed(&replicas[1], "out").await, 2.0);
}

/// Callers over TLS (`--api-tls-cert`, ALPN `http/1.1`): the relaying
/// replica ends TLS and relays the plaintext; HTTP/2 over TLS (ALPN `h2`)
/// is forwarded per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_caller_connection_is_relayed_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("relay api CA");
    let (cert, key) = ca
        .leaf(&["localhost", "127.0.0.1"])
        .write(dir.path(), "api");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let api = Api {
        ca_pem: Some(ca.pem.as_bytes().to_vec()),
    };
    let (_redis, _up, replicas, _files, _agents) =
        two_replicas_with(&api, &["--api-tls-cert", &cert, "--api-tls-key", &key]).await;
    let r1 = &replicas[1];
    let front = format!("{}/gitlab/acme/api/v4/version", api.base(r1));
    for (alpn, version) in [
        (&b"http/1.1"[..], reqwest::Version::HTTP_11),
        (&b"h2"[..], reqwest::Version::HTTP_2),
    ] {
        let http = api.client(r1, alpn);
        for _ in 0..2 {
            let r = http.get(&front).send().await.expect("send");
            assert_eq!(r.version(), version);
            assert_eq!((r.status().as_u16(), served_by(&r)), (200, "r0".into()));
            assert_eq!(
                r.text().await.expect("body"),
                r#"{"version":"17.5.0","revision":"test"}"#
            );
        }
        // One HTTP/1.1 connection relayed; HTTP/2 never.
        let out = r#"gitproxy_relayed_connections_total{direction="out"}"#;
        assert_eq!(metric_via(&api, r1, out).await, 1.0, "{version:?}");
    }
}

/// The real curl through a relayed connection: `Expect: 100-continue` (an
/// interim answer before the final one) and several URLs on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_relayed_connection() {
    let (_redis, _up, replicas, _files, _agents) = two_replicas().await;
    let r1 = &replicas[1];
    let acme = r1.front("acme");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &payload).expect("write");
    let out_file = dir.path().join("out");
    let out = Command::new("curl")
        .env("NO_PROXY", "*")
        .args(["-sS", "--max-time", "60", "-H", "Expect: 100-continue"])
        .args(["-H", &format!("x-gitproxy-key: {API_KEY}")])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg("-o")
        .arg(&out_file)
        .args(["-w", "%{http_code} %{num_connects}\\n"])
        .arg(format!("{acme}/api/v4/echo"))
        // The same connection for the next two.
        .arg("--next")
        .args(["-sS", "-H", &format!("x-gitproxy-key: {API_KEY}")])
        .args(["-w", "%{http_code} %{num_connects}\\n"])
        .args(["-o", "/dev/null", "-o", "/dev/null"])
        .arg(format!("{acme}/api/v4/version"))
        .arg(format!("{acme}/api/v4/json1k"))
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["200 1", "200 0", "200 0"],
        "one connection, three answers"
    );
    assert_eq!(std::fs::read(&out_file).expect("read"), payload);
    assert_eq!(relayed(r1, "out").await, 1.0);
}

/// The peer listener takes a relayed connection only with the shared
/// secret: without it the preamble is answered 500 naming the fix, the
/// caller's bytes are never served, and the refusal is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_takes_a_relayed_connection_only_with_the_secret() {
    let (_redis, up, replicas, _files, _agents) = two_replicas().await;
    let peer0 = peer_addr(&replicas[0]).await;
    let request = format!(
        "GET /gitlab/acme/api/v4/version?probe=relay HTTP/1.1\r\nhost: x\r\nx-gitproxy-key: {API_KEY}\r\nconnection: close\r\n\r\n"
    );
    let send = |secret: &'static str| {
        let request = request.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&peer0)
                .await
                .expect("connect");
            let preamble = format!(
                "RELAY /gitproxy/relay/v1 HTTP/1.1\r\nx-gitproxy-peer-auth: {secret}\r\nx-gitproxy-peer-from: r9\r\nx-gitproxy-relay-client: 192.0.2.1:1234\r\n\r\n{request}"
            );
            s.write_all(preamble.as_bytes()).await.expect("write");
            let mut answer = Vec::new();
            tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
                .await
                .expect("answered in time")
                .expect("read");
            String::from_utf8_lossy(&answer).to_string()
        }
    };
    let refused = send("wrong-secret").await;
    assert!(refused.starts_with("HTTP/1.1 500 "), "{refused}");
    assert!(refused.contains("GITPROXY_PEER_SECRET_FILE"), "{refused}");
    assert!(!up.requests().iter().any(|(_, p)| p.contains("probe=relay")));
    replicas[0]
        .proc
        .wait_for_text("peer listener refused a request", WAIT)
        .await;

    let served = send(PEER_SECRET).await;
    assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
    assert!(served.contains("17.5.0"), "{served}");
    assert!(up.requests().iter().any(|(_, p)| p.contains("probe=relay")));
    assert_eq!(relayed(&replicas[0], "in").await, 1.0);
}
