//! Enterprise networks (issue 4): TLS with private CAs made here (rcgen), a
//! real corporate proxy (Debian's tinyproxy), NO_PROXY, error classification,
//! `gitproxy-agent check`, and no listening socket in the agent.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::haproxy::Haproxy;
use gitproxy_integration_tests::harness::pki::Ca;
use gitproxy_integration_tests::harness::proxy::Proxy;
use gitproxy_integration_tests::harness::{bin, client, WAIT};
use gitproxy_integration_tests::sandbox::{ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

const KEY: &str = "enterprise-access-key-0123456789";
const TOKEN: &str = "enterprise-gitlab-token-0123456789";
const EXPIRED: &str = "enterprise-expired-token-0123456";
const PROXY_PASSWORD: &str = "proxy-secret-pw-42";
/// A GitLab name only the agent can resolve (GITPROXY_RESOLVE), like an
/// internal host the corporate proxy cannot reach.
const INTERNAL_HOST: &str = "gitlab.corp.test";

/// A sandbox GitLab over HTTPS with a certificate from `ca`, one project and
/// a valid and an expired token.
async fn https_gitlab(ca: &Ca, dir: &Path) -> (Sandbox, u16) {
    sandbox_gitlab(Some(ca), dir).await
}

/// The same sandbox GitLab, over HTTPS when `ca` is given, else plain HTTP.
async fn sandbox_gitlab(ca: Option<&Ca>, dir: &Path) -> (Sandbox, u16) {
    let mut cfg = SandboxConfig::new(dir.join("gitlab"));
    if let Some(ca) = ca {
        let leaf = ca.leaf(&[INTERNAL_HOST, "localhost", "127.0.0.1"]);
        cfg.tls = Some((leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes()));
    }
    let (sb, addr) = Sandbox::start(cfg).await.expect("sandbox");
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(
        TOKEN,
        uid,
        &["api", "read_repository", "write_repository"],
    ));
    sb.add_token(TokenSpec::new(
        EXPIRED,
        uid,
        &["api", "read_repository", "write_repository"],
    ));
    sb.expire_token(EXPIRED);
    sb.add_project(
        ProjectSpec::new("corp/app")
            .member(uid, 40)
            .file("docs/hello.txt", b"hello\n".to_vec()),
    );
    (sb, addr.port())
}

/// The agent's environment for dialling through `proxy` (an `HTTPS_PROXY`
/// URL), trusting the CA bundle at `ca`.
fn via_proxy<'a>(proxy: &'a str, ca: &'a Path) -> [(&'static str, &'a str); 2] {
    [
        ("HTTPS_PROXY", proxy),
        ("GITPROXY_CA_CERT_FILE", ca.to_str().expect("UTF-8 path")),
    ]
}

/// The agent's first ERROR log line whose message contains `text`.
async fn first_error(agent: &Agent, text: &str) -> serde_json::Value {
    agent
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["level"] == "ERROR" && v["message"].as_str().unwrap_or("").contains(text)
        })
        .await
}

/// The sandbox project every test reads.
const PROJECT: &str = "/api/v4/projects/corp%2Fapp";

/// [`PROJECT`] through `broker`'s front door (connection `acme`).
fn project_url(broker: &Broker) -> String {
    format!("{}{PROJECT}", broker.front("acme"))
}

fn resolve_env() -> (&'static str, String) {
    ("GITPROXY_RESOLVE", format!("{INTERNAL_HOST}=127.0.0.1"))
}

async fn tls_broker(ca: &Ca, dir: &Path, gitlab_url: &str) -> Broker {
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]).write(dir, "broker");
    Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", gitlab_url, KEY).token(TOKEN)],
        api_keys: vec![],
        args: vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
    })
    .await
}

fn tls_url(b: &Broker) -> String {
    format!("https://localhost:{}", b.agent_addr.port())
}

