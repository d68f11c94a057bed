//! GitLab fidelity (issue 3): the real clients cloud applications use —
//! python-gitlab and git — against the sandbox GitLab, through the broker's
//! front door, in agent mode and in direct mode.
//!
//! The sandbox calls itself `http://gitlab.sandbox.internal` (its external URL,
//! written into `Link` headers and bodies) while the broker reaches it at
//! `127.0.0.1:port`, as with a real GitLab behind a load balancer; the
//! connections carry that `external_url` so the broker can rewrite `Link`.
//! Every wait is on a response, a process exit or a log line, with a timeout.

use base64::Engine;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::client;
use gitproxy_integration_tests::harness::clients::{no_proxy, python, run};
use gitproxy_integration_tests::harness::pattern::Pattern;
use gitproxy_integration_tests::sandbox::{
    access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::process::Command;

const KEY: &str = "fidelity-access-key-0123456789abcdef";
const KEY_HELD: &str = "fidelity-held-access-key-0123456789";
/// The connections' token (what the broker injects).
const CONN_TOKEN: &str = "testpat-connection-token-0123456789";
/// A token a cloud caller sends itself.
const CALLER_TOKEN: &str = "testpat-caller-token-abcdefghij";
/// The token held by the agent of `acme-held` (never known to the broker).
const AGENT_TOKEN: &str = "testpat-agent-held-token-klmnopqrs";
const EXPIRED_TOKEN: &str = "testpat-expired-token-0000000001";
const REVOKED_TOKEN: &str = "testpat-revoked-token-0000000002";
const SCOPE_TOKEN: &str = "testpat-read-repo-only-0000000003";
/// What the sandbox GitLab calls itself.
const EXTERNAL_URL: &str = "http://gitlab.sandbox.internal";
/// The agent-mode and the direct-mode connection.
const MODES: [&str; 2] = ["acme", "acme-direct"];
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

struct Env {
    sb: Sandbox,
    sb_addr: SocketAddr,
    uid: u64,
    broker: Broker,
    agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Sandbox with user alice and every token of this file; a broker with
    /// `acme` (agent), `acme-direct` (direct) and, if `held`, `acme-held`
    /// whose agent holds its own token.
    async fn start(held: bool) -> Env {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = SandboxConfig::new(dir.path().join("gitlab"));
        cfg.external_url = Some(EXTERNAL_URL.into());
        let (sb, sb_addr) = Sandbox::start(cfg).await.expect("sandbox starts");
        let uid = sb.add_user("alice");
        let all = ["api", "read_repository", "write_repository"];
        for t in [
            CONN_TOKEN,
            CALLER_TOKEN,
            AGENT_TOKEN,
            EXPIRED_TOKEN,
            REVOKED_TOKEN,
        ] {
            sb.add_token(TokenSpec::new(t, uid, &all));
        }
        sb.add_token(TokenSpec::new(SCOPE_TOKEN, uid, &["read_repository"]));
        sb.expire_token(EXPIRED_TOKEN);
        sb.revoke_token(REVOKED_TOKEN);

        let gitlab_url = format!("http://{sb_addr}");
        let mut connections = vec![
            ConnSpec::agent("acme", &gitlab_url, KEY)
                .token(CONN_TOKEN)
                .external_url(EXTERNAL_URL),
            ConnSpec::direct("acme-direct", &gitlab_url)
                .token(CONN_TOKEN)
                .external_url(EXTERNAL_URL),
        ];
        if held {
            connections.push(
                ConnSpec::agent("acme-held", &gitlab_url, KEY_HELD)
                    .token(CONN_TOKEN)
                    .external_url(EXTERNAL_URL),
            );
        }
        let broker = Broker::start(BrokerSpec {
            connections,
            ..Default::default()
        })
        .await;
        let mut agents = vec![Agent::start("agent-acme", &broker.agent_url(), KEY, &[]).await];
        if held {
            agents.push(
                Agent::start(
                    "agent-held",
                    &broker.agent_url(),
                    KEY_HELD,
                    &[("GITPROXY_GITLAB_TOKEN", AGENT_TOKEN)],
                )
                .await,
            );
        }
        Env {
            sb,
            sb_addr,
            uid,
            broker,
            agents,
            _dir: dir,
        }
    }

    /// Creates projects off the async runtime (each is a real bare repository).
    async fn add_projects(&self, specs: Vec<ProjectSpec>) -> Vec<u64> {
        let sb = self.sb.clone();
        tokio::task::spawn_blocking(move || {
            let workers = 4;
            let per = specs.len().div_ceil(workers).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = specs
                    .chunks(per)
                    .map(|chunk| {
                        let sb = &sb;
                        s.spawn(move || {
                            chunk
                                .iter()
                                .map(|sp| sb.add_project(sp.clone()))
                                .collect::<Vec<u64>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("project worker"))
                    .collect()
            })
        })
        .await
        .expect("spawn_blocking")
    }

    /// The sandbox as reached without gitproxy.
    fn sandbox_url(&self) -> String {
        format!("http://{}", self.sb_addr)
    }

    /// No token, access key or accessKey in any log line of any program.
    fn assert_no_secrets(&self) {
        let secrets = [
            KEY,
            KEY_HELD,
            CONN_TOKEN,
            CALLER_TOKEN,
            AGENT_TOKEN,
            EXPIRED_TOKEN,
            REVOKED_TOKEN,
            SCOPE_TOKEN,
        ];
        self.broker.proc.assert_no_secrets(&secrets);
        for a in &self.agents {
            a.proc.assert_no_secrets(&secrets);
        }
    }
}

/// Runs git with no credential helper, no user or system configuration, and
/// `extra` configuration (`-c` values).
async fn git(dir: &Path, extra: &[String], args: &[&str]) -> Output {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "credential.helper=",
        "-c",
        "user.name=Cloud App",
        "-c",
        "user.email=app@cloud.example",
        "-c",
        "init.defaultBranch=main",
    ]);
    for e in extra {
        cmd.arg("-c").arg(e);
    }
    cmd.args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    no_proxy(&mut cmd);
    run(cmd, GIT_TIMEOUT, &format!("git {args:?}")).await
}

