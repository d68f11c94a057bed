//! The metrics operators scrape: the broker's `/metrics` keeps every family,
//! type and label set it had before the exposition moved to
//! `prometheus-client` (a golden list taken from the hand-written exporter,
//! single broker and cluster replicas), and the agent's counters, printed by
//! `gitproxy-agent health --metrics`, move with the traffic it serves.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{start_replicas, ClusterFiles, PEER_SECRET};
use gitproxy_integration_tests::harness::pattern::Pattern;
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, client, until, WAIT};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const KEY: &str = "testpat-metrics-access-key-0123456789";
const KEY_LONELY: &str = "testpat-metrics-lonely-key-0123456789";
const TOKEN: &str = "testpat-metrics-conn-token-0123456789";

/// Families, types and label sets the hand-written exporter wrote for the
/// scenario of `broker_metrics_keep_every_family` (captured from the
/// binary before the move). `le` values are compared as numbers (the
/// library writes `1.0` where the old exporter wrote `1`; Prometheus reads
/// both as the same bound), and `version` as `*`.
const GOLDEN_SINGLE: &[&str] = &[
    "counter gitproxy_agent_connections_total{connection=\"acme\"}",
    "counter gitproxy_agent_connections_total{connection=\"lonely\"}",
    "counter gitproxy_agent_connections_total{connection=\"plain\"}",
    "counter gitproxy_agent_disconnections_total{connection=\"acme\"}",
    "counter gitproxy_agent_disconnections_total{connection=\"lonely\"}",
    "counter gitproxy_agent_disconnections_total{connection=\"plain\"}",
    "counter gitproxy_errors_total{code=\"agent_not_connected\",connection=\"lonely\"}",
    "counter gitproxy_protocol_violations_total{connection=\"acme\"}",
    "counter gitproxy_protocol_violations_total{connection=\"lonely\"}",
    "counter gitproxy_protocol_violations_total{connection=\"plain\"}",
    "counter gitproxy_request_bytes_total{connection=\"acme\"}",
    "counter gitproxy_request_bytes_total{connection=\"lonely\"}",
    "counter gitproxy_request_bytes_total{connection=\"plain\"}",
    "counter gitproxy_requests_total{connection=\"acme\",status_class=\"2xx\"}",
    "counter gitproxy_requests_total{connection=\"acme\",status_class=\"4xx\"}",
    "counter gitproxy_requests_total{connection=\"lonely\",status_class=\"5xx\"}",
    "counter gitproxy_requests_total{connection=\"plain\",status_class=\"2xx\"}",
    "counter gitproxy_response_bytes_total{connection=\"acme\"}",
    "counter gitproxy_response_bytes_total{connection=\"lonely\"}",
    "counter gitproxy_response_bytes_total{connection=\"plain\"}",
    "gauge gitproxy_agents_connected{connection=\"acme\"}",
    "gauge gitproxy_agents_connected{connection=\"lonely\"}",
    "gauge gitproxy_build_info{version=\"*\"}",
    "gauge gitproxy_connection_info{connection=\"acme\",mode=\"agent\"}",
    "gauge gitproxy_connection_info{connection=\"lonely\",mode=\"agent\"}",
    "gauge gitproxy_connection_info{connection=\"plain\",mode=\"direct\"}",
    "gauge gitproxy_requests_in_flight{connection=\"acme\"}",
    "gauge gitproxy_requests_in_flight{connection=\"lonely\"}",
    "gauge gitproxy_requests_in_flight{connection=\"plain\"}",
    "gauge gitproxy_uptime_seconds{}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"+Inf\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.005\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.01\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.025\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.05\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.25\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"0.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"10\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"2.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"30\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"300\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"acme\",le=\"60\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"+Inf\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.005\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.01\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.025\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.05\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.25\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"0.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"10\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"2.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"30\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"300\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"lonely\",le=\"60\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"+Inf\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.005\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.01\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.025\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.05\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.25\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"0.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"1\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"10\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"2.5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"30\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"300\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"5\"}",
    "histogram gitproxy_request_duration_seconds_bucket{connection=\"plain\",le=\"60\"}",
    "histogram gitproxy_request_duration_seconds_count{connection=\"acme\"}",
    "histogram gitproxy_request_duration_seconds_count{connection=\"lonely\"}",
    "histogram gitproxy_request_duration_seconds_count{connection=\"plain\"}",
    "histogram gitproxy_request_duration_seconds_sum{connection=\"acme\"}",
    "histogram gitproxy_request_duration_seconds_sum{connection=\"lonely\"}",
    "histogram gitproxy_request_duration_seconds_sum{connection=\"plain\"}",
];

