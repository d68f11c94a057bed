//! The multiplexing machinery both ends of `gitproxy.v1.Tunnel` share.
//!
//! - [`limits`]: window, chunk and frame-cost settings and their validation.
//! - [`frames`]: the per-request frame rules (head → data* → end, abort,
//!   credit) as one state machine both dispatchers run every frame through.
//! - [`credit`]: per-request, per-direction credit: what a sender may still
//!   send, what a receiver has buffered and when it hands credit back.
//! - [`outbound`]: the single outbound queue of a stream. Data frames go through
//!   a [`queue`] bounded in messages and in body bytes; control frames (credit,
//!   cancel, pong) are coalesced in a small table and sent first, so they are never stuck behind bulk data and
//!   can be posted from synchronous code (`Drop`, `poll`).
//! - [`body`]: the receiving half of one request's body as a stream that hands
//!   credit back as its consumer reads.
//! - [`violations`]: a peer's protocol violations on one stream: counted,
//!   logged without flooding, and the end of the stream at the limit.

pub mod body;
pub mod credit;
pub mod frames;
pub mod limits;
pub mod outbound;
pub mod queue;
pub mod violations;

pub use limits::FlowSettings;