async fn git_ok(dir: &Path, extra: &[String], args: &[&str]) -> Output {
    let out = git(dir, extra, args).await;
    assert!(
        out.status.success(),
        "git {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `http.extraHeader` sending `token` the way GitLab expects it over git.
fn basic_header(token: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
    format!("http.extraHeader=Authorization: Basic {b64}")
}

/// Acceptance 1: python-gitlab lists every Developer+ project over 3 pages of
/// 100, with offset and with keyset pagination, without any warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_gitlab_lists_every_developer_project() {
    let env = Env::start(false).await;
    let levels = [
        access::DEVELOPER,
        access::MAINTAINER,
        access::OWNER,
        access::DEVELOPER,
        access::MAINTAINER,
        access::OWNER,
        access::GUEST,
        access::REPORTER,
    ];
    // 320 projects: 240 with Developer or above, 80 Guest or Reporter, plus 10
    // alice is no member of.
    let mut specs: Vec<ProjectSpec> = (0..320)
        .map(|i| {
            ProjectSpec::new(format!("fleet/svc-{i:03}")).member(env.uid, levels[i % levels.len()])
        })
        .collect();
    specs.extend((0..10).map(|i| ProjectSpec::new(format!("other/p-{i}"))));
    let started = Instant::now();
    let ids = env.add_projects(specs).await;
    eprintln!("created {} projects in {:?}", ids.len(), started.elapsed());
    let mut expected: Vec<u64> = ids[..320]
        .iter()
        .enumerate()
        .filter(|(i, _)| levels[i % levels.len()] >= access::DEVELOPER)
        .map(|(_, id)| *id)
        .collect();
    expected.sort_unstable();
    assert_eq!(expected.len(), 240);

    for conn in MODES {
        let base = env.broker.front(conn);
        for style in ["offset", "keyset"] {
            env.sb.clear_logs();
            let t = Instant::now();
            let v = python("list_projects.py", &[&base, style], CONN_TOKEN).await;
            eprintln!("{conn} {style}: listed in {:?}", t.elapsed());
            assert_eq!(v["username"], json!("alice"), "{conn} {style}");
            let got: Vec<u64> = v["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id"))
                .collect();
            let mut sorted = got.clone();
            sorted.sort_unstable();
            if style == "keyset" {
                assert_eq!(got, sorted, "{conn}: keyset by id ascending");
            }
            assert_eq!(
                sorted, expected,
                "{conn} {style}: every Developer+ project, once"
            );
            let pages: Vec<String> = env
                .sb
                .request_log()
                .into_iter()
                .filter(|(m, p)| m == "GET" && p.starts_with("/api/v4/projects?"))
                .map(|(_, p)| p)
                .collect();
            assert_eq!(pages.len(), 3, "{conn} {style}: {pages:#?}");
            assert!(
                pages.iter().all(|p| p.contains("per_page=100")),
                "{pages:#?}"
            );
            if style == "keyset" {
                assert!(
                    pages[1..].iter().all(|p| p.contains("id_after=")),
                    "{pages:#?}"
                );
            }
        }
    }
    env.assert_no_secrets();
}

