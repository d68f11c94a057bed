//! Issue 10, defect 1: a GitLab base URL is where every request goes, so one
//! with a fragment, a query, userinfo, dot segments or odd characters must
//! never be accepted, wherever it comes from: the broker's config file and
//! connection API, the agent's pin, or a (hostile) broker's Welcome. And an
//! unpinned agent keeps to the GitLab origin it first accepted.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec};
use gitproxy_integration_tests::harness::fake_broker::{head, FakeBroker, Script};
use gitproxy_integration_tests::harness::process::Proc;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, client, WAIT};
use gitproxy_proto::v1::agent_message;
use gitproxy_shared::policy::Policy;
use serde_json::{json, Value};
use tokio::process::Command;

const SECRET: &str = "s3cret-in-userinfo";

/// GitLab URLs every entry point must refuse (`{u}` is a live upstream).
fn hostile(u: &str) -> Vec<String> {
    vec![
        format!("{u}/#"),
        format!("{u}/base#x"),
        format!("{u}#"),
        format!("{u}/?"),
        format!("{u}/?private_token=x"),
        u.replacen("://", &format!("://user:{SECRET}@"), 1),
        format!("{u}/api/v4/../../admin"),
        format!("{u}/a/%2e%2e/admin"),
        format!("{u}\\admin"),
        format!("{u}/a b"),
    ]
}

/// The broker exits 64 on a config file with such a URL, naming the field
/// and never echoing userinfo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refuses_hostile_gitlab_urls_in_the_config_file() {
    for field in ["gitlab_url", "external_url"] {
        for url in hostile("https://gitlab.example") {
            let dir = tempfile::tempdir().unwrap();
            let cfg = dir.path().join("broker.toml");
            // JSON string escapes are TOML basic-string escapes.
            let quoted = serde_json::to_string(&url).unwrap();
            let (gitlab, external) = if field == "gitlab_url" {
                (quoted.clone(), "\"https://git.example\"".to_string())
            } else {
                ("\"https://gitlab.example\"".to_string(), quoted.clone())
            };
            std::fs::write(
                &cfg,
                format!(
                    "[[connection]]\nid = \"acme\"\nmode = \"direct\"\ngitlab_url = {gitlab}\nexternal_url = {external}\ntoken = \"glpat-token\"\n"
                ),
            )
            .unwrap();
            let mut cmd = Command::new(bin("gitproxy-broker"));
            cmd.arg("serve")
                .arg("--config")
                .arg(&cfg)
                .args([
                    "--agent-listen",
                    "127.0.0.1:0",
                    "--api-listen",
                    "127.0.0.1:0",
                ])
                .env("GITPROXY_LOG_FORMAT", "json");
            let mut p = Proc::spawn("broker", cmd);
            let status = p.wait_exit(WAIT).await.expect("the broker did not exit");
            assert_eq!(
                status.code(),
                Some(64),
                "{field} = {url:?}: {:?}",
                p.lines()
            );
            // The exit can come before the last line is read: wait for it.
            p.wait_for_text("invalid configuration", WAIT).await;
            let out = p.lines().join("\n");
            assert!(out.contains(field), "{field} = {url:?}: {out}");
            assert!(!out.contains(SECRET), "{field} = {url:?}: {out}");
        }
    }
}

/// `PUT /v1/connections/{id}` answers 400 `invalid_request` and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_api_refuses_hostile_gitlab_urls() {
    let broker = Broker::start(BrokerSpec {
        args: vec!["--data-dir".into(), "{dir}/data".into()],
        ..BrokerSpec::default()
    })
    .await;
    let c = client();
    let url = format!("{}/v1/connections/acme", broker.api());
    let put = |body: Value| {
        let rb = c
            .put(&url)
            .header("content-type", "application/json")
            .body(body.to_string());
        async move {
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let (s, b) =
        put(json!({"mode": "direct", "gitlab_url": "https://gitlab.example/gitlab"})).await;
    assert_eq!(s, 201, "{b}");
    for url in hostile("https://gitlab.example") {
        for field in ["gitlab_url", "external_url"] {
            let (s, b) = put(json!({"mode": "direct", field: url})).await;
            assert_eq!(s, 400, "{field} = {url:?}: {b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(v["error"], "invalid_request", "{b}");
            assert!(v["message"].as_str().unwrap().contains(field), "{b}");
            assert!(!b.contains(SECRET), "{b}");
        }
        let (s, b) = put(json!({"mode": "direct", "gitlab_url": url})).await;
        assert_eq!(s, 400, "{b}");
    }
    let text = c.get(&url).send().await.unwrap().text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["gitlab_url"], "https://gitlab.example/gitlab", "{v}");
    assert!(v.get("external_url").is_none_or(Value::is_null), "{v}");
    broker.proc.assert_no_secrets(&[SECRET]);
}

/// The agent exits 64 on such a pin (GITPROXY_GITLAB_URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_hostile_pin() {
    for url in hostile("https://gitlab.example") {
        let mut a = Agent::spawn(
            "agent-pin",
            "http://127.0.0.1:1",
            "any-key",
            &[("GITPROXY_GITLAB_URL", &url)],
        );
        let status = a
            .proc
            .wait_exit(WAIT)
            .await
            .expect("the agent did not exit");
        assert_eq!(status.code(), Some(64), "{url:?}: {:?}", a.proc.lines());
        // The exit can come before the last line is read: wait for it.
        a.proc.wait_for_text("invalid configuration", WAIT).await;
        let out = a.proc.lines().join("\n");
        assert!(out.contains("GITPROXY_GITLAB_URL"), "{url:?}: {out}");
        assert!(!out.contains(SECRET), "{url:?}: {out}");
    }
}

