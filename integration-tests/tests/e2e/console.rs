//! The operator console (issue 15) in a real browser: Debian's Chromium,
//! headless, driven by Selenium (`python/console_ui.py`) through one session
//! against the real broker and agent binaries and the sandbox GitLab.
//!
//! The script walks the operator's flow and asks this test for what a
//! browser cannot do (`NEED agent <key>`, `NEED revoke`, `NEED open-mr`,
//! `NEED merge-mr`, `NEED stop-broker` on its stdout; this test answers on
//! its stdin once done). Every step's screenshot lands in a temp directory
//! whose path is printed (and kept when the test fails).

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec};
use gitproxy_integration_tests::harness::clients::no_proxy;
use gitproxy_integration_tests::harness::{client, json_call, WAIT};
use gitproxy_integration_tests::sandbox::{
    access, demo, ProjectSpec, Sandbox, SandboxConfig, TokenSpec,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const API_KEY: &str = "testpat-console-api-key-0001";
const GOOD: &str = "testpat-console-good-00000001";
const GOOD2: &str = "testpat-console-good-00000002";
const ALL_SCOPES: [&str; 3] = ["api", "read_repository", "write_repository"];
/// Developer+ projects of the token's user: more than one page of 20.
const DEV_PROJECTS: usize = 23;
/// The whole browser flow.
const FLOW_TIMEOUT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_console_in_a_real_browser() {
    gitproxy_integration_tests::harness::init();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    // Screenshots: in the temp dir (kept when the test fails), or where
    // CONSOLE_SCREENSHOTS says (kept always), e.g. to look at the pages.
    let shots = std::env::var_os("CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    println!("console screenshots: {}", shots.display());

    // GitLab: Developer+ projects (one with a package.json to fix), and two
    // the user only sees as Reporter/Guest (not in the catalogue).
    let (sb, addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(GOOD, uid, &ALL_SCOPES));
    sb.add_token(TokenSpec::new(GOOD2, uid, &ALL_SCOPES));
    let pid = sb.add_project(
        ProjectSpec::new("demo-group/webapp")
            .member(uid, access::DEVELOPER)
            .file("package.json", demo::WEBAPP_PACKAGE_JSON),
    );
    for i in 1..DEV_PROJECTS {
        let level = [access::DEVELOPER, access::MAINTAINER, access::OWNER][i % 3];
        sb.add_project(ProjectSpec::new(format!("group/app-{i:02}")).member(uid, level));
    }
    sb.add_project(ProjectSpec::new("group/seen-only").member(uid, access::REPORTER));
    sb.add_project(ProjectSpec::new("group/guest-only").member(uid, access::GUEST));
    let gitlab_url = format!("http://{addr}");

    let mut b = Broker::start(BrokerSpec {
        connections: vec![],
        api_keys: vec![API_KEY.into()],
        args: vec!["--data-dir".into(), "{dir}/data".into()],
    })
    .await;

    // The page's own answer: embedded assets under a policy that allows only
    // the broker itself.
    let r = client()
        .get(format!("{}/ui/", b.api()))
        .send()
        .await
        .expect("GET /ui/");
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    // /v1/events is an API call like the others: the key is required.
    let r = client()
        .get(format!("{}/v1/events", b.api()))
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(r.status(), 401);
    // With the key: an event stream that opens with `hello`.
    let mut r = client()
        .get(format!("{}/v1/events", b.api()))
        .header("x-gitproxy-key", API_KEY)
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(WAIT, r.chunk())
        .await
        .expect("the first frame")
        .expect("read")
        .expect("a frame");
    let first = String::from_utf8_lossy(&first);
    assert!(first.contains("event: hello\n"), "{first}");
    drop(r);

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("console_ui.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(b.api())
        .arg(b.agent_url())
        .arg(&gitlab_url)
        .arg(&shots)
        .arg(DEV_PROJECTS.to_string())
        .env("GITPROXY_API_KEY", API_KEY)
        .env("GITLAB_TOKEN", GOOD)
        .env("GITLAB_TOKEN2", GOOD2)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    no_proxy(&mut cmd);
    let mut py = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 console_ui.py: {e}"));
    let mut to_py = py.stdin.take().expect("stdin");
    let mut from_py = BufReader::new(py.stdout.take().expect("stdout")).lines();

    let mut agent = None;
    let mut access_key = String::new();
    let mut result = None;
    let mut log = Vec::new();
    let deadline = tokio::time::Instant::now() + FLOW_TIMEOUT;
    loop {
        let line = match tokio::time::timeout_at(deadline, from_py.next_line()).await {
            Err(_) => panic!(
                "the browser flow took more than {FLOW_TIMEOUT:?}; so far:\n{}",
                log.join("\n")
            ),
            Ok(Err(e)) => panic!("reading console_ui.py: {e}"),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(l))) => l,
        };
        println!("[{:>5.1}s] {line}", t0.elapsed().as_secs_f64());
        log.push(line.clone());
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("NEED"), Some("agent"), Some(key)) => {
                access_key = key.trim().to_string();
                agent = Some(Agent::start("agent-console", &b.agent_url(), &access_key, &[]).await);
            }
            (Some("NEED"), Some("revoke"), _) => sb.revoke_token(GOOD),
            (Some("NEED"), Some("open-mr"), _) => {
                let fixed = demo::WEBAPP_PACKAGE_JSON.replace("4.17.15", "4.17.21");
                let (s, v) = json_call(
                    reqwest::Method::POST,
                    format!("{}/v1/connections/acme/merge-requests", b.api()),
                    API_KEY,
                    Some(json!({
                        "project": "demo-group/webapp",
                        "source_branch": "fix/lodash",
                        "title": "Bump lodash from 4.17.15 to 4.17.21",
                        "changes": [{"path": "package.json", "content": fixed}]
                    })),
                )
                .await;
                assert_eq!(s, 201, "{v}");
            }
            (Some("NEED"), Some("merge-mr"), _) => {
                let mrs = sb.merge_requests(pid);
                assert_eq!(mrs.len(), 1, "{mrs:?}");
                assert!(sb.set_mr_state(pid, mrs[0].0, "merged"));
            }
            (Some("NEED"), Some("stop-broker"), _) => {
                let status = b.terminate(WAIT).await;
                assert!(status.success(), "broker exit: {status}");
            }
            (Some("NEED"), other, _) => panic!("console_ui.py needs {other:?}: unknown"),
            (Some("RESULT"), Some(first), rest) => {
                let text = format!(
                    "{first}{}",
                    rest.map(|r| format!(" {r}")).unwrap_or_default()
                );
                result = Some(serde_json::from_str::<Value>(&text).expect("RESULT is JSON"));
                continue;
            }
            _ => continue,
        }
        to_py
            .write_all(b"done\n")
            .await
            .expect("answer console_ui.py");
        to_py.flush().await.expect("flush");
    }
    let status = tokio::time::timeout(WAIT, py.wait())
        .await
        .expect("console_ui.py exits")
        .expect("wait");
    if !status.success() {
        // Keep the screenshots for the post-mortem.
        let kept = dir.keep();
        panic!(
            "console_ui.py failed ({status}); screenshots in {}:\n{}",
            kept.display(),
            log.join("\n")
        );
    }
    let result = result.expect("console_ui.py printed its RESULT");
    println!("console result: {result:#}");
    let shots_taken = std::fs::read_dir(&shots).expect("screenshots").count();
    assert!(shots_taken >= 17, "{shots_taken} screenshots");
    // The first load asked the broker for the page, its script and style only.
    let first: Vec<&str> = result["first_load_requests"]
        .as_array()
        .expect("first_load_requests")
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    for want in ["/ui/", "/ui/app.js", "/ui/app.css"] {
        assert!(
            first.iter().any(|u| u.ends_with(want)),
            "{want} not among {first:?}"
        );
    }
    assert_eq!(
        result["mr_counts"],
        json!({"opened": 0, "merged": 1, "closed": 0})
    );
    let agent = agent.expect("the agent was started");
    drop(agent);
    b.proc
        .assert_no_secrets(&[GOOD, GOOD2, API_KEY, access_key.as_str()]);
    println!("console flow: {:.1}s wall", t0.elapsed().as_secs_f64());
}