/// Acceptance 2: real git clone, commit and push of a new branch through the
/// front door, with the caller's own credentials and with none (the broker
/// adds the connection's token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_commit_and_push_a_branch() {
    let env = Env::start(false).await;
    let pid = env
        .add_projects(vec![ProjectSpec::new("team/service")
            .member(env.uid, access::DEVELOPER)
            .file("src/main.rs", "fn main() {}\n")])
        .await[0];
    let work = tempfile::tempdir().unwrap();
    for conn in MODES {
        let url = format!("{}/team/service.git", env.broker.front(conn));
        for (who, extra, token) in [
            ("caller", vec![basic_header(CALLER_TOKEN)], CALLER_TOKEN),
            ("injected", vec![], CONN_TOKEN),
        ] {
            env.sb.clear_logs();
            let name = format!("{conn}-{who}");
            let repo = work.path().join(&name);
            git_ok(work.path(), &extra, &["clone", "-q", &url, &name]).await;
            assert_eq!(
                std::fs::read_to_string(repo.join("src/main.rs")).unwrap(),
                "fn main() {}\n"
            );
            let branch = format!("feature/{name}");
            let content = format!("pushed through {conn} with {who} credentials\n");
            std::fs::write(repo.join("NOTE.md"), &content).unwrap();
            git_ok(&repo, &extra, &["checkout", "-q", "-b", &branch]).await;
            git_ok(&repo, &extra, &["add", "NOTE.md"]).await;
            git_ok(&repo, &extra, &["commit", "-qm", "Add a note"]).await;
            git_ok(&repo, &extra, &["push", "-q", "origin", &branch]).await;

            assert!(
                env.sb.branches(pid).contains(&branch),
                "{branch} not in {:?}",
                env.sb.branches(pid)
            );
            assert_eq!(
                env.sb.read_file(pid, &branch, "NOTE.md"),
                Some(content.into_bytes())
            );
            let seen = env.sb.seen_tokens();
            assert!(!seen.is_empty(), "{name}: the sandbox saw no credentials");
            assert!(
                seen.iter().all(|t| t == token),
                "{name}: the sandbox saw other credentials than the {who} token"
            );
            let log = env.sb.request_log();
            assert!(
                log.iter()
                    .any(|(m, p)| m == "POST" && p == "/team/service.git/git-receive-pack"),
                "{log:?}"
            );
        }
    }
    env.assert_no_secrets();
}

