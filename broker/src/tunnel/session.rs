//! One agent's tunnel stream, broker side.
//!
//! The dispatcher (`run`) owns the inbound half and never waits on a request:
//! response heads complete a oneshot, body chunks go into the request's
//! credit-bounded channel, credit and pings update shared state. Requests are
//! started by the front door through [`AgentSession::send_request`]; each one
//! holds a [`RequestGuard`] whose drop cancels it at the agent unless it
//! finished, so a caller that goes away stops the upstream request.
//!
//! Everything the agent sends is untrusted: a frame the protocol does not
//! allow ends the request it concerns with `protocol_error` and counts as a
//! violation (`gitproxy_shared::tunnel::violations`); past the limit the
//! session ends. Nothing an agent sends can panic the dispatcher, and
//! however the session task ends (the stream ended, an error, a panic, an
//! abort), a drop guard removes the session from the registry and fails
//! its pending requests, so a dead session is never picked again.

use super::registry::{Changes, Registry};
use crate::observe::Observer;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use gitproxy_proto::v1::{
    agent_message::Msg as In, broker_message::Msg as Out, AgentMessage, BrokerMessage, Cancel,
    Credit, Data, Drain, End, Header, Ping, Pong, RequestHead,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::body::{self, BodyReceiver, BodySender, PushError};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame};
