//! GitLab in the wild (issue 12, points 3–9): releases 14.10 to 17.x, scopes
//! as GitLab grants them, archived and empty projects, non-`main` default
//! branches, rate limits and GitLab's failed-write answers (groups and the
//! write refusals through the front door: gitlab_groups.rs) — against
//! the sandbox GitLab in each shape, with the real broker and agent binaries,
//! through the front door in agent mode and (control plane) direct mode.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::{bin, client, git_with_key, json_call, put_token, WAIT};
use gitproxy_integration_tests::sandbox::{
    access, GitlabVersion, ProjectSpec, RateLimit, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::process::Command;

const API_KEY: &str = "gs-api-key-0123456789abcdef";
const GOOD: &str = "testpat-gs-good-000000000001";
const API_ONLY: &str = "testpat-gs-apionly-00000001";
const EXPIRED: &str = "testpat-gs-expired-0000001";
const REVOKED: &str = "testpat-gs-revoked-0000001";
const NO_WRITE: &str = "testpat-gs-nowrite-0000001";
const NO_PROJECT: &str = "testpat-gs-noproject-00001";
const ALL_SCOPES: [&str; 3] = ["api", "read_repository", "write_repository"];

struct Gitlab {
    sb: Sandbox,
    addr: SocketAddr,
    uid: u64,
    _dir: tempfile::TempDir,
}

impl Gitlab {
    async fn start(cfg: impl FnOnce(SandboxConfig) -> SandboxConfig) -> Gitlab {
        gitproxy_integration_tests::harness::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let (sb, addr) = Sandbox::start(cfg(SandboxConfig::new(dir.path().join("gitlab"))))
            .await
            .expect("sandbox starts");
        let uid = sb.add_user("alice");
        Gitlab {
            sb,
            addr,
            uid,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn api(b: &Broker, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    json_call(method, format!("{}{path}", b.api()), API_KEY, body).await
}

async fn test_conn(b: &Broker, conn: &str) -> Value {
    let (s, v) = api(
        b,
        reqwest::Method::POST,
        &format!("/v1/connections/{conn}/test"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn statuses(report: &Value) -> BTreeMap<String, (String, String)> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["status"].as_str().unwrap().to_string(),
                    c["detail"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// The one failing check: (name, detail, hint).
fn single_failure(report: &Value) -> (String, String, String) {
    let checks = report["checks"].as_array().expect("checks");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(failed.len(), 1, "exactly one failing check: {report:#}");
    assert_eq!(report["ok"], false, "{report:#}");
    let f = failed[0];
    assert!(!f["hint"].as_str().unwrap().is_empty(), "{report:#}");
    (
        f["name"].as_str().unwrap().to_string(),
        f["detail"].as_str().unwrap().to_string(),
        f["hint"].as_str().unwrap().to_string(),
    )
}

async fn set_token(b: &Broker, conn: &str, token: &str) {
    put_token(&b.api(), API_KEY, conn, token).await;
}

async fn agent_check(broker: &Broker, key: &str, token: &str) -> (bool, String) {
    let mut cmd = Command::new(bin("gitproxy-agent"));
    cmd.arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GITPROXY_BROKER_URL", broker.agent_url())
        .env("GITPROXY_ACCESS_KEY", key)
        .env("GITPROXY_GITLAB_TOKEN", token);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("check hung")
        .expect("gitproxy-agent check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn check_line<'a>(out: &'a str, step: &str) -> &'a str {
    out.lines()
        .find(|l| l.get(6..).is_some_and(|r| r.starts_with(step)))
        .unwrap_or_else(|| panic!("no line for {step:?}:\n{out}"))
}

// ---------------------------------------------------------------------------
// Points 3 and 4: GitLab releases and scopes (acceptance 3)
// ---------------------------------------------------------------------------

/// Test Connection and `gitproxy-agent check` on 14.10, 15.3, 16.11 and 17.5:
/// a good token passes everywhere (skip where an old release cannot tell),
/// a token with `api` alone passes, each bad token fails the same single
/// check on every release, in agent and direct mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_connection_works_on_every_gitlab_release() {
    let releases = ["14.10", "15.3", "16.11", "17.5"];
    let mut gitlabs = Vec::new();
    let mut conns = Vec::new();
    for (i, rel) in releases.iter().enumerate() {
        let v: GitlabVersion = rel.parse().unwrap();
        let gl = Gitlab::start(|c| c.version(v)).await;
        let bob = gl.sb.add_user("bob");
        for t in [GOOD, EXPIRED, REVOKED] {
            gl.sb.add_token(TokenSpec::new(t, gl.uid, &ALL_SCOPES));
        }
        gl.sb.expire_token(EXPIRED);
        gl.sb.revoke_token(REVOKED);
        gl.sb.add_token(TokenSpec::new(API_ONLY, gl.uid, &["api"]));
        gl.sb.add_token(TokenSpec::new(
            NO_WRITE,
            gl.uid,
            &["read_api", "read_repository"],
        ));
        gl.sb
            .add_token(TokenSpec::new(NO_PROJECT, bob, &ALL_SCOPES));
        gl.sb
            .add_project(ProjectSpec::new("group/app").member(gl.uid, access::DEVELOPER));
        gl.sb
            .add_project(ProjectSpec::new("group/seen").member(bob, access::REPORTER));
        let url = gl.url();
        conns.push(
            ConnSpec::agent(
                &format!("a{i}"),
                &url,
                &format!("gs-key-{i}-0123456789abcdef"),
            )
            .token(GOOD),
        );
        conns.push(ConnSpec::direct(&format!("d{i}"), &url).token(GOOD));
        gitlabs.push(gl);
    }
    let b = Broker::start(BrokerSpec {
        connections: conns,
        api_keys: vec![API_KEY.into()],
        args: vec!["--data-dir".into(), "{dir}/data".into()],
    })
    .await;
    let mut agents = Vec::new();
    for i in 0..releases.len() {
        agents.push(
            Agent::start(
                &format!("agent-{i}"),
                &b.agent_url(),
                &format!("gs-key-{i}-0123456789abcdef"),
                &[],
            )
            .await,
        );
    }
    for (i, rel) in releases.iter().enumerate() {
        let old = gitlabs[i].sb.gitlab_version() < GitlabVersion::new(15, 5);
        for conn in [format!("a{i}"), format!("d{i}")] {
            for token in [GOOD, API_ONLY] {
                set_token(&b, &conn, token).await;
                let r = test_conn(&b, &conn).await;
                assert_eq!(r["ok"], true, "{rel} {conn} {token}: {r:#}");
                let st = statuses(&r);
                assert!(
                    st["gitlab_reachable"]
                        .1
                        .contains(&format!("GitLab {rel}.0")),
                    "{r:#}"
                );
                assert_eq!(st["token_valid"].0, "pass", "{rel}: {r:#}");
                assert_eq!(st["projects_found"].0, "pass", "{rel}: {r:#}");
                // Old releases cannot show scopes: established by git capability.
                assert_eq!(st["token_scopes"].0, "pass", "{rel}: {r:#}");
                if old {
                    assert!(st["token_scopes"].1.contains("read and write"), "{r:#}");
                } else if token == API_ONLY {
                    assert!(st["token_scopes"].1.contains("recommended"), "{r:#}");
                }
            }
            let cases = [
                (EXPIRED, "token_valid", "expired"),
                (REVOKED, "token_valid", "revoked"),
                (
                    NO_WRITE,
                    "token_scopes",
                    if old { "cannot write" } else { "lacks api" },
                ),
                (NO_PROJECT, "projects_found", "no project"),
            ];
            for (token, check, needle) in cases {
                set_token(&b, &conn, token).await;
                let r = test_conn(&b, &conn).await;
                let (name, detail, _) = single_failure(&r);
                assert_eq!(name, check, "{rel} {conn} {needle}: {r:#}");
                assert!(detail.contains(needle), "{rel} {conn}: {detail}");
            }
        }
        // gitproxy-agent check with the agent's own token.
        let key = format!("gs-key-{i}-0123456789abcdef");
        let (ok, out) = agent_check(&b, &key, GOOD).await;
        assert!(ok, "{rel}:\n{out}");
        assert!(check_line(&out, "token valid").starts_with("ok"), "{out}");
        assert!(check_line(&out, "token scopes").starts_with("ok"), "{out}");
        assert!(
            check_line(&out, "projects found").starts_with("ok"),
            "{out}"
        );
        let (ok, out) = agent_check(&b, &key, EXPIRED).await;
        assert!(!ok, "{out}");
        assert!(check_line(&out, "token valid").starts_with("FAIL"), "{out}");
        assert!(out.contains("expired"), "{out}");
        let (ok, out) = agent_check(&b, &key, NO_WRITE).await;
        assert!(!ok, "{out}");
        assert!(
            check_line(&out, "token valid").starts_with("ok"),
            "{rel}: {out}"
        );
        assert!(
            check_line(&out, "token scopes").starts_with("FAIL"),
            "{rel}: {out}"
        );
    }
    b.proc.assert_no_secrets(&[
        GOOD, API_ONLY, EXPIRED, REVOKED, NO_WRITE, NO_PROJECT, API_KEY,
    ]);
}

/// Point 4: a token with `api` alone reads and writes repositories over git
/// HTTP, through the front door (agent mode); `read_api` + `read_repository`
/// may clone but not push.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_scope_alone_clones_and_pushes() {
    let gl = Gitlab::start(|c| c).await;
    gl.sb.add_token(TokenSpec::new(API_ONLY, gl.uid, &["api"]));
    gl.sb.add_token(TokenSpec::new(
        NO_WRITE,
        gl.uid,
        &["read_api", "read_repository"],
    ));
    gl.sb
        .add_project(ProjectSpec::new("group/app").member(gl.uid, access::DEVELOPER));
    let key = "gs-key-scope-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &gl.url(), key).token(API_ONLY),
            ConnSpec::direct("ro", &gl.url()).token(NO_WRITE),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-scope", &b.agent_url(), key, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let git = |args: &[&str], dir: &std::path::Path| git_with_key(API_KEY, args, dir);
    for (conn, can_push) in [("acme", true), ("ro", false)] {
        let url = format!("{}/group/app.git", b.front(conn));
        let dest = work.path().join(conn);
        let (ok, err) = git(&["clone", &url, dest.to_str().unwrap()], work.path());
        assert!(ok, "{conn} clone: {err}");
        std::fs::write(dest.join("x.txt"), conn).unwrap();
        assert!(git(&["add", "x.txt"], &dest).0);
        assert!(git(&["commit", "-m", "x"], &dest).0);
        let (ok, err) = git(
            &["push", "origin", &format!("HEAD:refs/heads/{conn}-branch")],
            &dest,
        );
        assert_eq!(ok, can_push, "{conn} push: {err}");
        if !can_push {
            assert!(err.contains("not allowed to push"), "{err}");
        }
    }
    let pid = gl.sb.project_id("group/app").unwrap();
    assert!(gl.sb.branches(pid).contains(&"acme-branch".to_string()));
    assert!(!gl.sb.branches(pid).contains(&"ro-branch".to_string()));
}

// ---------------------------------------------------------------------------
// Point 8: rate limits (acceptance 5)
// ---------------------------------------------------------------------------

/// The front door passes GitLab's 429 through unchanged (agent mode), and
/// Test Connection reports `rate_limited` (not a bad token) once GitLab's
/// `Retry-After` exceeds the broker's budget, in agent and direct mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_pass_through_and_exhaust_the_budget() {
    // One request per hour: the second one is refused for ~3600 s.
    let gl = Gitlab::start(|c| c.rate_limit(RateLimit::per(1, 3600))).await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    gl.sb
        .add_project(ProjectSpec::new("group/app").member(gl.uid, access::DEVELOPER));
    let key = "gs-key-rate-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &gl.url(), key).token(GOOD),
            ConnSpec::direct("acme-direct", &gl.url()).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec!["--gitlab-rate-limit-budget".into(), "3s".into()],
    })
    .await;
    let _agent = Agent::start("agent-rate", &b.agent_url(), key, &[]).await;
    let get = |conn: &'static str| {
        let url = format!("{}/api/v4/version", b.front(conn));
        async move {
            tokio::time::timeout(
                WAIT,
                client().get(url).header("x-gitproxy-key", API_KEY).send(),
            )
            .await
            .expect("front door hung")
            .expect("front door answers")
        }
    };
    assert_eq!(get("acme").await.status(), 200);
    let r = get("acme").await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    assert!(h.get("x-gitproxy-error").is_none(), "{h:?}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 3000, "{h:?}");
    for k in [
        "ratelimit-limit",
        "ratelimit-observed",
        "ratelimit-remaining",
        "ratelimit-reset",
        "ratelimit-resettime",
    ] {
        assert!(h.contains_key(k), "{k} missing: {h:?}");
    }
    assert_eq!(h["ratelimit-limit"], "1");
    assert_eq!(r.text().await.unwrap(), "Retry later\n");

    for conn in ["acme", "acme-direct"] {
        let before = gl.sb.throttled();
        let report = test_conn(&b, conn).await;
        let (_, detail, hint) = single_failure(&report);
        assert!(detail.starts_with("rate_limited"), "{conn}: {report:#}");
        assert!(hint.contains("GITPROXY_GITLAB_RATE_LIMIT_BUDGET"), "{hint}");
        assert!(!detail.contains("does not accept the token"), "{detail}");
        // Refused once, then no retry: 3600 s is beyond the 3 s budget.
        assert_eq!(gl.sb.throttled(), before + 1, "{conn}");
    }
    b.proc.assert_no_secrets(&[GOOD, API_KEY, key]);
}

/// A catalogue of 500 projects completes, exactly, under a throttle of 2
/// requests per second: every 429 is waited out within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalogue_of_500_completes_under_a_throttle() {
    let gl = Gitlab::start(|c| c.rate_limit(RateLimit::per(2, 1))).await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let mut specs = Vec::new();
    for i in 0..510 {
        let level = if i < 500 {
            [access::DEVELOPER, access::MAINTAINER, access::OWNER][i % 3]
        } else {
            access::REPORTER
        };
        specs.push(
            ProjectSpec::new(format!("big/p{i:03}"))
                .member(gl.uid, level)
                .empty(),
        );
    }
    let ids = gl.sb.add_projects(&specs).expect("projects");
    let expected: BTreeMap<u64, u64> = ids[..500]
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, [30, 40, 50][i % 3]))
        .collect();
    let key = "gs-key-big-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &gl.url(), key).token(GOOD),
            ConnSpec::direct("acme-direct", &gl.url()).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-big", &b.agent_url(), key, &[]).await;
    for conn in ["acme", "acme-direct"] {
        let (s, v) = api(
            &b,
            reqwest::Method::GET,
            &format!("/v1/connections/{conn}/projects"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let got: BTreeMap<u64, u64> = v["projects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap(),
                    p["access_level"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, expected, "{conn}");
        assert_eq!(v["count"], 500);
    }
    assert!(
        gl.sb.throttled() > 0,
        "the throttle never refused a request"
    );
}

// ---------------------------------------------------------------------------
// Points 5, 6 and 9: archived and empty projects, default branches, failed writes
// ---------------------------------------------------------------------------

/// The catalogue leaves archived projects out unless asked and marks them;
/// Test Connection counts only projects where an MR can be opened; an MR on
/// an archived or empty project fails fast with its code before any write;
/// projects whose default branch is `master`, `develop` or `trunk` work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archived_empty_and_default_branches() {
    let gl = Gitlab::start(|c| c).await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let dev = |p: &str| ProjectSpec::new(p).member(gl.uid, access::DEVELOPER);
    let active = gl.sb.add_project(dev("g/active"));
    let archived = gl.sb.add_project(dev("g/old").archived());
    let empty = gl.sb.add_project(dev("g/blank").empty());
    let mut by_branch = Vec::new();
    for br in ["master", "develop", "trunk"] {
        by_branch.push((
            br,
            gl.sb
                .add_project(dev(&format!("g/on-{br}")).default_branch(br)),
        ));
    }
    let key = "gs-key-shapes-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &gl.url(), key).token(GOOD),
            ConnSpec::direct("acme-direct", &gl.url()).token(GOOD),
        ],
        api_keys: vec![API_KEY.into()],
        args: vec!["--data-dir".into(), "{dir}/data".into()],
    })
    .await;
    let _agent = Agent::start("agent-shapes", &b.agent_url(), key, &[]).await;
    for conn in ["acme", "acme-direct"] {
        let list = |q: &'static str| {
            let b = &b;
            async move {
                let (s, v) = api(
                    b,
                    reqwest::Method::GET,
                    &format!("/v1/connections/{conn}/projects{q}"),
                    None,
                )
                .await;
                assert_eq!(s, 200, "{v}");
                v["projects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p["id"].as_u64().unwrap(), p.clone()))
                    .collect::<BTreeMap<u64, Value>>()
            }
        };
        let plain = list("").await;
        assert!(!plain.contains_key(&archived), "{plain:?}");
        assert_eq!(plain.len(), 5);
        assert_eq!(plain[&empty]["empty_repo"], true);
        assert_eq!(plain[&active]["archived"], false);
        let all = list("?include_archived=true").await;
        assert_eq!(all.len(), 6);
        assert_eq!(all[&archived]["archived"], true);
        let (s, v) = api(
            &b,
            reqwest::Method::GET,
            &format!("/v1/connections/{conn}/projects?include_archived=perhaps"),
            None,
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));

        let r = test_conn(&b, conn).await;
        let st = statuses(&r);
        assert_eq!(st["projects_found"].0, "pass", "{r:#}");
        assert!(st["projects_found"].1.starts_with("5 project(s)"), "{r:#}");

        // Archived and empty: the named code, and no write reached GitLab.
        for (project, code) in [
            ("g/old", "project_archived"),
            ("g/blank", "empty_repository"),
        ] {
            gl.sb.clear_logs();
            let (s, v) = api(
                &b,
                reqwest::Method::POST,
                &format!("/v1/connections/{conn}/merge-requests"),
                Some(json!({
                    "project": project,
                    "source_branch": format!("fix-{conn}"),
                    "title": "Fix",
                    "changes": [{"path": "a.txt", "content": "a"}],
                })),
            )
            .await;
            assert_eq!(s, 409, "{v}");
            assert_eq!(v["error"], code, "{v}");
            assert!(!v["hint"].as_str().unwrap().is_empty());
            let writes: Vec<_> = gl
                .sb
                .request_log()
                .into_iter()
                .filter(|(m, _)| m != "GET" && m != "HEAD")
                .collect();
            assert!(writes.is_empty(), "{writes:?}");
        }
        assert!(gl.sb.branches(empty).is_empty());
        assert_eq!(gl.sb.branches(archived), ["main"]);

        // Default branches other than main.
        for (br, pid) in &by_branch {
            let (s, v) = api(
                &b,
                reqwest::Method::POST,
                &format!("/v1/connections/{conn}/merge-requests"),
                Some(json!({
                    "project": pid,
                    "source_branch": format!("fix-{conn}"),
                    "title": "Fix",
                    "changes": [{"path": "README.md", "content": "fixed"}],
                })),
            )
            .await;
            assert_eq!(s, 201, "{br}: {v}");
            assert_eq!(v["merge_request"]["target_branch"], *br, "{v}");
            assert_eq!(
                gl.sb.read_file(*pid, &format!("fix-{conn}"), "README.md"),
                Some(b"fixed".to_vec())
            );
        }
    }
}