/// Acceptance 1: agent → broker over TLS with a private CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_tls_needs_the_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let broker = tls_broker(&ca, dir.path(), "http://127.0.0.1:9").await;

    let without = Agent::spawn("no-ca", &tls_url(&broker), KEY, &[]);
    let line = without
        .proc
        .wait_for_nth(1, WAIT, |v| {
            v["level"] == "ERROR" && v["message"].as_str().unwrap_or("").contains("TLS")
        })
        .await;
    let msg = line.to_string();
    assert!(
        msg.contains("x509: certificate signed by unknown authority"),
        "{msg}"
    );
    assert!(
        msg.contains("customCaCert"),
        "the hint must name customCaCert: {msg}"
    );

    let ca_file = ca.write(dir.path(), "ca.pem");
    Agent::start(
        "ca-file",
        &tls_url(&broker),
        KEY,
        &[("GITPROXY_CA_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let b64 = ca.base64();
    let a = Agent::start(
        "ca-base64",
        &tls_url(&broker),
        KEY,
        &[("GITPROXY_CA_CERT", &b64)],
    )
    .await;
    assert!(a.health().await);
    a.proc.assert_no_secrets(&[KEY]);
}

/// Acceptance 2: agent → broker through the proxy with CONNECT and basic auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reaches_the_broker_through_an_authenticating_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let broker = tls_broker(&ca, dir.path(), "http://127.0.0.1:9").await;
    let proxy = Proxy::start(Some(("agent", PROXY_PASSWORD))).await;
    let ca_file = ca.write(dir.path(), "ca.pem");
    let agent = Agent::start(
        "via-proxy",
        &tls_url(&broker),
        KEY,
        &via_proxy(&proxy.url(), &ca_file),
    )
    .await;
    // The CONNECT was logged before the agent connected; the log is read
    // concurrently, so wait for the line rather than peek.
    let target = format!("localhost:{}", broker.agent_addr.port());
    proxy
        .proc
        .wait_for_text(&format!("CONNECT {target}"), WAIT)
        .await;
    agent.proc.assert_no_secrets(&[KEY, PROXY_PASSWORD]);

    // Without credentials the proxy refuses the CONNECT: a clear error.
    let anon = format!("http://127.0.0.1:{}", proxy.port);
    let refused = Agent::spawn(
        "no-proxy-auth",
        &tls_url(&broker),
        KEY,
        &via_proxy(&anon, &ca_file),
    );
    let line = first_error(&refused, "refused to CONNECT").await;
    assert!(line.to_string().contains("proxy"), "{line}");
}

/// Acceptance 3: GitLab over HTTPS from another private CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_tls_needs_the_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab_ca = Ca::new("GitLab CA");
    let (_sb, port) = https_gitlab(&gitlab_ca, dir.path()).await;
    let broker = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &format!("https://localhost:{port}"), KEY).token(TOKEN),
        ],
        ..BrokerSpec::default()
    })
    .await;
    let c = client();
    let url = project_url(&broker);
    {
        let _agent = Agent::start("no-gitlab-ca", &broker.agent_url(), KEY, &[]).await;
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["x-gitproxy-error"], "upstream_tls");
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("unknown authority"),
            "{v}"
        );
        assert!(v["hint"].as_str().unwrap().contains("customCaCert"), "{v}");
        _agent
            .proc
            .wait_for_nth(1, WAIT, |v| v["error"] == "upstream_tls")
            .await;
    }
    let ca_file = gitlab_ca.write(dir.path(), "gitlab-ca.pem");
    let agent = Agent::start(
        "gitlab-ca",
        &broker.agent_url(),
        KEY,
        &[("GITPROXY_CA_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // And git clone through the tunnel, token injected by the broker.
    let clone_dir = dir.path().join("clone");
    let out = Command::new("git")
        .args(["-c", "credential.helper=", "clone", "--quiet"])
        .arg(format!("{}/corp/app.git", broker.front("acme")))
        .arg(&clone_dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(clone_dir.join("docs/hello.txt")).unwrap(),
        "hello\n"
    );
    agent.proc.assert_no_secrets(&[KEY, TOKEN]);
    broker.proc.assert_no_secrets(&[KEY, TOKEN]);
}

/// Acceptance 4: the proxy cannot reach the internal GitLab → proxy_error
/// naming the host for noProxy; with the host, its domain or its CIDR in
/// NO_PROXY the request goes direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gateway_from_the_proxy_names_no_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab_ca = Ca::new("GitLab CA");
    let (_sb, port) = https_gitlab(&gitlab_ca, dir.path()).await;
    let proxy = Proxy::start(None).await;
    let ca_file = gitlab_ca.write(dir.path(), "gitlab-ca.pem");
    let c = client();
    for (gitlab_host, no_proxy, expect_direct) in [
        (INTERNAL_HOST, "", false),
        (INTERNAL_HOST, INTERNAL_HOST, true),
        (INTERNAL_HOST, ".corp.test", true),
        ("127.0.0.1", "10.0.0.0/8,127.0.0.0/8", true),
    ] {
        let broker = Broker::start(BrokerSpec {
            connections: vec![ConnSpec::agent(
                "acme",
                &format!("https://{gitlab_host}:{port}"),
                KEY,
            )
            .token(TOKEN)],
            ..BrokerSpec::default()
        })
        .await;
        let (rk, rv) = resolve_env();
        let mut env = vec![
            ("HTTPS_PROXY", proxy.url()),
            ("GITPROXY_CA_CERT_FILE", ca_file.display().to_string()),
            (rk, rv),
        ];
        if !no_proxy.is_empty() {
            env.push(("NO_PROXY", no_proxy.to_string()));
        }
        // The agent reaches the (plain http) broker directly.
        env.push(("no_proxy", format!("{},{}", no_proxy, "localhost")));
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let agent = Agent::start("agent", &broker.agent_url(), KEY, &env_ref).await;
        let before = proxy.connects_to(&format!("{gitlab_host}:{port}"));
        let r = c.get(project_url(&broker)).send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default();
        let after = proxy.connects_to(&format!("{gitlab_host}:{port}"));
        if expect_direct {
            assert_eq!(status, 200, "NO_PROXY={no_proxy}: {body}");
            assert_eq!(
                after, before,
                "NO_PROXY={no_proxy}: the request went through the proxy"
            );
        } else {
            assert_eq!(status, 502, "{body}");
            assert_eq!(headers["x-gitproxy-error"], "proxy_error", "{body}");
            let hint = body["hint"].as_str().unwrap();
            assert!(
                hint.contains("proxy.noProxy") && hint.contains(INTERNAL_HOST),
                "{hint}"
            );
            // tinyproxy logged the CONNECT before answering 502, but its log
            // is read concurrently: wait for the line (a late one would also
            // land in the next case's before/after window).
            proxy
                .proc
                .wait_for_nth_text(before + 1, &format!("CONNECT {gitlab_host}:{port}"), WAIT)
                .await;
            agent
                .proc
                .wait_for_nth(1, WAIT, |v| v["error"] == "proxy_error")
                .await;
        }
    }
}

async fn check(env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(bin("gitproxy-agent"));
    cmd.arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("check hung")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn fail_line<'a>(out: &'a str, step: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with("FAIL") && l.contains(step))
        .unwrap_or_else(|| panic!("no FAIL line for {step:?}:\n{out}"))
}

