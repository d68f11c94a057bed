//! One agent's tunnel stream, broker side.
//!
//! The dispatcher (`run`) owns the inbound half and never waits on a request:
//! response heads complete a oneshot, body chunks go into the request's
//! credit-bounded channel, credit and pings update shared state. Requests are
//! started by the front door through [`AgentSession::send_request`]; each one
//! holds a [`RequestGuard`] whose drop cancels it at the agent unless it
//! finished, so a caller that goes away stops the upstream request.

use super::registry::Registry;
use bytes::Bytes;
use gitproxy_proto::v1::{
    agent_message::Msg as In, broker_message::Msg as Out, AgentMessage, BrokerMessage, Cancel,
    Credit, Data, Drain, End, Header, Ping, Pong, RequestHead,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::tunnel::body::{self, BodyReceiver, BodySender, PushError};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame};
use gitproxy_shared::tunnel::FlowSettings;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{debug, info, warn};

/// What the agent answered.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Response headers (wire form).
    pub headers: Vec<Header>,
    /// The body, unless the head said there is none.
    pub body: Option<BodyReceiver>,
}

type HeadSender = oneshot::Sender<Result<Answer, GitproxyError>>;

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
}

/// One connected agent.
pub struct AgentSession {
    /// Connection served.
    pub conn_id: String,
    /// Agent instance name.
    pub instance: String,
    /// Agent version.
    pub version: String,
    /// Whether the agent injects its own token.
    pub holds_token: bool,
    /// When it connected.
    pub connected_since: SystemTime,
    settings: SessionSettings,
    tx: mpsc::Sender<BrokerMessage>,
    control: Arc<Control>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    in_flight: AtomicUsize,
    draining: AtomicBool,
    closed: CancellationToken,
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

impl AgentSession {
    /// A session writing to `tx` and `control`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn_id: String,
        instance: String,
        version: String,
        holds_token: bool,
        settings: SessionSettings,
        tx: mpsc::Sender<BrokerMessage>,
        control: Arc<Control>,
        closed: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(AgentSession {
            conn_id,
            instance,
            version,
            holds_token,
            connected_since: SystemTime::now(),
            settings,
            tx,
            control,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            closed,
        })
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