/// An archived project refuses git pushes through the front door (agent
/// mode) with GitLab's own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archived_project_refuses_pushes() {
    let gl = Gitlab::start(|c| c).await;
    gl.sb.add_token(TokenSpec::new(GOOD, gl.uid, &ALL_SCOPES));
    let pid = gl
        .sb
        .add_project(ProjectSpec::new("g/app").member(gl.uid, access::MAINTAINER));
    let key = "gs-key-push-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &gl.url(), key).token(GOOD)],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-push", &b.agent_url(), key, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let git = |args: &[&str], dir: &std::path::Path| git_with_key(API_KEY, args, dir);
    let dest = work.path().join("app");
    let url = format!("{}/g/app.git", b.front("acme"));
    assert!(git(&["clone", &url, dest.to_str().unwrap()], work.path()).0);
    std::fs::write(dest.join("x.txt"), "x").unwrap();
    assert!(git(&["add", "x.txt"], &dest).0);
    assert!(git(&["commit", "-m", "x"], &dest).0);
    gl.sb.set_archived(pid, true);
    let (ok, err) = git(&["push", "origin", "HEAD:refs/heads/topic"], &dest);
    assert!(!ok);
    assert!(
        err.contains("You are not allowed to push code to an archived project."),
        "{err}"
    );
    gl.sb.set_archived(pid, false);
    let (ok, err) = git(&["push", "origin", "HEAD:refs/heads/topic"], &dest);
    assert!(ok, "{err}");
}