/// Acceptance 5: `gitproxy-agent check` names the failing step and its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_failure() {
    let dir = tempfile::tempdir().unwrap();
    let broker_ca = Ca::new("broker CA");
    let gitlab_ca = Ca::new("GitLab CA");
    let (_sb, port) = https_gitlab(&gitlab_ca, dir.path()).await;
    let broker = tls_broker(
        &broker_ca,
        dir.path(),
        &format!("https://{INTERNAL_HOST}:{port}"),
    )
    .await;
    let both = dir.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", broker_ca.pem, gitlab_ca.pem)).unwrap();
    let broker_only = broker_ca.write(dir.path(), "broker-ca.pem");
    let url = tls_url(&broker);
    let (rk, rv) = resolve_env();
    let good: Vec<(&str, &str)> = vec![
        ("GITPROXY_BROKER_URL", &url),
        ("GITPROXY_ACCESS_KEY", KEY),
        ("GITPROXY_CA_CERT_FILE", both.to_str().unwrap()),
        ("GITPROXY_GITLAB_TOKEN", TOKEN),
        (rk, &rv),
    ];
    let with = |changes: &[(&'static str, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = good
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, val) in changes {
            v.retain(|(kk, _)| kk != k);
            if !val.is_empty() {
                v.push((k.to_string(), val.to_string()));
            }
        }
        v
    };
    async fn run(env: Vec<(String, String)>) -> (bool, String) {
        let r: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        check(&r).await
    }

    let (ok, out) = check(&good).await;
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    for step in [
        "broker reachable",
        "broker TLS trusted",
        "accessKey accepted",
        "GitLab reachable",
        "GitLab TLS trusted",
        "token valid",
        "token scopes",
        "projects found",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("ok") && l.contains(step)),
            "no ok line for {step}:\n{out}"
        );
    }

    let closed = format!(
        "https://localhost:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let (ok, out) = run(with(&[("GITPROXY_BROKER_URL", &closed)])).await;
    assert!(
        !ok && fail_line(&out, "broker reachable").contains("cannot reach"),
        "{out}"
    );

    let (ok, out) = run(with(&[("GITPROXY_CA_CERT_FILE", "")])).await;
    assert!(
        !ok && fail_line(&out, "broker TLS trusted").contains("unknown authority"),
        "{out}"
    );
    assert!(out.contains("customCaCert"), "{out}");

    let (ok, out) = run(with(&[("GITPROXY_ACCESS_KEY", "wrong-key")])).await;
    assert!(
        !ok && fail_line(&out, "accessKey accepted").contains("rejected"),
        "{out}"
    );

    let (ok, out) = run(with(&[(
        "GITPROXY_CA_CERT_FILE",
        broker_only.to_str().unwrap(),
    )]))
    .await;
    assert!(
        !ok && fail_line(&out, "GitLab TLS trusted").contains("unknown authority"),
        "{out}"
    );
    assert!(out.contains("customCaCert"), "{out}");

    let proxy = Proxy::start(None).await;
    let proxy_url = proxy.url();
    let (ok, out) = run(with(&[
        ("HTTPS_PROXY", &proxy_url),
        ("NO_PROXY", "localhost"),
    ]))
    .await;
    assert!(
        !ok && fail_line(&out, "GitLab reachable").contains("proxy_error"),
        "{out}"
    );
    assert!(
        out.contains("proxy.noProxy") && out.contains(INTERNAL_HOST),
        "{out}"
    );

    let (ok, out) = run(with(&[("GITPROXY_GITLAB_TOKEN", EXPIRED)])).await;
    assert!(
        !ok && fail_line(&out, "token valid").contains("expired"),
        "{out}"
    );
    assert!(!out.contains(KEY) && !out.contains(TOKEN) && !out.contains(EXPIRED));
}

