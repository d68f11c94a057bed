//! The tokio runtime of both binaries, sized by `--worker-threads`.
//!
//! Fewer worker threads spend less CPU per request: a request's tasks wake
//! each other, and a wake-up that crosses threads costs a futex call and a
//! context switch (BENCHMARKS.md, "Threads"). The agent therefore runs one
//! worker by default, as linkerd2-proxy does; the broker defaults to one per
//! core, since it is the side that scales up.

use std::io;
use tokio::runtime::{Builder, Runtime};

/// Builds the multi-thread runtime with `worker_threads` workers; 0 means
/// one per CPU core the process may use (tokio's default, cgroup-aware).
pub fn build(worker_threads: usize) -> io::Result<Runtime> {
    let mut b = Builder::new_multi_thread();
    if worker_threads > 0 {
        b.worker_threads(worker_threads);
    }
    b.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_workers_asked_for() {
        let one = build(1).unwrap();
        assert_eq!(one.metrics().num_workers(), 1);
        let three = build(3).unwrap();
        assert_eq!(three.metrics().num_workers(), 3);
        let cores = build(0).unwrap();
        assert_eq!(
            cores.metrics().num_workers(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
