//! Smoke test of the benchmark harness: `gitproxy-bench --quick` runs every
//! scenario end to end and prints each table. No performance threshold here
//! (the numbers belong in BENCHMARKS.md, `scripts/bench.sh`), but every
//! number must be sane: each table is read back from the Markdown and each
//! scenario's figures checked — finite, throughputs above zero, no request
//! failed, every idle stream connected. Bulk transfers and clones are
//! byte-exact by the bench itself (a difference fails the scenario).

use gitproxy_integration_tests::harness::bin;
use std::time::Duration;

/// One table of the report: its title, rows (metric and the measured cells,
/// `None` for "–": direct, tunnel, front door, and rathole with `--rathole`;
/// the ratio columns, whose heading has a " / ", are left out) and notes.
#[derive(Debug)]
struct Table {
    title: String,
    rows: Vec<(String, Vec<Option<f64>>)>,
    notes: Vec<String>,
}

impl Table {
    /// The cells of the row whose metric starts with `metric`.
    fn row(&self, metric: &str) -> &[Option<f64>] {
        self.rows
            .iter()
            .find(|(m, _)| m.starts_with(metric))
            .map(|(_, c)| c.as_slice())
            .unwrap_or_else(|| panic!("{}: no row {metric:?}: {self:#?}", self.title))
    }

    /// Every present cell of every row whose metric contains `part`.
    fn cells(&self, part: &str) -> Vec<(&str, f64)> {
        let out: Vec<_> = self
            .rows
            .iter()
            .filter(|(m, _)| m.contains(part))
            .flat_map(|(m, c)| c.iter().flatten().map(move |v| (m.as_str(), *v)))
            .collect();
        assert!(!out.is_empty(), "{}: no value for {part:?}", self.title);
        out
    }

    /// The note that starts with `prefix`.
    fn note(&self, prefix: &str) -> &str {
        self.notes
            .iter()
            .find(|n| n.starts_with(prefix))
            .unwrap_or_else(|| panic!("{}: no note {prefix:?}: {self:#?}", self.title))
    }
}

/// The cells of a Markdown table line, trimmed.
fn cells(line: &str) -> Vec<&str> {
    line.trim_matches('|').split('|').map(str::trim).collect()
}

/// The `### ...` tables of a report.
fn tables(report: &str) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    // Which columns of the current table are ratios (from its heading).
    let mut ratio = Vec::new();
    for line in report.lines() {
        if let Some(title) = line.strip_prefix("### ") {
            out.push(Table {
                title: title.to_string(),
                rows: Vec::new(),
                notes: Vec::new(),
            });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        if let Some(note) = line.strip_prefix("- ") {
            t.notes.push(note.to_string());
        } else if line.starts_with("| metric |") {
            ratio = cells(line).iter().map(|h| h.contains(" / ")).collect();
        } else if line.starts_with("| ") {
            let cells = cells(line);
            let values = cells
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(i, _)| !ratio.get(*i).copied().unwrap_or(false))
                .map(|(_, c)| match *c {
                    "–" => None,
                    c => Some(c.parse::<f64>().unwrap_or(f64::NAN)),
                })
                .collect();
            t.rows.push((cells[0].to_string(), values));
        }
    }
    out
}

/// `errors (non-2xx + socket errors): E of N requests`: E is 0, N is not.
fn assert_no_errors(t: &Table) {
    let prefix = "errors (non-2xx + socket errors): ";
    let note = t.note(prefix);
    let words: Vec<&str> = note[prefix.len()..].split_whitespace().collect();
    let (e, n) = (words[0], words[2]);
    assert_eq!(e, "0", "{}: {note}", t.title);
    assert!(n.parse::<u64>().is_ok_and(|n| n > 0), "{}: {note}", t.title);
}

fn assert_positive(t: &Table, part: &str) {
    for (m, v) in t.cells(part) {
        assert!(v > 0.0, "{}: {m} = {v}", t.title);
    }
}

