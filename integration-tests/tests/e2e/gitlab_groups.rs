//! GitLab groups and bots (issue 12, point 7, acceptance 4) and GitLab's own
//! answers to failed writes (point 9), against the sandbox GitLab with the real
//! broker and agent binaries, through the front door in agent mode (the
//! catalogue also in direct mode).
//!
//! The expected catalogues are written out by hand below from the membership
//! tree this file seeds, one line per project with the route that gives the
//! level, so they do not share any code with the sandbox's model or the
//! broker's query.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::{client, git_with_key, json_call, put_token};
use gitproxy_integration_tests::sandbox::{
    access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const API_KEY: &str = "gg-api-key-0123456789abcdef";
const ALICE: &str = "testpat-gg-alice-0000000001";
const GROUP_BOT: &str = "testpat-gg-groupbot-000001";
const SERVICE: &str = "testpat-gg-service-0000001";
const SCOPES: [&str; 3] = ["api", "read_repository", "write_repository"];

/// The broker's connection API.
async fn api(b: &Broker, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    json_call(method, format!("{}{path}", b.api()), API_KEY, body).await
}

/// GitLab's API through the front door (the broker adds the connection's token).
async fn front(
    b: &Broker,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    json_call(
        method,
        format!("{}/api/v4{path}", b.front("acme")),
        API_KEY,
        body,
    )
    .await
}

/// `path_with_namespace -> access_level` of a catalogue, checking `count`.
async fn catalogue(b: &Broker, conn: &str, query: &str) -> BTreeMap<String, u64> {
    let (s, v) = api(
        b,
        reqwest::Method::GET,
        &format!("/v1/connections/{conn}/projects{query}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let got: BTreeMap<String, u64> = v["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .map(|p| {
            (
                p["path_with_namespace"].as_str().unwrap().to_string(),
                p["access_level"].as_u64().expect("access_level"),
            )
        })
        .collect();
    assert_eq!(v["count"].as_u64(), Some(got.len() as u64), "{v}");
    got
}

fn expect(rows: &[(&str, u64)]) -> BTreeMap<String, u64> {
    rows.iter().map(|(p, l)| (p.to_string(), *l)).collect()
}

async fn set_token(b: &Broker, conn: &str, token: &str) {
    put_token(&b.api(), API_KEY, conn, token).await;
}

/// The tree (alice is a person; the group bot and the service account are bots):
///
/// ```text
/// acme                  alice Reporter
/// ├── acme/website      project: alice Developer (direct)
/// ├── acme/handbook     project: service account Maintainer (direct)
/// └── acme/platform     alice Maintainer
///     ├── acme/platform/api      project: alice Developer (direct)
///     ├── acme/platform/legacy   project, archived
///     ├── acme/platform/empty    project, no commit
///     └── acme/platform/infra    subgroup
///         └── acme/platform/infra/terraform
/// security              alice Owner, service account Developer
/// └── security/scanner
/// partners              shared with `security` at Developer; group access token (bot) Maintainer
/// ├── partners/sdk
/// └── partners/tools/cli
/// corp                  alice Developer (no project)
/// └── corp/ops          subgroup (alice inherits; not a direct member)
/// ext                   shared with `corp/ops` at Owner
/// └── ext/tool
/// tools                 nobody
/// ├── tools/linter      project shared with `acme/platform` at Owner
/// └── tools/docs        project shared with `acme` at Owner
/// misc/guest-only       project: alice Guest (direct)
/// ```
fn seed(sb: &Sandbox) -> (u64, u64) {
    let alice = sb.add_user("alice");
    sb.add_token(TokenSpec::new(ALICE, alice, &SCOPES));
    let svc = sb.add_service_account("svc-scanner");
    sb.add_token(TokenSpec::new(SERVICE, svc, &SCOPES));
    let g = |p: &str| sb.add_group(p).expect("group");
    let acme = g("acme");
    let platform = g("acme/platform");
    g("acme/platform/infra");
    let security = g("security");
    let partners = g("partners");
    g("partners/tools");
    let corp = g("corp");
    let ops = g("corp/ops");
    let ext = g("ext");
    g("tools");
    g("misc");
    sb.add_group_member(acme, alice, access::REPORTER);
    sb.add_group_member(platform, alice, access::MAINTAINER);
    sb.add_group_member(security, alice, access::OWNER);
    sb.add_group_member(security, svc, access::DEVELOPER);
    sb.add_group_member(corp, alice, access::DEVELOPER);
    sb.share_group(partners, security, access::DEVELOPER);
    sb.share_group(ext, ops, access::OWNER);
    let bot = sb.add_group_access_token(partners, GROUP_BOT, access::MAINTAINER, &SCOPES);
    let specs = [
        ProjectSpec::new("acme/website").member(alice, access::DEVELOPER),
        ProjectSpec::new("acme/handbook").member(svc, access::MAINTAINER),
        ProjectSpec::new("acme/platform/api").member(alice, access::DEVELOPER),
        ProjectSpec::new("acme/platform/legacy").archived(),
        ProjectSpec::new("acme/platform/empty").empty(),
        ProjectSpec::new("acme/platform/infra/terraform"),
        ProjectSpec::new("security/scanner"),
        ProjectSpec::new("partners/sdk"),
        ProjectSpec::new("partners/tools/cli").default_branch("master"),
        ProjectSpec::new("ext/tool"),
        ProjectSpec::new("tools/linter"),
        ProjectSpec::new("tools/docs"),
        ProjectSpec::new("misc/guest-only").member(alice, access::GUEST),
    ];
    let ids: BTreeMap<String, u64> = specs
        .iter()
        .map(|s| s.path_with_namespace.clone())
        .zip(sb.add_projects(&specs).expect("projects"))
        .collect();
    let id = |p: &str| ids[p];
    sb.share_project(id("tools/linter"), platform, access::OWNER);
    sb.share_project(id("tools/docs"), acme, access::OWNER);
    (alice, bot)
}

/// The catalogue over a group tree equals, exactly and with effective access
/// levels, what GitLab's membership rules give each token: a person, a group
/// access token's bot and a service account; agent and direct mode. The raw
/// listing through the front door shows GitLab's `permissions` (direct
/// memberships only), and git works at the inherited and shared levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalogue_over_a_group_tree() {
    gitproxy_integration_tests::harness::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let (_alice, _bot) = seed(&sb);
    let url = format!("http://{addr}");
    let key = "gg-key-groups-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &url, key).token(ALICE),
            ConnSpec::direct("acme-direct", &url).token(ALICE),
        ],
        api_keys: vec![API_KEY.into()],
        // Token rotation over the API needs a data directory.
        args: vec!["--data-dir".into(), "{dir}/data".into()],
    })
    .await;
    let _agent = Agent::start("agent-groups", &b.agent_url(), key, &[]).await;

    // alice, by route:
    let alice = expect(&[
        ("acme/website", 30),                  // direct Developer (acme: Reporter)
        ("acme/platform/api", 40),             // acme/platform Maintainer beats direct Developer
        ("acme/platform/empty", 40),           // acme/platform Maintainer (empty repository)
        ("acme/platform/infra/terraform", 40), // inherited two levels down from acme/platform
        ("security/scanner", 50),              // security Owner
        ("partners/sdk", 30), // partners shared with security at Developer: min(50, 30)
        ("partners/tools/cli", 30), // the share reaches partners' subgroups
        ("tools/linter", 40), // shared with acme/platform at Owner: min(40, 50)
                              // Not listed: acme/handbook and tools/docs (Reporter through acme),
                              // misc/guest-only (Guest), ext/tool (shared with corp/ops, of which
                              // alice is only an inherited member: a share reaches direct members),
                              // acme/platform/legacy (archived).
    ]);
    for conn in ["acme", "acme-direct"] {
        assert_eq!(catalogue(&b, conn, "").await, alice, "{conn}");
    }
    let mut with_archived = alice.clone();
    with_archived.insert("acme/platform/legacy".into(), 40);
    assert_eq!(
        catalogue(&b, "acme", "?include_archived=true").await,
        with_archived
    );

    // GitLab's raw listing through the front door: the same set, and
    // `permissions` showing direct memberships only (null through a share).
    let (s, v) = front(
        &b,
        reqwest::Method::GET,
        "/projects?membership=true&min_access_level=30&archived=false&per_page=100",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let rows = v.as_array().expect("list");
    let perms = |path: &str| {
        let p = rows
            .iter()
            .find(|p| p["path_with_namespace"] == path)
            .unwrap_or_else(|| panic!("{path} not listed: {v}"));
        let lvl = |k: &str| p["permissions"][k]["access_level"].as_u64();
        (lvl("project_access"), lvl("group_access"))
    };
    assert_eq!(rows.len(), alice.len());
    assert_eq!(perms("acme/platform/api"), (Some(30), Some(40)));
    assert_eq!(perms("acme/website"), (Some(30), Some(20)));
    assert_eq!(perms("acme/platform/infra/terraform"), (None, Some(40)));
    assert_eq!(perms("partners/sdk"), (None, None));
    assert_eq!(perms("tools/linter"), (None, None));
    let (s, v) = front(
        &b,
        reqwest::Method::GET,
        "/projects?min_access_level=50",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let owned: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["path_with_namespace"].as_str())
        .collect();
    assert_eq!(owned, ["security/scanner"]);

    // The group access token's bot: partners' projects at the token's level.
    set_token(&b, "acme", GROUP_BOT).await;
    assert_eq!(
        catalogue(&b, "acme", "").await,
        expect(&[("partners/sdk", 40), ("partners/tools/cli", 40)])
    );
    let (s, v) = front(&b, reqwest::Method::GET, "/user", None).await;
    assert_eq!((s, &v["bot"]), (200, &json!(true)), "{v}");

    // The service account: direct project membership, a group, and that
    // group's share.
    set_token(&b, "acme", SERVICE).await;
    assert_eq!(
        catalogue(&b, "acme", "").await,
        expect(&[
            ("acme/handbook", 40),      // direct Maintainer
            ("security/scanner", 30),   // security Developer
            ("partners/sdk", 30),       // partners shared with security: min(30, 30)
            ("partners/tools/cli", 30), // ... and its subgroups
        ])
    );
    let (s, v) = front(&b, reqwest::Method::GET, "/user", None).await;
    assert_eq!((s, &v["bot"]), (200, &json!(true)), "{v}");

    // Test Connection counts projects by any route.
    set_token(&b, "acme", ALICE).await;
    let (s, v) = api(&b, reqwest::Method::POST, "/v1/connections/acme/test", None).await;
    assert_eq!((s, &v["ok"]), (200, &json!(true)), "{v}");

    // git at inherited and shared levels: alice clones terraform (inherited)
    // and pushes a branch to partners/sdk (Developer through the share).
    let work = tempfile::tempdir().unwrap();
    let dest = clone_and_commit(&b, "partners/sdk", work.path());
    let (ok, err) = git(&["push", "origin", "HEAD:refs/heads/fix"], &dest);
    assert!(ok, "{err}");
    let tf = work.path().join("tf");
    let (ok, err) = git(
        &[
            "clone",
            &format!("{}/acme/platform/infra/terraform.git", b.front("acme")),
            tf.to_str().unwrap(),
        ],
        work.path(),
    );
    assert!(ok, "{err}");
    let (ok, err) = git(
        &[
            "clone",
            &format!("{}/ext/tool.git", b.front("acme")),
            work.path().join("no").to_str().unwrap(),
        ],
        work.path(),
    );
    assert!(!ok, "ext/tool must not be reachable");
    assert!(err.contains("could not be found"), "{err}");
    b.proc
        .assert_no_secrets(&[ALICE, GROUP_BOT, SERVICE, API_KEY, key]);
}

