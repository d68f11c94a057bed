//! Extra allowed path prefixes (`--allow-path-prefix` on the broker,
//! `GITPROXY_ALLOW_PATH_PREFIXES` on the agent): a request under one travels
//! only when both sides allow it; each side refuses it on its own otherwise,
//! with `blocked_by_policy` naming that side.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::client;
use gitproxy_integration_tests::harness::upstream::Upstream;

const KEY: &str = "prefix-access-key-0123456789abcdef";
const PREFIX: &str = "/-/readiness";

async fn run(broker_allows: bool, agent_allows: bool) -> (u16, Option<String>, String, bool) {
    let up = Upstream::start().await;
    let mut args = Vec::new();
    if broker_allows {
        args = vec!["--allow-path-prefix".to_string(), PREFIX.to_string()];
    }
    let broker = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY)],
        args,
        ..BrokerSpec::default()
    })
    .await;
    let env: Vec<(&str, &str)> = if agent_allows {
        vec![("GITPROXY_ALLOW_PATH_PREFIXES", PREFIX)]
    } else {
        vec![]
    };
    let _agent = Agent::start("agent-0", &broker.agent_url(), KEY, &env).await;
    let r = client()
        .get(format!("{}{PREFIX}?all=1", broker.front("acme")))
        .send()
        .await
        .expect("answered");
    let status = r.status().as_u16();
    let code = r
        .headers()
        .get("x-gitproxy-error")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let body = r.text().await.unwrap_or_default();
    let reached = up.requests().iter().any(|(_, p)| p.starts_with(PREFIX));
    (status, code, body, reached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_prefix_travels_when_both_sides_allow_it() {
    let (status, code, body, reached) = run(true, true).await;
    assert!(reached, "{status} {code:?} {body}");
    assert_eq!(code, None, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_prefix_is_refused_by_the_side_that_does_not_allow_it() {
    let (status, code, body, reached) = run(false, true).await;
    assert_eq!((status, code.as_deref()), (403, Some("blocked_by_policy")));
    assert!(body.contains("broker's policy"), "{body}");
    assert!(!reached);
    let (status, code, body, reached) = run(true, false).await;
    assert_eq!((status, code.as_deref()), (403, Some("blocked_by_policy")));
    assert!(body.contains("agent's policy"), "{body}");
    assert!(!reached);
}