/// An `https://` corporate proxy of real parts: HAProxy terminating TLS
/// (a certificate from `ca`, for `localhost`) in front of tinyproxy with
/// basic auth. Returns tinyproxy (its log), HAProxy and the proxy URL with
/// its credentials.
async fn tls_proxy(ca: &Ca, dir: &Path) -> (Proxy, Haproxy, String) {
    let tiny = Proxy::start(Some(("agent", PROXY_PASSWORD))).await;
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let pem = dir.join("proxy.pem");
    std::fs::write(&pem, format!("{}{}", leaf.cert_pem, leaf.key_pem)).unwrap();
    let front = Haproxy::tls_front(&pem, format!("127.0.0.1:{}", tiny.port).parse().unwrap()).await;
    let url = format!(
        "https://agent:{PROXY_PASSWORD}@localhost:{}",
        front.addr.port()
    );
    (tiny, front, url)
}

/// The agent dials an https broker through an `https://` corporate proxy
/// (TLS to the proxy, `CONNECT`, TLS to the broker inside it); without the
/// proxy's CA the error names the proxy's certificate and customCaCert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_through_a_tls_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let broker_ca = Ca::new("broker CA");
    let proxy_ca = Ca::new("Proxy CA");
    let broker = tls_broker(&broker_ca, dir.path(), "http://127.0.0.1:9").await;
    let (tiny, _front, proxy_url) = tls_proxy(&proxy_ca, dir.path()).await;
    let both = dir.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", broker_ca.pem, proxy_ca.pem)).unwrap();
    let broker_only = broker_ca.write(dir.path(), "broker-ca.pem");

    let agent = Agent::start(
        "via-tls-proxy",
        &tls_url(&broker),
        KEY,
        &via_proxy(&proxy_url, &both),
    )
    .await;
    let target = format!("localhost:{}", broker.agent_addr.port());
    tiny.proc
        .wait_for_text(&format!("CONNECT {target}"), WAIT)
        .await;
    agent.proc.assert_no_secrets(&[KEY, PROXY_PASSWORD]);
    drop(agent);

    let untrusted = Agent::spawn(
        "tls-proxy-unknown-ca",
        &tls_url(&broker),
        KEY,
        &via_proxy(&proxy_url, &broker_only),
    );
    let line = first_error(&untrusted, "TLS to the corporate proxy").await;
    let message = line["message"].as_str().unwrap();
    assert!(message.contains("unknown authority"), "{line}");
    assert!(
        line["hint"].as_str().unwrap().contains("customCaCert"),
        "{line}"
    );
    untrusted.proc.assert_no_secrets(&[KEY, PROXY_PASSWORD]);
}

