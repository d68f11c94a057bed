//! The API store in cluster mode (issue 11, acceptance 5 and the store's
//! Redis faults): real `redis-server`, real broker replicas sharing it, the
//! in-process upstream recording the token each request carries, a real
//! agent for the accessKey. Every wait is on a response, a log line or a
//! process exit, with a timeout.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerOptions, BrokerSpec};
use gitproxy_integration_tests::harness::cluster::{start_replicas, ClusterFiles};
use gitproxy_integration_tests::harness::process::Proc;
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, client, keyed_request, WAIT};
use serde_json::{json, Value};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

const API_KEY: &str = "cluster-store-api-key-0123456789";
const REDIS_PASSWORD: &str = "cluster-store-redis-pass-0123";
/// GitLab tokens made at run time (nothing token-like is committed); the
/// label says which one a failure is about.
fn token(label: &str) -> String {
    format!("testpat-{label}-{:016x}", rand::random::<u64>())
}
static TOKEN_1: LazyLock<String> = LazyLock::new(|| token("first"));
static TOKEN_2: LazyLock<String> = LazyLock::new(|| token("second"));
static TOKEN_3: LazyLock<String> = LazyLock::new(|| token("third"));
static TOKEN_4: LazyLock<String> = LazyLock::new(|| token("fourth"));

struct Answer {
    status: u16,
    error: Option<String>,
    retry_after: Option<String>,
    json: Value,
}