use gitproxy_shared::tunnel::violations::{Verdict, Violations};
use gitproxy_shared::tunnel::FlowSettings;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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
    tx: mpsc::Sender<Box<BrokerMessage>>,
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
        tx: mpsc::Sender<Box<BrokerMessage>>,
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
                head: Some(head_tx),
                body: None,
                credit: credit.clone(),
            },
        );
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        (id, head_rx, credit)
    }

    /// Sends a request to the agent and waits (up to `timeout`) for the
    /// response head. The body, if any, is pumped within the agent's credit.
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
        let (id, head_rx, credit) = self.register();
        head.id = id;
        head.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        head.end_of_stream = body.is_none();
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

    /// Streams the caller's body to the agent, spending the agent's credit.
    /// A body that stalls (no data for the body idle time while we wait for
    /// it) ends the request.
    async fn pump<B>(
        self: Arc<Self>,
        id: u64,
        mut body: B,
        credit: SendCredit,
        cancel: CancellationToken,
        bytes_in: Arc<AtomicU64>,
    ) where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let flow = self.settings.agent_flow;
        let idle = self.settings.body_idle_timeout;
        let max = flow.max_chunk_bytes as usize;
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                f = gitproxy_shared::idle::within(idle, body.frame()) => f,
            };
            let Some(frame) = frame else {
                info!(connection = %self.conn_id, request_id = id, idle_s = idle.as_secs_f32(), "the caller's request body stalled: no data for the body idle time; ending the request");
                self.fail(
                    id,
                    GitproxyError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "the request body stalled: no data from the caller for {}s (GITPROXY_BODY_IDLE_TIMEOUT)",
                            idle.as_secs_f32()
                        ),
                    ),
                );
                self.control.cancel(id);
                return;
            };
            match frame {
                None => {
                    let end = Box::new(BrokerMessage {
                        msg: Some(Out::End(End { id })),
                    });
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = self.tx.send(end) => {}
                    }
                    return;
                }
                Some(Err(e)) => {
                    debug!(request_id = id, "the caller's request body failed: {e}");
                    self.fail(
                        id,
                        GitproxyError::new(
                            ErrorCode::BadRequest,
                            format!("the request body could not be read: {e}"),
                        ),
                    );
                    self.control.cancel(id);
                    return;
                }
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    while !data.is_empty() {
                        let part = data.split_to(data.len().min(max));
                        let n = part.len() as u64;
                        let msg = Box::new(BrokerMessage {
                            msg: Some(Out::Data(Data { id, data: part })),
                        });
                        let sent = tokio::select! {
                            _ = cancel.cancelled() => false,
                            ok = async {
                                credit.acquire(flow.frame_cost(n as usize)).await.is_ok()
                                    && self.tx.send(msg).await.is_ok()
                            } => ok,
                        };
                        if !sent {
                            return;
                        }
                        bytes_in.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
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

    /// Counts one violation by the agent; `Break` once the limit is reached.
    fn violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        self.observer.protocol_violation(&self.conn_id);
        match self.violations.record(id, what) {
            Verdict::Continue => ControlFlow::Continue(()),
            Verdict::End(reason) => ControlFlow::Break(reason),
        }
    }

    /// A violation about request `id`: if it is pending here it ends with
    /// `protocol_error` and the agent is told to drop it.
    fn request_violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        let err = GitproxyError::new(
            ErrorCode::ProtocolError,
            format!("the agent broke the tunnel protocol: {what}"),
        );
        if self.fail(id, err) {
            self.control.cancel(id);
        }
        self.violation(id, what)
    }

    /// A frame for an id with no pending request: late (the request was
    /// cancelled or failed here first) when the id was issued, a violation
    /// otherwise.
    fn unknown(&self, id: u64, what: &str) -> ControlFlow<String> {
        if id == 0 || id > self.next_id.load(Ordering::Relaxed) {
            self.violation(id, &format!("{what} for a request never sent"))
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Runs the dispatcher until the stream ends, then fails what is left;
    /// the future's output is why it ended. The same clean-up runs if the
    /// future is dropped (even before its first poll) or panics: the guard
    /// that does it ([`Departure`]) is made here, not inside the future.
    pub fn run<S>(
        self: Arc<Self>,
        inbound: S,
        registry: Arc<Registry>,
    ) -> impl std::future::Future<Output = String> + Send
    where
        S: Stream<Item = Result<AgentMessage, tonic::Status>> + Unpin + Send,
    {
        let departure = Departure {
            session: self.clone(),
            registry,
            reason: None,
        };
        self.serve(inbound, departure)
    }

    async fn serve<S>(self: Arc<Self>, mut inbound: S, mut departure: Departure) -> String
    where
        S: Stream<Item = Result<AgentMessage, tonic::Status>> + Unpin + Send,
    {
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let mut nonce = 0u64;
        let age_limit = (!self.settings.max_age.is_zero()).then(|| {
            // ±10% jitter so a fleet does not drain at once.
            let jitter = rand::random_range(0.9..1.1);
            Instant::now() + self.settings.max_age.mul_f64(jitter)
        });
        let reason = loop {
            tokio::select! {
                _ = self.closed.cancelled() => break "closed by the broker".to_string(),
                m = inbound.next() => match m {
                    Some(Ok(m)) => {
                        last_seen = Instant::now();
                        if let ControlFlow::Break(reason) = self.dispatch(m) {
                            break reason;
                        }
                    }
                    None => break "the agent closed the stream".to_string(),
                    Some(Err(s)) => break format!(
                        "stream error: {}",
                        sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)
                    ),
                },
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() > self.settings.heartbeat_timeout {
                        break format!("no frame from the agent for {:?}", last_seen.elapsed());
                    }
                    self.violations.flush();
                    nonce += 1;
                    let _ = self.tx.try_send(Box::new(BrokerMessage { msg: Some(Out::Ping(Ping { nonce })) }));
                }
                _ = async { tokio::time::sleep_until(age_limit.unwrap_or_else(Instant::now)).await }, if age_limit.is_some() && !self.is_draining() => {
                    self.drain("max connection age reached");
                }
            }
        };
        departure.reason = Some(reason.clone());
        drop(departure);
        reason
    }

    /// Ends the session: no new request can use it, it leaves the registry,
    /// and every pending request fails (before its head: the caller gets
    /// `agent_disconnected`; mid-body: a cut body, never a clean end).
    fn end(&self, registry: &Registry, reason: &str) {
        self.closed.cancel();
        registry.remove_session(self);
        let pending: Vec<Pending> = self.lock().drain().map(|(_, p)| p).collect();
        let n = pending.len();
        for p in pending {
            p.credit.close();
            if let Some(h) = p.head {
                let _ = h.send(Err(disconnected_before_head()));
            } else if let Some(b) = p.body {
                b.fail(GitproxyError::new(
                    ErrorCode::AgentDisconnected,
                    "the agent went away in the middle of the response",
                ));
            }
        }
        self.violations.flush();
        info!(connection = %self.conn_id, instance = %self.instance, failed_in_flight = n, "agent disconnected: {reason}");
        self.observer
            .agent_disconnected(&self.conn_id, &self.instance, reason);
    }

    /// Handles one frame without waiting; `Break` ends the session.
    fn dispatch(&self, m: AgentMessage) -> ControlFlow<String> {
        match m.msg {
            Some(In::ResponseHead(h)) => self.response_head(h),
            Some(In::Data(d)) => self.data(d.id, d.data),
            Some(In::End(End { id })) => self.end_frame(id),
            Some(In::Error(e)) => {
                let code = ErrorCode::parse(&e.code);
                let err = GitproxyError {
                    error: if AGENT_CODES.contains(&code) {
                        code
                    } else {
                        ErrorCode::Internal
                    },
                    message: sanitize::owned(&e.message, sanitize::MAX_ERROR_MESSAGE_BYTES),
                    hint: sanitize::owned(&e.hint, sanitize::MAX_ERROR_HINT_BYTES),
                };
                if self.fail(e.id, err) {
                    ControlFlow::Continue(())
                } else {
                    self.unknown(e.id, "Error")
                }
            }
            Some(In::Credit(c)) => {
                let res = self
                    .lock()
                    .get(&c.id)
                    .map(|p| p.credit.grant(c.bytes as usize));
                match res {
                    None => self.unknown(c.id, "Credit"),
                    Some(Err(e)) => self.request_violation(c.id, &e.to_string()),
                    Some(Ok(())) => ControlFlow::Continue(()),
                }
            }
            Some(In::Ping(p)) => {
                self.control.pong(p.nonce);
                ControlFlow::Continue(())
            }
            Some(In::Pong(_)) => ControlFlow::Continue(()),
            Some(In::Drain(d)) => {
                if !self.draining.swap(true, Ordering::SeqCst) {
                    self.changed();
                }
                let reason = sanitize::text(&d.reason, sanitize::MAX_REASON_BYTES);
                info!(connection = %self.conn_id, instance = %self.instance, reason = %reason, "the agent is draining");
                ControlFlow::Continue(())
            }
            Some(In::Hello(_)) => self.violation(0, "a second Hello"),
            None => {
                debug!("frame of an unknown kind ignored (newer agent?)");
                ControlFlow::Continue(())
            }
        }
    }

    fn response_head(&self, h: gitproxy_proto::v1::ResponseHead) -> ControlFlow<String> {
        let id = h.id;
        // Everything about the head is checked before it reaches the caller.
        let status = u16::try_from(h.status)
            .ok()
            .filter(|s| (200..=599).contains(s));
        let headers = gitproxy_shared::headers::from_wire(&h.headers);
        let mut map = self.lock();
        let Some(p) = map.get_mut(&id) else {
            drop(map);
            return self.unknown(id, "ResponseHead");
        };
        if p.head.is_none() {
            drop(map);
            return self.request_violation(id, "a second ResponseHead");
        }
        let (status, headers_map) = match (status, headers) {
            (Some(s), Ok(m)) => (s, m),
            (None, _) => {
                drop(map);
                return self.request_violation(
                    id,
                    &format!("invalid status {} (allowed: 200-599)", h.status),
                );
            }
            (_, Err(e)) => {
                drop(map);
                return self.request_violation(id, &format!("unusable response headers: {e}"));
            }
        };
        let content_length = headers_map
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let head_tx = p.head.take();
        let body = if h.end_of_stream {
            map.remove(&id);
            None
        } else {
            let (tx, rx) =
                body::channel(id, self.settings.flow, self.control.clone(), content_length);
            p.body = Some(tx);
            Some(rx)
        };
        drop(map);
        if let Some(head_tx) = head_tx {
            let _ = head_tx.send(Ok(Answer {
                status,
                headers: h.headers,
                body,
            }));
        }
        ControlFlow::Continue(())
    }

    fn data(&self, id: u64, data: Bytes) -> ControlFlow<String> {
        if data.len() > self.settings.flow.max_chunk_bytes as usize {
            return self.request_violation(id, "Data frame larger than the largest chunk");
        }
        let res = {
            let map = self.lock();
            match map.get(&id) {
                None => None,
                Some(Pending { body: Some(b), .. }) => Some(b.push(data)),
                Some(_) => Some(Err(PushError::Overrun)),
            }
        };
        match res {
            None => self.unknown(id, "Data"),
            Some(Err(PushError::Overrun)) => {
                self.request_violation(id, "Data before the head or beyond the granted credit")
            }
            // The consumer went away; its guard ends the request.
            Some(Err(PushError::Gone)) | Some(Ok(())) => ControlFlow::Continue(()),
        }
    }

    fn end_frame(&self, id: u64) -> ControlFlow<String> {
        let p = self.lock().remove(&id);
        match p {
            Some(Pending { body: Some(b), .. }) => {
                b.end();
                ControlFlow::Continue(())
            }
            Some(Pending {
                head: Some(h),
                credit,
                ..
            }) => {
                credit.close();
                let _ = h.send(Err(GitproxyError::new(
                    ErrorCode::ProtocolError,
                    "the agent broke the tunnel protocol: End before the response head",
                )));
                self.control.cancel(id);
                self.violation(id, "End before the response head")
            }
            Some(_) => ControlFlow::Continue(()),
            None => self.unknown(id, "End"),
        }
    }
}