/// Acceptance 2 (size): a clone whose pack is more than 100 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_of_a_pack_over_100_mb() {
    let env = Env::start(false).await;
    const SIZE: usize = 104 << 20;
    let mut data = vec![0u8; SIZE];
    Pattern::new(7).fill(&mut data);
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(&data)
    };
    let t = Instant::now();
    env.add_projects(vec![ProjectSpec::new("team/big")
        .member(env.uid, access::DEVELOPER)
        .file("assets/blob.bin", data)])
        .await;
    eprintln!("created team/big ({SIZE} bytes) in {:?}", t.elapsed());
    let work = tempfile::tempdir().unwrap();
    for conn in MODES {
        let url = format!("{}/team/big.git", env.broker.front(conn));
        let t = Instant::now();
        git_ok(work.path(), &[], &["clone", "-q", &url, conn]).await;
        let repo = work.path().join(conn);
        let pack_bytes: u64 = std::fs::read_dir(repo.join(".git/objects/pack"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        eprintln!(
            "{conn}: cloned a {pack_bytes}-byte pack in {:?}",
            t.elapsed()
        );
        assert!(
            pack_bytes >= 100_000_000,
            "{conn}: pack of {pack_bytes} bytes"
        );
        let got = std::fs::read(repo.join("assets/blob.bin")).unwrap();
        use sha2::Digest;
        assert_eq!(got.len(), SIZE);
        assert!(
            sha2::Sha256::digest(&got) == digest,
            "{conn}: content differs"
        );
        std::fs::remove_dir_all(&repo).unwrap();
    }
    env.assert_no_secrets();
}

/// Acceptance 3: the remediation flow with python-gitlab; the duplicate MR's
/// 409 reaches the caller exactly as GitLab wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_flow_with_python_gitlab() {
    let env = Env::start(false).await;
    let pid = env
        .add_projects(vec![ProjectSpec::new("demo-group/webapp")
            .member(env.uid, access::DEVELOPER)
            .file("package.json", demo::WEBAPP_PACKAGE_JSON)])
        .await[0];
    for conn in MODES {
        let branch = format!("fix/lodash-{conn}");
        let base = env.broker.front(conn);
        let v = python(
            "remediate.py",
            &[&base, "demo-group/webapp", &branch, "lodash", "4.17.21"],
            CONN_TOKEN,
        )
        .await;
        eprintln!("{conn}: {v}");
        assert_eq!(v["project_id"], json!(pid));
        assert_eq!(v["before"], json!("4.17.15"));
        assert_eq!(
            v["commit_title"],
            json!("Bump lodash from 4.17.15 to 4.17.21")
        );
        assert_eq!(v["mr_state"], json!("opened"));
        let iid = v["mr_iid"].as_u64().expect("iid");
        // Bodies are GitLab's own, never rewritten.
        assert_eq!(
            v["mr_web_url"],
            json!(format!(
                "{EXTERNAL_URL}/demo-group/webapp/-/merge_requests/{iid}"
            ))
        );
        let expected_409 = format!(
            r#"{{"message":["Another open merge request already exists for this source branch: !{iid}"]}}"#
        );
        assert_eq!(
            v["duplicate"],
            json!({"status": 409, "body": expected_409}),
            "{conn}"
        );
        // The same attempt straight at the sandbox: byte for byte the same answer.
        let r = client()
            .post(format!(
                "{}/api/v4/projects/{pid}/merge_requests",
                env.sandbox_url()
            ))
            .header("PRIVATE-TOKEN", CONN_TOKEN)
            .header("content-type", "application/json")
            .body(
                json!({"source_branch": branch, "target_branch": "main", "title": "again"})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        assert_eq!(r.text().await.unwrap(), expected_409);

        // The commit is in the bare repository, the MR in the sandbox.
        assert!(env.sb.branches(pid).contains(&branch));
        let manifest: Value = serde_json::from_slice(
            &env.sb
                .read_file(pid, &branch, "package.json")
                .expect("package.json on the branch"),
        )
        .unwrap();
        assert_eq!(manifest["dependencies"]["lodash"], json!("4.17.21"));
        assert_eq!(manifest["dependencies"]["express"], json!("4.17.1"));
        let mrs = env.sb.merge_requests(pid);
        let open: Vec<_> = mrs.iter().filter(|m| m.1 == branch).collect();
        assert_eq!(open.len(), 1, "{mrs:?}");
        assert_eq!(
            (open[0].0, open[0].2.as_str(), open[0].3.as_str()),
            (iid, "main", "opened")
        );
    }
    env.assert_no_secrets();
}

async fn api_get(url: &str, auth: Option<(&str, String)>) -> reqwest::Response {
    let mut rb = client().get(url);
    if let Some((name, value)) = auth {
        rb = rb.header(name, value);
    }
    rb.send().await.expect("send")
}

/// Acceptance 4: without caller credentials the sandbox sees the connection's
/// token; with an agent-held token it sees only the agent's, whatever the
/// caller sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_injection_and_agent_held_token() {
    let env = Env::start(true).await;
    env.add_projects(vec![
        ProjectSpec::new("team/creds").member(env.uid, access::DEVELOPER)
    ])
    .await;
    let work = tempfile::tempdir().unwrap();

    let check = |conn: &str, what: &str, want: &str| {
        let seen = env.sb.seen_tokens();
        assert!(!seen.is_empty(), "{conn} {what}: no credentials seen");
        assert!(
            seen.iter().all(|t| t == want),
            "{conn} {what}: the sandbox saw another token than expected"
        );
    };

    for conn in MODES.into_iter().chain(["acme-held"]) {
        let front = env.broker.front(conn);
        let held = conn == "acme-held";
        // No credentials from the caller: API and git.
        env.sb.clear_logs();
        let r = api_get(&format!("{front}/api/v4/user"), None).await;
        assert_eq!(r.status(), 200, "{conn}");
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["username"], json!("alice"));
        let out = git_ok(
            work.path(),
            &[],
            &["ls-remote", &format!("{front}/team/creds.git")],
        )
        .await;
        assert!(String::from_utf8_lossy(&out.stdout).contains("refs/heads/main"));
        check(
            conn,
            "no credentials",
            if held { AGENT_TOKEN } else { CONN_TOKEN },
        );

        // The caller's own credentials, in each form GitLab accepts.
        env.sb.clear_logs();
        for auth in [
            ("PRIVATE-TOKEN", CALLER_TOKEN.to_string()),
            ("Authorization", format!("Bearer {CALLER_TOKEN}")),
        ] {
            let r = api_get(&format!("{front}/api/v4/user"), Some(auth)).await;
            assert_eq!(r.status(), 200, "{conn}");
        }
        let r = api_get(
            &format!("{front}/api/v4/projects?private_token={CALLER_TOKEN}&membership=true"),
            None,
        )
        .await;
        assert_eq!(r.status(), 200, "{conn}");
        let out = git_ok(
            work.path(),
            &[basic_header(CALLER_TOKEN)],
            &["ls-remote", &format!("{front}/team/creds.git")],
        )
        .await;
        assert!(String::from_utf8_lossy(&out.stdout).contains("refs/heads/main"));
        check(
            conn,
            "caller credentials",
            if held { AGENT_TOKEN } else { CALLER_TOKEN },
        );
        if held {
            // The query credential was dropped, not only overridden.
            let log = env.sb.request_log();
            assert!(
                log.iter().all(|(_, p)| !p.contains("private_token")),
                "{log:?}"
            );
        }
    }
    env.assert_no_secrets();
}

