//! A child process whose stderr log lines are collected and can be awaited.

use serde_json::Value;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A running program. Killed (SIGKILL) when dropped.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
}

impl Proc {
    /// Spawns `cmd`, capturing stderr lines (and stdout lines, marked).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        for reader in [
            Box::new(stderr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stdout),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(reader).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    let n = {
                        let mut v = lines.lock().unwrap();
                        v.push(l);
                        v.len()
                    };
                    let _ = tx.send(n);
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            lines,
            count: rx,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process already reaped")
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Every line so far, parsed as JSON (non-JSON lines skipped).
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `look` finds something in the lines so far, re-looking at
    /// each new line (the signal) and once more when the output closes.
    async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        look: impl Fn(&[String]) -> Option<T>,
    ) -> T {
        let mut rx = self.count.clone();
        let fut = async {
            loop {
                if let Some(found) = look(&self.lines()) {
                    return found;
                }
                if rx.changed().await.is_err() {
                    if let Some(found) = look(&self.lines()) {
                        return found;
                    }
                    futures::future::pending::<()>().await;
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(v) => v,
            Err(_) => panic!(
                "{}: timed out after {timeout:?} waiting for {what}; last lines:\n{}",
                self.name,
                self.lines()
                    .iter()
                    .rev()
                    .take(30)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    /// Waits for the first raw line containing any of `needles`.
    pub async fn wait_for_any_text(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_until(&format!("any of {needles:?}"), timeout, |lines| {
            lines
                .iter()
                .find(|l| needles.iter().any(|n| l.contains(n)))
                .cloned()
        })
        .await
    }

    /// Waits until `n` JSON lines match `pred`, returning the n-th.
    pub async fn wait_for_nth(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until("a log line", timeout, |lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| pred(v))
                .nth(n - 1)
        })
        .await
    }

    /// Waits for the first raw line containing `needle`.
    pub async fn wait_for_text(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(&format!("{needle:?}"), timeout, |lines| {
            lines.iter().find(|l| l.contains(needle)).cloned()
        })
        .await
    }

    /// Waits until `n` raw lines contain `needle`, returning the n-th.
    pub async fn wait_for_nth_text(&self, n: usize, needle: &str, timeout: Duration) -> String {
        self.wait_until(&format!("{needle:?} (#{n})"), timeout, |lines| {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
                .cloned()
        })
        .await
    }

    /// Waits for the first JSON line whose `message` equals `msg`.
    pub async fn wait_for_message(&self, msg: &str, timeout: Duration) -> Value {
        self.wait_for_nth(1, timeout, |v| v["message"] == msg).await
    }

    /// Number of JSON lines whose `message` equals `msg`.
    pub fn count_message(&self, msg: &str) -> usize {
        self.json_lines()
            .iter()
            .filter(|v| v["message"] == msg)
            .count()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:")
    }

    /// Fails the test if any line contains one of `secrets`.
    pub fn assert_no_secrets(&self, secrets: &[&str]) {
        for l in self.lines() {
            for s in secrets {
                assert!(!s.is_empty());
                assert!(
                    !l.contains(s),
                    "{}: a secret appears in a log line: {l}",
                    self.name
                );
            }
        }
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
