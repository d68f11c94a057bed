//! The real client programs the tests run (git, curl, python-gitlab
//! scripts): on loopback, never through a proxy, bounded in time, a missing
//! program a failure.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;
use tokio::process::Command;

/// How long a python-gitlab script may take.
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(180);

/// Takes every proxy variable away from `cmd`: loopback is reached directly.
pub fn no_proxy(cmd: &mut Command) {
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("no_proxy", "127.0.0.1,localhost")
        .env("NO_PROXY", "127.0.0.1,localhost");
}

/// Runs `cmd` to its end within `timeout`; `what` names it in the failure.
pub async fn run(mut cmd: Command, timeout: Duration, what: &str) -> Output {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("{what}: cannot run (is it installed?): {e}"),
        Err(_) => panic!("{what}: no answer within {timeout:?}"),
    }
}

/// Runs `integration-tests/python/<script>` with `GITLAB_TOKEN`; returns its
/// JSON output, failing the test on a non-zero exit (a warning included).
pub async fn python(script: &str, args: &[&str], token: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(&path).args(args).env("GITLAB_TOKEN", token);
    no_proxy(&mut cmd);
    let out = run(cmd, PYTHON_TIMEOUT, script).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{script}: not JSON ({e}): {stdout}"))
}