    /// Ends the stream now (accessKey rotated, connection deleted, shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Asks the agent to move to a new stream and finish in-flight work here.
    pub fn drain(&self, reason: &str) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(connection = %self.conn_id, instance = %self.instance, in_flight = self.in_flight(), reason, "asking the agent to drain");
        let msg = BrokerMessage {
            msg: Some(Out::Drain(Drain {
                reason: reason.to_string(),
            })),
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(msg).await;
        });
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        head.id = id;
        head.timeout_ms = timeout.as_millis() as u64;
        head.end_of_stream = body.is_none();
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
        let guard = RequestGuard {
            session: self.clone(),
            id,
            pump: self.closed.child_token(),
            complete: false,
        };
        let msg = BrokerMessage {
            msg: Some(Out::RequestHead(head)),
        };
        if self.is_closed() || self.tx.send(msg).await.is_err() {
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
        let max = flow.max_chunk_bytes as usize;
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                f = body.frame() => f,
            };
            match frame {
                None => {
                    let end = BrokerMessage {
                        msg: Some(Out::End(End { id })),
                    };
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
                        let msg = BrokerMessage {
                            msg: Some(Out::Data(Data { id, data: part })),
                        };
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

    /// Ends a request with an error, wherever it is.
    fn fail(&self, id: u64, err: GitproxyError) {
        let p = self.lock().remove(&id);
        if let Some(p) = p {
            p.credit.close();
            if let Some(h) = p.head {
                let _ = h.send(Err(err));
            } else if let Some(b) = p.body {
                b.fail(err);
            }
        }
    }

    fn protocol_error(&self, id: u64, what: &str) {
        warn!(connection = %self.conn_id, instance = %self.instance, request_id = id, "protocol error from the agent: {what}");
        self.fail(
            id,
            GitproxyError::new(
                ErrorCode::ProtocolError,
                format!("the agent broke the tunnel protocol: {what}"),
            ),
        );
        self.control.cancel(id);
    }

    /// Runs the dispatcher until the stream ends, then fails what is left.
    pub async fn run(
        self: Arc<Self>,
        mut inbound: Streaming<AgentMessage>,
        registry: Arc<Registry>,
    ) -> String {
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
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        last_seen = Instant::now();
                        self.dispatch(m);
                    }
                    Ok(None) => break "the agent closed the stream".to_string(),
                    Err(s) => break format!("stream error: {}", s.message()),
                },
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() > self.settings.heartbeat_timeout {
                        break format!("no frame from the agent for {:?}", last_seen.elapsed());
                    }
                    nonce += 1;
                    let _ = self.tx.try_send(BrokerMessage { msg: Some(Out::Ping(Ping { nonce })) });
                }
                _ = async { tokio::time::sleep_until(age_limit.unwrap_or_else(Instant::now)).await }, if age_limit.is_some() && !self.is_draining() => {
                    self.drain("max connection age reached");
                }
            }
        };
        self.closed.cancel();
        registry.remove(&self);
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
        info!(connection = %self.conn_id, instance = %self.instance, failed_in_flight = n, "agent disconnected: {reason}");
        reason
    }

    fn dispatch(&self, m: AgentMessage) {
        match m.msg {
            Some(In::ResponseHead(h)) => {
                let id = h.id;
                let mut map = self.lock();
                let Some(p) = map.get_mut(&id) else {
                    drop(map);
                    self.unknown(id, "ResponseHead");
                    return;
                };
                let Some(head_tx) = p.head.take() else {
                    drop(map);
                    self.protocol_error(id, "a second ResponseHead");
                    return;
                };
                let headers_map = gitproxy_shared::headers::from_wire(&h.headers);
                let Ok(headers_map) = headers_map else {
                    drop(map);
                    let _ = head_tx.send(Err(GitproxyError::new(
                        ErrorCode::ProtocolError,
                        "response headers too large",
                    )));
                    self.protocol_error(id, "response headers too large");
                    return;
                };
                let content_length = headers_map
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
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
                let status = u16::try_from(h.status)
                    .ok()
                    .filter(|s| (100..=999).contains(s));
                let Some(status) = status else {
                    self.protocol_error(id, "invalid status");
                    return;
                };
                let _ = head_tx.send(Ok(Answer {
                    status,
                    headers: h.headers,
                    body,
                }));
            }
            Some(In::Data(d)) => {
                let id = d.id;
                if d.data.len() > self.settings.flow.max_chunk_bytes as usize {
                    self.protocol_error(id, "Data frame larger than the largest chunk");
                    return;
                }
                let res = {
                    let map = self.lock();
                    match map.get(&id) {
                        None => None,
                        Some(Pending { body: Some(b), .. }) => Some(b.push(d.data)),
                        Some(_) => Some(Err(PushError::Overrun)),
                    }
                };
                match res {
                    None => self.unknown(id, "Data"),
                    Some(Err(PushError::Overrun)) => {
                        self.protocol_error(id, "Data before the head or beyond the granted credit")
                    }
                    _ => {}
                }
            }
            Some(In::End(End { id })) => {
                let p = self.lock().remove(&id);
                match p {
                    Some(Pending { body: Some(b), .. }) => b.end(),
                    Some(Pending { head: Some(h), .. }) => {
                        let _ = h.send(Err(GitproxyError::new(
                            ErrorCode::ProtocolError,
                            "End before the response head",
                        )));
                    }
                    Some(_) => {}
                    None => self.unknown(id, "End"),
                }
            }
            Some(In::Error(e)) => {
                let err = GitproxyError {
                    error: ErrorCode::parse(&e.code),
                    message: e.message,
                    hint: e.hint,
                };
                self.fail(e.id, err);
            }
            Some(In::Credit(c)) => {
                let res = self
                    .lock()
                    .get(&c.id)
                    .map(|p| p.credit.grant(c.bytes as usize));
                if let Some(Err(e)) = res {
                    self.protocol_error(c.id, &e.to_string());
                }
            }
            Some(In::Ping(p)) => self.control.pong(p.nonce),
            Some(In::Pong(_)) => {}
            Some(In::Drain(d)) => {
                self.draining.store(true, Ordering::SeqCst);
                info!(connection = %self.conn_id, instance = %self.instance, reason = %d.reason, "the agent is draining");
            }
            Some(In::Hello(_)) => {
                warn!(connection = %self.conn_id, "unexpected second Hello ignored")
            }
            None => debug!("frame of an unknown kind ignored (newer agent?)"),
        }
    }

    /// A frame for an id with no pending request: late (the request was
    /// cancelled or failed here first) when the id was issued, bogus otherwise.
    fn unknown(&self, id: u64, what: &str) {
        if id > self.next_id.load(Ordering::Relaxed) {
            warn!(connection = %self.conn_id, request_id = id, "protocol error from the agent: {what} for a request never sent");
        }
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