/// Runs the end of a session however its task ends: normally (with the
/// reason), or by a panic or an abort (the future dropped), so a dead
/// session never stays registered and no caller waits on it forever.
struct Departure {
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    reason: Option<String>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                "the session task panicked".to_string()
            } else {
                "the session task was stopped".to_string()
            }
        });
        self.session.end(&self.registry, &reason);
    }
}

fn disconnected_before_head() -> GitproxyError {
    GitproxyError::new(
        ErrorCode::AgentDisconnected,
        "the agent went away before answering this request",
    )
}

/// Keeps a request alive; dropping it before the response ended cancels the
/// request at the agent (which aborts the upstream request).
pub struct RequestGuard {
    session: Arc<AgentSession>,
    id: u64,
    pump: CancellationToken,
    complete: bool,
}

impl RequestGuard {
    /// The caller received the whole response (its length was known, so the
    /// server stopped reading before End arrived): do not cancel on drop.
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// The request id on the stream.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The serving agent instance.
    pub fn instance(&self) -> &str {
        &self.session.instance
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.pump.cancel();
        let unfinished = self.session.lock().remove(&self.id);
        if let Some(p) = unfinished {
            p.credit.close();
            if !self.complete && !self.session.is_closed() {
                self.session.control.cancel(self.id);
            }
        }
        self.session.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod props;
