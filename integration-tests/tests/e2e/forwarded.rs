//! What the front door believes of its callers (issue 10, defect 7):
//! `X-Forwarded-Proto`/`-Host` only from trusted proxies (or the configured
//! public URL) when GitLab's `Link` headers are rewritten; client-identity
//! headers (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`) from callers never
//! reach GitLab; one accessKey opens one connection.

use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{bin, client, WAIT};
use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use std::process::Stdio;

const TOKEN: &str = "testpat-forwarded-token-0123456789";
const EXTERNAL_URL: &str = "http://gitlab.sandbox.internal";

/// A sandbox GitLab (calling itself `EXTERNAL_URL`) with three projects, and
/// the front door's `Link` for page 1 of the listing, asked with `headers`.
struct Env {
    _sb: Sandbox,
    _dir: tempfile::TempDir,
    broker: Broker,
}

impl Env {
    async fn start(args: &[&str]) -> Env {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = SandboxConfig::new(dir.path().join("gitlab"));
        cfg.external_url = Some(EXTERNAL_URL.into());
        let (sb, addr) = Sandbox::start(cfg).await.expect("sandbox starts");
        let uid = sb.add_user("alice");
        sb.add_token(TokenSpec::new(
            TOKEN,
            uid,
            &["api", "read_repository", "write_repository"],
        ));
        for i in 0..3 {
            let mut p = ProjectSpec::new(format!("group/p{i}"));
            p.members.push((uid, access::DEVELOPER));
            sb.add_project(p);
        }
        let broker = Broker::start(BrokerSpec {
            connections: vec![ConnSpec::direct("acme", &format!("http://{addr}"))
                .token(TOKEN)
                .external_url(EXTERNAL_URL)],
            args: args.iter().map(|s| s.to_string()).collect(),
            ..BrokerSpec::default()
        })
        .await;
        Env {
            _sb: sb,
            _dir: dir,
            broker,
        }
    }

    /// The `Link` header of page 1, asked with extra `headers`.
    async fn link(&self, headers: &[(&str, &str)]) -> String {
        let mut req = client().get(format!(
            "{}/api/v4/projects?membership=true&per_page=1",
            self.broker.front("acme")
        ));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("request");
        assert_eq!(r.status(), 200);
        r.headers()
            .get("link")
            .expect("a Link header")
            .to_str()
            .expect("ascii")
            .to_string()
    }
}

const SPOOF: [(&str, &str); 2] = [
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_an_untrusted_caller_are_ignored() {
    let env = Env::start(&[]).await;
    let own = format!("http://{}/gitlab/acme/api/v4/projects", env.broker.api_addr);
    let link = env.link(&SPOOF).await;
    assert!(link.contains(&own), "{link}");
    assert!(!link.contains("evil.example"), "{link}");
    assert!(!link.contains("gitlab.sandbox.internal"), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_a_trusted_proxy_are_used() {
    // The test's requests come from 127.0.0.1: make it a trusted proxy.
    let env = Env::start(&["--trusted-proxy", "10.0.0.0/8,127.0.0.1"]).await;
    let link = env.link(&SPOOF).await;
    assert!(
        link.contains("https://evil.example/gitlab/acme/api/v4/projects"),
        "{link}"
    );
    // A host with a path or userinfo is never written into a URL.
    let link = env
        .link(&[("x-forwarded-host", "evil.example/x?"), SPOOF[1]])
        .await;
    assert!(!link.contains("evil.example"), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_url_wins() {
    let env = Env::start(&["--public-url", "https://gitproxy.example.com/scm/"]).await;
    let link = env.link(&SPOOF).await;
    assert!(
        link.contains("https://gitproxy.example.com/scm/gitlab/acme/api/v4/projects"),
        "{link}"
    );
    assert!(!link.contains("evil.example"), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_identity_headers_never_reach_gitlab() {
    let up = Upstream::start().await;
    let broker = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::direct("acme", &up.url())],
        ..BrokerSpec::default()
    })
    .await;
    let r = client()
        .post(format!("{}/api/v4/echo", broker.front("acme")))
        .header("x-forwarded-for", "203.0.113.7")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .header("x-real-ip", "203.0.113.7")
        .header("x-forwarded-host", "evil.example")
        .header("true-client-ip", "203.0.113.7")
        .header("x-custom", "kept")
        .body("hi")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let seen = up
        .last_headers("/api/v4/echo")
        .expect("GitLab got the request");
    for h in [
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "true-client-ip",
    ] {
        assert!(seen.get(h).is_none(), "{h} reached GitLab: {seen:?}");
    }
    assert_eq!(seen.get("x-custom").expect("x-custom"), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_cannot_share_an_access_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("broker.toml");
    let spec = BrokerSpec {
        connections: vec![
            ConnSpec::agent(
                "tenant-a",
                "https://gitlab.a.example",
                "shared-access-key-0123456789",
            ),
            ConnSpec::agent(
                "tenant-b",
                "https://gitlab.b.example",
                "shared-access-key-0123456789",
            ),
        ],
        ..BrokerSpec::default()
    };
    std::fs::write(&cfg, Broker::toml(&spec)).expect("write config");
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(bin("gitproxy-broker"))
            .args([
                "serve",
                "--agent-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the broker exits at once")
    .expect("run the broker");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("same access_key_sha256"), "{err}");
    assert!(
        err.contains("tenant-a") && err.contains("tenant-b"),
        "{err}"
    );
    let hash = gitproxy_shared::secret::sha256_hex(b"shared-access-key-0123456789");
    assert!(!err.contains(&hash), "the hash is not repeated: {err}");
}