/// The cluster-only families and label sets for a request forwarded
/// between two replicas (both replicas' scrapes merged; the rest is as in
/// [`GOLDEN_SINGLE`]).
const GOLDEN_CLUSTER: &[&str] = &[
    "counter gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"in\"}",
    "counter gitproxy_forwarded_requests_total{connection=\"acme\",direction=\"out\"}",
    "counter gitproxy_registry_commands_total{}",
    "counter gitproxy_relayed_connections_total{direction=\"in\"}",
    "counter gitproxy_relayed_connections_total{direction=\"out\"}",
    "counter gitproxy_registry_errors_total{}",
    "gauge gitproxy_registry_streams{}",
    "gauge gitproxy_registry_up{}",
];

/// Prometheus text (0.0.4 or OpenMetrics) → the set of
/// `type name{sorted labels}` of its samples. Every sample must belong to
/// a family declared by a `# TYPE` line before it.
fn families(text: &str) -> BTreeSet<String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (n, t) = rest.split_once(' ').expect(line);
            types.insert(n.to_string(), t.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').expect(line);
        assert!(
            value == "+Inf" || value.parse::<f64>().is_ok(),
            "bad value: {line}"
        );
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect(line)),
            None => (name_labels, ""),
        };
        // The family a sample belongs to: itself, a counter's name without
        // `_total` (OpenMetrics), or a histogram's without its suffix.
        let ty = [
            (name, None),
            (name.strip_suffix("_total").unwrap_or(""), Some("counter")),
            (
                name.strip_suffix("_bucket").unwrap_or(""),
                Some("histogram"),
            ),
            (name.strip_suffix("_sum").unwrap_or(""), Some("histogram")),
            (name.strip_suffix("_count").unwrap_or(""), Some("histogram")),
        ]
        .iter()
        .find_map(|(fam, want)| {
            let t = types.get(*fam)?;
            (want.is_none() || *want == Some(t.as_str())).then(|| t.clone())
        })
        .unwrap_or_else(|| panic!("no # TYPE for {line}"));
        let mut set = BTreeMap::new();
        // Label values here hold no quote, comma or backslash.
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect(line);
            let v = v.trim_matches('"');
            let v = match k {
                "le" if v == "+Inf" => v.to_string(),
                "le" => format!("{}", v.parse::<f64>().expect(line)),
                "version" => "*".to_string(),
                _ => v.to_string(),
            };
            set.insert(k.to_string(), v);
        }
        let labels: Vec<String> = set.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        out.insert(format!("{ty} {name}{{{}}}", labels.join(",")));
    }
    out
}

async fn scrape(b: &Broker) -> (String, String) {
    let r = client()
        .get(format!("{}/metrics", b.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.expect("text"))
}

/// GET `url`, body read to the end (a caller leaving early would count as
/// `aborted`, or not, depending on timing).
async fn get(url: &str) -> u16 {
    let r = client().get(url).send().await.expect("send");
    let status = r.status().as_u16();
    r.bytes().await.expect("body");
    status
}

/// Asserts that `got` holds every entry of `golden`; on failure prints
/// `got` whole, in the form to paste as a golden list.
fn assert_keeps(golden: &[&str], got: &BTreeSet<String>, text: &str) {
    let missing: Vec<&&str> = golden.iter().filter(|g| !got.contains(**g)).collect();
    if golden.is_empty() || !missing.is_empty() {
        let all: Vec<String> = got.iter().map(|g| format!("    {g:?},")).collect();
        panic!(
            "missing families/label sets: {missing:#?}\nscraped (as a golden list):\n{}\nexposition:\n{text}",
            all.join("\n")
        );
    }
}

/// One broker with an agent connection served by an agent, one without an
/// agent and one direct connection; a success, a GitLab 404, an upload and
/// a gitproxy error. Every family, type and label set of the old exporter
/// is still there, under the OpenMetrics content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_metrics_keep_every_family() {
    let up = Upstream::start().await;
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN),
            ConnSpec::agent("lonely", &up.url(), KEY_LONELY).token(TOKEN),
            ConnSpec::direct("plain", &up.url()).token(TOKEN),
        ],
        ..Default::default()
    })
    .await;
    let agent = Agent::start("agent-m", &b.agent_url(), KEY, &[]).await;
    assert_eq!(
        get(&format!("{}/api/v4/version", b.front("acme"))).await,
        200
    );
    assert_eq!(
        get(&format!("{}/api/v4/nowhere", b.front("acme"))).await,
        404
    );
    assert_eq!(
        get(&format!("{}/api/v4/version", b.front("lonely"))).await,
        503
    );
    assert_eq!(
        get(&format!("{}/api/v4/version", b.front("plain"))).await,
        200
    );
    let r = client()
        .post(format!("{}/api/v4/upload?seed=7", b.front("acme")))
        .body(Pattern::new(7).chunk(1000))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    let (ct, text) = scrape(&b).await;
    assert_keeps(GOLDEN_SINGLE, &families(&text), &text);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    b.proc.assert_no_secrets(&[KEY, KEY_LONELY, TOKEN]);
    agent.proc.assert_no_secrets(&[KEY, TOKEN]);
}