/// What a caller gets for a request: status, content type, challenge, body.
async fn answer(r: reqwest::Response) -> (u16, Option<String>, Option<String>, bytes::Bytes) {
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    };
    let (ct, www) = (h("content-type"), h("www-authenticate"));
    (r.status().as_u16(), ct, www, r.bytes().await.unwrap())
}

/// Acceptance 5: expired, revoked and under-scoped tokens get GitLab's own
/// status and body through the tunnel, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_errors_reach_the_caller_unchanged() {
    let env = Env::start(false).await;
    let pid = env
        .add_projects(vec![
            ProjectSpec::new("team/errors").member(env.uid, access::DEVELOPER)
        ])
        .await[0];
    let cases = [
        (
            EXPIRED_TOKEN,
            401,
            json!({"error": "invalid_token", "error_description": "Token has expired."}),
        ),
        (
            REVOKED_TOKEN,
            401,
            json!({"error": "invalid_token", "error_description": "Token was revoked. You have to re-authorize from the user."}),
        ),
        (
            SCOPE_TOKEN,
            403,
            json!({
                "error": "insufficient_scope",
                "error_description": "The request requires higher privileges than provided by the access token.",
                "scope": "api read_api"
            }),
        ),
    ];
    // GET /user also accepts `read_user`, and GitLab names it in the answer.
    let expected = |body: &Value, path: &str| {
        let mut b = body.clone();
        if b["scope"].is_string() && path == "/api/v4/user" {
            b["scope"] = json!("api read_api read_user");
        }
        b
    };
    for conn in MODES {
        let front = env.broker.front(conn);
        for (token, status, body) in &cases {
            for path in [
                "/api/v4/user".to_string(),
                format!("/api/v4/projects/{pid}"),
                "/api/v4/projects?membership=true&min_access_level=30".to_string(),
            ] {
                let auth = || Some(("PRIVATE-TOKEN", token.to_string()));
                let direct =
                    answer(api_get(&format!("{}{path}", env.sandbox_url()), auth()).await).await;
                let tunneled = answer(api_get(&format!("{front}{path}"), auth()).await).await;
                assert_eq!(tunneled.0, *status, "{conn} {path}");
                let v: Value = serde_json::from_slice(&tunneled.3).unwrap();
                assert_eq!(v, expected(body, &path), "{conn} {path}");
                assert_eq!(
                    tunneled, direct,
                    "{conn} {path}: differs from GitLab's own answer"
                );
            }
        }
        // git over HTTP with a bad token: GitLab's 401 and its text, unchanged.
        for token in [EXPIRED_TOKEN, REVOKED_TOKEN] {
            let path = "/team/errors.git/info/refs?service=git-upload-pack";
            let basic = || {
                let b64 =
                    base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
                Some(("Authorization", format!("Basic {b64}")))
            };
            let direct =
                answer(api_get(&format!("{}{path}", env.sandbox_url()), basic()).await).await;
            let tunneled = answer(api_get(&format!("{front}{path}"), basic()).await).await;
            assert_eq!(tunneled.0, 401, "{conn} git");
            assert!(String::from_utf8_lossy(&tunneled.3).starts_with("HTTP Basic: Access denied."));
            assert_eq!(
                tunneled, direct,
                "{conn} git: differs from GitLab's own answer"
            );
        }
    }
    env.assert_no_secrets();
}
