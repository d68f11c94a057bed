//! Test harness: real gitproxy binaries started on ephemeral ports, waited on
//! through their log lines (never sleeps), plus an in-process upstream whose
//! behaviour the tunnel tests need to observe (streamed bodies, dropped
//! connections).
//!
//! - [`process`]: a child process whose JSON log lines can be awaited.
//! - [`broker`] / [`agent`]: the two programs with test configuration.
//! - [`fake_agent`]: a scripted agent speaking the real protocol, to play a
//!   hostile or broken agent against the real broker.
//! - [`upstream`]: a GitLab-shaped HTTP server for tunnel mechanics.
//! - [`pattern`]: deterministic byte streams for byte-exact transfer checks.
//! - [`pki`]: private CAs and certificates made at run time (rcgen).
//! - [`proxy`]: a real tinyproxy as the corporate proxy.
//! - [`redis`]: a real redis-server; [`cluster`]: broker replicas sharing it;
//!   [`haproxy`]: a real load balancer in front of them.
//! - [`fdlimit`]: the open-file limit for benchmarks holding many sockets.
//! - [`fake_broker`]: a scripted broker speaking the real tunnel protocol,
//!   to drive the real agent with hostile input.

pub mod agent;
pub mod broker;
pub mod clients;
pub mod cluster;
pub mod fake_agent;
pub mod fake_broker;
pub mod fdlimit;
pub mod haproxy;
pub mod pattern;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

/// Default limit for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// Where the gitproxy binaries are: `GITPROXY_BIN_DIR`, or the workspace's
/// target directory for the profile the tests were built with.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("GITPROXY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join(profile)
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --release --bins), or set GITPROXY_BIN_DIR",
        p.display()
    );
    p
}

/// Waits until `check` returns `Some`, asking again every 50 ms, for at
/// most `limit` (a state reached, not a fixed delay).
pub async fn until<T, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    until_every(what, limit, Duration::from_millis(50), check).await
}

/// [`until`], asking every `every` (a measurement finer than 50 ms).
pub async fn until_every<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Installs the TLS provider used by test clients (idempotent).
pub fn init() {
    gitproxy_shared::tls::install_default_provider();
}

/// A plain HTTP client for tests.
pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .tls_backend_preconfigured(
            gitproxy_shared::tls::client_config(b"", &[b"http/1.1"]).expect("tls config"),
        )
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client")
}

/// A request carrying the broker's API key (`X-Gitproxy-Key`) and, if given,
/// a JSON body.
pub fn keyed_request(
    method: reqwest::Method,
    url: String,
    api_key: &str,
    body: Option<serde_json::Value>,
) -> reqwest::RequestBuilder {
    let r = client()
        .request(method, url)
        .header("x-gitproxy-key", api_key);
    match body {
        Some(v) => r
            .header("content-type", "application/json")
            .body(v.to_string()),
        None => r,
    }
}

/// [`keyed_request`] sent within [`WAIT`]: the status and the body as JSON
/// (kept as a JSON string when it is not JSON).
pub async fn json_call(
    method: reqwest::Method,
    url: String,
    api_key: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let resp = tokio::time::timeout(WAIT, keyed_request(method, url, api_key, body).send())
        .await
        .expect("api call hung")
        .expect("api call");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Runs `git` in `dir` with the broker's API key as an extra header (for
/// clones and pushes through the front door) and a committer identity;
/// whether it succeeded, and its stderr.
pub fn git_with_key(api_key: &str, args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            &format!("http.extraHeader=X-Gitproxy-Key: {api_key}"),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Rotates a connection's GitLab token over the connection API
/// (`PUT /v1/connections/{conn}`); panics unless the broker accepts it.
pub async fn put_token(broker_api: &str, api_key: &str, conn: &str, token: &str) {
    let (s, v) = json_call(
        reqwest::Method::PUT,
        format!("{broker_api}/v1/connections/{conn}"),
        api_key,
        Some(serde_json::json!({ "token": token })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}