/// An `https://` corporate proxy (HAProxy terminating TLS in front of
/// tinyproxy with basic auth): with the proxy's CA in the agent's bundle,
/// an https GitLab is reached through `CONNECT` inside the proxy's TLS and
/// an http GitLab through absolute-form requests; without it, the error
/// names the proxy's certificate, not GitLab's. No password in any answer
/// or log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_through_a_tls_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab_ca = Ca::new("GitLab CA");
    let proxy_ca = Ca::new("Proxy CA");
    let (_https_sb, https_port) = sandbox_gitlab(Some(&gitlab_ca), &dir.path().join("s")).await;
    let (_http_sb, http_port) = sandbox_gitlab(None, &dir.path().join("p")).await;
    let (tiny, _tls_front, proxy_url) = tls_proxy(&proxy_ca, dir.path()).await;
    let both = dir.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", gitlab_ca.pem, proxy_ca.pem)).unwrap();
    let gitlab_only = gitlab_ca.write(dir.path(), "gitlab-ca.pem");
    let c = client();

    for (case, gitlab, proxy_var, ca) in [
        (
            "https GitLab",
            format!("https://localhost:{https_port}"),
            "HTTPS_PROXY",
            &both,
        ),
        (
            "http GitLab",
            format!("http://localhost:{http_port}"),
            "HTTP_PROXY",
            &both,
        ),
        (
            "proxy CA unknown",
            format!("https://localhost:{https_port}"),
            "HTTPS_PROXY",
            &gitlab_only,
        ),
    ] {
        let broker = Broker::start(BrokerSpec {
            connections: vec![ConnSpec::agent("acme", &gitlab, KEY).token(TOKEN)],
            ..BrokerSpec::default()
        })
        .await;
        let ca = ca.display().to_string();
        let env = [
            (proxy_var, proxy_url.as_str()),
            ("GITPROXY_CA_CERT_FILE", ca.as_str()),
            // The agent reaches the (plain http) broker directly.
            ("NO_PROXY", "127.0.0.1"),
        ];
        let agent = Agent::start("tls-proxy-agent", &broker.agent_url(), KEY, &env).await;
        let before = tiny.proc.lines().len();
        let r = c.get(project_url(&broker)).send().await.unwrap();
        let status = r.status();
        let code = r
            .headers()
            .get("x-gitproxy-error")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let seen: Vec<String> = tiny.proc.lines().split_off(before);
        assert!(!text.contains(PROXY_PASSWORD), "{case}: {text}");
        match case {
            "https GitLab" => {
                assert_eq!(status, 200, "{case}: {text}");
                // tinyproxy logged it before answering; its log is read
                // concurrently, so wait for the line rather than peek.
                tiny.proc
                    .wait_for_text(&format!("CONNECT localhost:{https_port}"), WAIT)
                    .await;
            }
            "http GitLab" => {
                assert_eq!(status, 200, "{case}: {text}");
                let url = format!("http://localhost:{http_port}{PROJECT}");
                tiny.proc.wait_for_text(&format!("GET {url}"), WAIT).await;
            }
            _ => {
                assert_eq!(status, 502, "{case}: {text}");
                assert_eq!(code.as_deref(), Some("proxy_error"), "{case}: {text}");
                let body: serde_json::Value = serde_json::from_str(&text).unwrap();
                let (message, hint) = (
                    body["message"].as_str().unwrap(),
                    body["hint"].as_str().unwrap(),
                );
                assert!(
                    message.contains("unknown authority") && message.contains("corporate proxy"),
                    "{message}"
                );
                assert!(!message.contains("GitLab at"), "{message}");
                assert!(hint.contains("customCaCert"), "{hint}");
                assert!(
                    seen.iter().all(|l| !l.contains("CONNECT")),
                    "{case}: {seen:#?}"
                );
                agent
                    .proc
                    .wait_for_nth(1, WAIT, |v| v["error"] == "proxy_error")
                    .await;
            }
        }
        for l in agent.proc.lines() {
            assert!(
                !l.contains(PROXY_PASSWORD),
                "{case}: the proxy password in a log line: {l}"
            );
        }
    }
}