/// git through the front door (the broker adds the token).
fn git(args: &[&str], dir: &Path) -> (bool, String) {
    git_with_key(API_KEY, args, dir)
}

/// Clones `project` through the front door into `work` and commits a file on
/// top; the clone's directory.
fn clone_and_commit(b: &Broker, project: &str, work: &Path) -> std::path::PathBuf {
    let dest = work.join(project.replace('/', "_"));
    let url = format!("{}/{project}.git", b.front("acme"));
    let (ok, err) = git(&["clone", &url, dest.to_str().unwrap()], work);
    assert!(ok, "{err}");
    std::fs::write(dest.join("new.txt"), "new").unwrap();
    assert!(git(&["add", "new.txt"], &dest).0);
    assert!(git(&["commit", "-m", "new"], &dest).0);
    dest
}

/// GitLab's answers to failed writes reach callers unchanged through the
/// front door (agent mode) — a push to a protected branch, a commit to it,
/// a file that already exists, an MR from a missing branch — and the
/// broker's merge-request flow names the protected-branch refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_writes_as_gitlab_answers_them() {
    gitproxy_integration_tests::harness::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let dev = sb.add_user("dev");
    sb.add_token(TokenSpec::new(ALICE, dev, &SCOPES));
    let grp = sb.add_group("team").expect("group");
    // Developer through the group: may push branches, not the protected default branch.
    sb.add_group_member(grp, dev, access::DEVELOPER);
    let pid = sb.add_project(ProjectSpec::new("team/app"));
    let url = format!("http://{addr}");
    let key = "gg-key-writes-0123456789abcdef";
    let b = Broker::start(BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &url, key).token(ALICE)],
        api_keys: vec![API_KEY.into()],
        args: vec![],
    })
    .await;
    let _agent = Agent::start("agent-writes", &b.agent_url(), key, &[]).await;

    // git push to the protected default branch: GitLab's pre-receive refusal.
    let work = tempfile::tempdir().unwrap();
    let dest = clone_and_commit(&b, "team/app", work.path());
    let (ok, err) = git(&["push", "origin", "HEAD:refs/heads/main"], &dest);
    assert!(!ok);
    assert!(
        err.contains("remote: GitLab: You are not allowed to push code to protected branches on this project.")
            && err.contains("pre-receive hook declined"),
        "{err}"
    );
    let (ok, err) = git(&["push", "origin", "HEAD:refs/heads/develop"], &dest);
    assert!(ok, "{err}");

    let commit = |branch: &str, start: Option<&str>, action: &str, file: &str| {
        let mut body = json!({
            "branch": branch,
            "commit_message": "m",
            "actions": [{"action": action, "file_path": file, "content": "c"}],
        });
        if let Some(s) = start {
            body["start_branch"] = json!(s);
        }
        body
    };
    let path = format!("/projects/{pid}/repository/commits");
    // The commits API on the protected branch: 403 with GitLab's message.
    let (s, v) = front(
        &b,
        reqwest::Method::POST,
        &path,
        Some(commit("main", None, "update", "README.md")),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            403,
            json!({"message": "You are not allowed to push into this branch"})
        )
    );
    // Creating a file that exists: 400.
    let (s, v) = front(
        &b,
        reqwest::Method::POST,
        &path,
        Some(commit("topic", Some("main"), "create", "README.md")),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            400,
            json!({"message": "A file with this name already exists"})
        )
    );
    // An MR from a branch that does not exist: 422, a list of messages.
    let (s, v) = front(
        &b,
        reqwest::Method::POST,
        &format!("/projects/{pid}/merge_requests"),
        Some(json!({"source_branch": "nope", "target_branch": "main", "title": "t"})),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            422,
            json!({"message": ["Source branch \"nope\" does not exist"]})
        )
    );

    // The broker's MR flow onto `develop` from `source`.
    let open_mr = |source: &'static str| {
        api(
            &b,
            reqwest::Method::POST,
            "/v1/connections/acme/merge-requests",
            Some(json!({
                "project": "team/app",
                "source_branch": source,
                "target_branch": "develop",
                "title": "t",
                "changes": [{"path": "a.txt", "content": "a"}],
            })),
        )
    };
    // Asked to commit to the protected branch: a named error.
    let (s, v) = open_mr("main").await;
    assert_eq!((s, &v["error"]), (409, &json!("branch_protected")), "{v}");
    assert!(
        v["hint"].as_str().unwrap_or("").contains("source_branch"),
        "{v}"
    );
    // With a branch of its own, the same Developer (through the group) opens the MR.
    let (s, v) = open_mr("fix-a").await;
    assert_eq!((s, &v["created"]), (201, &json!(true)), "{v}");
    assert_eq!(
        sb.read_file(pid, "fix-a", "a.txt").as_deref(),
        Some(&b"a"[..])
    );
    b.proc.assert_no_secrets(&[ALICE, API_KEY, key]);
}

