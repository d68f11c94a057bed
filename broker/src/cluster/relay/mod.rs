//! Relaying a caller's HTTP/1.1 connection to the replica that holds the
//! agent, so a forwarded request costs the forwarding replica about what a
//! TCP relay costs instead of a second front door.
//!
//! A request forwarded per request ([`crate::frontdoor::remote`]) is served
//! twice over HTTP: the forwarding replica parses the caller's request,
//! runs the front door, sends a new HTTP/1.1 request to the peer, parses its
//! answer and writes it again. Measured, that hop cost as much CPU as the
//! whole local request (BENCHMARKS.md, "Forwarded between replicas"). For an
//! HTTP/1.1 caller the forwarding replica can do much less:
//!
//! 1. [`outbound`] (api listener): the first request head of a fresh
//!    HTTP/1.1 connection is read and parsed ([`framing`]). If it is for an
//!    agent-mode connection held by another replica only (the same rule as
//!    `frontdoor::route`), the replica dials that replica's peer listener,
//!    sends a preamble naming itself, the shared secret and the caller's
//!    address, then the caller's bytes as they came, and copies bytes both
//!    ways. Everything else goes to hyper here, with the bytes read so far.
//! 2. [`inbound`] (peer listener): a connection that starts with the
//!    preamble and the right secret is served by the **api router**, as if
//!    the caller had connected to this replica: it checks the caller's key,
//!    computes the front-door base from the caller's `Host` (the replicas
//!    share their configuration) and writes the access-log line.
//! 3. While relaying, the relay follows the HTTP/1.1 message boundaries
//!    without decoding bodies. At every request head it routes again: a
//!    request that goes elsewhere (another connection, an agent that moved)
//!    waits for the answers in flight, then the connection continues here
//!    with hyper from that head on. A peer that closes between exchanges
//!    (its idle timeout, its shutdown) closes the caller's connection as a
//!    server's keep-alive close would; one that dies with a request sent and
//!    no answer started gets `502 agent_disconnected` written for it; one
//!    that dies in the middle of an answer cuts the caller's connection, so
//!    the body is never presented as complete.
//!
//! HTTP/2 callers (one connection carries requests of many connections at
//! once) and requests the relay cannot follow exactly (see [`framing`]) are
//! forwarded per request, as before. A relayed connection's requests may be
//! forwarded once more per request by the receiving replica when its agent
//! has just moved; a request forwarded per request is never forwarded
//! again, so nothing loops.

pub mod framing;
pub mod inbound;
pub mod outbound;

pub use inbound::Inbound;
pub use outbound::Outbound;

/// Largest request or response head the relay follows: the header limit
/// plus a request line.
pub const MAX_HEAD_BYTES: usize = gitproxy_shared::headers::MAX_HEADER_BYTES + 8 * 1024;
/// The first line of a relayed connection on the peer listener.
pub const PREAMBLE_LINE: &str = "RELAY /gitproxy/relay/v1 HTTP/1.1\r\n";
/// How much longer than `--idle-timeout` the receiving replica keeps an
/// idle relayed connection. The relaying replica applies the caller's idle
/// timeout itself, so the receiver never closes first in the normal case: a
/// close by the receiver races with the caller's next request, which would
/// then be answered `agent_disconnected` (or sent again, when safe) instead
/// of being served.
pub const PEER_IDLE_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);
/// The caller's address, in the preamble.
pub const CLIENT_HEADER: &str = "x-gitproxy-relay-client";
/// Largest preamble accepted.
pub const MAX_PREAMBLE_BYTES: usize = 4096;
