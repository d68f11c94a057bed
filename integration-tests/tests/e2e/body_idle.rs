//! The body idle timeout (`--body-idle-timeout` / `GITPROXY_BODY_IDLE_TIMEOUT`
//! on the broker, the same variable on the agent): a GitLab that freezes
//! mid-body no longer holds a request (and its in-flight slot) forever. The
//! caller sees a cut body (an error, never a clean end) within the idle time,
//! in agent mode (cut by the agent, or by the broker's backstop) and in direct
//! mode; a caller's upload that stalls is ended too; a caller that is merely
//! slow to read is never cut.

use bytes::Bytes;
use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerOptions, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::pattern::Verifier;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, WAIT};
use std::time::{Duration, Instant};

const KEY: &str = "idle-access-key-0123456789abcdef";
const TOKEN: &str = "idle-conn-token-0123456789";
const IDLE: Duration = Duration::from_secs(2);
const IDLE_ENV: (&str, &str) = ("GITPROXY_BODY_IDLE_TIMEOUT", "2s");

/// A broker with an agent-mode and a direct-mode connection to `up`;
/// `short_idle` gives it the test's idle timeout (else the default).
async fn broker(up: &Upstream, short_idle: bool) -> Broker {
    let env = if short_idle {
        vec![(IDLE_ENV.0.to_string(), IDLE_ENV.1.to_string())]
    } else {
        vec![]
    };
    Broker::start_with(
        BrokerSpec {
            connections: vec![
                ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN),
                ConnSpec::direct("acme-direct", &up.url()).token(TOKEN),
            ],
            ..BrokerSpec::default()
        },
        BrokerOptions {
            env,
            ..BrokerOptions::default()
        },
    )
    .await
}

async fn agent(b: &Broker, short_idle: bool) -> Agent {
    let env: &[(&str, &str)] = if short_idle { &[IDLE_ENV] } else { &[] };
    Agent::start("idle-agent", &b.agent_url(), KEY, env).await
}

/// GETs `/api/v4/hold` (headers, one chunk, then nothing) and reads until
/// the body ends; returns the body error and how long after the head it came.
async fn frozen_body(url: &str) -> (String, Duration) {
    let resp = client()
        .get(format!("{url}/api/v4/hold"))
        .send()
        .await
        .expect("head");
    assert_eq!(resp.status(), 200);
    let head_at = Instant::now();
    let mut s = resp.bytes_stream();
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(IDLE + WAIT, async {
        while let Some(c) = s.next().await {
            match c {
                Ok(c) => got.extend_from_slice(&c),
                Err(e) => return Some(format!("{e:?}")),
            }
        }
        None
    })
    .await
    .expect("the frozen body was never cut");
    assert_eq!(got, b"first");
    let err = outcome.expect("a frozen body ended cleanly: a cut body must be an error");
    (err, head_at.elapsed())
}

fn assert_cut_in_time(elapsed: Duration) {
    assert!(
        elapsed >= IDLE.mul_f32(0.5),
        "cut after {elapsed:?}, before the idle timeout of {IDLE:?}"
    );
    assert!(
        elapsed < IDLE + Duration::from_secs(10),
        "cut only after {elapsed:?}"
    );
}

/// Agent mode, the agent's timer: no chunk from GitLab for the idle time →
/// the agent ends the request with an Error frame (`timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_gitlab_is_cut_by_the_agent() {
    let up = Upstream::start().await;
    let b = broker(&up, false).await;
    let a = agent(&b, true).await;
    let (_err, elapsed) = frozen_body(&b.front("acme")).await;
    assert_cut_in_time(elapsed);
    a.proc
        .wait_for_nth(1, WAIT, |v| {
            v["error"] == "timeout" && v["path"] == "/api/v4/hold"
        })
        .await;
    let line = b
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["path"] == "/api/v4/hold"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("request aborted mid-body"))
        })
        .await;
    assert!(
        line["message"].as_str().unwrap().contains("timeout"),
        "{line}"
    );
}

/// Agent mode, the broker's backstop: an agent that keeps a body open
/// without data is cut by the broker while the caller waits for data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_body_is_cut_by_the_broker_backstop() {
    let up = Upstream::start().await;
    let b = broker(&up, true).await;
    let _a = agent(&b, false).await;
    let (_err, elapsed) = frozen_body(&b.front("acme")).await;
    assert_cut_in_time(elapsed);
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["path"] == "/api/v4/hold"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("request aborted mid-body"))
        })
        .await;
}

/// Direct mode: the broker's timer on GitLab's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_gitlab_is_cut_in_direct_mode() {
    let up = Upstream::start().await;
    let b = broker(&up, true).await;
    let (_err, elapsed) = frozen_body(&b.front("acme-direct")).await;
    assert_cut_in_time(elapsed);
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["path"] == "/api/v4/hold"
                && v["mode"] == "direct"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("request aborted mid-body"))
        })
        .await;
}

/// A caller that stops reading for three idle times gets the whole body:
/// the timers run only while someone waits for data, never while the caller
/// is the slow one (agent and direct mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_caller_is_not_cut() {
    let up = Upstream::start().await;
    let b = broker(&up, true).await;
    let _a = agent(&b, true).await;
    let n: u64 = 64 << 20;
    for conn in ["acme", "acme-direct"] {
        let resp = client()
            .get(format!("{}/api/v4/bytes?n={n}&seed=5", b.front(conn)))
            .send()
            .await
            .expect("head");
        assert_eq!(resp.status(), 200);
        let mut s = resp.bytes_stream();
        let mut v = Verifier::new(5);
        let mut ok = v.feed(&s.next().await.expect("a first chunk").expect("chunk"));
        // The caller is the slow one: nothing is read for three idle times.
        tokio::time::sleep(IDLE * 3).await;
        while let Some(c) = s.next().await {
            let c = c.unwrap_or_else(|e| panic!("{conn}: a slow caller was cut: {e:?}"));
            ok &= v.feed(&c);
        }
        let len = v.len;
        let (tail, _) = v.finish();
        assert_eq!(len, n, "{conn}");
        assert!(ok && tail, "{conn}: bytes differ");
    }
}

/// A caller whose upload stalls mid-body (one chunk, then nothing) is
/// answered within the idle time instead of holding the request until the
/// request timeout (agent mode, the broker's body pump).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_ends_after_the_idle_time() {
    let up = Upstream::start().await;
    let b = broker(&up, true).await;
    let _a = agent(&b, false).await;
    let first = futures::stream::once(async {
        Ok::<Bytes, std::io::Error>(Bytes::from_static(b"some bytes, then nothing"))
    });
    let body = reqwest::Body::wrap_stream(first.chain(futures::stream::pending()));
    let started = Instant::now();
    let r = tokio::time::timeout(
        IDLE + WAIT,
        client()
            .post(format!("{}/api/v4/upload?seed=1", b.front("acme")))
            .body(body)
            .send(),
    )
    .await
    .expect("a stalled upload held the request");
    let elapsed = started.elapsed();
    assert!(elapsed >= IDLE.mul_f32(0.5), "ended after {elapsed:?}");
    if let Ok(r) = r {
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-gitproxy-error"], "bad_request");
    }
    b.proc
        .wait_for_nth(1, WAIT, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("request body") && m.contains("stalled"))
        })
        .await;
}
