//! A hostile or broken agent against the real broker binary: a fake agent
//! (a tonic client speaking the real protocol) sends an oversized Hello full
//! of control characters, floods frames for ids the broker never issued,
//! answers with a head of 30,000 headers or with statuses outside 200–599.
//! The broker must keep its log readable and bounded, count the violations,
//! end a session that keeps breaking the protocol, answer callers with
//! `protocol_error`, never panic and never keep a dead session registered.

use bytes::Bytes;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerOptions, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::fake_agent::{
    flood, hello, ok_answer, response_head, FakeAgent,
};
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, WAIT};
use gitproxy_proto::v1::{agent_message::Msg as Out, Data, End, Header};
use std::sync::atomic::Ordering;
use std::time::Duration;

const KEY: &str = "hostile-agent-access-key-0123456789";

/// `MAX_PROTOCOL_VIOLATIONS` of `gitproxy_shared::tunnel::limits`.
const VIOLATION_LIMIT: u64 = 100;

fn spec(gitlab_url: &str) -> BrokerSpec {
    BrokerSpec {
        connections: vec![ConnSpec::agent("acme", gitlab_url, KEY)],
        ..BrokerSpec::default()
    }
}

async fn metric(broker: &Broker, name_and_labels: &str) -> Option<f64> {
    let text = client()
        .get(format!("{}/metrics", broker.api()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|v| v.trim().parse().ok())
    })
}

fn is_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A Hello of about 1 MiB whose instance name holds newlines and ANSI
/// escapes: the text log stays one line per event, without escapes, short;
/// the API shows the name sanitised and bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hello_cannot_forge_or_flood_the_text_log() {
    let broker = Broker::start_with(
        spec("http://127.0.0.1:9"),
        BrokerOptions {
            text_log: true,
            ..BrokerOptions::default()
        },
    )
    .await;
    let mut instance = String::from(
        "evil\nFORGED 2026-01-01T00:00:00.000000Z  INFO agent connected instance=admin\x1b[31m",
    );
    // Just under the 1 MiB message limit together with the other fields.
    while instance.len() < 900 * 1024 {
        instance.push_str("A\n\x1b[2J\r\u{202e}");
    }
    let mut h = hello(&instance);
    h.version = format!("1.0\n\x1b[31m{}", "9".repeat(64 * 1024));
    h.capabilities = vec!["flow-control-v1\nFORGED".into(); 1000];
    let agent = FakeAgent::connect(broker.agent_addr, KEY, h)
        .await
        .expect("the broker accepts the Hello (sanitised)");
    broker.proc.wait_for_text("agent connected", WAIT).await;

    let v: serde_json::Value = client()
        .get(format!("{}/v1/connections/acme", broker.api()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).expect("JSON"))
        .unwrap();
    let shown = v["agents"][0]["instance"].as_str().expect("instance shown");
    assert!(shown.starts_with("evil"), "{shown:?}");
    assert!(
        shown.len() <= 128,
        "instance of {} bytes shown",
        shown.len()
    );
    assert!(!shown.chars().any(is_control), "{shown:?}");
    let version = v["agents"][0]["version"].as_str().expect("version shown");
    assert!(version.len() <= 64, "version of {} bytes", version.len());
    assert!(!version.chars().any(is_control), "{version:?}");

    drop(agent);
    broker.proc.wait_for_text("agent disconnected", WAIT).await;
    let lines = broker.proc.lines();
    for l in &lines {
        assert!(!l.contains('\x1b'), "raw ESC in a log line: {l:?}");
        assert!(
            l.len() <= 4096,
            "a log line of {} bytes: {:?}...",
            l.len(),
            &l[..200]
        );
        // Every text line starts with its own timestamp: a newline inside a
        // field would start a line with the attacker's text instead.
        let ts = l.get(..4).unwrap_or("");
        assert!(
            ts.bytes().all(|b| b.is_ascii_digit()) && l.get(4..5) == Some("-"),
            "a log line that is not an event of its own (forged?): {l:?}"
        );
    }
}

