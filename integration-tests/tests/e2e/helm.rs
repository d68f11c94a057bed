//! The Helm charts (`helm/gitproxy-agent`, `helm/gitproxy-broker`), checked
//! without a cluster by `python/helm_check.py`: Helm v4 lint and render
//! (pip `helm-python-sdk`), Kubernetes 1.29 schema validation (pip
//! `kubernetes-validate`), assertions on the rendered objects, the values
//! schema's refusals, and the real binaries started with the rendered
//! environment and arguments (the agent connects to the broker and the
//! chart's probe answers 0).
//!
//! `scripts/test.sh` installs the pip packages; when they are missing and
//! `pip install` is impossible (no pip, no network), the test says why and
//! passes without checking anything.

use gitproxy_integration_tests::harness;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The pip packages the script imports (import name, package name).
const PACKAGES: &[(&str, &str)] = &[
    ("helm_python", "helm-python-sdk"),
    ("kubernetes_validate", "kubernetes-validate"),
];

/// Limit on the whole script (it takes a few seconds).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn importable(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn pip_install(packages: &[&str]) -> bool {
    let base = [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let ok = Command::new("python3")
            .args(base)
            .args(extra)
            .args(packages)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return true;
        }
    }
    false
}

/// Makes sure the pip packages are importable; `Err(why)` when they cannot be.
fn ensure_packages() -> Result<(), String> {
    if Command::new("python3").arg("--version").output().is_err() {
        return Err("python3 is not installed".into());
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(module, _)| !importable(module))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !pip_install(&missing) {
        return Err(format!(
            "pip install {} failed (no pip or no network)",
            missing.join(" ")
        ));
    }
    match PACKAGES.iter().find(|(module, _)| !importable(module)) {
        Some((module, pkg)) => Err(format!(
            "{pkg} was installed but `import {module}` still fails"
        )),
        None => Ok(()),
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn helm_charts_lint_render_validate_and_run() {
    // A missing tool fails the test: scripts/test.sh installs them.
    if let Err(why) = ensure_packages() {
        panic!("the Helm chart checks need pip packages helm-python-sdk and kubernetes-validate: {why}");
    }
    let bin_dir = harness::bin("gitproxy-broker")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    // Fail early with the harness's message when the agent is not built.
    harness::bin("gitproxy-agent");
    let root = repo_root();
    let script = root.join("integration-tests/python/helm_check.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--repo")
        .arg(&root)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 helm_check.py");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The exit itself is the signal: a thread waits on the child and reports.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(SCRIPT_TIMEOUT) {
        Ok(status) => status.expect("wait for helm_check.py"),
        Err(_) => {
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            panic!(
                "helm_check.py did not finish within {SCRIPT_TIMEOUT:?}:\n{}",
                out_reader.join().unwrap_or_default()
            );
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    println!("{out}");
    // Helm logs the charts' `fail` messages it swallows while linting: noise.
    let err: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("funcMap fail"))
        .collect();
    assert!(
        status.success(),
        "helm_check.py failed ({status}):\n{out}\n{}",
        err.join("\n")
    );
    assert!(
        out.contains("all helm checks passed"),
        "helm_check.py did not finish its checks:\n{out}"
    );
}
