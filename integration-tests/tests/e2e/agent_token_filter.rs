//! Issue 10, defect 5: an agent holding its own GitLab token drops every
//! credential the cloud sent, in every form GitLab (Rails on Rack) would read:
//! percent-encoded and nested query names, `;` separators, `bearer_token`,
//! header spellings with `_`, session cookies, and `sudo`. A real broker and a
//! real agent; the upstream records the raw request line and headers.

use base64::Engine;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::client;
use gitproxy_integration_tests::harness::upstream::Upstream;
use percent_encoding::percent_decode_str;

const KEY: &str = "filter-access-key-0001";
const CONN_TOKEN: &str = "conn-token-AAAA1111";
const AGENT_TOKEN: &str = "agent-token-BBBB2222";
/// The cloud's credential, in every form below.
const CLOUD: &str = "cloud-secret-CCCC3333";

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// Whether a header value carries the cloud's credential (also inside HTTP
/// Basic).
fn carries_cloud(value: &[u8]) -> bool {
    let s = String::from_utf8_lossy(value);
    if s.contains(CLOUD) {
        return true;
    }
    s.strip_prefix("Basic ")
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .is_some_and(|d| String::from_utf8_lossy(&d).contains(CLOUD))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_held_token_replaces_cloud_credentials_in_every_form() {
    let up = Upstream::start().await;
    let broker = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY).token(CONN_TOKEN)],
        ..BrokerSpec::default()
    })
    .await;
    let agent = Agent::start(
        "agent-filter",
        &broker.agent_url(),
        KEY,
        &[
            ("GITPROXY_GITLAB_TOKEN", AGENT_TOKEN),
            ("GITPROXY_GITLAB_URL", &up.url()),
        ],
    )
    .await;
    let api = "/api/v4/version";
    let git = "/g/p.git/info/refs";
    let c = CLOUD.to_string();
    // (target, headers, the target GitLab must see)
    type Case<'a> = (String, Vec<(&'a str, String)>, String);
    let cases: Vec<Case> = vec![
        (format!("{api}?private_token={c}"), vec![], api.into()),
        (format!("{api}?private%5Ftoken={c}"), vec![], api.into()),
        (format!("{api}?%70rivate_token={c}"), vec![], api.into()),
        (
            format!("{api}?page=1;private_token={c}"),
            vec![],
            format!("{api}?page=1"),
        ),
        (format!("{api}?access_token={c}"), vec![], api.into()),
        (format!("{api}?bearer_token={c}"), vec![], api.into()),
        (format!("{api}?job_token={c}"), vec![], api.into()),
        (format!("{api}?token={c}"), vec![], api.into()),
        (
            format!("{api}?feed_token={c}&rss_token={c}"),
            vec![],
            api.into(),
        ),
        (format!("{api}?private_token%5B%5D={c}"), vec![], api.into()),
        (
            format!("{api}?private_token%5Ba%5D%5Bb%5D={c}"),
            vec![],
            api.into(),
        ),
        (format!("{api}?sudo={c}"), vec![], api.into()),
        (
            format!("{api}?page=2&private_token={c}&per_page=5&x=%2Fy"),
            vec![],
            format!("{api}?page=2&per_page=5&x=%2Fy"),
        ),
        (api.into(), vec![("private-token", c.clone())], api.into()),
        (api.into(), vec![("private_token", c.clone())], api.into()),
        (
            api.into(),
            vec![("authorization", format!("Bearer {c}"))],
            api.into(),
        ),
        (api.into(), vec![("job-token", c.clone())], api.into()),
        (api.into(), vec![("job_token", c.clone())], api.into()),
        (api.into(), vec![("deploy-token", c.clone())], api.into()),
        (api.into(), vec![("deploy_token", c.clone())], api.into()),
        (
            api.into(),
            vec![("cookie", format!("_gitlab_session={c}; a=b"))],
            api.into(),
        ),
        (api.into(), vec![("sudo", c.clone())], api.into()),
        (
            api.into(),
            vec![("x-gitlab-static-object-token", c.clone())],
            api.into(),
        ),
        (
            format!("{git}?service=git-upload-pack&private%5Ftoken={c}"),
            vec![
                ("authorization", basic("oauth2", &c)),
                ("private_token", c.clone()),
            ],
            format!("{git}?service=git-upload-pack"),
        ),
    ];
    let http = client();
    for (i, (target, headers, want)) in cases.iter().enumerate() {
        let mut rb = http.get(format!("{}{target}", broker.front("acme")));
        for (n, v) in headers {
            rb = rb.header(*n, v);
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(
            !body.contains("x-gitproxy-error") && !body.contains("blocked_by_policy"),
            "{target}: {status} {body}"
        );
        let seen = up.requests();
        assert_eq!(
            seen.len(),
            i + 1,
            "{target} did not reach GitLab: {status} {body}"
        );
        let (_, pq) = seen.last().unwrap();
        let hdrs = up.last_headers("/").unwrap();
        assert!(
            !pq.contains(CLOUD) && !percent_decode_str(pq).decode_utf8_lossy().contains(CLOUD),
            "{target}: GitLab saw the cloud's credential in {pq}"
        );
        assert_eq!(
            pq, want,
            "{target}: what is not a credential must pass unchanged"
        );
        for (name, value) in &hdrs {
            assert!(
                !carries_cloud(value.as_bytes()),
                "{target}: GitLab saw the cloud's credential in header {name}"
            );
        }
        for name in [
            "sudo",
            "cookie",
            "job-token",
            "deploy-token",
            "x-gitlab-static-object-token",
        ] {
            assert!(
                hdrs.get(name).is_none(),
                "{target}: header {name} reached GitLab"
            );
        }
        if want.starts_with(api) {
            assert_eq!(hdrs["private-token"], AGENT_TOKEN, "{target}");
            assert!(hdrs.get("authorization").is_none(), "{target}");
        } else {
            assert_eq!(
                hdrs["authorization"].to_str().unwrap(),
                basic("oauth2", AGENT_TOKEN),
                "{target}"
            );
        }
    }
    for p in [&broker.proc, &agent.proc] {
        p.assert_no_secrets(&[CLOUD, AGENT_TOKEN, CONN_TOKEN]);
    }
}