/// 10,000 frames for ids the broker never issued: the session is ended at
/// the violation limit, the log holds a few lines about it, not one per
/// frame, and the metric counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_for_never_issued_ids_end_the_session_at_the_limit() {
    let broker = Broker::start(spec("http://127.0.0.1:9")).await;
    let mut agent = FakeAgent::connect(broker.agent_addr, KEY, hello("flooder"))
        .await
        .expect("connect");
    broker.proc.wait_for_message("agent connected", WAIT).await;
    let frames = (0..10_000u64).map(|i| match i % 4 {
        0 => Out::Data(Data {
            id: 1_000_000 + i,
            data: Bytes::from_static(b"x"),
        }),
        1 => Out::End(End { id: 1_000_000 + i }),
        2 => response_head(1_000_000 + i, 200, vec![]),
        _ => Out::Credit(gitproxy_proto::v1::Credit {
            id: 1_000_000 + i,
            bytes: 1024,
        }),
    });
    let flooder = tokio::spawn(flood(agent.sender(), frames));
    assert!(
        agent.wait_ended(WAIT).await,
        "the broker kept a session that broke the protocol 10,000 times"
    );
    flooder.await.unwrap();
    broker
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("agent disconnected"))
        })
        .await;
    let about: Vec<serde_json::Value> = broker
        .proc
        .json_lines()
        .into_iter()
        .filter(|v| {
            let m = v["message"].as_str().unwrap_or("");
            m.contains("protocol") || m.contains("never")
        })
        .collect();
    assert!(
        !about.is_empty() && about.len() <= 5,
        "{} log lines about the violations: {about:#?}",
        about.len()
    );
    let counted = metric(
        &broker,
        "gitproxy_protocol_violations_total{connection=\"acme\"}",
    )
    .await;
    assert_eq!(counted, Some(VIOLATION_LIMIT as f64));
    let v: serde_json::Value = client()
        .get(format!("{}/v1/connections/acme", broker.api()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).expect("JSON"))
        .unwrap();
    assert_eq!(v["status"], "disconnected", "{v}");
}

/// A response head of 30,000 tiny headers (small in bytes, huge in count):
/// the caller gets 502 `protocol_error` without a retry, the broker does not
/// panic, and no session is left as a zombie: with a healthy agent joining,
/// 20 following GETs all succeed, some of them through the first agent,
/// which stayed usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_with_30000_headers_is_a_protocol_error_and_leaves_no_zombie() {
    let up = Upstream::start().await;
    let broker = Broker::start(spec(&up.url())).await;
    let hostile = FakeAgent::connect(broker.agent_addr, KEY, hello("hostile"))
        .await
        .expect("connect");
    broker.proc.wait_for_message("agent connected", WAIT).await;
    let (seen, _task) = hostile.serve(|h, n| {
        if n == 0 {
            let headers = (0..30_000)
                .map(|_| Header {
                    name: "x".into(),
                    value: vec![],
                })
                .collect();
            vec![response_head(h.id, 200, headers)]
        } else {
            ok_answer(h.id)
        }
    });
    let c = client();
    let url = format!("{}/api/v4/version", broker.front("acme"));
    let r = c.get(&url).timeout(WAIT).send().await.expect("an answer");
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-gitproxy-error"], "protocol_error");
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the request was retried");

    let healthy = Agent::start("healthy", &broker.agent_url(), KEY, &[]).await;
    for i in 0..20 {
        let r = c
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {i} got no answer (zombie session?): {e}"));
        assert_eq!(r.status(), 200, "GET {i}");
        r.bytes().await.expect("body");
    }
    assert!(
        seen.load(Ordering::SeqCst) > 1,
        "the first agent's session was never used again"
    );
    assert!(
        !broker.proc.lines().iter().any(|l| l.contains("panicked")),
        "the broker panicked"
    );
    drop(healthy);
}

/// Statuses outside 200–599 are never relayed (no 1xx, no 999) and never
/// retried: each is 502 `protocol_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_outside_200_to_599_are_protocol_errors() {
    let broker = Broker::start(spec("http://127.0.0.1:9")).await;
    let agent = FakeAgent::connect(broker.agent_addr, KEY, hello("odd-statuses"))
        .await
        .expect("connect");
    broker.proc.wait_for_message("agent connected", WAIT).await;
    let statuses = [101u32, 999, 99, 600, 0, 1_000_000];
    let (seen, _task) = agent.serve(move |h, n| {
        let status = statuses.get(n).copied().unwrap_or(200);
        vec![
            response_head(h.id, status, vec![]),
            Out::End(End { id: h.id }),
        ]
    });
    let c = client();
    for (i, s) in statuses.iter().enumerate() {
        let r = c
            .get(format!("{}/api/v4/version", broker.front("acme")))
            .timeout(WAIT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("status {s}: no answer: {e}"));
        assert_eq!(r.status(), 502, "status {s} from the agent");
        assert_eq!(
            r.headers()
                .get("x-gitproxy-error")
                .map(|v| v.to_str().unwrap()),
            Some("protocol_error"),
            "status {s} from the agent"
        );
        assert_eq!(
            seen.load(Ordering::SeqCst),
            i + 1,
            "status {s}: the request was retried"
        );
    }
}
