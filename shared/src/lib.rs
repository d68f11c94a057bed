//! Code both gitproxy programs use.
//!
//! Layout:
//! - [`tunnel`]: the multiplexing machinery of `gitproxy.v1.Tunnel` that both
//!   ends share (frame limits, per-request credit, the outbound queue).
//! - [`errors`]: the product's error codes, their HTTP status and operator hints,
//!   and the classification of network failures into those codes.
//! - [`policy`]: which requests may travel to GitLab at all.
//! - [`gitlab_url`]: the strict validator of GitLab base URLs, and the join of
//!   a request target onto one.
//! - [`credentials`]: GitLab credentials in headers and queries, recognised
//!   as GitLab (Rack) reads them.
//! - [`headers`]: hop-by-hop and `X-Gitproxy-*` filtering, wire conversion.
//! - [`scopes`]: what a GitLab token's scopes allow gitproxy to do.
//! - [`sanitize`]: text from the other end of the tunnel made safe to log
//!   and show (printable, bounded).
//! - [`idle`]: the body idle timeout.
//! - [`upstream`]: the HTTP client that replays a request against GitLab
//!   (the agent, and the broker in direct mode).
//! - [`tls`]: trust stores (public roots plus customer CAs) and server identities.
//! - [`secret`]: a string whose `Debug`/`Display` never show the value.
//! - [`logging`]: `tracing` set-up, text or JSON.
//! - [`log_limit`]: one log line per episode of a repeating error, not one per failure.
//! - [`signal`]: the start of both programs' shutdown tree.

// No panic on the request path: peer input, configuration and I/O errors
// are answered, never unwrapped (tests may unwrap).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod credentials;
pub mod errors;
pub mod gitlab_probe;
pub mod gitlab_url;
pub mod headers;
pub mod idle;
pub mod log_limit;
pub mod logging;
pub mod policy;
pub mod runtime;
pub mod sanitize;
pub mod scopes;
pub mod secret;
pub mod signal;
pub mod tls;
pub mod tunnel;
pub mod upstream;

pub use errors::{ErrorCode, GitproxyError};
pub use secret::Secret;

/// Crate version shared by the broker and the agent (they ship together).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
