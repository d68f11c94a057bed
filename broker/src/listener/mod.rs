//! The broker's two listeners at the socket level: how connections are
//! accepted, handshaken, watched and closed, so that idle, slow and too many
//! clients cost a bounded amount of descriptors, memory, CPU and log.
//!
//! Layout:
//! - [`accept`]: the accept loop both listeners share: a cap on open
//!   connections (a slot taken before `accept`, held until the connection
//!   closes), back-off and rate-limited logging when `accept` fails.
//! - [`io`]: the accepted stream (plain or TLS), the handshake (TLS, then the
//!   first bytes: HTTP version detection, the HTTP/2 preface) under one
//!   deadline, and a reader that replays the bytes the detection consumed.
//! - [`watch`]: per api connection, requests in flight and the deadline that
//!   follows from them (idle timeout, header-read timeout).
//! - [`api`]: the api listener: HTTP/1.1 and HTTP/2 (h2c or ALPN) with those
//!   limits, and its drain on shutdown.
//! - [`agent`]: the agent listener's stream of handshaken connections for
//!   tonic.

pub mod accept;
pub mod agent;
pub mod api;
pub mod io;
pub mod watch;