async fn api(b: &Broker, method: reqwest::Method, path: &str, body: Option<Value>) -> Answer {
    let r = keyed_request(method, format!("{}{path}", b.api()), API_KEY, body);
    let resp = tokio::time::timeout(WAIT, r.send())
        .await
        .expect("api call hung")
        .expect("api call");
    let status = resp.status().as_u16();
    let error = resp
        .headers()
        .get("x-gitproxy-error")
        .map(|v| v.to_str().unwrap().to_string());
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    Answer {
        status,
        error,
        retry_after,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// A front-door GET of `/api/v4/version` through `b`; the status and the
/// `PRIVATE-TOKEN` the upstream received for it.
async fn token_seen(b: &Broker, conn: &str, up: &Upstream) -> (u16, Option<String>) {
    let before = up.all_headers("/api/v4/version").len();
    let resp = tokio::time::timeout(
        WAIT,
        client()
            .get(format!("{}/api/v4/version", b.front(conn)))
            .header("x-gitproxy-key", API_KEY)
            .send(),
    )
    .await
    .expect("front door hung")
    .expect("front door");
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    let all = up.all_headers("/api/v4/version");
    let token = (all.len() > before)
        .then(|| all.last().and_then(|h| h.get("private-token")))
        .flatten()
        .map(|v| v.to_str().unwrap().to_string());
    (status, token)
}

fn redis_env(dir: &tempfile::TempDir) -> BrokerOptions {
    let file = dir.path().join("redis-password");
    std::fs::write(&file, REDIS_PASSWORD).unwrap();
    BrokerOptions {
        env: vec![(
            "GITPROXY_REDIS_PASSWORD_FILE".into(),
            file.display().to_string(),
        )],
        ..BrokerOptions::default()
    }
}

fn spec() -> BrokerSpec {
    BrokerSpec {
        api_keys: vec![API_KEY.into()],
        ..BrokerSpec::default()
    }
}

/// Waits until every replica listens to store changes (before that, a
/// write would not wait for it).
async fn subscribed(replicas: &[Broker]) {
    for b in replicas {
        b.proc
            .wait_for_message("subscribed to store changes", WAIT)
            .await;
    }
}

/// The `elapsed_us` of the n-th "applied by every replica" line of `p`,
/// checking that `replicas` acknowledged.
async fn propagation_us(p: &Proc, n: usize, replicas: u64) -> u64 {
    let v = p
        .wait_for_nth(n, WAIT, |v| {
            v["message"] == "store change applied by every replica"
        })
        .await;
    assert_eq!(v["replicas"].as_u64(), Some(replicas), "{v}");
    v["elapsed_us"].as_u64().expect("elapsed_us")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acceptance5_writes_through_one_replica_are_used_by_the_others_at_once() {
    let up = Upstream::start().await;
    let redis = Redis::start(Some(REDIS_PASSWORD)).await;
    let files = ClusterFiles::new();
    let pw = tempfile::tempdir().unwrap();
    let replicas = start_replicas(3, &spec(), &redis_env(&pw), &redis, &files).await;
    subscribed(&replicas).await;
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);

    // Created through A: B and C use it on their very next request.
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "direct", "gitlab_url": up.url(), "token": TOKEN_1.as_str()})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let created_us = propagation_us(&a.proc, 1, 3).await;
    for r in [b, c, a] {
        assert_eq!(
            token_seen(r, "acme", &up).await,
            (200, Some(TOKEN_1.as_str().into()))
        );
    }

    // Token rotated through A: B and C send the new one at once.
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": TOKEN_2.as_str()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let rotated_us = propagation_us(&a.proc, 2, 3).await;
    for r in [b, c] {
        assert_eq!(
            token_seen(r, "acme", &up).await,
            (200, Some(TOKEN_2.as_str().into()))
        );
    }
    // A second rotation through another replica wins over the first.
    let r = api(
        c,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": TOKEN_3.as_str()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    for r in [a, b] {
        assert_eq!(
            token_seen(r, "acme", &up).await,
            (200, Some(TOKEN_3.as_str().into()))
        );
    }

    // An agent-mode connection made through B, its accessKey issued through
    // B: an agent presenting it to C is admitted, and C serves through it.
    let r = api(
        b,
        reqwest::Method::PUT,
        "/v1/connections/tunnel",
        Some(json!({"mode": "agent", "gitlab_url": up.url(), "token": TOKEN_4.as_str()})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let r = api(
        b,
        reqwest::Method::POST,
        "/v1/connections/tunnel/access-key",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let key = r.json["access_key"].as_str().unwrap().to_string();
    let agent = Agent::start("cluster-store-agent", &c.agent_url(), &key, &[]).await;
    assert_eq!(
        token_seen(c, "tunnel", &up).await,
        (200, Some(TOKEN_4.as_str().into()))
    );

    // Deleted through C: gone from A and B on the next request.
    let r = api(c, reqwest::Method::DELETE, "/v1/connections/acme", None).await;
    assert_eq!(r.status, 204, "{}", r.json);
    for r in [a, b] {
        assert_eq!(token_seen(r, "acme", &up).await.0, 404);
    }

    // What someone reading Redis sees: sealed tokens, the accessKey's hash,
    // never a token or the accessKey itself.
    let dump = redis.dump().await;
    assert!(dump.contains("gitproxy:store:connections"), "{dump}");
    assert!(dump.contains("token_sealed"), "{dump}");
    assert!(
        dump.contains(&gitproxy_shared::secret::sha256_hex(key.as_bytes())),
        "{dump}"
    );
    for secret in [
        TOKEN_1.as_str(),
        TOKEN_2.as_str(),
        TOKEN_3.as_str(),
        TOKEN_4.as_str(),
        key.as_str(),
    ] {
        assert!(
            !dump.contains(secret),
            "a secret is readable in Redis:\n{dump}"
        );
    }
    for r in &replicas {
        r.proc.assert_no_secrets(&[
            TOKEN_1.as_str(),
            TOKEN_2.as_str(),
            TOKEN_3.as_str(),
            TOKEN_4.as_str(),
            &key,
            REDIS_PASSWORD,
        ]);
        assert_eq!(
            r.proc.count_message("store change not acknowledged by every replica within 2s: answering anyway; a replica that missed it reloads within 2s"),
            0
        );
    }
    agent.proc.assert_no_secrets(&[
        TOKEN_1.as_str(),
        TOKEN_2.as_str(),
        TOKEN_3.as_str(),
        TOKEN_4.as_str(),
    ]);
    println!(
        "propagation (write to acknowledged by all 3 replicas): created {created_us} µs, rotated {rotated_us} µs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_refuses_writes_keeps_traffic_and_recovers_when_it_returns_empty() {
    let up = Upstream::start().await;
    let mut redis = Redis::start(None).await;
    let files = ClusterFiles::new();
    let replicas = start_replicas(2, &spec(), &BrokerOptions::default(), &redis, &files).await;
    subscribed(&replicas).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "direct", "gitlab_url": up.url(), "token": TOKEN_1.as_str()})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);

    redis.kill().await;
    // Writes are refused with a named code and a hint naming Redis...
    let r = api(
        b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": TOKEN_2.as_str()})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.error.as_deref(), Some("store_unavailable"));
    assert_eq!(r.json["error"], "store_unavailable");
    // A client may come back by itself: Redis restarts in seconds.
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    assert!(
        r.json["hint"].as_str().unwrap().contains("Redis"),
        "{}",
        r.json
    );
    let r = api(b, reqwest::Method::DELETE, "/v1/connections/acme", None).await;
    assert_eq!(
        (r.status, r.error.as_deref()),
        (503, Some("store_unavailable"))
    );
    // ... while reads and the front door keep using the last loaded table.
    for r in [a, b] {
        assert_eq!(
            token_seen(r, "acme", &up).await,
            (200, Some(TOKEN_1.as_str().into()))
        );
        let v = api(r, reqwest::Method::GET, "/v1/connections/acme", None).await;
        assert_eq!(v.status, 200, "{}", v.json);
    }

    // Redis comes back empty (no persistence): data loss, said loudly, and
    // the store re-seeded from the replicas' copy, with no broker restart.
    redis.restart().await;
    let back = Instant::now();
    for r in [a, b] {
        r.proc
            .wait_for_message(
                "subscribed to store changes again; reloading the store",
                Duration::from_secs(5),
            )
            .await;
    }
    // The token-only PUT needs the connection's mode and URL from the store:
    // it works only because the store survived Redis's loss.
    let r = api(
        b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": TOKEN_2.as_str()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let recovered = back.elapsed();
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
    assert_eq!(
        token_seen(a, "acme", &up).await,
        (200, Some(TOKEN_2.as_str().into()))
    );
    let lost = a.proc.count_message("Redis lost the API store (gitproxy:store:version is gone: Redis restarted without persistence, or was flushed); re-seeding it from this replica's copy. Turn on Redis persistence (AOF or RDB) to keep it across restarts")
        + b.proc.count_message("Redis lost the API store (gitproxy:store:version is gone: Redis restarted without persistence, or was flushed); re-seeding it from this replica's copy. Turn on Redis persistence (AOF or RDB) to keep it across restarts");
    assert!(lost >= 1, "the data loss was not reported");
    let seeded = a
        .proc
        .count_message("re-seeded the API store in Redis from this replica's copy")
        + b.proc
            .count_message("re-seeded the API store in Redis from this replica's copy");
    assert_eq!(seeded, 1, "exactly one replica re-seeds");
    let dump = redis.dump().await;
    assert!(dump.contains("token_sealed"), "{dump}");
    assert!(
        !dump.contains(TOKEN_1.as_str()) && !dump.contains(TOKEN_2.as_str()),
        "{dump}"
    );
    println!("recovered {recovered:?} after Redis came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_store_key_refuses_to_start_without_showing_a_token() {
    let up = Upstream::start().await;
    let redis = Redis::start(None).await;
    let files = ClusterFiles::new();
    let replicas = start_replicas(1, &spec(), &BrokerOptions::default(), &redis, &files).await;
    let r = api(
        &replicas[0],
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "direct", "gitlab_url": up.url(), "token": TOKEN_1.as_str()})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);

    let other = ClusterFiles::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("broker.toml");
    std::fs::write(&cfg, Broker::toml(&spec())).unwrap();
    let refused = |id: &'static str| {
        let mut cmd = tokio::process::Command::new(bin("gitproxy-broker"));
        cmd.args([
            "serve",
            "--agent-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&cfg)
        .args(other.args(&redis, id))
        .env("GITPROXY_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
        async move {
            let out = tokio::time::timeout(WAIT, cmd.output())
                .await
                .expect("the broker exits at once")
                .expect("run the broker");
            assert_eq!(out.status.code(), Some(64), "{out:?}");
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("GITPROXY_STORE_KEY_FILE"), "{text}");
            assert!(text.contains("does not decrypt"), "{text}");
            assert!(!text.contains(TOKEN_1.as_str()), "{text}");
            assert!(!text.contains("v1:"), "no sealed value either: {text}");
            text
        }
    };
    // The key check finds the wrong key before any token is read...
    let text = refused("wrong-key-1").await;
    assert!(text.contains("gitproxy:store:keycheck"), "{text}");
    // ... and without it, the token itself does not open.
    redis.cli(&["del", "gitproxy:store:keycheck"]).await;
    let text = refused("wrong-key-2").await;
    assert!(
        text.contains("the GitLab token of connection \"acme\""),
        "{text}"
    );
    // The right key still works, and nothing was changed by the refused one.
    assert_eq!(
        token_seen(&replicas[0], "acme", &up).await,
        (200, Some(TOKEN_1.as_str().into()))
    );
}

async fn readyz(b: &Broker) -> u16 {
    tokio::time::timeout(WAIT, client().get(format!("{}/readyz", b.api())).send())
        .await
        .expect("readyz hung")
        .expect("readyz")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_while_redis_is_down_serves_the_file_and_loads_the_store_later() {
    use gitproxy_integration_tests::harness::broker::ConnSpec;
    let up = Upstream::start().await;
    let mut redis = Redis::start(None).await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![ConnSpec::direct("filed", &up.url()).token(TOKEN_4.as_str())],
        ..spec()
    };
    let first = start_replicas(1, &spec, &BrokerOptions::default(), &redis, &files).await;
    let a = &first[0];
    subscribed(&first).await;
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "direct", "gitlab_url": up.url(), "token": TOKEN_1.as_str()})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);

    // A second replica starts while Redis is down: it serves the config
    // file's connections, but says it is not ready, since the API-made ones
    // are missing.
    redis.kill().await;
    let mut s = spec.clone();
    s.args.extend(files.args(&redis, "late"));
    let b = Broker::start_with(s, BrokerOptions::default()).await;
    assert_eq!(readyz(&b).await, 503);
    assert_eq!(readyz(a).await, 200, "a loaded replica stays ready");
    assert_eq!(
        token_seen(&b, "filed", &up).await,
        (200, Some(TOKEN_4.as_str().into()))
    );
    assert_eq!(token_seen(&b, "acme", &up).await.0, 404);
    assert_eq!(
        token_seen(a, "acme", &up).await,
        (200, Some(TOKEN_1.as_str().into()))
    );

    // Redis is back (empty): A re-seeds it, B loads it, and a write through
    // A is acknowledged by B and used by it at once.
    redis.restart().await;
    b.proc
        .wait_for_message(
            "subscribed to store changes again; reloading the store",
            WAIT,
        )
        .await;
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": TOKEN_2.as_str()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    // Right after Redis came back empty the registry's live-replica keys are
    // being rewritten (within its 2 s probe), so this one write may be
    // answered before B acknowledged it (docs/architecture.md, failure
    // cases); B must then catch up within the 2 s version poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = token_seen(&b, "acme", &up).await;
        if seen == (200, Some(TOKEN_2.as_str().into())) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never used the token written through A after Redis came back: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(&b).await, 200);
    for p in [&a.proc, &b.proc] {
        p.assert_no_secrets(&[TOKEN_1.as_str(), TOKEN_2.as_str(), TOKEN_4.as_str()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_requests_tracked_through_one_replica_are_listed_by_another() {
    use gitproxy_integration_tests::sandbox::{
        access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
    };
    const GL_TOKEN: &str = "testpat-cluster-store-mr-00001";
    gitproxy_integration_tests::harness::init();
    let gl_dir = tempfile::tempdir().unwrap();
    let (sb, gl_addr) = Sandbox::start(SandboxConfig::new(gl_dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(
        GL_TOKEN,
        uid,
        &["api", "read_repository", "write_repository"],
    ));
    sb.add_project(
        ProjectSpec::new("demo-group/webapp")
            .member(uid, access::DEVELOPER)
            .file("package.json", demo::WEBAPP_PACKAGE_JSON),
    );
    let redis = Redis::start(None).await;
    let files = ClusterFiles::new();
    let replicas = start_replicas(2, &spec(), &BrokerOptions::default(), &redis, &files).await;
    subscribed(&replicas).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let r = api(
        a,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(
            json!({"mode": "direct", "gitlab_url": format!("http://{gl_addr}"), "token": GL_TOKEN}),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);

    let fixed = demo::WEBAPP_PACKAGE_JSON.replace("4.17.15", "4.17.21");
    let body = json!({
        "project": "demo-group/webapp",
        "source_branch": "fix/lodash",
        "title": "Bump lodash from 4.17.15 to 4.17.21",
        "changes": [{"path": "package.json", "content": fixed}]
    });
    let path = "/v1/connections/acme/merge-requests";
    let r = api(a, reqwest::Method::POST, path, Some(body.clone())).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let iid = r.json["merge_request"]["iid"].as_u64().unwrap();
    // Listed through B at once, from the store in Redis.
    let r = api(b, reqwest::Method::GET, path, None).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let list = r.json["merge_requests"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", r.json);
    assert_eq!(list[0]["iid"].as_u64(), Some(iid));
    assert_eq!(list[0]["state"], "opened");
    // The same MR asked through B again: not opened twice, not tracked twice.
    let r = api(b, reqwest::Method::POST, path, Some(body)).await;
    assert_eq!(
        (r.status, &r.json["created"]),
        (200, &json!(false)),
        "{}",
        r.json
    );
    let r = api(a, reqwest::Method::GET, path, None).await;
    assert_eq!(
        r.json["merge_requests"].as_array().unwrap().len(),
        1,
        "{}",
        r.json
    );
    let dump = redis.dump().await;
    assert!(dump.contains("gitproxy:store:mrs"), "{dump}");
    assert!(!dump.contains(GL_TOKEN), "{dump}");
}
