//! `tracing` set-up shared by both binaries: text (default) or JSON lines on
//! stderr, level from `RUST_LOG` (default `info`).
//!
//! Lines are written off the request path (`batch.rs`): a task that logs
//! formats its line (`json.rs` for JSON) and appends it to a buffer; one
//! thread writes the buffer every few milliseconds with one `write`. No line
//! is dropped (the request log is an audit trail). What is pending is written
//! when the [`LogGuard`] is dropped at the end of `main`; a process killed
//! with SIGKILL may lose the lines of its last few milliseconds.

use json::JsonLines;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::{fmt, EnvFilter};

mod batch;
mod json;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

/// Keeps the log writer thread; dropping it writes every pending line
/// (hold it until the process ends).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<batch::BatchGuard>);

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = std::io::stderr();
    let ansi = std::io::IsTerminal::is_terminal(&stderr);
    // Without a writer thread (none could be started), each line is
    // written by the task that logs it, as it comes.
    let (writer, guard) = match batch::start(Box::new(stderr)) {
        Ok((w, g)) => (BoxMakeWriter::new(w), Some(g)),
        Err(_) => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        // Colour codes only on a terminal: in a file or a log pipeline
        // they are noise (and an escape sequence in a log line).
        LogFormat::Text => builder.with_target(false).with_ansi(ansi).try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
    };
    LogGuard(guard)
}