/// Every request an upstream saw is inside the policy, relative to its root.
fn assert_all_within_policy(up: &Upstream, what: &str) {
    for (method, target) in up.requests() {
        assert!(
            Policy::default().check(&method, &target).is_ok(),
            "{what}: GitLab received {method} {target}, outside the policy"
        );
    }
}

/// A broker hands an unpinned agent a GitLab URL whose fragment would
/// swallow the request target (`http://gitlab/#` + `/api/v4/...` is a
/// request for `/`): the agent refuses the Welcome, and the upstream never
/// sees a request outside the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_never_leaves_the_policy_for_a_hostile_welcome() {
    gitproxy_integration_tests::harness::init();
    let up = Upstream::start().await;
    for url in hostile(&up.url()) {
        let mut fake = FakeBroker::start(vec![Script::new(
            &url,
            vec![head(1, "GET", "/api/v4/version")],
        )])
        .await;
        let agent = Agent::spawn("agent-welcome", &fake.url(), "any-key", &[]);
        let refused = |v: &Value| {
            v["level"] == "ERROR"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("unusable GitLab URL"))
        };
        // Either signal ends the wait: the refusal (fixed), or an answer to
        // the request (the request went somewhere).
        tokio::select! {
            _ = agent.proc.wait_for_nth(1, WAIT, refused) => {}
            a = fake.answer(0, 1, WAIT) => {
                assert!(a.is_some(), "{url:?}: neither a refusal nor an answer");
            }
        }
        assert_all_within_policy(&up, &url);
        agent.proc.wait_for_nth(1, WAIT, refused).await;
        agent.proc.assert_no_secrets(&[SECRET]);
    }
    assert_eq!(up.requests(), vec![], "no request may reach GitLab");
}

/// An unpinned agent remembers the GitLab origin of the first Welcome it
/// accepted and refuses a later Welcome naming another one (logging both
/// origins and the way to pin), retrying with backoff like other refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_agent_refuses_another_gitlab_origin() {
    gitproxy_integration_tests::harness::init();
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    let mut fake = FakeBroker::start(vec![
        Script::new(&first.url(), vec![head(1, "GET", "/api/v4/version")]).close_after(1),
        Script::new(&second.url(), vec![head(1, "GET", "/api/v4/version")]),
    ])
    .await;
    let agent = Agent::spawn("agent-origin", &fake.url(), "any-key", &[]);
    match fake.answer(0, 1, WAIT).await {
        Some(agent_message::Msg::ResponseHead(h)) => assert_eq!(h.status, 200),
        other => panic!("the first session was not served: {other:?}"),
    }
    let origin = |u: &Upstream| format!("http://{}", u.addr);
    let (a, b) = (origin(&first), origin(&second));
    let refused = move |v: &Value| {
        v["level"] == "ERROR"
            && v["message"].as_str().is_some_and(|m| {
                m.contains(&a) && m.contains(&b) && m.contains("GITPROXY_GITLAB_URL")
            })
    };
    tokio::select! {
        _ = agent.proc.wait_for_nth(1, WAIT, &refused) => {}
        x = fake.answer(1, 1, WAIT) => {
            assert!(x.is_some(), "neither a refusal nor an answer");
        }
    }
    assert_eq!(second.requests(), vec![], "the second GitLab was used");
    // It keeps refusing on the following attempts.
    agent.proc.wait_for_nth(2, WAIT, &refused).await;
    assert_eq!(second.requests(), vec![]);
    assert_eq!(
        first.requests(),
        vec![("GET".to_string(), "/api/v4/version".to_string())]
    );
}
