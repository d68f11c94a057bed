//! Cluster mode (issue 11, acceptance 1) with the real clients against the
//! sandbox GitLab: one agent connected through a real TCP load balancer
//! (HAProxy) to whichever replica it picks; python-gitlab lists over several pages through each of r0, r1 and r2
//! (every `Link` names the replica that was asked, or python-gitlab warns
//! and the script fails), git pushes through each replica, and a clone of a
//! pack over 100 MB through a forwarding replica. Real `redis-server`, real
//! broker and agent processes.

use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::clients::{no_proxy, python, run};
use gitproxy_integration_tests::harness::cluster::{start_replicas, ClusterFiles, PEER_SECRET};
use gitproxy_integration_tests::harness::haproxy::{agent_backends, Haproxy, Mode};
use gitproxy_integration_tests::harness::pattern::Pattern;
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::{client, until, WAIT};
use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::process::Command;

const KEY: &str = "cluster-fidelity-key-0123456789abcdef";
const CONN_TOKEN: &str = "testpat-cluster-conn-token-0123456";
const EXTERNAL_URL: &str = "http://gitlab.sandbox.internal";
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

async fn git_ok(dir: &Path, args: &[&str]) -> Output {
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
    ])
    .args(args)
    .current_dir(dir)
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null");
    no_proxy(&mut cmd);
    let out = run(cmd, GIT_TIMEOUT, &format!("git {args:?}")).await;
    assert!(
        out.status.success(),
        "git {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The replica `b` sees the agent of `acme` on (through the registry),
/// once it sees one.
async fn agent_replica(b: &Broker) -> String {
    until(&format!("{} to see the agent", b.api()), WAIT, || async {
        let r = client()
            .get(format!("{}/v1/connections/acme", b.api()))
            .send()
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        v["agents"][0]["replica"].as_str().map(str::to_string)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_gitlab_and_git_through_every_replica() {
    gitproxy_integration_tests::harness::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = SandboxConfig::new(dir.path().join("gitlab"));
    cfg.external_url = Some(EXTERNAL_URL.into());
    let (sb, sb_addr) = Sandbox::start(cfg).await.expect("sandbox starts");
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(
        CONN_TOKEN,
        uid,
        &["api", "read_repository", "write_repository"],
    ));

    let redis = Redis::start(None).await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![ConnSpec::agent("acme", &format!("http://{sb_addr}"), KEY)
            .token(CONN_TOKEN)
            .external_url(EXTERNAL_URL)],
        ..Default::default()
    };
    let replicas = start_replicas(3, &spec, &Default::default(), &redis, &files).await;
    // The agent reaches "some replica" through a real TCP load balancer.
    let lb = Haproxy::start(Mode::Tcp, &agent_backends(&replicas)).await;
    let agent = Agent::start("agent-acme", &lb.url(), KEY, &[]).await;
    let holder = agent_replica(&replicas[0]).await;
    for b in &replicas {
        assert_eq!(agent_replica(b).await, holder);
    }
    let o: usize = holder[1..].parse().expect("replica id rN");
    eprintln!("the balancer sent the agent to {holder}");

    // 210 projects alice is a Developer of (3 pages of 100), a small one to
    // push to and one whose pack is over 100 MB.
    const SIZE: usize = 104 << 20;
    let mut data = vec![0u8; SIZE];
    Pattern::new(7).fill(&mut data);
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(&data)
    };
    let sb2 = sb.clone();
    let (ids, push_pid) = tokio::task::spawn_blocking(move || {
        let mut ids: Vec<u64> = (0..210)
            .map(|i| {
                sb2.add_project(
                    ProjectSpec::new(format!("fleet/svc-{i:03}")).member(uid, access::DEVELOPER),
                )
            })
            .collect();
        let push = sb2.add_project(
            ProjectSpec::new("team/service")
                .member(uid, access::DEVELOPER)
                .file("src/main.rs", "fn main() {}\n"),
        );
        let big = sb2.add_project(
            ProjectSpec::new("team/big")
                .member(uid, access::DEVELOPER)
                .file("assets/blob.bin", data),
        );
        ids.push(push);
        ids.push(big);
        ids.sort_unstable();
        (ids, push)
    })
    .await
    .expect("projects");

    for (i, b) in replicas.iter().enumerate() {
        let base = b.front("acme");
        sb.clear_logs();
        let v = python("list_projects.py", &[&base, "offset"], CONN_TOKEN).await;
        assert_eq!(v["username"], json!("alice"), "via r{i}");
        let mut got: Vec<u64> = v["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id"))
            .collect();
        got.sort_unstable();
        assert_eq!(got, ids, "via r{i}: every project, once");
        let pages = sb
            .request_log()
            .into_iter()
            .filter(|(m, p)| m == "GET" && p.starts_with("/api/v4/projects?"))
            .count();
        assert_eq!(pages, 3, "via r{i}");
        // The Link header itself names the replica asked.
        let r = client()
            .get(format!(
                "{base}/api/v4/projects?per_page=100&membership=true"
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let link = r.headers()["link"].to_str().unwrap().to_string();
        assert!(
            link.contains(&format!("<{base}/api/v4/projects?")),
            "via r{i}: {link}"
        );
        assert!(!link.contains(EXTERNAL_URL), "via r{i}: {link}");
    }

    let work = tempfile::tempdir().unwrap();
    for (i, b) in replicas.iter().enumerate() {
        let url = format!("{}/team/service.git", b.front("acme"));
        let name = format!("service-r{i}");
        git_ok(work.path(), &["clone", "-q", &url, &name]).await;
        let repo = work.path().join(&name);
        let branch = format!("feature/via-r{i}");
        let content = format!("pushed through replica r{i}\n");
        std::fs::write(repo.join("NOTE.md"), &content).unwrap();
        git_ok(&repo, &["checkout", "-q", "-b", &branch]).await;
        git_ok(&repo, &["add", "NOTE.md"]).await;
        git_ok(&repo, &["commit", "-qm", "Add a note"]).await;
        git_ok(&repo, &["push", "-q", "origin", &branch]).await;
        assert_eq!(
            sb.read_file(push_pid, &branch, "NOTE.md"),
            Some(content.into_bytes()),
            "via r{i}"
        );
    }

    // The big clone through a forwarding replica.
    let fwd = &replicas[(o + 1) % 3];
    let url = format!("{}/team/big.git", fwd.front("acme"));
    let t = Instant::now();
    git_ok(work.path(), &["clone", "-q", &url, "big"]).await;
    let repo = work.path().join("big");
    let pack_bytes: u64 = std::fs::read_dir(repo.join(".git/objects/pack"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    eprintln!(
        "cloned a {pack_bytes}-byte pack through forwarding replica r{} in {:?}; its peak RSS {} KiB",
        (o + 1) % 3,
        t.elapsed(),
        fwd.proc.peak_rss_kib()
    );
    assert!(pack_bytes >= 100_000_000, "pack of {pack_bytes} bytes");
    let got = std::fs::read(repo.join("assets/blob.bin")).unwrap();
    use sha2::Digest;
    assert_eq!(got.len(), SIZE);
    assert!(sha2::Sha256::digest(&got) == digest, "content differs");

    for b in &replicas {
        b.proc.assert_no_secrets(&[KEY, CONN_TOKEN, PEER_SECRET]);
    }
    agent.proc.assert_no_secrets(&[KEY, CONN_TOKEN]);
}
