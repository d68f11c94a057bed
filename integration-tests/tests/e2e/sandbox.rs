//! Tests of the sandbox GitLab itself: pagination, token errors, repository API, merge
//! requests and git smart HTTP with the real `git` CLI.

use std::process::Command;

use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use serde_json::{json, Value};

struct Env {
    sb: Sandbox,
    base: String,
    _dir: tempfile::TempDir,
}

async fn start(external_url: Option<&str>) -> Env {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = SandboxConfig::new(dir.path().join("repos"));
    cfg.external_url = external_url.map(str::to_string);
    let (sb, addr) = Sandbox::start(cfg).await.expect("sandbox starts");
    Env {
        sb,
        base: format!("http://{addr}"),
        _dir: dir,
    }
}

/// JSON bodies without reqwest's `json` feature.
trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
}

async fn jv(r: reqwest::Response) -> Value {
    let bytes = r.bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

async fn jlist(r: reqwest::Response) -> Vec<Value> {
    match jv(r).await {
        Value::Array(a) => a,
        other => panic!("expected a JSON array, got {other}"),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(env: &Env, token: Option<&str>, path: &str) -> reqwest::Response {
    let mut rb = client().get(format!("{}{path}", env.base));
    if let Some(t) = token {
        rb = rb.header("PRIVATE-TOKEN", t);
    }
    rb.send().await.expect("request")
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// User `alice` with an `api` token `tok-api` and `n` projects `grp/p<i>` at mixed levels.
fn seed(sb: &Sandbox, n: usize) -> (u64, Vec<u64>) {
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(
        "tok-api",
        uid,
        &["api", "read_repository", "write_repository"],
    ));
    let levels = [
        access::GUEST,
        access::REPORTER,
        access::DEVELOPER,
        access::MAINTAINER,
    ];
    let ids = (0..n)
        .map(|i| {
            sb.add_project(
                ProjectSpec::new(format!("grp/p{i}")).member(uid, levels[i % levels.len()]),
            )
        })
        .collect();
    (uid, ids)
}

#[tokio::test]
async fn offset_pagination_headers_use_external_url() {
    let env = start(Some("https://gitlab.example.com")).await;
    let (_, ids) = seed(&env.sb, 7);
    let r = get(
        &env,
        Some("tok-api"),
        "/api/v4/projects?membership=true&order_by=id&sort=asc&per_page=3&page=2",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-page").as_deref(), Some("2"));
    assert_eq!(header(&r, "x-per-page").as_deref(), Some("3"));
    assert_eq!(header(&r, "x-next-page").as_deref(), Some("3"));
    assert_eq!(header(&r, "x-prev-page").as_deref(), Some("1"));
    assert_eq!(header(&r, "x-total").as_deref(), Some("7"));
    assert_eq!(header(&r, "x-total-pages").as_deref(), Some("3"));
    let u = |p: u32| {
        format!("https://gitlab.example.com/api/v4/projects?membership=true&order_by=id&page={p}&per_page=3&sort=asc")
    };
    assert_eq!(
        header(&r, "link").unwrap(),
        format!(
            "<{}>; rel=\"prev\", <{}>; rel=\"next\", <{}>; rel=\"first\", <{}>; rel=\"last\"",
            u(1),
            u(3),
            u(1),
            u(3)
        )
    );
    let body: Vec<Value> = jlist(r).await;
    let got: Vec<u64> = body.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(got, ids[3..6].to_vec());
    assert_eq!(
        body[0]["http_url_to_repo"],
        json!("https://gitlab.example.com/grp/p3.git")
    );
    assert_eq!(
        body[0]["web_url"],
        json!("https://gitlab.example.com/grp/p3")
    );
    assert_eq!(
        body[0]["permissions"]["project_access"]["access_level"],
        json!(40)
    );

    // Last page: empty X-Next-Page, no rel="next".
    let r = get(
        &env,
        Some("tok-api"),
        "/api/v4/projects?order_by=id&sort=asc&per_page=3&page=3",
    )
    .await;
    assert_eq!(header(&r, "x-next-page").as_deref(), Some(""));
    assert!(!header(&r, "link").unwrap().contains("rel=\"next\""));

    // min_access_level: Developer+ -> p2, p3, p6.
    let r = get(
        &env,
        Some("tok-api"),
        "/api/v4/projects?membership=true&min_access_level=30&order_by=id&sort=asc",
    )
    .await;
    let body: Vec<Value> = jlist(r).await;
    let names: Vec<&str> = body.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["p2", "p3", "p6"]);

    // search + default sort (created_at desc).
    let r = get(&env, Some("tok-api"), "/api/v4/projects?search=P1").await;
    let body: Vec<Value> = jlist(r).await;
    assert_eq!(body.len(), 1);
    assert_eq!(body[0]["path_with_namespace"], json!("grp/p1"));
}

#[tokio::test]
async fn keyset_pagination_follows_next_links() {
    let env = start(None).await;
    let (_, ids) = seed(&env.sb, 7);
    let mut url = format!(
        "{}/api/v4/projects?pagination=keyset&order_by=id&sort=asc&per_page=3",
        env.base
    );
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = client()
            .get(&url)
            .header("PRIVATE-TOKEN", "tok-api")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(header(&r, "x-total").is_none());
        assert!(header(&r, "x-total-pages").is_none());
        let link = header(&r, "link");
        let body: Vec<Value> = jlist(r).await;
        seen.extend(body.iter().map(|p| p["id"].as_u64().unwrap()));
        pages += 1;
        match link {
            Some(l) => {
                assert!(l.ends_with("; rel=\"next\""), "{l}");
                assert!(l.contains("id_after="), "{l}");
                url = l
                    .trim_start_matches('<')
                    .split(">;")
                    .next()
                    .unwrap()
                    .to_string();
                assert!(url.starts_with(&env.base), "{url}");
            }
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);

    let r = get(
        &env,
        Some("tok-api"),
        "/api/v4/projects?pagination=keyset&order_by=name",
    )
    .await;
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn token_errors_match_gitlab() {
    let env = start(None).await;
    let (uid, ids) = seed(&env.sb, 1);
    let sb = &env.sb;
    sb.add_token(TokenSpec::new("tok-read-repo", uid, &["read_repository"]));
    sb.add_token(TokenSpec::new("tok-expired", uid, &["api"]));
    sb.expire_token("tok-expired");
    sb.add_token(TokenSpec::new("tok-revoked", uid, &["api"]));
    sb.revoke_token("tok-revoked");

    let r = get(&env, None, "/api/v4/user").await;
    assert_eq!(r.status(), 401);
    assert_eq!(jv(r).await, json!({"message": "401 Unauthorized"}));

    let r = get(&env, Some("nope"), "/api/v4/user").await;
    assert_eq!(r.status(), 401);
    assert_eq!(jv(r).await, json!({"message": "401 Unauthorized"}));

    let r = get(&env, Some("tok-expired"), "/api/v4/projects").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        jv(r).await,
        json!({"error": "invalid_token", "error_description": "Token has expired."})
    );

    let r = get(&env, Some("tok-revoked"), "/api/v4/projects").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        jv(r).await,
        json!({"error": "invalid_token", "error_description": "Token was revoked. You have to re-authorize from the user."})
    );

    let r = get(&env, Some("tok-read-repo"), "/api/v4/projects").await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        jv(r).await,
        json!({
            "error": "insufficient_scope",
            "error_description": "The request requires higher privileges than provided by the access token.",
            "scope": "api read_api"
        })
    );

    // Bearer works too; /personal_access_tokens/self answers for any scope.
    let r = client()
        .get(format!("{}/api/v4/personal_access_tokens/self", env.base))
        .bearer_auth("tok-read-repo")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = jv(r).await;
    assert_eq!(v["scopes"], json!(["read_repository"]));
    assert_eq!(v["active"], json!(true));
    assert_eq!(v["revoked"], json!(false));
    assert_eq!(v["user_id"], json!(uid));

    let r = get(&env, Some("tok-api"), "/api/v4/user").await;
    let v: Value = jv(r).await;
    assert_eq!(v["username"], json!("alice"));
    assert_eq!(v["state"], json!("active"));

    let r = get(&env, Some("tok-api"), "/api/v4/version").await;
    assert_eq!(jv(r).await["version"], json!("17.5.0-ee"));

    // Unknown route, unknown project, guest write.
    let r = get(&env, Some("tok-api"), "/api/v4/nothing/here").await;
    assert_eq!(r.status(), 404);
    assert_eq!(jv(r).await, json!({"error": "404 Not Found"}));
    let r = get(&env, Some("tok-api"), "/api/v4/projects/grp%2Fmissing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(jv(r).await, json!({"message": "404 Project Not Found"}));
    let r = client()
        .post(format!(
            "{}/api/v4/projects/{}/repository/branches",
            env.base, ids[0]
        ))
        .header("PRIVATE-TOKEN", "tok-api")
        .json_body(&json!({"branch": "x", "ref": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "guest may not create branches");
    assert_eq!(jv(r).await, json!({"message": "403 Forbidden"}));

    let seen = sb.seen_tokens();
    assert!(seen.contains(&"tok-expired".to_string()));
    assert!(seen.contains(&"tok-read-repo".to_string()));
    assert!(sb
        .request_log()
        .contains(&("GET".to_string(), "/api/v4/nothing/here".to_string())));
}

#[tokio::test]
async fn commits_api_files_branches_and_merge_requests() {
    let env = start(None).await;
    let uid = env.sb.add_user("bob");
    env.sb.add_token(TokenSpec::new("tok-bob", uid, &["api"]));
    let pid = env.sb.add_project(
        ProjectSpec::new("acme/webapp")
            .member(uid, access::DEVELOPER)
            .file(
                "package.json",
                "{\"dependencies\":{\"lodash\":\"4.17.15\"}}\n",
            ),
    );
    let c = client();
    let api = |p: &str| format!("{}/api/v4/projects/acme%2Fwebapp{p}", env.base);

    // File read by path-encoded project id.
    let r = c
        .get(api("/repository/files/package.json?ref=main"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = jv(r).await;
    assert_eq!(v["encoding"], json!("base64"));
    assert_eq!(v["file_path"], json!("package.json"));

    // Developer cannot commit onto the protected default branch.
    let r = c
        .post(api("/repository/commits"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&json!({"branch": "main", "commit_message": "x", "actions": [{"action": "update", "file_path": "package.json", "content": "{}"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Commit onto a new branch started from main.
    let new = "{\"dependencies\":{\"lodash\":\"4.17.21\"}}\n";
    let r = c
        .post(api("/repository/commits"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&json!({
            "branch": "fix/lodash",
            "start_branch": "main",
            "commit_message": "Bump lodash\n\nSecurity fix.",
            "actions": [
                {"action": "update", "file_path": "package.json", "content": new},
                {"action": "create", "file_path": "docs/NOTE.md", "content": "bm90ZQ==", "encoding": "base64"}
            ]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let commit: Value = jv(r).await;
    assert_eq!(commit["title"], json!("Bump lodash"));
    let sha = commit["id"].as_str().unwrap().to_string();
    assert_eq!(commit["short_id"], json!(&sha[..8]));
    assert_eq!(env.sb.branches(pid), vec!["fix/lodash", "main"]);

    let r = c
        .get(api("/repository/files/package.json?ref=fix%2Flodash"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    let v: Value = jv(r).await;
    use base64::Engine;
    let content = base64::engine::general_purpose::STANDARD
        .decode(v["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(content, new.as_bytes());
    assert_eq!(v["commit_id"], json!(sha));
    let r = c
        .get(api("/repository/files/docs%2FNOTE.md/raw?ref=fix%2Flodash"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "note");
    let r = c
        .get(api("/repository/files/nope.txt?ref=main"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(jv(r).await, json!({"message": "404 File Not Found"}));

    // Creating a file that exists is refused.
    let r = c
        .post(api("/repository/commits"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&json!({"branch": "fix/lodash", "commit_message": "x", "actions": [{"action": "create", "file_path": "package.json", "content": "{}"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        jv(r).await,
        json!({"message": "A file with this name already exists"})
    );

    // Branches API: create, duplicate.
    let r = c
        .post(api("/repository/branches"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&json!({"branch": "feature", "ref": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .post(api("/repository/branches?branch=feature&ref=main"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(jv(r).await, json!({"message": "Branch already exists"}));

    // Merge requests: create, duplicate 409, list, state changes.
    let mr_body = json!({"source_branch": "fix/lodash", "target_branch": "main", "title": "Bump lodash", "description": "CVE"});
    let r = c
        .post(api("/merge_requests"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&mr_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mr: Value = jv(r).await;
    assert_eq!(mr["iid"], json!(1));
    assert_eq!(mr["state"], json!("opened"));
    assert_eq!(mr["project_id"], json!(pid));
    assert_eq!(
        mr["web_url"],
        json!(format!("{}/acme/webapp/-/merge_requests/1", env.base))
    );
    let r = c
        .post(api("/merge_requests"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&mr_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        jv(r).await,
        json!({"message": ["Another open merge request already exists for this source branch: !1"]})
    );
    let r = c
        .get(api(
            "/merge_requests?state=opened&source_branch=fix%2Flodash",
        ))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    let list: Vec<Value> = jlist(r).await;
    assert_eq!(list.len(), 1);
    assert!(env.sb.set_mr_state(pid, 1, "merged"));
    let r = c
        .get(api("/merge_requests/1"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(jv(r).await["state"], json!("merged"));
    let r = c
        .post(api("/merge_requests"))
        .header("PRIVATE-TOKEN", "tok-bob")
        .json_body(&mr_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "a merged MR does not block a new one");
}

fn git(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args([
            "-c",
            "credential.helper=",
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@t",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git runs")
}

#[tokio::test]
async fn git_clone_and_push_over_smart_http() {
    let env = start(None).await;
    let uid = env.sb.add_user("carol");
    env.sb.add_token(TokenSpec::new(
        "tok-git",
        uid,
        &["read_repository", "write_repository"],
    ));
    env.sb
        .add_token(TokenSpec::new("tok-ro", uid, &["read_repository"]));
    let pid = env.sb.add_project(
        ProjectSpec::new("team/service")
            .member(uid, access::DEVELOPER)
            .file("src/main.rs", "fn main() {}\n"),
    );
    let work = tempfile::tempdir().unwrap();
    let addr = env.base.trim_start_matches("http://").to_string();
    let url = format!("http://oauth2:tok-git@{addr}/team/service.git");
    let out = tokio::task::spawn_blocking({
        let (dir, url) = (work.path().to_path_buf(), url.clone());
        move || git(&dir, &["clone", "-q", &url, "clone"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = work.path().join("clone");
    assert!(repo.join("src/main.rs").exists());

    // A big-ish random file so the push pack is more than a trivial body.
    let data: Vec<u8> = (0..100_000u32)
        .flat_map(|i| {
            use sha2::Digest;
            sha2::Sha256::digest(i.to_le_bytes()).to_vec()
        })
        .collect();
    std::fs::write(repo.join("blob.bin"), &data).unwrap();
    let out = tokio::task::spawn_blocking({
        let repo = repo.clone();
        move || {
            let a = git(&repo, &["checkout", "-q", "-b", "feature/x"]);
            assert!(a.status.success());
            let a = git(&repo, &["add", "."]);
            assert!(a.status.success());
            let a = git(&repo, &["commit", "-qm", "add blob"]);
            assert!(a.status.success());
            // Small postBuffer forces a chunked request body.
            let push = git(
                &repo,
                &[
                    "-c",
                    "http.postBuffer=65536",
                    "push",
                    "-q",
                    "origin",
                    "feature/x",
                ],
            );
            let main = git(&repo, &["push", "origin", "HEAD:main"]);
            (push, main)
        }
    })
    .await
    .unwrap();
    let (push, main) = out;
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    assert!(!main.status.success(), "main is protected for developers");
    assert!(String::from_utf8_lossy(&main.stderr).contains("protected branches"));
    assert_eq!(env.sb.branches(pid), vec!["feature/x", "main"]);
    assert_eq!(
        env.sb
            .read_file(pid, "feature/x", "blob.bin")
            .map(|b| b.len()),
        Some(data.len())
    );
    assert!(env.sb.seen_tokens().contains(&"tok-git".to_string()));

    // Read-only token cannot push; no credentials gets the Basic challenge.
    let ro = format!("http://oauth2:tok-ro@{addr}/team/service.git");
    let out = tokio::task::spawn_blocking({
        let repo = repo.clone();
        move || git(&repo, &["push", &ro, "HEAD:refs/heads/other"])
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let r = client()
        .get(format!(
            "{}/team/service.git/info/refs?service=git-upload-pack",
            env.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "www-authenticate").as_deref(),
        Some("Basic realm=\"GitLab\"")
    );
}

#[tokio::test]
async fn dropping_the_handle_stops_serving() {
    let env = start(None).await;
    let base = env.base.clone();
    let r = client()
        .get(format!("{base}/api/v4/version"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let stopped = env.sb.stopped();
    drop(env);
    stopped.cancelled().await;
    // The listener is closed once the accept loop observes the cancellation.
    let mut refused = false;
    for _ in 0..100 {
        if client()
            .get(format!("{base}/api/v4/version"))
            .send()
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused);
}
