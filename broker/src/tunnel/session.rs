//! One agent's tunnel stream, broker side.
//!
//! Requests are started by the front door through
//! [`AgentSession::send_request`]; each one holds a [`RequestGuard`] whose
//! drop cancels it at the agent unless it finished, so a caller that goes
//! away stops the upstream request.
//!
//! Layout:
//! - this file: the session's state, request registration and sending;
//! - [`dispatch`]: the agent's frames, judged by the shared frame rules;
//! - [`serve`]: the session task (heartbeats, max age, clean-up however it ends);
//! - [`pump`]: a caller's request body streamed within the agent's credit;
//! - [`guard`]: the request handle, [`RequestGuard`].

use super::registry::Changes;
use crate::observe::Observer;
use bytes::Bytes;
use gitproxy_proto::v1::{
    broker_message::Msg as Out, BrokerMessage, Cancel, Credit, Drain, Header, Pong, RequestHead,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::tunnel::body::{BodyReceiver, BodySender};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::frames::RequestState;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame};
use gitproxy_shared::tunnel::queue;
use gitproxy_shared::tunnel::violations::Violations;
use gitproxy_shared::tunnel::FlowSettings;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::info;

mod dispatch;
mod guard;
mod pump;
mod serve;

pub use guard::RequestGuard;

/// What the agent answered.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status (200–599).
    pub status: u16,
    /// Response headers (wire form; within the count and size limits).
    pub headers: Vec<Header>,
    /// The body, unless the head said there is none.
    pub body: Option<BodyReceiver>,
}

type HeadSender = oneshot::Sender<Result<Answer, GitproxyError>>;
type HeadReceiver = oneshot::Receiver<Result<Answer, GitproxyError>>;

struct Pending {
    /// Where the agent's answer stands (the frame rules' state).
    state: RequestState,
    head: Option<HeadSender>,
    body: Option<BodySender>,
    credit: SendCredit,
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Our receive flow control (response bodies).
    pub flow: FlowSettings,
    /// The agent's receive flow control (request bodies).
    pub agent_flow: FlowSettings,
    /// Ping period.
    pub heartbeat_interval: Duration,
    /// Silence after which the agent is dead.
    pub heartbeat_timeout: Duration,
    /// Age after which the stream is asked to drain (zero: never).
    pub max_age: Duration,
    /// Longest silence of a caller's request body mid-upload (zero: never).
    pub body_idle_timeout: Duration,
    /// The agent's Hello offered `inline-body-v1`: a small request body may
    /// go whole in its head.
    pub agent_inline_bodies: bool,
}

/// Error codes an agent may end a request with; any other code it sends
/// becomes `internal` (an agent cannot make the broker answer, say,
/// `unauthorized` or `overloaded`, nor trigger the retry reserved for
/// `agent_disconnected`).
const AGENT_CODES: [ErrorCode; 8] = [
    ErrorCode::BlockedByPolicy,
    ErrorCode::UpstreamUnreachable,
    ErrorCode::UpstreamTls,
    ErrorCode::ProxyError,
    ErrorCode::Timeout,
    ErrorCode::ProtocolError,
    ErrorCode::BadRequest,
    ErrorCode::Internal,
];

/// Numbers the sessions of this process (names them in the cluster registry).
static SESSION_NO: AtomicU64 = AtomicU64::new(0);

/// One connected agent.
pub struct AgentSession {
    /// Connection served.
    pub conn_id: String,
    /// This session's number in this process (1, 2, ...).
    pub session_no: u64,
    /// Agent instance name (sanitised, bounded).
    pub instance: String,
    /// Agent version (sanitised, bounded).
    pub version: String,
    /// Whether the agent injects its own token.
    pub holds_token: bool,
    /// When it connected.
    pub connected_since: SystemTime,
    settings: SessionSettings,
    tx: queue::Sender<Box<BrokerMessage>>,
    control: Arc<Control>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    in_flight: AtomicUsize,
    draining: AtomicBool,
    closed: CancellationToken,
    violations: Violations,
    observer: Arc<Observer>,
    /// Where a drain is reported (the registry's change feed).
    changes: OnceLock<Arc<Changes>>,
}

impl std::fmt::Debug for AgentSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSession")
            .field("conn_id", &self.conn_id)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Turns a control frame into a broker message.
pub fn control_to_msg(f: ControlFrame) -> BrokerMessage {
    let msg = match f {
        ControlFrame::Credit { id, bytes } => Out::Credit(Credit { id, bytes }),
        ControlFrame::Cancel(id) => Out::Cancel(Cancel { id }),
        ControlFrame::Pong(nonce) => Out::Pong(Pong { nonce }),
    };
    BrokerMessage { msg: Some(msg) }
}

/// Who an agent is, as read (and cleaned) from its Hello.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    /// Instance name (sanitised, bounded).
    pub instance: String,
    /// Version (sanitised, bounded).
    pub version: String,
    /// Whether the agent injects its own token.
    pub holds_token: bool,
}