/// Acceptance 6: the running agent owns no listening TCP or UDP socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_opens_no_listening_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let broker = tls_broker(&ca, dir.path(), "http://127.0.0.1:9").await;
    let ca_file = ca.write(dir.path(), "ca.pem");
    let agent = Agent::start(
        "sockets",
        &tls_url(&broker),
        KEY,
        &[("GITPROXY_CA_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let pid = agent.proc.pid();
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    assert!(
        !inodes.is_empty(),
        "the agent should hold its outbound connection"
    );
    let mut tcp_connections = 0;
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (state, inode) = (f[3], f[9]);
            if !inodes.iter().any(|i| i == inode) {
                continue;
            }
            assert!(
                !table.starts_with("udp"),
                "the agent owns a UDP socket: {line}"
            );
            assert_ne!(state, "0A", "the agent owns a listening TCP socket: {line}");
            tcp_connections += 1;
        }
    }
    assert!(
        tcp_connections >= 1,
        "the agent's connection to the broker was not found"
    );
}

/// Test Connection (issue 5) through the same path as real traffic names the
/// TLS and proxy fixes: an unknown GitLab CA fails `tls_trusted` with the
/// customCaCert hint; a proxy that cannot reach GitLab fails
/// `gitlab_reachable` with the noProxy hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_names_tls_and_proxy_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab_ca = Ca::new("GitLab CA");
    let (_sb, port) = https_gitlab(&gitlab_ca, dir.path()).await;
    let proxy = Proxy::start(None).await;
    const KEY2: &str = "enterprise-second-key-0123456789";
    let broker = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &format!("https://localhost:{port}"), KEY).token(TOKEN),
            ConnSpec::agent("internal", &format!("https://{INTERNAL_HOST}:{port}"), KEY2)
                .token(TOKEN),
        ],
        ..BrokerSpec::default()
    })
    .await;
    let ca_file = gitlab_ca.write(dir.path(), "gitlab-ca.pem");
    let (rk, rv) = resolve_env();
    let _no_ca = Agent::start("no-ca", &broker.agent_url(), KEY, &[]).await;
    let _via_proxy = Agent::start(
        "via-proxy",
        &broker.agent_url(),
        KEY2,
        &[
            ("HTTPS_PROXY", &proxy.url()),
            ("NO_PROXY", "localhost,127.0.0.1"),
            ("GITPROXY_CA_CERT_FILE", ca_file.to_str().unwrap()),
            (rk, &rv),
        ],
    )
    .await;
    let c = client();
    let check = |conn: &'static str| {
        let c = c.clone();
        let url = format!("{}/v1/connections/{conn}/test", broker.api());
        async move {
            let r = c.post(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap()).unwrap()
        }
    };
    let status = |report: &serde_json::Value, name: &str| -> (String, String) {
        let c = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
            .clone();
        (
            c["status"].as_str().unwrap().to_string(),
            c["hint"].as_str().unwrap_or("").to_string(),
        )
    };

    let report = check("acme").await;
    assert_eq!(report["ok"], false, "{report:#}");
    assert_eq!(status(&report, "gitlab_reachable").0, "pass", "{report:#}");
    let (s, hint) = status(&report, "tls_trusted");
    assert_eq!(s, "fail", "{report:#}");
    assert!(hint.contains("customCaCert"), "{report:#}");

    let report = check("internal").await;
    assert_eq!(report["ok"], false, "{report:#}");
    let (s, hint) = status(&report, "gitlab_reachable");
    assert_eq!(s, "fail", "{report:#}");
    assert!(
        hint.contains("noProxy") && hint.contains(INTERNAL_HOST),
        "{report:#}"
    );
    assert_eq!(status(&report, "tls_trusted").0, "skip", "{report:#}");
    broker.proc.assert_no_secrets(&[KEY, KEY2, TOKEN]);
}
