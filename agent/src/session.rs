//! One tunnel stream, agent side.
//!
//! Layout:
//! - this file: what a session is told and tells (context, events, ends,
//!   errors) and [`run`], which dials, shakes hands and serves;
//! - [`handshake`]: Hello/Welcome (also used by `gitproxy-agent check`);
//! - [`serve`]: the stream's loop: frames, heartbeats, drain and shutdown;
//! - [`reader`]: the dispatcher, judging every frame by the shared frame rules;
//! - [`shared`]: what the dispatcher and the request tasks share;
//! - [`upstream`]: the GitLab client of a session.

use crate::config::AgentConfig;
use crate::dial::{self, DialError};
use crate::metrics::AgentMetrics;
use gitproxy_shared::gitlab_url::GitlabUrlError;
use gitproxy_shared::tunnel::frames;
use gitproxy_shared::tunnel::outbound::{Control, Outbound};
use gitproxy_shared::tunnel::queue::{self, QUEUE_BYTES, QUEUE_MESSAGES};
use gitproxy_shared::upstream::Upstream;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub mod handshake;
mod reader;
mod serve;
mod shared;
mod upstream;

pub(crate) use shared::{error_frame, Shared};

/// Capabilities announced in Hello.
pub const CAPABILITIES: [&str; 3] = ["flow-control-v1", "drain-v1", frames::INLINE_BODY];

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The broker asked to drain; in-flight requests finished.
    Drained,
    /// The agent is shutting down; in-flight requests finished or the grace
    /// period ran out.
    ShutDown,
    /// The broker closed the stream.
    BrokerClosed,
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker could not be reached.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The accessKey was refused.
    #[error("the broker rejected the accessKey (UNAUTHENTICATED): check GITPROXY_ACCESS_KEY (Helm gitproxy.accessKey) against the key issued for this connection")]
    Unauthenticated,
    /// The broker refused the stream for another reason.
    #[error("the broker refused the tunnel: {0}")]
    Refused(String),
    /// The handshake went wrong.
    #[error("tunnel handshake failed: {0}")]
    Handshake(String),
    /// The broker asked for another GitLab than the pinned one.
    #[error("the broker asked for GitLab at {asked}, but this agent is pinned to {pinned} (GITPROXY_GITLAB_URL); refusing")]
    PinMismatch {
        /// What the broker sent.
        asked: String,
        /// The pin.
        pinned: String,
    },
    /// The broker's GitLab URL fails validation.
    #[error("the broker sent an unusable GitLab URL, refusing it: {0}")]
    BadGitlabUrl(GitlabUrlError),
    /// An unpinned agent was asked for another GitLab origin than the first
    /// one it accepted.
    #[error("the broker asked for GitLab at {asked}, but this unpinned agent has served GitLab at {first} since it started and refuses another origin until it is restarted; pin the GitLab URL with GITPROXY_GITLAB_URL (Helm gitproxy.gitlabUrl)")]
    OriginChanged {
        /// The origin of the first accepted Welcome.
        first: String,
        /// The origin asked for now.
        asked: String,
    },
    /// The stream broke.
    #[error("the tunnel stream broke: {0}")]
    Stream(String),
    /// No frame from the broker for too long.
    #[error("no frame from the broker for {0:?}: assuming it is dead")]
    HeartbeatTimeout(Duration),
    /// The broker broke the tunnel protocol too often.
    #[error("ending the tunnel stream: {0}")]
    Protocol(String),
    /// The GitLab client could not be built.
    #[error("cannot build the GitLab client: {0}")]
    Upstream(String),
}

impl SessionError {
    /// The fix an operator should try (empty when the message says it all).
    pub fn hint(&self) -> &'static str {
        match self {
            SessionError::Dial(e) => e.hint(),
            SessionError::Unauthenticated => "Use the accessKey issued for this connection (Helm gitproxy.accessKey or GITPROXY_ACCESS_KEY); a rotated key invalidates the old one.",
            SessionError::PinMismatch { .. } => "Fix GITPROXY_GITLAB_URL (Helm gitproxy.gitlabUrl) or the connection's GitLab URL.",
            SessionError::BadGitlabUrl(_) => "Fix the connection's GitLab URL in the broker.",
            _ => "",
        }
    }
}

/// What a session tells the supervisor while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The handshake completed.
    Connected {
        /// Session number.
        generation: u64,
        /// The connection served.
        connection: String,
        /// The GitLab requests go to.
        gitlab: String,
    },
    /// The broker asked this session to drain: open a successor now.
    DrainRequested {
        /// Session number.
        generation: u64,
    },
}

/// What the supervisor hands every session.
pub struct SessionContext {
    /// Configuration.
    pub cfg: Arc<AgentConfig>,
    /// This session's number.
    pub generation: u64,
    /// Events for the supervisor.
    pub events: mpsc::Sender<SessionEvent>,
    /// Agent shutdown.
    pub shutdown: CancellationToken,
    /// Generation of the newest connected session (a draining session ends
    /// only once its successor is connected, so no request finds no agent).
    pub connected_generation: watch::Receiver<u64>,
    /// GitLab client reused across sessions while the URL stays the same.
    pub upstream_cache: Arc<Mutex<Option<Upstream>>>,
    /// The GitLab origin (scheme, host, port) of the first Welcome accepted
    /// since the agent started: an unpinned agent refuses any other.
    pub first_origin: Arc<Mutex<Option<String>>>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
}

/// Runs one session until it ends.
pub async fn run(ctx: SessionContext) -> Result<SessionEnd, SessionError> {
    let cfg = ctx.cfg.clone();
    let mut client = dial::connect(&cfg).await?;

    let (tx, rx) = queue::channel(QUEUE_MESSAGES, QUEUE_BYTES);
    let control = Control::new();
    // Ending the call would reset the HTTP/2 stream and drop queued frames;
    // a graceful end half-closes instead (see `serve::finish`).
    let half_close = CancellationToken::new();
    let outbound =
        Outbound::new(control.clone(), rx, shared::control_to_msg).closed_by(half_close.clone());
    let opened = handshake::open(&mut client, &cfg, &cfg.instance, &tx, outbound).await?;
    let upstream = upstream::upstream_for(&ctx, opened.gitlab_url)?;

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        upstream,
        tx,
        broker_flow: opened.broker_flow,
        // The first few names only: a Welcome is peer input, as a Hello is
        // for the broker.
        inline_bodies: opened
            .welcome
            .capabilities
            .iter()
            .take(16)
            .any(|c| c == frames::INLINE_BODY),
        metrics: ctx.metrics.clone(),
        control,
        inflight: Mutex::new(Default::default()),
        idle: Default::default(),
    });
    // Open (for the metrics) until this function returns.
    let _stream = ctx.metrics.stream_opened();
    // The supervisor publishes the health state, then logs the connection.
    let _ = ctx
        .events
        .send(SessionEvent::Connected {
            generation: ctx.generation,
            connection: opened.welcome.connection_id.clone(),
            gitlab: opened.welcome.gitlab_url.clone(),
        })
        .await;
    let heartbeat = serve::Heartbeat {
        interval: opened.heartbeat_interval,
        timeout: opened.heartbeat_timeout,
    };
    serve::serve(&ctx, shared, opened.inbound, &half_close, heartbeat).await
}

#[cfg(test)]
mod answer_tests;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
