//! Smoke test of the benchmark harness: `gitproxy-bench --quick` runs every
//! scenario end to end and prints each table. No performance assertion here:
//! the numbers belong in BENCHMARKS.md (`scripts/bench.sh`).

use gitproxy_integration_tests::harness::bin;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_mode_prints_every_scenario() {
    let out_file = tempfile::NamedTempFile::new().expect("tempfile");
    let mut cmd = tokio::process::Command::new(bin("gitproxy-bench"));
    cmd.arg("--quick")
        .arg("--out")
        .arg(out_file.path())
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("gitproxy-bench --quick did not finish within 120 s")
        .expect("gitproxy-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gitproxy-bench --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for heading in [
        "## Machine",
        "### Bulk transfer",
        "### Small requests",
        "requests in flight at once",
        "### Head-of-line blocking",
        "### Idle agents on one broker",
        "### Reconnect after a broker restart",
        "### git clone of a",
        "### Forwarded between replicas (cluster mode)",
    ] {
        assert!(
            stdout.contains(heading),
            "no {heading:?} in the output:\n{stdout}\n{stderr}"
        );
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
    // Every scenario prints one table with the three ways side by side.
    let tables = stdout
        .matches("| metric | direct | tunnel (agent mode) | front door (direct mode) | tunnel / direct |")
        .count();
    assert_eq!(tables, 7, "{stdout}");
    let written = std::fs::read_to_string(out_file.path()).expect("--out file");
    assert_eq!(written.trim(), stdout.trim(), "--out differs from stdout");
}
