//! GitLab's URLs as customers serve them (issue 12, points 1, 2 and 10):
//! a GitLab under a relative URL root (`https://host/gitlab`), `Link` headers
//! naming `gitlab.yml`'s host and port rather than the URL the agent used, and
//! clone URLs without `.git` as GitLab's UI shows them. Real python-gitlab
//! and real git through the front door, in agent and in direct mode.
//! Every wait is on a response, a process exit or a log line, with a timeout.

use base64::Engine;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::clients;
use gitproxy_integration_tests::harness::{bin, client, json_call};
use gitproxy_integration_tests::sandbox::{
    access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tokio::process::Command;

const API_KEY: &str = "urls-api-key-0123456789abcdef";
const KEY: &str = "urls-access-key-0123456789abcdef";
/// The agent of the connection whose URL lacks the relative root.
const KEY_NOPREFIX: &str = "urls-noprefix-key-0123456789abcd";
const TOKEN: &str = "testpat-urls-token-0123456789abc";
const ROOT: &str = "/gitlab";
const TIMEOUT: Duration = Duration::from_secs(180);
/// Developer+ projects of the listing, over several pages of `PER_PAGE`.
const LISTED: usize = 12;
const PER_PAGE: &str = "5";

struct Env {
    sb: Sandbox,
    uid: u64,
    broker: Broker,
    _agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A sandbox shaped by `shape`; connections `acme` (agent) and
    /// `acme-direct` on `gitlab_url`, and, with `noprefix`, `acme-noprefix`
    /// (agent) and `acme-noprefix-direct` on `http://<sandbox address>` (the
    /// host without its relative root).
    async fn start(
        shape: impl FnOnce(&mut SandboxConfig),
        gitlab_url: impl FnOnce(std::net::SocketAddr) -> String,
        noprefix: bool,
    ) -> Env {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = SandboxConfig::new(dir.path().join("gitlab"));
        shape(&mut cfg);
        let (sb, addr) = Sandbox::start(cfg).await.expect("sandbox starts");
        let uid = sb.add_user("alice");
        sb.add_token(TokenSpec::new(
            TOKEN,
            uid,
            &["api", "read_repository", "write_repository"],
        ));
        let url = gitlab_url(addr);
        let mut connections = vec![
            ConnSpec::agent("acme", &url, KEY).token(TOKEN),
            ConnSpec::direct("acme-direct", &url).token(TOKEN),
        ];
        if noprefix {
            let np = format!("http://{addr}");
            connections.push(ConnSpec::agent("acme-noprefix", &np, KEY_NOPREFIX).token(TOKEN));
            connections.push(ConnSpec::direct("acme-noprefix-direct", &np).token(TOKEN));
        }
        let broker = Broker::start(BrokerSpec {
            connections,
            api_keys: vec![],
            args: vec!["--data-dir".into(), "{dir}/data".into()],
        })
        .await;
        let mut agents = vec![Agent::start("agent-acme", &broker.agent_url(), KEY, &[]).await];
        if noprefix {
            agents
                .push(Agent::start("agent-noprefix", &broker.agent_url(), KEY_NOPREFIX, &[]).await);
        }
        Env {
            sb,
            uid,
            broker,
            _agents: agents,
            _dir: dir,
        }
    }

    /// `LISTED` Developer+ projects plus 3 the listing must leave out; returns
    /// the listed ids.
    async fn seed_listing(&self) -> BTreeSet<u64> {
        let sb = self.sb.clone();
        let uid = self.uid;
        tokio::task::spawn_blocking(move || {
            let mut listed = BTreeSet::new();
            for i in 0..LISTED {
                let level = [access::DEVELOPER, access::MAINTAINER, access::OWNER][i % 3];
                listed.insert(
                    sb.add_project(
                        ProjectSpec::new(format!("fleet/svc-{i:02}")).member(uid, level),
                    ),
                );
            }
            sb.add_project(ProjectSpec::new("fleet/guest").member(uid, access::GUEST));
            sb.add_project(ProjectSpec::new("fleet/reporter").member(uid, access::REPORTER));
            sb.add_project(ProjectSpec::new("other/none"));
            listed
        })
        .await
        .expect("seeding")
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        json_call(
            method,
            format!("{}{path}", self.broker.api()),
            API_KEY,
            body,
        )
        .await
    }

    async fn test_connection(&self, conn: &str) -> Value {
        let (s, v) = self
            .api(
                reqwest::Method::POST,
                &format!("/v1/connections/{conn}/test"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// python-gitlab lists every Developer+ project through `conn`'s front
    /// door, several pages, any warning an error; returns the ids.
    async fn python_list(&self, conn: &str, style: &str) -> BTreeSet<u64> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .join("list_projects.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args([&self.broker.front(conn), style, PER_PAGE])
            .env("GITLAB_TOKEN", TOKEN);
        let out = run(cmd, "list_projects.py").await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{conn} {style}: python-gitlab failed ({}):\n{}\n{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(stdout.trim()).expect("JSON");
        v["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id"))
            .collect()
    }
}

/// A client program on loopback, never through a proxy.
async fn run(mut cmd: Command, what: &str) -> Output {
    clients::no_proxy(&mut cmd);
    clients::run(cmd, TIMEOUT, what).await
}

/// Real git with the token as GitLab expects it, no user or system config.
async fn git(dir: &Path, args: &[&str]) -> Output {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{TOKEN}"));
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "credential.helper=",
        "-c",
        "user.name=Cloud App",
        "-c",
        "user.email=app@cloud.example",
        "-c",
    ])
    .arg(format!("http.extraHeader=Authorization: Basic {b64}"))
    .args(args)
    .current_dir(dir)
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null");
    let out = run(cmd, &format!("git {args:?}")).await;
    assert!(
        out.status.success(),
        "git {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn check_named<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

fn assert_all_ok(report: &Value) {
    assert_eq!(report["ok"], true, "{report:#}");
    for c in report["checks"].as_array().expect("checks") {
        assert!(c["status"] == "pass" || c["status"] == "skip", "{report:#}");
    }
}

/// Point 1: a GitLab served under `/gitlab`. Listing (python-gitlab, offset and
/// keyset, Link headers under the root), Test Connection, catalogue, a
/// remediation MR and git clone/push all work with `gitlab_url` holding the
/// root; a `gitlab_url` missing it fails `gitlab_reachable` with a hint about
/// the URL's path, in Test Connection (both modes) and `gitproxy-agent check`,
/// instead of blaming the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_under_a_relative_url_root() {
    let env = Env::start(
        |c| c.relative_url_root = Some(ROOT.into()),
        |a| format!("http://{a}{ROOT}"),
        false,
    )
    .await;
    let listed = env.seed_listing().await;
    let app = {
        let sb = env.sb.clone();
        let uid = env.uid;
        tokio::task::spawn_blocking(move || {
            sb.add_project(
                ProjectSpec::new("demo-group/webapp")
                    .member(uid, access::DEVELOPER)
                    .file("package.json", demo::WEBAPP_PACKAGE_JSON),
            )
        })
        .await
        .expect("seed app")
    };
    let mut all_listed = listed.clone();
    all_listed.insert(app);
    assert!(env.sb.external_url().ends_with(ROOT));

    for conn in ["acme", "acme-direct"] {
        assert_all_ok(&env.test_connection(conn).await);
        for style in ["offset", "keyset"] {
            env.sb.clear_logs();
            assert_eq!(
                env.python_list(conn, style).await,
                all_listed,
                "{conn} {style}"
            );
            let pages: Vec<String> = env
                .sb
                .request_log()
                .into_iter()
                .filter(|(_, p)| p.contains("/api/v4/projects?"))
                .map(|(_, p)| p)
                .collect();
            assert!(
                pages.len() >= 3,
                "{conn} {style}: several pages: {pages:#?}"
            );
            assert!(
                pages
                    .iter()
                    .all(|p| p.starts_with("/gitlab/api/v4/projects?")),
                "{conn} {style}: every page under the root: {pages:#?}"
            );
        }
        let (s, v) = env
            .api(
                reqwest::Method::GET,
                &format!("/v1/connections/{conn}/projects"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let got: BTreeSet<u64> = v["projects"]
            .as_array()
            .expect("projects")
            .iter()
            .map(|p| p["id"].as_u64().expect("id"))
            .collect();
        assert_eq!(got, all_listed, "{conn}: catalogue");

        let branch = format!("fix/lodash-{conn}");
        let fixed = demo::WEBAPP_PACKAGE_JSON.replace("4.17.15", "4.17.21");
        let (s, v) = env
            .api(
                reqwest::Method::POST,
                &format!("/v1/connections/{conn}/merge-requests"),
                Some(json!({
                    "project": "demo-group/webapp",
                    "source_branch": branch,
                    "title": "Bump lodash",
                    "changes": [{"path": "package.json", "content": fixed}]
                })),
            )
            .await;
        assert_eq!(s, 201, "{conn}: {v}");
        assert_eq!(
            env.sb
                .read_file(app, &branch, "package.json")
                .expect("file"),
            fixed.as_bytes()
        );
    }

    // git clone and push through the front door, the base holding the root.
    let work = tempfile::tempdir().expect("tempdir");
    let url = format!("{}/demo-group/webapp.git", env.broker.front("acme"));
    git(work.path(), &["clone", "-q", &url, "app"]).await;
    let repo = work.path().join("app");
    std::fs::write(repo.join("NOTES.md"), "through the root\n").expect("write");
    git(&repo, &["checkout", "-q", "-b", "fix/notes"]).await;
    git(&repo, &["add", "NOTES.md"]).await;
    git(&repo, &["commit", "-q", "-m", "notes"]).await;
    git(&repo, &["push", "-q", "origin", "fix/notes"]).await;
    assert_eq!(
        env.sb
            .read_file(app, "fix/notes", "NOTES.md")
            .expect("pushed"),
        b"through the root\n"
    );
}

/// Point 1, the careless URL: `gitlab_url` without the root answers 404 (not
/// GitLab), so `gitlab_reachable` fails naming the URL's path and nothing blames
/// the token; `gitproxy-agent check` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_url_missing_the_root_is_named_as_the_problem() {
    let env = Env::start(
        |c| c.relative_url_root = Some(ROOT.into()),
        |a| format!("http://{a}{ROOT}"),
        true,
    )
    .await;
    for conn in ["acme-noprefix", "acme-noprefix-direct"] {
        let r = env.test_connection(conn).await;
        assert_eq!(r["ok"], false, "{r:#}");
        let reach = check_named(&r, "gitlab_reachable");
        assert_eq!(reach["status"], "fail", "{conn}: {r:#}");
        assert!(
            reach["detail"].as_str().unwrap().contains("404"),
            "{conn}: {r:#}"
        );
        assert!(
            reach["hint"]
                .as_str()
                .unwrap()
                .contains("relative_url_root"),
            "{conn}: {r:#}"
        );
        for later in ["token_valid", "token_scopes", "projects_found"] {
            assert_eq!(check_named(&r, later)["status"], "skip", "{conn}: {r:#}");
        }
    }

    let out = tokio::time::timeout(
        TIMEOUT,
        Command::new(bin("gitproxy-agent"))
            .arg("check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GITPROXY_BROKER_URL", env.broker.agent_url())
            .env("GITPROXY_ACCESS_KEY", KEY_NOPREFIX)
            .env("GITPROXY_GITLAB_TOKEN", TOKEN)
            .output(),
    )
    .await
    .expect("check hung")
    .expect("check runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("GitLab reachable"))
        .unwrap_or_else(|| panic!("no FAIL line for GitLab reachable:\n{text}"));
    assert!(line.contains("404"), "{text}");
    assert!(text.contains("relative_url_root"), "{text}");
    assert!(
        !text.contains(TOKEN) && !text.contains(KEY_NOPREFIX),
        "{text}"
    );
}

/// Point 2: GitLab names `gitlab.yml`'s port in `Link` (`http://host:443/...`
/// while the agent speaks http to another port). python-gitlab pagination
/// through the front door never leaves the broker, with no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_headers_naming_another_port_stay_on_the_front_door() {
    let env = Env::start(
        |c| c.external_port = Some(443),
        |a| format!("http://{a}"),
        false,
    )
    .await;
    assert_eq!(env.sb.external_url(), "http://127.0.0.1:443");
    let listed = env.seed_listing().await;
    for conn in ["acme", "acme-direct"] {
        for style in ["offset", "keyset"] {
            env.sb.clear_logs();
            assert_eq!(env.python_list(conn, style).await, listed, "{conn} {style}");
            let pages = env
                .sb
                .request_log()
                .into_iter()
                .filter(|(_, p)| p.starts_with("/api/v4/projects?"))
                .count();
            assert!(pages >= 3, "{conn} {style}: {pages} pages");
        }
    }
}

/// Point 10: `git clone https://host/group/project` (no `.git`), the URL
/// GitLab's UI shows: GitLab redirects the handshake to the `.git` path; the
/// redirect's `Location` is rewritten to the front door and git carries on
/// through it (clone and push), under a relative root too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_urls_without_dot_git() {
    let env = Env::start(
        |c| c.relative_url_root = Some(ROOT.into()),
        |a| format!("http://{a}{ROOT}"),
        false,
    )
    .await;
    let pid = {
        let sb = env.sb.clone();
        let uid = env.uid;
        tokio::task::spawn_blocking(move || {
            sb.add_project(ProjectSpec::new("group/project").member(uid, access::DEVELOPER))
        })
        .await
        .expect("seed")
    };
    // Without gitproxy, the sandbox answers as GitLab does.
    let direct = client()
        .get(format!(
            "{}/group/project/info/refs?service=git-upload-pack",
            env.sb.external_url()
        ))
        .send()
        .await
        .expect("sandbox");
    assert_eq!(direct.status(), 301);

    for conn in ["acme", "acme-direct"] {
        let front = env.broker.front(conn);
        // The redirect itself, seen by a client that does not follow it.
        let resp = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("client")
            .get(format!(
                "{front}/group/project/info/refs?service=git-upload-pack"
            ))
            .header("x-gitproxy-key", API_KEY)
            .send()
            .await
            .expect("front door");
        assert_eq!(resp.status(), 301, "{conn}");
        assert_eq!(
            resp.headers()["location"],
            format!("{front}/group/project.git/info/refs?service=git-upload-pack").as_str(),
            "{conn}"
        );
        // Only the handshake: the other `.git`-less git paths are refused.
        let refused = client()
            .post(format!("{front}/group/project/git-upload-pack"))
            .header("x-gitproxy-key", API_KEY)
            .send()
            .await
            .expect("front door");
        assert_eq!(refused.status(), 403, "{conn}");

        let work = tempfile::tempdir().expect("tempdir");
        let url = format!("{front}/group/project");
        git(work.path(), &["clone", "-q", &url, "p"]).await;
        let repo = work.path().join("p");
        assert!(repo.join("README.md").exists());
        let branch = format!("fix/{conn}");
        std::fs::write(repo.join("FIX.md"), conn).expect("write");
        git(&repo, &["checkout", "-q", "-b", &branch]).await;
        git(&repo, &["add", "FIX.md"]).await;
        git(&repo, &["commit", "-q", "-m", "fix"]).await;
        git(&repo, &["push", "-q", "origin", &branch]).await;
        assert_eq!(
            env.sb.read_file(pid, &branch, "FIX.md").expect("pushed"),
            conn.as_bytes()
        );
    }
}
