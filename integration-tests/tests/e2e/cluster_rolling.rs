//! Cluster mode (issue 11, acceptance 3 and 2) behind real load balancers,
//! as a cloud deployment runs it: a real `redis-server`, three broker
//! replicas, a real HAProxy in TCP mode in front of their agent listeners
//! (the agents dial it, so they land on "some replica") and a real HAProxy
//! in HTTP mode in front of their api listeners (callers go through it, as
//! through an ingress that sends a request it could not deliver to another
//! replica). Two agents: one for a GitLab-shaped upstream (REST GETs, POSTs
//! echoed, byte-exact downloads), one for the sandbox GitLab (real
//! `git clone`s).
//!
//! 1. Rolling restart: while a continuous mixed load runs through the api
//!    balancer, r0, r1 and r2 are restarted one after the other (SIGTERM,
//!    exit, a new process with the same replica id on the same ports, ready
//!    behind both balancers, the agents connected somewhere): zero failed
//!    requests, every body byte-exact, at least 50 requests/s.
//! 2. Then the replica holding the upstream's agent is SIGKILLed: the agent
//!    is connected again through the balancer within 2 s; every surviving
//!    replica serves; once the dead replica's registry key expired
//!    (`--registry-ttl 3s`) nothing dials its peer port any more.

use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::broker::{Broker, BrokerSpec, ConnSpec};
use gitproxy_integration_tests::harness::cluster::{
    peer_addr, start_replicas, ClusterFiles, PEER_SECRET,
};
use gitproxy_integration_tests::harness::haproxy::{agent_backends, api_backends, Haproxy, Mode};
use gitproxy_integration_tests::harness::pattern::{Pattern, Verifier};
use gitproxy_integration_tests::harness::redis::Redis;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::{client, until_every, WAIT};
use gitproxy_integration_tests::sandbox::{access, ProjectSpec, Sandbox, SandboxConfig, TokenSpec};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const KEY_ACME: &str = "testpat-rolling-acme-key-0123456789";
const KEY_GIT: &str = "testpat-rolling-git-key-0123456789a";
const TOKEN_ACME: &str = "testpat-rolling-acme-token-012345";
const TOKEN_GIT: &str = "testpat-rolling-git-token-0123456";
const VERSION_BODY: &str = r#"{"version":"17.5.0","revision":"test"}"#;
/// REST workers and the period of each: 8 × 1/80 ms = 100 requests/s
/// offered (git clones come on top); 50/s still holds on a loaded machine
/// where a request takes 150 ms on average.
const WORKERS: usize = 8;
const PERIOD: Duration = Duration::from_millis(80);
/// Size of the file in the cloned repository.
const BLOB_BYTES: usize = 256 * 1024;
/// Registry key lifetime of the replicas (the shortest allowed).
const REGISTRY_TTL: &str = "3s";