impl AgentSession {
    /// A session writing to `tx` and `control`, reporting to `observer`.
    pub fn new(
        conn_id: String,
        agent: AgentIdentity,
        settings: SessionSettings,
        tx: queue::Sender<Box<BrokerMessage>>,
        control: Arc<Control>,
        closed: CancellationToken,
        observer: Arc<Observer>,
    ) -> Arc<Self> {
        Arc::new(AgentSession {
            conn_id,
            session_no: SESSION_NO.fetch_add(1, Ordering::Relaxed) + 1,
            instance: agent.instance,
            version: agent.version,
            holds_token: agent.holds_token,
            connected_since: SystemTime::now(),
            settings,
            tx,
            control,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            closed,
            violations: Violations::new("agent"),
            observer,
            changes: OnceLock::new(),
        })
    }

    /// Reports later state changes (drain) to `changes` (set once, by the
    /// registry that holds this session).
    pub(crate) fn report_changes_to(&self, changes: Arc<Changes>) {
        let _ = self.changes.set(changes);
    }

    fn changed(&self) {
        if let Some(c) = self.changes.get() {
            c.mark(&self.conn_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight on this stream.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// True once asked to drain (or the agent said it is leaving).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// True once the stream is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Waits until the stream is gone (however it ends).
    pub async fn wait_closed(&self) {
        self.closed.cancelled().await
    }

    /// Ends the stream now (accessKey rotated, connection deleted, shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Asks the agent to move to a new stream and finish in-flight work here.
    pub fn drain(&self, reason: &str) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        self.changed();
        info!(connection = %self.conn_id, instance = %self.instance, in_flight = self.in_flight(), reason, "asking the agent to drain");
        let msg = BrokerMessage {
            msg: Some(Out::Drain(Drain {
                reason: reason.to_string(),
            })),
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(Box::new(msg)).await;
        });
    }

    /// Registers a new request: its id, the receiver of its head, and the
    /// agent's credit for its body.
    fn register(&self) -> (u64, HeadReceiver, SendCredit) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (head_tx, head_rx) = oneshot::channel();
        let credit = SendCredit::new(self.settings.agent_flow.window_bytes as usize);
        self.lock().insert(
            id,
            Pending {
                state: RequestState::AwaitingHead,
                head: Some(head_tx),
                body: None,
                credit: credit.clone(),
            },
        );
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        (id, head_rx, credit)
    }

    /// Sends a request to the agent and waits (up to `timeout`) for the
    /// response head. The body, if any, is pumped within the agent's credit,
    /// or, when it is small, of known length and the agent offered
    /// `inline-body-v1`, read first and sent whole in the head.
    /// Dropping the returned guard before the body ended cancels the request.
    pub async fn send_request<B>(
        self: &Arc<Self>,
        mut head: RequestHead,
        body: Option<B>,
        timeout: Duration,
        bytes_in: Arc<AtomicU64>,
    ) -> Result<(Answer, RequestGuard), GitproxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let mut body = body;
        // A small body of known length goes whole in the head: one frame
        // instead of head, Data and End.
        let max = self.settings.agent_flow.max_chunk_bytes as u64;
        let whole = body.as_ref().and_then(|b| b.size_hint().exact());
        if let Some(b) = body
            .as_mut()
            .filter(|_| self.settings.agent_inline_bodies && whole.is_some_and(|n| n <= max))
        {
            let data = self.whole_body(b, max as usize).await?;
            bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            head.body = data;
            body = None;
        }
        let (id, head_rx, credit) = self.register();
        head.id = id;
        head.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        head.end_of_stream = body.is_none();
        if !head.body.is_empty() {
            // Always at hand: the request's credit is a whole window.
            let cost = self.settings.agent_flow.frame_cost(head.body.len());
            let _ = credit.acquire(cost).await;
        }
        let guard = RequestGuard {
            session: self.clone(),
            id,
            pump: self.closed.child_token(),
            complete: false,
        };
        let msg = BrokerMessage {
            msg: Some(Out::RequestHead(head)),
        };
        if self.is_closed() || self.tx.send(Box::new(msg)).await.is_err() {
            return Err(GitproxyError::new(
                ErrorCode::AgentDisconnected,
                "the agent went away before the request could be sent",
            ));
        }
        if let Some(body) = body {
            tokio::spawn(
                self.clone()
                    .pump(id, body, credit, guard.pump.clone(), bytes_in),
            );
        }
        let answer = tokio::select! {
            r = head_rx => r.unwrap_or_else(|_| Err(disconnected_before_head())),
            _ = tokio::time::sleep(timeout) => Err(GitproxyError::new(
                ErrorCode::Timeout,
                format!("GitLab did not answer within {}s", timeout.as_secs()),
            )),
        }?;
        Ok((answer, guard))
    }

    /// Ends a request with an error, wherever it is. False when it was not
    /// pending (unknown, or already finished here).
    fn fail(&self, id: u64, err: GitproxyError) -> bool {
        let p = self.lock().remove(&id);
        let Some(p) = p else {
            return false;
        };
        p.credit.close();
        if let Some(h) = p.head {
            let _ = h.send(Err(err));
        } else if let Some(b) = p.body {
            b.fail(err);
        }
        true
    }
}

fn disconnected_before_head() -> GitproxyError {
    GitproxyError::new(
        ErrorCode::AgentDisconnected,
        "the agent went away before answering this request",
    )
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
