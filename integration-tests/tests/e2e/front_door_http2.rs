//! HTTP/2 callers at the front door (issue 10, defect 2): h2c with prior
//! knowledge on the plaintext api listener, ALPN `h2` with `--api-tls-cert`,
//! the real `curl` and a real `git clone` over HTTP/2, both HTTP versions
//! answering identically (GitLab's answers and gitproxy's own errors), and
//! absolute-form request targets still refused over HTTP/1.1.
//!
//! The GitLab is the in-process sandbox, reached through a real agent.
//! Every wait is on a process exit or a log line, with a timeout.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::clients::{no_proxy, run};
use gitproxy_integration_tests::harness::pki::Ca;
use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const KEY: &str = "http2-access-key-0123456789abcdef";
const TOKEN: &str = "testpat-http2-connection-token-01234";
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const README: &str = "served over HTTP/2 through the tunnel\n";

/// A sandbox GitLab with one project, a broker (api TLS when `ca` is given)
/// with agent-mode connection `acme`, and its agent.
struct Env {
    sb: Sandbox,
    broker: Broker,
    agent: Agent,
    dir: tempfile::TempDir,
    /// The CA PEM file when the api listener speaks TLS.
    ca_file: Option<PathBuf>,
}

impl Env {
    async fn start(ca: Option<&Ca>) -> Env {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let (sb, sb_addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
            .await
            .expect("sandbox starts");
        let uid = sb.add_user("alice");
        sb.add_token(TokenSpec::new(
            TOKEN,
            uid,
            &["api", "read_repository", "write_repository"],
        ));
        let sb2 = sb.clone();
        tokio::task::spawn_blocking(move || {
            sb2.add_project(
                ProjectSpec::new("team/app")
                    .member(uid, access::DEVELOPER)
                    .file("docs/h2.txt", README),
            )
        })
        .await
        .expect("project");
        let mut args = Vec::new();
        let mut ca_file = None;
        if let Some(ca) = ca {
            let (cert, key) = ca
                .leaf(&["localhost", "127.0.0.1"])
                .write(dir.path(), "api");
            args = vec![
                "--api-tls-cert".to_string(),
                cert.display().to_string(),
                "--api-tls-key".to_string(),
                key.display().to_string(),
            ];
            ca_file = Some(ca.write(dir.path(), "ca.pem"));
        }
        let broker = Broker::start(BrokerSpec {
            connections: vec![
                ConnSpec::agent("acme", &format!("http://{sb_addr}"), KEY).token(TOKEN)
            ],
            api_keys: vec![],
            args,
        })
        .await;
        let agent = Agent::start("agent-h2", &broker.agent_url(), KEY, &[]).await;
        Env {
            sb,
            broker,
            agent,
            dir,
            ca_file,
        }
    }

    /// The front-door base of `acme`, `https://localhost:PORT/...` with TLS.
    fn front(&self, conn: &str) -> String {
        match self.ca_file {
            Some(_) => format!(
                "https://localhost:{}/gitlab/{conn}",
                self.broker.api_addr.port()
            ),
            None => self.broker.front(conn),
        }
    }

    fn assert_no_secrets(&self) {
        self.broker.proc.assert_no_secrets(&[KEY, TOKEN]);
        self.agent.proc.assert_no_secrets(&[KEY, TOKEN]);
    }
}

/// One answer as curl saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// `%{http_version}`: "2" or "1.1".
    version: String,
    /// The `X-Gitproxy-Error` header, empty when absent.
    gitproxy_error: String,
    content_type: String,
    body: Vec<u8>,
}

/// Runs the real curl with `args` (and `--cacert` when the env has TLS).
async fn curl(env: &Env, args: &[&str]) -> Answer {
    let d = tempfile::tempdir_in(env.dir.path()).expect("tempdir");
    let (body_file, head_file) = (d.path().join("body"), d.path().join("head"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-o"])
        .arg(&body_file)
        .arg("-D")
        .arg(&head_file)
        .args(["-w", "%{http_code} %{http_version}"]);
    if let Some(ca) = &env.ca_file {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(args);
    no_proxy(&mut cmd);
    let out = run(cmd, CMD_TIMEOUT, &format!("curl {args:?}")).await;
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = w.split_whitespace();
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = parts.next().unwrap_or("").to_string();
    let head = std::fs::read_to_string(&head_file).unwrap_or_default();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    Answer {
        status,
        version,
        gitproxy_error: header("x-gitproxy-error"),
        content_type: header("content-type"),
        body: std::fs::read(&body_file).unwrap_or_default(),
    }
}

/// The same GET over HTTP/1.1 and over HTTP/2 (`h2` = `--http2-prior-knowledge`
/// on plaintext, `--http2` with ALPN on TLS); both answers, checked for the
/// negotiated version and compared field by field.
async fn both_versions(env: &Env, url: &str) -> Answer {
    let h2_flag = if env.ca_file.is_some() {
        "--http2"
    } else {
        "--http2-prior-knowledge"
    };
    let h1 = curl(env, &["--http1.1", url]).await;
    let h2 = curl(env, &[h2_flag, url]).await;
    assert_eq!(h1.version, "1.1", "{url}: {h1:?}");
    assert_eq!(h2.version, "2", "{url}: {h2:?}");
    let view = |a: &Answer| {
        (
            a.status,
            a.gitproxy_error.clone(),
            a.content_type.clone(),
            String::from_utf8_lossy(&a.body).to_string(),
        )
    };
    assert_eq!(
        view(&h2),
        view(&h1),
        "{url}: HTTP/2 (left) and HTTP/1.1 (right) answer differently"
    );
    assert_eq!(h2.body, h1.body, "{url}: bodies differ");
    h2
}

fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&a.body)))
}