/// The agent streams of `conn` as replica `b` shows them: (replica,
/// draining).
async fn agents_seen(b: &Broker, conn: &str) -> Vec<(String, bool)> {
    let Ok(r) = client()
        .get(format!("{}/v1/connections/{conn}", b.api()))
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or_default();
    v["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["replica"].as_str().unwrap_or_default().to_string(),
                        x["draining"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `b` sees exactly one agent stream of each of `conns`, not
/// draining and not held by `not_on`; returns their replicas.
async fn wait_settled(b: &Broker, conns: &[&str], not_on: Option<&str>) -> Vec<String> {
    until_every(
        &format!("{} to see one ready agent of each of {conns:?}", b.api()),
        WAIT,
        Duration::from_millis(50),
        || async {
            let mut on = Vec::new();
            for c in conns {
                match agents_seen(b, c).await.as_slice() {
                    [(r, false)] if Some(r.as_str()) != not_on => on.push(r.clone()),
                    _ => return None,
                }
            }
            Some(on)
        },
    )
    .await
}

/// What the load counts.
#[derive(Default)]
struct Tally {
    rest: AtomicU64,
    clones: AtomicU64,
    bytes: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn done(&self) -> u64 {
        self.rest.load(Ordering::Relaxed) + self.clones.load(Ordering::Relaxed)
    }

    fn fail(&self, t0: Instant, what: String) {
        let line = format!("{:.3}s {what}", t0.elapsed().as_secs_f64());
        eprintln!("FAILED: {line}");
        self.failures.lock().unwrap().push(line);
    }
}

/// Sends `rq`: 200 and exactly `expected` back, or what went wrong.
async fn exact(rq: reqwest::RequestBuilder, what: &str, expected: &[u8]) -> Result<u64, String> {
    let r = rq.send().await.map_err(|e| format!("{what}: {e:?}"))?;
    let status = r.status();
    let err = r.headers().get("x-gitproxy-error").cloned();
    let body = r
        .bytes()
        .await
        .map_err(|e| format!("{what}, body: {e:?}"))?;
    if status != 200 || body != expected {
        return Err(format!(
            "{what}: {status} {err:?}: {} bytes back of {}: {}",
            body.len(),
            expected.len(),
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    Ok(body.len() as u64)
}

/// `GET /api/v4/version`: 200 and GitLab's exact body.
async fn get_version(http: &reqwest::Client, base: &str) -> Result<u64, String> {
    let rq = http.get(format!("{base}/api/v4/version"));
    exact(rq, "GET version", VERSION_BODY.as_bytes()).await
}

/// `POST /api/v4/echo` with a body of its own: the same body back.
async fn post_echo(http: &reqwest::Client, base: &str, seq: u64) -> Result<u64, String> {
    let pad = "x".repeat(100 + (seq as usize * 7919) % 4000);
    let sent = format!(r#"{{"seq":{seq},"title":"Bump lodash","pad":"{pad}"}}"#);
    let rq = http
        .post(format!("{base}/api/v4/echo"))
        .header("content-type", "application/json")
        .body(sent.clone());
    Ok(2 * exact(rq, &format!("POST echo #{seq}"), sent.as_bytes()).await?)
}

/// `GET /api/v4/bytes?n=&seed=`: every byte checked against the pattern;
/// `first` is told when the first bytes arrived.
async fn fetch_bytes(
    http: &reqwest::Client,
    base: &str,
    n: u64,
    seed: u64,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<u64, String> {
    let what = format!("GET bytes #{seed} ({n} bytes)");
    let r = http
        .get(format!("{base}/api/v4/bytes?n={n}&seed={seed}"))
        .send()
        .await
        .map_err(|e| format!("{what}: {e:?}"))?;
    if r.status() != 200 {
        return Err(format!(
            "{what}: {} {:?}",
            r.status(),
            r.headers().get("x-gitproxy-error")
        ));
    }
    let mut v = Verifier::new(seed);
    let mut ok = true;
    let mut s = r.bytes_stream();
    while let Some(c) = s.next().await {
        ok &= v.feed(&c.map_err(|e| format!("{what} cut: {e:?}"))?);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
    }
    let len = v.len;
    let (tail, _) = v.finish();
    if len != n || !(ok && tail) {
        return Err(format!("{what}: {len} bytes, exact: {}", ok && tail));
    }
    Ok(n)
}

/// A download of 32 to 256 KiB.
async fn download(http: &reqwest::Client, base: &str, seq: u64) -> Result<u64, String> {
    let n = 32 * 1024 + (seq * 7919) % (224 * 1024);
    fetch_bytes(http, base, n, seq, None).await
}

/// Bytes of each download in flight at a SIGTERM.
const BIG_BYTES: u64 = 32 << 20;

/// Starts a [`BIG_BYTES`] download through `base` and returns once its
/// first bytes arrived (it is in flight); the task checks every byte.
async fn big_download(base: String, seed: u64) -> tokio::task::JoinHandle<Result<u64, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let h =
        tokio::spawn(async move { fetch_bytes(&client(), &base, BIG_BYTES, seed, Some(tx)).await });
    // Its end (an error included) also ends the wait.
    let _ = tokio::time::timeout(WAIT, rx).await;
    h
}

/// One REST caller: a request every [`PERIOD`], taking turns among GET,
/// POST and download, until `stop`.
async fn rest_worker(
    id: u64,
    base: String,
    stop: CancellationToken,
    tally: Arc<Tally>,
    t0: Instant,
) {
    let http = client();
    // Paces the offered load (rate control of the generator, not a wait
    // for readiness).
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let seq = (id << 32) | n;
        let r = match n % 3 {
            0 => get_version(&http, &base).await,
            1 => post_echo(&http, &base, seq).await,
            _ => download(&http, &base, seq).await,
        };
        match r {
            Ok(b) => {
                tally.rest.fetch_add(1, Ordering::Relaxed);
                tally.bytes.fetch_add(b, Ordering::Relaxed);
            }
            Err(e) => tally.fail(t0, format!("worker {id}: {e}")),
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.args(["-c", "credential.helper=", "-c", "protocol.version=2"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        cmd.env_remove(v);
    }
    cmd
}

/// One git caller: clones `url` again and again until `stop`, checking the
/// file's bytes each time.
async fn clone_worker(
    url: String,
    blob: Arc<Vec<u8>>,
    stop: CancellationToken,
    tally: Arc<Tally>,
    t0: Instant,
) {
    let work = tempfile::tempdir().expect("tempdir");
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let name = format!("clone-{n}");
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            git(work.path(), &["clone", "-q", &url, &name]).output(),
        )
        .await;
        match out {
            Ok(Ok(o)) if o.status.success() => {
                let got = std::fs::read(work.path().join(&name).join("data/blob.bin"))
                    .unwrap_or_default();
                if got == *blob {
                    tally.clones.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
                } else {
                    tally.fail(
                        t0,
                        format!("clone #{n}: the file differs ({} bytes)", got.len()),
                    );
                }
            }
            Ok(Ok(o)) => tally.fail(
                t0,
                format!(
                    "clone #{n}: git {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ),
            Ok(Err(e)) => tally.fail(t0, format!("clone #{n}: cannot run git: {e}")),
            Err(_) => tally.fail(t0, format!("clone #{n}: no end within 60 s")),
        }
        let _ = std::fs::remove_dir_all(work.path().join(&name));
    }
}

/// Waits until the load has completed `n` more requests than `from` (a
/// signal that it flows, not a delay).
async fn load_progress(tally: &Tally, from: u64, n: u64) {
    until_every(
        &format!("{n} more requests of the load"),
        WAIT,
        Duration::from_millis(50),
        || async { (tally.done() >= from + n).then_some(()) },
    )
    .await
}

/// Waits until `b` answers `/readyz` with 200.
async fn wait_ready(b: &Broker) {
    let http = client();
    until_every(
        &format!("{} to be ready", b.api()),
        WAIT,
        Duration::from_millis(20),
        || async {
            let r = http.get(format!("{}/readyz", b.api())).send().await.ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await
}

/// Waits until `lb` counts `server` as up: as many "is UP" lines as "is
/// DOWN" ones (a restart faster than its check interval is never noticed).
async fn wait_back_in(lb: &Haproxy, server: &str) {
    let (down, up) = (
        format!("Server replicas/{server} is DOWN"),
        format!("Server replicas/{server} is UP"),
    );
    until_every(
        &format!("the balancer to send to {server} again"),
        WAIT,
        Duration::from_millis(20),
        || async {
            let lines = lb.proc.lines();
            let count = |t: &str| lines.iter().filter(|l| l.contains(t)).count();
            (count(&up) >= count(&down)).then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_nothing_then_owner_killed() {
    gitproxy_integration_tests::harness::init();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let (sb, sb_addr) = Sandbox::start(SandboxConfig::new(dir.path().join("gitlab")))
        .await
        .expect("sandbox starts");
    let uid = sb.add_user("alice");
    sb.add_token(TokenSpec::new(TOKEN_GIT, uid, &["api", "read_repository"]));
    let mut blob = vec![0u8; BLOB_BYTES];
    Pattern::new(11).fill(&mut blob);
    let blob = Arc::new(blob);
    let sb2 = sb.clone();
    let b2 = blob.clone();
    tokio::task::spawn_blocking(move || {
        sb2.add_project(
            ProjectSpec::new("team/service")
                .member(uid, access::DEVELOPER)
                .file("data/blob.bin", b2.to_vec()),
        )
    })
    .await
    .expect("project");

    let redis = Redis::start(None).await;
    let up = Upstream::start().await;
    let files = ClusterFiles::new();
    let spec = BrokerSpec {
        connections: vec![
            ConnSpec::agent("acme", &up.url(), KEY_ACME).token(TOKEN_ACME),
            ConnSpec::agent("git", &format!("http://{sb_addr}"), KEY_GIT).token(TOKEN_GIT),
        ],
        args: vec![
            "--replica-header".into(),
            "--registry-ttl".into(),
            REGISTRY_TTL.into(),
        ],
        ..Default::default()
    };
    let mut replicas = start_replicas(3, &spec, &Default::default(), &redis, &files).await;
    let lb_agents = Haproxy::start(Mode::Tcp, &agent_backends(&replicas)).await;
    let lb_api = Haproxy::start(Mode::Http, &api_backends(&replicas)).await;
    let agents = [
        Agent::start("agent-acme", &lb_agents.url(), KEY_ACME, &[]).await,
        Agent::start("agent-git", &lb_agents.url(), KEY_GIT, &[]).await,
    ];
    let on = wait_settled(&replicas[0], &["acme", "git"], None).await;
    eprintln!(
        "set up in {:?}; agents (acme, git) on {on:?}",
        started.elapsed()
    );

    // --- Acceptance 3: rolling restart under load -----------------------
    let stop = CancellationToken::new();
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let mut load = Vec::new();
    for id in 0..WORKERS as u64 {
        load.push(tokio::spawn(rest_worker(
            id,
            format!("{}/gitlab/acme", lb_api.url()),
            stop.clone(),
            tally.clone(),
            t0,
        )));
    }
    load.push(tokio::spawn(clone_worker(
        format!("{}/gitlab/git/team/service.git", lb_api.url()),
        blob.clone(),
        stop.clone(),
        tally.clone(),
        t0,
    )));
    load_progress(&tally, 0, 100).await;
    for i in 0..3 {
        // r1: large downloads in flight when it is stopped, one it serves
        // itself, one sent to the next replica (forwarded to the agent,
        // wherever it is). r0 and r2: no request of their own lasts, so
        // their api drain ends at once, before their agents' successors are
        // registered elsewhere (the race the handover wait closes).
        let mut in_flight = Vec::new();
        for (n, j) in [i, (i + 1) % 3].into_iter().enumerate().filter(|_| i == 1) {
            let seed = 2_000_000 + (i * 2 + n) as u64;
            in_flight.push(big_download(replicas[j].front("acme"), seed).await);
        }
        let t = Instant::now();
        let before = tally.done();
        let status = replicas[i].terminate(Duration::from_secs(45)).await;
        assert!(status.success(), "r{i} exited with {status}");
        let exited = t.elapsed();
        let handover: Vec<String> = replicas[i]
            .proc
            .json_lines()
            .iter()
            .filter_map(|v| v["message"].as_str().map(str::to_string))
            .filter(|m| m.contains("agent stream") || m.contains("drained agents"))
            .collect();
        replicas[i].start_again().await;
        wait_ready(&replicas[i]).await;
        for lb in [&lb_api, &lb_agents] {
            wait_back_in(lb, &format!("r{i}")).await;
        }
        let ready = t.elapsed();
        let on = wait_settled(
            &replicas[(i + 1) % 3],
            &["acme", "git"],
            Some(&format!("r{i}")),
        )
        .await;
        for h in in_flight {
            match h.await.expect("download task") {
                Ok(b) => {
                    tally.rest.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(b, Ordering::Relaxed);
                }
                Err(e) => tally.fail(t0, format!("in flight at the SIGTERM of r{i}: {e}")),
            }
        }
        eprintln!(
            "restart of r{i}: SIGTERM to exit {exited:?} ({handover:?}), to ready behind both \
             balancers {ready:?}, to agents settled {:?} (on {on:?}); {} requests meanwhile",
            t.elapsed(),
            tally.done() - before
        );
        // The load reaches the new process before the next restart.
        let from = tally.done();
        load_progress(&tally, from, 100).await;
    }
    let after = tally.done();
    load_progress(&tally, after, 50).await;
    stop.cancel();
    for h in load {
        h.await.expect("load task");
    }
    let secs = t0.elapsed().as_secs_f64();
    let (rest, clones) = (
        tally.rest.load(Ordering::Relaxed),
        tally.clones.load(Ordering::Relaxed),
    );
    let failures = tally.failures.lock().unwrap().clone();
    let rate = (rest + clones) as f64 / secs;
    eprintln!(
        "rolling restart load: {rest} REST requests + {clones} git clones in {secs:.1} s = {rate:.1}/s, \
         {} MB checked, {} failed",
        tally.bytes.load(Ordering::Relaxed) / 1_000_000,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(rate >= 50.0, "{rate:.1} requests/s");
    assert!(clones >= 3, "{clones} clones");
    // The balancer spread the callers over all three replicas.
    let lines = lb_api.proc.lines();
    eprintln!(
        "api balancer: {} requests sent again to another replica (retries)",
        lines
            .iter()
            .filter(|l| l.contains("front replicas/"))
            .filter(|l| {
                // httplog: timers, then (after the status) the counters
                // actconn/feconn/beconn/srv_conn/retries.
                l.split_whitespace()
                    .filter(|w| w.matches('/').count() == 4)
                    .nth(1)
                    .is_some_and(|w| !w.ends_with("/0"))
            })
            .count()
    );
    for i in 0..3 {
        let n = lines
            .iter()
            .filter(|l| l.contains(&format!("front replicas/r{i} ")))
            .count();
        eprintln!("api balancer: {n} requests to r{i}");
        assert!(n > 0, "no request went to r{i}");
    }

    // --- Acceptance 2: the replica holding the agent is SIGKILLed --------
    let holder = wait_settled(&replicas[0], &["acme"], None).await[0].clone();
    let k: usize = holder[1..].parse().expect("replica id rN");
    let dead_peer = peer_addr(&replicas[k]).await;
    let survivors: Vec<usize> = (0..3).filter(|&j| j != k).collect();
    let t = Instant::now();
    replicas[k].proc.kill9().await;
    let moved = until_every(
        "the agent to be connected to a surviving replica",
        WAIT,
        Duration::from_millis(20),
        || async {
            agents_seen(&replicas[survivors[0]], "acme")
                .await
                .into_iter()
                .find(|(r, _)| *r != holder)
        },
    )
    .await;
    let reconnect = t.elapsed();
    eprintln!(
        "{holder} killed: the agent is on {} {reconnect:?} later",
        moved.0
    );
    assert!(
        reconnect < Duration::from_secs(2),
        "reconnected after {reconnect:?}"
    );
    let http = client();
    let check_all = |tag: &'static str| {
        let http = http.clone();
        let bases: Vec<String> = survivors
            .iter()
            .map(|&j| replicas[j].front("acme"))
            .chain([format!("{}/gitlab/acme", lb_api.url())])
            .collect();
        async move {
            for (n, base) in bases.iter().enumerate() {
                let seq = 1_000_000 + n as u64;
                for r in [
                    get_version(&http, base).await,
                    post_echo(&http, base, seq).await,
                    download(&http, base, seq).await,
                ] {
                    if let Err(e) = r {
                        panic!("{tag}, through {base}: {e}");
                    }
                }
            }
        }
    };
    check_all("after the kill").await;
    until_every(
        "the dead replica's registry key to expire",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let key = format!("gitproxy:replica:{holder}");
            (redis.cli(&["exists", &key]).await.trim() == "0").then_some(())
        },
    )
    .await;
    eprintln!(
        "{holder}'s registry key expired {:?} after the kill",
        t.elapsed()
    );
    // From now on nobody may dial the dead replica: its peer port is ours,
    // and counts every connection.
    let trap = tokio::net::TcpListener::bind(dead_peer)
        .await
        .expect("the dead replica's peer port is free");
    let dialled = Arc::new(AtomicUsize::new(0));
    let trap_task = tokio::spawn({
        let dialled = dialled.clone();
        async move {
            while let Ok((s, _)) = trap.accept().await {
                dialled.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        }
    });
    for _ in 0..5 {
        check_all("after the expiry").await;
    }
    for &j in &survivors {
        let seen = agents_seen(&replicas[j], "acme").await;
        assert!(
            seen.iter().all(|(r, _)| *r != holder),
            "r{j} still shows the dead replica: {seen:?}"
        );
    }
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "a replica dialled the dead one after its entries expired"
    );
    trap_task.abort();

    for &j in &survivors {
        replicas[j].proc.assert_no_secrets(&[
            KEY_ACME,
            KEY_GIT,
            TOKEN_ACME,
            TOKEN_GIT,
            PEER_SECRET,
        ]);
    }
    for a in &agents {
        a.proc
            .assert_no_secrets(&[KEY_ACME, KEY_GIT, TOKEN_ACME, TOKEN_GIT]);
    }
    eprintln!("whole test {:?}", started.elapsed());
}
