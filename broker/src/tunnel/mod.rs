//! The broker's end of `gitproxy.v1.Tunnel`.
//!
//! - [`service`]: the `Connect` handler: accessKey check, Hello/Welcome, and
//!   the hand-off to a session.
//! - [`session`]: one agent's stream: the frame dispatcher, heartbeats, drain,
//!   and [`session::AgentSession::send_request`], which the front door uses.
//! - [`registry`]: the agents of every connection and how a request picks one.

pub mod registry;
pub mod service;
pub mod session;

pub use registry::Registry;
pub use session::AgentSession;
