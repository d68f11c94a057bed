//! Acceptance 11: no secret (accessKey, tokens, API key, credentials in a
//! query string) appears in any log line or error body, on every error path.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::client;
use gitproxy_integration_tests::harness::upstream::Upstream;

const KEY: &str = "secret-access-key-AAAA1111";
const CONN_TOKEN: &str = "secret-conn-token-BBBB2222";
const AGENT_TOKEN: &str = "secret-agent-token-CCCC3333";
const API_KEY: &str = "secret-api-key-DDDD4444";
const HEADER_TOKEN: &str = "secret-header-token-EEEE5555";
const QUERY_TOKEN: &str = "secret-query-token-FFFF6666";
const WRONG_API_KEY: &str = "secret-wrong-api-key-GGGG7777";
const WRONG_KEY: &str = "secret-wrong-access-key-HHHH8888";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_error_bodies() {
    let up = Upstream::start().await;
    let dead = "http://127.0.0.1:1";
    let broker = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &up.url(), KEY).token(CONN_TOKEN),
            ConnSpec::agent("dead", dead, "secret-other-key-IIII9999").token(CONN_TOKEN),
            ConnSpec::direct("dead-direct", dead).token(CONN_TOKEN),
            ConnSpec::direct("live-direct", &up.url()).token(CONN_TOKEN),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let agent = Agent::start(
        "agent-a",
        &broker.agent_url(),
        KEY,
        &[("GITPROXY_GITLAB_TOKEN", AGENT_TOKEN)],
    )
    .await;
    let dead_agent = Agent::start(
        "agent-dead",
        &broker.agent_url(),
        "secret-other-key-IIII9999",
        &[],
    )
    .await;
    let wrong = Agent::spawn("agent-wrong", &broker.agent_url(), WRONG_KEY, &[]);
    wrong
        .proc
        .wait_for_nth(1, gitproxy_integration_tests::harness::WAIT, |v| {
            v["level"] == "ERROR"
        })
        .await;

    let c = client();
    let mut bodies = Vec::new();
    for conn in ["acme", "dead", "dead-direct", "live-direct", "nope"] {
        for path in [
            "/api/v4/version",
            "/api/v4/projects",
            "/admin/users",
            "/g/p.git/info/refs",
        ] {
            let url = format!(
                "{}{path}?private_token={QUERY_TOKEN}&page=2",
                broker.front(conn)
            );
            let r = c
                .get(&url)
                .header("x-gitproxy-key", API_KEY)
                .header("private-token", HEADER_TOKEN)
                .header("authorization", format!("Bearer {HEADER_TOKEN}"))
                .send()
                .await
                .unwrap();
            bodies.push(r.text().await.unwrap());
        }
    }
    let r = c
        .get(format!("{}/api/v4/version", broker.front("acme")))
        .header("x-gitproxy-key", WRONG_API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    bodies.push(r.text().await.unwrap());
    // The agent's own token replaced everything the caller sent (the first
    // request to reach the upstream came through connection "acme").
    let seen = up
        .all_headers("/api/v4/version")
        .into_iter()
        .next()
        .expect("reached the upstream");
    assert_eq!(seen["private-token"], AGENT_TOKEN);
    assert!(seen.get("authorization").is_none());

    let secrets = [
        KEY,
        CONN_TOKEN,
        AGENT_TOKEN,
        API_KEY,
        HEADER_TOKEN,
        QUERY_TOKEN,
        WRONG_API_KEY,
        WRONG_KEY,
        "secret-other-key-IIII9999",
    ];
    for b in &bodies {
        for s in secrets {
            assert!(!b.contains(s), "an answer holds a secret: {b}");
        }
    }
    assert!(
        bodies.iter().any(|b| b.contains("upstream_unreachable")),
        "{bodies:?}"
    );
    assert!(bodies.iter().any(|b| b.contains("blocked_by_policy")));
    for p in [&broker.proc, &agent.proc, &dead_agent.proc, &wrong.proc] {
        p.assert_no_secrets(&secrets);
    }
}