/// GitLab's own answers and gitproxy's errors, identical over both versions.
async fn check_answers(env: &Env) {
    let direct = gitproxy_integration_tests::harness::client()
        .get(format!(
            "{}/api/v4/version",
            env.sb.external_url().trim_end_matches('/')
        ))
        .header("private-token", TOKEN)
        .send()
        .await
        .expect("sandbox answers");
    let direct = direct.bytes().await.expect("body").to_vec();

    // REST through the tunnel: GitLab's body, byte for byte.
    let a = both_versions(env, &format!("{}/api/v4/version", env.front("acme"))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, direct, "the body is GitLab's, byte-exact");
    let a = both_versions(
        env,
        &format!("{}/api/v4/projects/team%2Fapp", env.front("acme")),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(json(&a)["path_with_namespace"], "team/app");

    // gitproxy's own errors: same status, header and JSON.
    let a = both_versions(env, &format!("{}/api/v4/version", env.front("nope"))).await;
    assert_eq!(
        (a.status, a.gitproxy_error.as_str()),
        (404, "unknown_connection")
    );
    assert_eq!(json(&a)["error"], "unknown_connection");
    let a = both_versions(env, &format!("{}/admin/users", env.front("acme"))).await;
    assert_eq!(
        (a.status, a.gitproxy_error.as_str()),
        (403, "blocked_by_policy")
    );
    assert_eq!(json(&a)["error"], "blocked_by_policy");
}

/// Absolute-form over HTTP/1.1 is still refused, with curl's
/// `--request-target` (plain or TLS) and with a raw write (plain).
async fn check_absolute_form_refused(env: &Env) {
    let base = match env.ca_file {
        Some(_) => format!("https://localhost:{}/", env.broker.api_addr.port()),
        None => format!("http://{}/", env.broker.api_addr),
    };
    let a = curl(
        env,
        &[
            "--http1.1",
            "--request-target",
            "http://evil.example/gitlab/acme/api/v4/version",
            &base,
        ],
    )
    .await;
    assert_eq!(a.version, "1.1");
    assert_eq!(
        (a.status, a.gitproxy_error.as_str()),
        (403, "blocked_by_policy"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(json(&a)["error"], "blocked_by_policy");
    if env.ca_file.is_none() {
        let mut s = tokio::net::TcpStream::connect(env.broker.api_addr)
            .await
            .expect("connect");
        s.write_all(
            b"GET http://evil.example/gitlab/acme/api/v4/version HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 403"), "{text}");
        assert!(
            text.contains("x-gitproxy-error: blocked_by_policy"),
            "{text}"
        );
    }
    assert!(
        !env.sb
            .request_log()
            .iter()
            .any(|(_, p)| p.starts_with("/api/v4/version") && p.contains("evil")),
        "an absolute-form request reached GitLab"
    );
}

/// Defect 2, h2c: `curl --http2-prior-knowledge` on the plaintext api
/// listener gets GitLab's answer through the tunnel over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_through_the_tunnel() {
    let env = Env::start(None).await;
    check_answers(&env).await;
    check_absolute_form_refused(&env).await;
    env.assert_no_secrets();
}

/// Defect 2, TLS: ALPN `h2` with `--api-tls-cert` (curl `--http2` and a real
/// `git clone` over HTTP/2), ALPN `http/1.1` still served, absolute-form over
/// HTTP/1.1 refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_h2_curl_and_git_clone() {
    let ca = Ca::new("api CA");
    let env = Env::start(Some(&ca)).await;
    check_answers(&env).await;
    check_absolute_form_refused(&env).await;

    // A real git clone over HTTP/2 (git's libcurl negotiates h2 with ALPN).
    let work = tempfile::tempdir_in(env.dir.path()).expect("tempdir");
    let url = format!("{}/team/app.git", env.front("acme"));
    let out = git_clone(&env, work.path(), &url, "HTTP/2").await;
    let trace = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "git clone over HTTP/2 failed ({}):\n{}",
        out.status,
        tail(&trace)
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("app/docs/h2.txt")).expect("docs/h2.txt"),
        README
    );
    assert!(
        trace.contains("ALPN: server accepted h2")
            || trace.contains("ALPN, server accepted to use h2"),
        "git's curl trace shows no ALPN h2:\n{}",
        tail(&trace)
    );
    assert!(
        trace.contains("HTTP/2 200"),
        "git's curl trace shows no HTTP/2 answer:\n{}",
        tail(&trace)
    );
    assert!(
        !trace.contains("HTTP/1.1 "),
        "git fell back to HTTP/1.1:\n{}",
        tail(&trace)
    );
    env.assert_no_secrets();
}

/// `git clone` with `http.version` and curl's trace on stderr.
async fn git_clone(env: &Env, dir: &Path, url: &str, version: &str) -> Output {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "credential.helper=",
        "-c",
        &format!("http.version={version}"),
        "clone",
        "-q",
        url,
        "app",
    ])
    .current_dir(dir)
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env("GIT_TRACE_CURL", "1")
    .env("GIT_TRACE_CURL_NO_DATA", "1");
    if let Some(ca) = &env.ca_file {
        cmd.env("GIT_SSL_CAINFO", ca);
    }
    no_proxy(&mut cmd);
    run(cmd, CMD_TIMEOUT, &format!("git clone {url}")).await
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