/// What each scenario must show, by the start of its title.
fn check(t: &Table) {
    // No NaN or unparsable cell anywhere ("p99 minus the hold" may be
    // slightly negative on a direct path, so no sign check in general).
    for (m, cells) in &t.rows {
        for v in cells.iter().flatten() {
            assert!(v.is_finite(), "{}: {m} has a non-number", t.title);
        }
    }
    for n in &t.notes {
        assert!(
            !n.starts_with("first errors:") && !n.contains(" failed; first: "),
            "{}: {n}",
            t.title
        );
    }
    let title = t.title.as_str();
    if title.starts_with("Bulk transfer") {
        assert_positive(t, "MB/s");
        assert!(t.notes[0].contains("Byte-exact"), "{:?}", t.notes);
    } else if title.starts_with("Small requests") {
        assert_positive(t, "requests/s");
        assert_positive(t, "latency");
        assert_no_errors(t);
    } else if title.ends_with("requests in flight at once") {
        for (m, v) in t.cells("success, %") {
            assert_eq!(v, 100.0, "{title}: {m}");
        }
        assert_positive(t, "p50 latency");
        assert_positive(t, "most requests at the upstream at once");
    } else if title.starts_with("Head-of-line blocking") {
        assert_positive(t, "MB/s");
        assert_positive(t, "throughput kept");
    } else if title.starts_with("Idle agents") {
        let connected = t.row("tunnel streams connected")[1].expect("a count");
        let wanted: f64 = t.notes[0]
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .expect("\"N streams wanted\"");
        assert!(wanted > 0.0, "{:?}", t.notes);
        assert_eq!(connected, wanted, "{title}: streams connected");
        assert_positive(t, "streams opened per second");
    } else if title.starts_with("Reconnect") {
        assert_positive(t, "first 200");
    } else if title.starts_with("git clone") {
        assert_positive(t, "wall time");
        assert_positive(t, "pack");
    } else if title.starts_with("Forwarded between replicas") {
        assert_positive(t, "requests/s");
        assert_positive(t, "latency");
        assert_no_errors(t);
    } else {
        panic!("a table this test does not know: {title}");
    }
}

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
    let tables_3way = stdout
        .matches("| metric | direct | tunnel (agent mode) | front door (direct mode) | tunnel / direct |")
        .count();
    assert_eq!(tables_3way, 7, "{stdout}");
    let tables = tables(&stdout);
    assert_eq!(tables.len(), 8, "{tables:#?}");
    for t in &tables {
        check(t);
    }
    let written = std::fs::read_to_string(out_file.path()).expect("--out file");
    assert_eq!(written.trim(), stdout.trim(), "--out differs from stdout");
}

#[test]
fn the_report_reader_sees_cells_and_notes() {
    let t = tables(
        "## Machine\n\n### Small requests (1 KiB JSON)\n\n| metric | direct | tunnel (agent mode) | front door (direct mode) | tunnel / direct |\n|---|---:|---:|---:|---:|\n| requests/s, c=64 | 1000 | 500.5 | – | 0.50 |\n\n- errors (non-2xx + socket errors): 0 of 12 requests\n",
    );
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].row("requests/s"), [Some(1000.0), Some(500.5), None]);
    assert_no_errors(&t[0]);
}

#[test]
fn the_report_reader_sees_the_rathole_column() {
    let t = tables(
        "### Small requests (1 KiB JSON)\n\n| metric | direct | tunnel (agent mode) | front door (direct mode) | rathole (TCP tunnel) | tunnel / direct | tunnel / rathole |\n|---|---:|---:|---:|---:|---:|---:|\n| requests/s, c=64 | 1000 | 500.5 | – | 700 | 0.50 | 0.72 |\n",
    );
    assert_eq!(
        t[0].row("requests/s"),
        [Some(1000.0), Some(500.5), None, Some(700.0)]
    );
}

/// `--rathole` with something that is not rathole 0.5.0 stops the run
/// before anything starts, naming the path: the column never goes missing
/// silently. (CI builds no rathole; `scripts/bench.sh --peers` does.)
#[tokio::test]
async fn bench_refuses_an_unusable_rathole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("rathole");
    let out = tokio::process::Command::new(bin("gitproxy-bench"))
        .args(["--quick", "--only", "small", "--rathole"])
        .arg(&missing)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("gitproxy-bench did not stop within 20 s")
        .expect("gitproxy-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("--rathole {}", missing.display()))
            && stderr.contains("scripts/lib/rathole.sh"),
        "{stderr}"
    );
    assert!(!stdout.contains("### "), "a scenario ran: {stdout}");
}
