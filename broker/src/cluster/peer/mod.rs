//! The channel between replicas: a replica holding no agent of a connection
//! forwards the front-door request to a replica that holds one.
//!
//! - [`server`]: the peer listener (`--peer-listen`): HTTP/2 (h2c; HTTP/1.1
//!   is understood too) behind the same accept loop, caps and timeouts as
//!   the api listener. Every request must carry the shared secret
//!   ([`AUTH_HEADER`], `GITPROXY_PEER_SECRET_FILE`, compared in constant
//!   time); anything else is answered 401 and logged, rate-limited. It
//!   serves only `/gitlab/{connection}/...` of this broker's own
//!   connections, **locally**: a forwarded request is never forwarded again.
//! - [`client`]: pooled keep-alive HTTP/1.1 connections per peer address
//!   (why not HTTP/2: see the module).
//! - [`replay`]: a request body whose first bytes are kept, so a request a
//!   peer refused before using it (`agent_not_connected`) can go elsewhere.
//!
//! What the forwarder sends besides the caller's request, trusted by the
//! receiver only after the secret matched: the front-door base it computed
//! ([`BASE_HEADER`], so `Link`/`Location` name the replica the caller
//! asked) and its replica id ([`FROM_HEADER`], for logs). All three are
//! `X-Gitproxy-*` headers, which never travel to an agent or to GitLab;
//! the caller's own `X-Gitproxy-*` headers are dropped before forwarding.

pub mod client;
pub mod replay;
pub mod server;

use std::time::Duration;

/// The shared secret.
pub const AUTH_HEADER: &str = "x-gitproxy-peer-auth";
/// The front-door base the forwarding replica computed for the caller.
pub const BASE_HEADER: &str = "x-gitproxy-peer-base";
/// The forwarding replica's id.
pub const FROM_HEADER: &str = "x-gitproxy-peer-from";
/// Optional debug response header naming the replica that served a
/// front-door request (`--replica-header`).
pub const REPLICA_HEADER: &str = "x-gitproxy-replica";

/// Most open connections on the peer listener: one per request in flight
/// from another replica (HTTP/1.1), plus the idle ones replicas keep.
pub const MAX_PEER_CONNECTIONS: usize = 4096;
/// Idle connections a replica keeps to each peer.
pub const POOL_IDLE_PER_PEER: usize = 256;
/// How long an idle pooled connection to a peer is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 stream window on the peer listener (replicas send HTTP/1.1; the
/// listener still understands h2c), both directions.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window on the peer listener.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Limit on dialling a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed dial, requests fail at once for this long instead of
/// each waiting for the connect timeout.
pub const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// TCP keep-alive idle time on pooled peer connections (a frozen replica's
/// idle connections are dropped within interval + timeout).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long keep-alive probes may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request body bytes kept for a second attempt elsewhere.
pub const REPLAY_BYTES: usize = 64 * 1024;
/// Largest error body read from a peer's gitproxy error answer.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
