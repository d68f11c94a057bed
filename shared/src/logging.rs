//! `tracing` set-up shared by both binaries: text (default) or JSON lines on
//! stderr, level from `RUST_LOG` (default `info`).
//!
//! Lines are written off the request path: a task that logs formats its line
//! and queues it ([`LOG_QUEUE_LINES`] at most; a full queue makes the logger
//! wait, so no line is ever dropped — the request log is an audit trail), and
//! one thread writes whatever is queued with one `write` per batch instead of
//! one per line. What is queued is written when the [`LogGuard`] is dropped at
//! the end of `main`; a process killed with SIGKILL may lose the lines of its
//! last microseconds, as it would lose lines still in a pipe's writer.

use std::io::{BufWriter, Write};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

/// Most formatted lines waiting for the writer thread (a line is ~300 bytes,
/// so at most ~1–2 MiB).
pub const LOG_QUEUE_LINES: usize = 4096;
/// Bytes a batch of lines is gathered into before it is written.
const BATCH_BYTES: usize = 64 * 1024;

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

/// Keeps the log writer thread; dropping it writes every queued line (hold
/// it until the process ends).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// Standard error gathered into batches: the writer thread flushes after
/// each batch it takes from the queue, so a batch costs one `write`.
struct Batched(BufWriter<std::io::Stderr>);

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = std::io::stderr();
    let ansi = std::io::IsTerminal::is_terminal(&stderr);
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gitproxy-log")
        .finish(Batched(BufWriter::with_capacity(BATCH_BYTES, stderr)));
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        // Colour codes only on a terminal: in a file or a log pipeline
        // they are noise (and an escape sequence in a log line).
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(ansi)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    LogGuard(guard)
}