/// `gitlab-sandbox --groups` seeds what `demo::seed_groups` documents: each
/// token's effective levels, read from GitLab's own `min_access_level`
/// listings (no broker involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_scenario_is_what_it_documents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let g = demo::seed_groups(&sb, "testpat-gg-scenario-00001").expect("seed");
    let levels = |token: String| async move {
        let mut out = BTreeMap::new();
        for min in [30u64, 40, 50] {
            let url = format!("http://{addr}/api/v4/projects?min_access_level={min}&per_page=100");
            let text = client()
                .get(url)
                .header("private-token", &token)
                .send()
                .await
                .expect("sandbox answers")
                .text()
                .await
                .expect("body");
            let v: Value = serde_json::from_str(&text).expect("JSON");
            for p in v.as_array().expect("list") {
                out.insert(p["path_with_namespace"].as_str().unwrap().to_string(), min);
            }
        }
        out
    };
    assert_eq!(
        levels(g.token.clone()).await,
        expect(&[
            ("platform/backend/api", 30),
            ("platform/new", 30),
            ("platform/old", 30),
            ("platform/web", 40),
            ("security/audit", 30),
        ])
    );
    assert_eq!(
        levels(g.group_token.clone()).await,
        expect(&[
            ("platform/backend/api", 40),
            ("platform/new", 40),
            ("platform/old", 40),
            ("platform/web", 40),
            ("security/audit", 40),
        ])
    );
    assert_eq!(
        levels(g.service_token.clone()).await,
        expect(&[("security/audit", 30), ("security/internal", 30)])
    );
}
