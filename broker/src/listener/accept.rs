//! The accept loop both listeners share.
//!
//! - **Cap**: a slot (semaphore permit) is taken *before* `accept` and
//!   travels with the connection until it closes. At the cap the broker stops
//!   calling `accept`, so new clients wait in the kernel's listen queue
//!   instead of costing a descriptor, a task and buffers each.
//! - **Back-off**: when `accept` itself fails (out of descriptors: `EMFILE`,
//!   `ENFILE`; out of memory: `ENOBUFS`, `ENOMEM`), retrying at once spins
//!   at 100 % CPU, because the waiting connection stays in the queue. The
//!   loop waits, doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], and starts
//!   again from the bottom after the next success. Errors that belong to one
//!   connection (reset or aborted before it was accepted) are skipped without
//!   waiting.
//! - **Logging**: one line when an episode of failures starts, a summary at
//!   most every [`SUMMARY_EVERY`], one line with the count when it ends
//!   ([`EpisodeLog`]).

use gitproxy_shared::log_limit::{EpisodeLog, Report};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// First wait after a failed `accept`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two `accept` attempts while they fail.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one summary line this often while `accept` keeps failing.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A connection just accepted, with the slot it holds.
pub struct Accepted {
    /// The stream (`TCP_NODELAY` set, keepalive if asked).
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The connection's place under the cap: drop it when the connection
    /// closes.
    pub slot: OwnedSemaphorePermit,
}

/// Doubling back-off between failed `accept` calls.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt; doubles up to [`BACKOFF_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    /// After a success: the next failure waits [`BACKOFF_MIN`] again.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// The accept loop of one listener.
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    slots: Arc<Semaphore>,
    max: usize,
    keepalive: Option<Duration>,
    backoff: Backoff,
    errors: EpisodeLog,
}

impl Acceptor {
    /// Accepts on `listener` (named `name` in logs) at most
    /// `max_connections` at once, with TCP keepalive probes after
    /// `keepalive` of silence if set.
    pub fn new(
        listener: TcpListener,
        name: &'static str,
        max_connections: usize,
        keepalive: Option<Duration>,
    ) -> Self {
        let max = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Acceptor {
            listener,
            name,
            slots: Arc::new(Semaphore::new(max)),
            max,
            keepalive,
            backoff: Backoff::default(),
            errors: EpisodeLog::new(SUMMARY_EVERY),
        }
    }

    /// Waits for a free slot, then for the next connection. `None` once
    /// `stop` is cancelled.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Accepted> {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            p = self.slots.clone().acquire_owned() => p.ok()?,
        };
        if self.slots.available_permits() == 0 {
            debug!(
                listener = self.name,
                max = self.max,
                "connection cap reached; new connections wait in the listen queue"
            );
        }
        loop {
            let r = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match r {
                Ok((stream, peer)) => {
                    self.backoff.reset();
                    if let Some(end) = self.errors.success(Instant::now()) {
                        warn!(
                            listener = self.name,
                            errors = end.total,
                            lasted_ms = end.lasted.as_millis() as u64,
                            "accept errors ended"
                        );
                    }
                    self.configure(&stream);
                    return Some(Accepted { stream, peer, slot });
                }
                Err(e) if per_connection(&e) => {
                    debug!(
                        listener = self.name,
                        "a connection failed before accept: {e}"
                    );
                }
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    match self.errors.failure(Instant::now()) {
                        Report::Started => warn!(
                            listener = self.name,
                            error = %e,
                            hint = hint(&e),
                            "accept failing"
                        ),
                        Report::Ongoing {
                            count,
                            total,
                            lasted,
                        } => warn!(
                            listener = self.name,
                            error = %e,
                            errors = count,
                            total,
                            lasted_ms = lasted.as_millis() as u64,
                            "accept still failing"
                        ),
                        Report::Suppressed => {}
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn configure(&self, stream: &TcpStream) {
        // Small frames must not wait for delayed ACKs (~40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(listener = self.name, "TCP_NODELAY: {e}");
        }
        if let Some(idle) = self.keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(idle);
            if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
                debug!(listener = self.name, "TCP keepalive: {e}");
            }
        }
    }
}

/// Errors that concern one connection, not the listener: try the next one.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

// EMFILE and ENFILE have these values on Linux, the BSDs and macOS.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(EMFILE) | Some(ENFILE) => {
            "out of file descriptors: raise the limit (ulimit -n, LimitNOFILE) above --max-api-connections + --max-agent-connections + 1024, or lower those caps"
        }
        _ => "accept keeps failing; the listener retries with back-off",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }

    #[tokio::test]
    async fn the_cap_holds_the_next_accept_until_a_slot_is_freed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acc = Acceptor::new(listener, "test", 1, None);
        let stop = CancellationToken::new();
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let first = acc.next(&stop).await.expect("first");
        // The second waits for the slot: `next` is pending until it is freed.
        let mut second = Box::pin(async move {
            let a = acc.next(&stop).await;
            (a, acc)
        });
        assert!(futures::poll!(second.as_mut()).is_pending());
        tokio::task::yield_now().await;
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop(first);
        let (a, _) = second.await;
        assert!(a.is_some());
    }

    #[tokio::test]
    async fn stop_ends_a_waiting_accept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut acc = Acceptor::new(listener, "test", 4, None);
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(acc.next(&stop).await.is_none());
    }
}
