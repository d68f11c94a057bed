//! Log lines gathered in memory and written out in batches by one thread.
//!
//! A task that logs appends its formatted line to a shared buffer and goes
//! on: no system call and, unless the buffer was empty, no wake-up. The
//! writer thread, woken by the first line of a batch, lets lines gather for
//! [`GATHER`] and writes them with one `write`. So a busy process makes
//! ~1/[`GATHER`] writes a second however many requests it logs, and an idle
//! one none. Nothing is dropped (the request log is an audit trail): past
//! [`MAX_PENDING`] bytes the line's own task writes the batch itself. The
//! order of lines is kept, since one lock covers taking a batch and writing
//! it.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after the first of a batch: the
/// most a line waits before it reaches the output.
pub const GATHER: Duration = Duration::from_millis(5);
/// Bytes waiting beyond which a logging task writes them itself (the
/// output is slower than the logging).
pub const MAX_PENDING: usize = 1 << 20;

/// Where batches go (standard error in the binaries, a buffer in tests).
pub type Sink = Box<dyn Write + Send>;

struct Shared {
    /// Lines not yet taken by a writer, and whether the writer must stop.
    pending: Mutex<Pending>,
    /// Signalled on the first line of a batch and on close.
    wake: Condvar,
    /// Held while a batch is taken and written, so batches keep their order.
    out: Mutex<Sink>,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while logging leaves bytes, not a broken invariant.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Takes what is pending and writes it; `extra` is written after it.
    fn write_out(&self, extra: &[u8]) -> io::Result<()> {
        let mut out = lock(&self.out);
        let batch = std::mem::take(&mut lock(&self.pending).lines);
        out.write_all(&batch)?;
        out.write_all(extra)?;
        out.flush()
    }
}

/// The writer handed to the subscriber: cheap to clone, one per line.
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut p = lock(&self.0.pending);
        if p.lines.len() + line.len() > MAX_PENDING {
            drop(p);
            self.0.write_out(line)?;
            return Ok(line.len());
        }
        let first = p.lines.is_empty();
        p.lines.extend_from_slice(line);
        drop(p);
        if first {
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;
    fn make_writer(&'a self) -> BatchWriter {
        self.clone()
    }
}

/// Stops the writer thread when dropped, after it wrote every pending line.
#[must_use = "dropping the guard stops the log writer"]
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.shared.write_out(&[]);
    }
}

/// A writer into `sink` and the guard of its thread.
pub fn start(sink: Sink) -> io::Result<(BatchWriter, BatchGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        out: Mutex::new(sink),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("gitproxy-log".into())
        .spawn(move || run(&worker))?;
    Ok((
        BatchWriter(shared.clone()),
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared) {
    loop {
        let mut p = lock(&shared.pending);
        while p.lines.is_empty() && !p.closed {
            p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.closed {
            return;
        }
        drop(p);
        // Let the batch grow: lines that arrive meanwhile cost no wake-up.
        std::thread::sleep(GATHER);
        // An output that fails (a closed stderr) has nowhere to report to.
        let _ = shared.write_out(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A sink that records what it got and how many writes it took.
    #[derive(Clone, Default)]
    struct Recorder {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicUsize>,
        flushed: Arc<(Mutex<usize>, Condvar)>,
    }

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if !b.is_empty() {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            lock(&self.bytes).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let (n, cv) = &*self.flushed;
            *lock(n) = lock(&self.bytes).len();
            cv.notify_all();
            Ok(())
        }
    }

    impl Recorder {
        /// Waits (bounded) until `len` bytes were written and flushed.
        fn wait_for(&self, len: usize) {
            let (n, cv) = &*self.flushed;
            let (g, t) = cv
                .wait_timeout_while(lock(n), Duration::from_secs(10), |n| *n < len)
                .unwrap();
            assert!(!t.timed_out(), "only {} of {len} bytes written", *g);
        }
    }

    /// Logs `n` numbered lines, one writer per line as the subscriber
    /// does, and returns what the output must then hold.
    fn log_lines(w: &BatchWriter, n: usize) -> Vec<u8> {
        let mut expected = Vec::new();
        for i in 0..n {
            let line = format!("line {i:05}\n").into_bytes();
            w.clone().write_all(&line).unwrap();
            expected.extend(line);
        }
        expected
    }

    #[test]
    fn lines_arrive_in_order_in_few_writes() {
        let rec = Recorder::default();
        let (w, guard) = start(Box::new(rec.clone())).unwrap();
        let expected = log_lines(&w, 2000);
        rec.wait_for(expected.len());
        assert_eq!(*lock(&rec.bytes), expected);
        // One write per batch, not per line.
        assert!(rec.writes.load(Ordering::SeqCst) < 100);
        drop(guard);
    }

    #[test]
    fn a_line_is_written_without_further_logging() {
        let rec = Recorder::default();
        let (mut w, _guard) = start(Box::new(rec.clone())).unwrap();
        w.write_all(b"alone\n").unwrap();
        rec.wait_for(6);
        assert_eq!(*lock(&rec.bytes), b"alone\n");
    }

    #[test]
    fn dropping_the_guard_writes_what_is_pending() {
        let rec = Recorder::default();
        let (w, guard) = start(Box::new(rec.clone())).unwrap();
        let expected = log_lines(&w, 500);
        drop(guard);
        assert_eq!(*lock(&rec.bytes), expected);
    }

    #[test]
    fn past_the_limit_the_logging_thread_writes_itself_and_nothing_is_lost() {
        let rec = Recorder::default();
        let (w, guard) = start(Box::new(rec.clone())).unwrap();
        // Hold the output so the writer thread cannot take batches.
        let out = lock(&w.0.out);
        let big = vec![b'x'; MAX_PENDING / 4];
        for _ in 0..4 {
            w.clone().write_all(&big).unwrap();
        }
        assert_eq!(lock(&w.0.pending).lines.len(), MAX_PENDING);
        let writer = {
            let w = w.clone();
            std::thread::spawn(move || w.clone().write_all(b"over\n").unwrap())
        };
        // The fifth line waits for the output instead of growing the buffer.
        drop(out);
        writer.join().unwrap();
        drop(guard);
        let got = lock(&rec.bytes);
        assert_eq!(got.len(), MAX_PENDING + 5);
        assert!(got.ends_with(b"xover\n"));
    }
}