/// Two replicas sharing a Redis registry; the agent on r0, a request
/// through r1 forwarded to r0: the cluster families (`forwarded`,
/// `registry_*`) keep their names, types and labels too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_metrics_keep_every_family() {
    let redis = Redis::start(None).await;
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN)],
        ..Default::default()
    };
    let replicas = start_replicas(2, &spec, &Default::default(), &redis, &files).await;
    let _agent = Agent::start("agent-c", &replicas[0].agent_url(), KEY, &[]).await;
    // Forwarded once r1 sees the agent on r0 in the registry.
    until("r1 to forward to r0", WAIT, || async {
        (get(&format!("{}/api/v4/version", replicas[1].front("acme"))).await == 200).then_some(())
    })
    .await;
    let mut got = BTreeSet::new();
    let mut texts = String::new();
    for r in &replicas {
        let (_, text) = scrape(r).await;
        got.extend(families(&text));
        texts.push_str(&text);
    }
    assert_keeps(GOLDEN_CLUSTER, &got, &texts);
    for r in &replicas {
        r.proc.assert_no_secrets(&[KEY, TOKEN, PEER_SECRET]);
    }
}

/// `gitproxy-agent health --metrics` for this state file: exit status and
/// the text printed.
async fn agent_metrics(state_file: &Path) -> (bool, String) {
    let o = tokio::process::Command::new(bin("gitproxy-agent"))
        .args(["health", "--metrics", "--state-file"])
        .arg(state_file)
        .output()
        .await
        .expect("run gitproxy-agent health --metrics");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// An agent serves a download, an upload and an answer GitLab cuts; `gitproxy-agent health --metrics` prints OpenMetrics text whose
/// counters moved by exactly that (the agent rewrites the file within a
/// second of a change, so the test waits for the values, not for time).
/// After the broker restarts, the reconnect is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_move_with_traffic() {
    let up = Upstream::start().await;
    let mut b = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &up.url(), KEY).token(TOKEN)],
        ..Default::default()
    })
    .await;
    let agent = Agent::start("agent-h", &b.agent_url(), KEY, &[]).await;
    let (ok, text) = agent_metrics(&agent.state_file).await;
    assert!(ok, "health --metrics failed while connected:\n{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        value(&text, "gitproxy_agent_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "gitproxy_agent_reconnects_total"),
        Some(0.0),
        "{text}"
    );

    let r = client()
        .get(format!("{}/api/v4/bytes?n=5000&seed=3", b.front("acme")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").len(), 5000);
    let r = client()
        .post(format!("{}/api/v4/upload?seed=7", b.front("acme")))
        .body(Pattern::new(7).chunk(3000))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // GitLab cuts this answer after its head and 100 bytes: an error the
    // agent makes (upstream_unreachable) on a 2xx answer.
    let r = client()
        .get(format!("{}/api/v4/cut?n=100", b.front("acme")))
        .send()
        .await;
    // The cut reaches the caller as a cut body, or before the head when
    // the head had not left the broker yet.
    if let Ok(r) = r {
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err(), "the cut body ended cleanly");
    }

    let text = until(
        "the agent's metrics to count 3 answered requests",
        WAIT,
        || async {
            let (_, t) = agent_metrics(&agent.state_file).await;
            (value(&t, "gitproxy_agent_requests_total{status_class=\"2xx\"}") == Some(3.0)
                && value(&t, "gitproxy_agent_requests_in_flight") == Some(0.0))
            .then_some(t)
        },
    )
    .await;
    assert!(
        value(&text, "gitproxy_agent_response_bytes_total").unwrap() >= 5100.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "gitproxy_agent_request_bytes_total"),
        Some(3000.0),
        "{text}"
    );
    assert_eq!(value(&text, "gitproxy_agent_streams"), Some(1.0), "{text}");
    assert_eq!(
        value(
            &text,
            "gitproxy_agent_errors_total{code=\"upstream_unreachable\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // The broker goes away and comes back: one reconnect.
    b.restart().await;
    agent.wait_connected(2).await;
    until(
        "the agent's metrics to count the reconnect",
        WAIT,
        || async {
            let (ok, t) = agent_metrics(&agent.state_file).await;
            (ok && value(&t, "gitproxy_agent_reconnects_total") == Some(1.0)
                && value(&t, "gitproxy_agent_connected") == Some(1.0))
            .then_some(())
        },
    )
    .await;
    agent.proc.assert_no_secrets(&[KEY, TOKEN]);
}
