//! One tunnel stream: the Hello/Welcome handshake, the frame dispatcher and
//! heartbeats.
//!
//! The dispatcher never waits on a request: heads spawn a task, body chunks go
//! into the request's credit-bounded channel, credit and cancels update shared
//! state. So a slow GitLab or a slow caller for one request never holds up the
//! frames of the others.
//!
//! What the broker sends is checked too: a frame the protocol does not allow
//! ends the request it concerns with `protocol_error` and counts as a
//! violation (logged without flooding; past the limit the session ends and
//! the supervisor reconnects), and broker-chosen text (Welcome, Drain
//! reasons, methods and paths, status messages) is cleaned before it is
//! logged.

use crate::config::AgentConfig;
use crate::dial::{self, DialError};
use crate::metrics::{AgentMetrics, Outcome};
use crate::request;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, broker_message::Msg as In, AgentMessage, BrokerMessage, Cancel,
    Credit, Drain, Error as ErrorFrame, Hello, Ping, Pong, RequestHead, Welcome,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::gitlab_url::{self, GitlabUrlError};
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::body::{self, BodySender, PushError};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame, Outbound};
use gitproxy_shared::tunnel::violations::{Verdict, Violations};
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::upstream::{Upstream, UpstreamConfig};
use gitproxy_shared::VERSION;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tracing::{debug, info, warn, Instrument};

/// Capabilities announced in Hello.
pub const CAPABILITIES: [&str; 2] = ["flow-control-v1", "drain-v1"];

/// Outbound data frames queued per stream before request tasks wait.
const OUTBOUND_QUEUE: usize = 256;

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

/// A request being served.
struct Inflight {
    body: Option<BodySender>,
    credit: SendCredit,
    cancel: CancellationToken,
}

/// State shared by the dispatcher and the request tasks of one stream.
pub(crate) struct Shared {
    pub(crate) cfg: Arc<AgentConfig>,
    pub(crate) upstream: Upstream,
    pub(crate) tx: mpsc::Sender<AgentMessage>,
    pub(crate) broker_flow: FlowSettings,
    pub(crate) metrics: Arc<AgentMetrics>,
    control: Arc<Control>,
    inflight: Mutex<HashMap<u64, Inflight>>,
    idle: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Inflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a request task when it is done.
    pub(crate) fn finish(&self, id: u64) {
        let mut map = self.lock();
        map.remove(&id);
        if map.is_empty() {
            self.idle.notify_one();
        }
    }

    fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Sends an Error frame without making the dispatcher wait.
    pub(crate) fn reply_error(&self, id: u64, err: &GitproxyError) {
        let msg = error_frame(id, err);
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.tx.try_send(msg) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Ends request `id`, if it is live here, because the broker broke the
    /// protocol (the broker is told with an Error frame). Ids not live here
    /// get no answer: the broker never sent them, or is done with them.
    fn protocol_error(&self, id: u64, what: &str) {
        let Some(e) = self.lock().remove(&id) else {
            return;
        };
        e.cancel.cancel();
        e.credit.close();
        self.reply_error(
            id,
            &GitproxyError::new(ErrorCode::ProtocolError, format!("protocol error: {what}")),
        );
    }
}

/// Wire form of an error.
pub(crate) fn error_frame(id: u64, err: &GitproxyError) -> AgentMessage {
    AgentMessage {
        msg: Some(Out::Error(ErrorFrame {
            id,
            code: err.error.as_str().to_string(),
            message: err.message.clone(),
            hint: err.hint.clone(),
        })),
    }
}

fn control_to_msg(f: ControlFrame) -> AgentMessage {
    let msg = match f {
        ControlFrame::Credit { id, bytes } => Out::Credit(Credit { id, bytes }),
        ControlFrame::Pong(nonce) => Out::Pong(Pong { nonce }),
        // The agent ends requests with Error frames; a cancel here means the
        // same to the broker.
        ControlFrame::Cancel(id) => Out::Error(ErrorFrame {
            id,
            code: ErrorCode::Internal.as_str().into(),
            message: "cancelled by the agent".into(),
            hint: String::new(),
        }),
    };
    AgentMessage { msg: Some(msg) }
}

/// Runs one session until it ends.
pub async fn run(ctx: SessionContext) -> Result<SessionEnd, SessionError> {
    let cfg = ctx.cfg.clone();
    let mut client = dial::connect(&cfg).await?;

    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let control = Control::new();
    let hello = AgentMessage {
        msg: Some(Out::Hello(Hello {
            version: VERSION.to_string(),
            instance: cfg.instance.clone(),
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
            pinned_gitlab_url: cfg
                .gitlab_url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
            holds_token: cfg.gitlab_token.is_some(),
            window_bytes: cfg.flow.window_bytes,
        })),
    };
    tx.try_send(hello)
        .map_err(|_| SessionError::Handshake("cannot queue Hello".into()))?;

    // Ending the call would reset the HTTP/2 stream and drop queued frames;
    // a graceful end half-closes instead (see `finish`).
    let half_close = CancellationToken::new();
    let outbound = Outbound::new(control.clone(), rx, control_to_msg).closed_by(half_close.clone());
    let mut req = tonic::Request::new(outbound);
    let mut auth =
        MetadataValue::try_from(format!("Bearer {}", cfg.access_key.expose())).map_err(|_| {
            SessionError::Handshake("the accessKey holds characters not allowed in a header".into())
        })?;
    auth.set_sensitive(true);
    req.metadata_mut().insert("authorization", auth);

    // A broker (or a load balancer in front of it) that accepted the
    // connection but never answers must not hold the agent: the stream must
    // open within the connect timeout.
    let opened = tokio::time::timeout(cfg.connect_timeout, client.connect(req)).await;
    let mut inbound = match opened {
        Err(_) => {
            return Err(SessionError::Handshake(format!(
                "the broker did not open the tunnel stream within {:?} (GITPROXY_CONNECT_TIMEOUT)",
                cfg.connect_timeout
            )))
        }
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) if s.code() == Code::Unauthenticated => {
            return Err(SessionError::Unauthenticated)
        }
        Ok(Err(s)) => {
            return Err(SessionError::Refused(format!(
                "{}: {}",
                s.code(),
                sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)
            )))
        }
    };

    let welcome = match tokio::time::timeout(Duration::from_secs(15), inbound.message()).await {
        Ok(Ok(Some(BrokerMessage {
            msg: Some(In::Welcome(w)),
        }))) => w,
        Ok(Ok(Some(_))) => {
            return Err(SessionError::Handshake(
                "the first frame was not Welcome".into(),
            ))
        }
        Ok(Ok(None)) => {
            return Err(SessionError::Handshake(
                "the broker closed the stream".into(),
            ))
        }
        Ok(Err(s)) if s.code() == Code::Unauthenticated => {
            return Err(SessionError::Unauthenticated)
        }
        Ok(Err(s)) => {
            return Err(SessionError::Handshake(format!(
                "{}: {}",
                s.code(),
                sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)
            )))
        }
        Err(_) => return Err(SessionError::Handshake("no Welcome within 15s".into())),
    };
    let (broker_flow, hb_interval, hb_timeout) = check_welcome(&welcome)?;
    let upstream = upstream_for(&ctx, &welcome.gitlab_url)?;

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        upstream,
        tx: tx.clone(),
        broker_flow,
        metrics: ctx.metrics.clone(),
        control: control.clone(),
        inflight: Mutex::new(HashMap::new()),
        idle: Notify::new(),
    });
    // Open (for the metrics) until this function returns.
    let _stream = ctx.metrics.stream_opened();
    // The supervisor publishes the health state, then logs the connection.
    let _ = ctx
        .events
        .send(SessionEvent::Connected {
            generation: ctx.generation,
            connection: welcome.connection_id.clone(),
            gitlab: welcome.gitlab_url.clone(),
        })
        .await;

    // Every request task is a child of this token: when the session ends,
    // for whatever reason, the upstream requests are aborted.
    let session_cancel = CancellationToken::new();
    let _abort_requests = session_cancel.clone().drop_guard();

    let mut reader = Reader::new(shared.clone(), session_cancel.clone());
    let mut heartbeat = tokio::time::interval(hb_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut ping_nonce = 0u64;
    let mut drain: Option<Drainage> = None;
    let mut successor = ctx.connected_generation.clone();
    let far_future = Instant::now() + Duration::from_secs(365 * 24 * 3600);

    loop {
        if let Some(d) = &drain {
            let successor_up = d.shutdown || *successor.borrow() > ctx.generation;
            if successor_up && shared.in_flight() == 0 {
                let end = if d.shutdown {
                    SessionEnd::ShutDown
                } else {
                    SessionEnd::Drained
                };
                return Ok(finish(&half_close, &mut inbound, end).await);
            }
        }
        let deadline = drain.as_ref().map(|d| d.deadline).unwrap_or(far_future);
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    last_seen = Instant::now();
                    match reader.dispatch(m) {
                        Dispatch::Continue => {}
                        Dispatch::Drain(reason) => {
                            if drain.is_none() {
                                info!(reason = %reason, in_flight = shared.in_flight(), "the broker asked to drain: opening a new stream, finishing in-flight requests here");
                                drain = Some(Drainage { shutdown: false, deadline: Instant::now() + cfg.shutdown_grace.max(Duration::from_secs(60)) });
                                let _ = ctx.events.send(SessionEvent::DrainRequested { generation: ctx.generation }).await;
                            }
                        }
                        Dispatch::End(reason) => {
                            reader.violations.flush();
                            return Err(SessionError::Protocol(reason));
                        }
                    }
                }
                Ok(None) => {
                    return match &drain {
                        Some(d) if d.shutdown => Ok(SessionEnd::ShutDown),
                        Some(_) => Ok(SessionEnd::Drained),
                        None => Ok(SessionEnd::BrokerClosed),
                    };
                }
                Err(s) => return Err(SessionError::Stream(format!("{}: {}", s.code(), sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)))),
            },
            _ = heartbeat.tick() => {
                let silent = last_seen.elapsed();
                if silent > hb_timeout {
                    return Err(SessionError::HeartbeatTimeout(silent));
                }
                reader.violations.flush();
                ping_nonce += 1;
                // A full queue means frames are flowing anyway.
                let _ = tx.try_send(AgentMessage { msg: Some(Out::Ping(Ping { nonce: ping_nonce })) });
            }
            _ = ctx.shutdown.cancelled(), if drain.as_ref().is_none_or(|d| !d.shutdown) => {
                info!(in_flight = shared.in_flight(), "draining: the broker will send no new requests");
                let _ = tx.send(AgentMessage { msg: Some(Out::Drain(Drain { reason: "agent shutting down".into() })) }).await;
                drain = Some(Drainage { shutdown: true, deadline: Instant::now() + cfg.shutdown_grace });
            }
            _ = shared.idle.notified(), if drain.is_some() => {}
            _ = successor.changed(), if drain.is_some() => {}
            _ = tokio::time::sleep_until(deadline), if drain.is_some() => {
                warn!(abandoned = shared.in_flight(), "drain grace period over: abandoning in-flight requests");
                return Ok(finish(&half_close, &mut inbound, SessionEnd::ShutDown).await);
            }
        }
    }
}

/// Ends a session gracefully: every queued frame goes out, then the end of
/// our half; the broker then closes its half. Bounded, so a silent broker
/// cannot hold the agent.
async fn finish(
    half_close: &CancellationToken,
    inbound: &mut tonic::Streaming<BrokerMessage>,
    end: SessionEnd,
) -> SessionEnd {
    half_close.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    end
}

struct Drainage {
    shutdown: bool,
    deadline: Instant,
}

fn check_welcome(w: &Welcome) -> Result<(FlowSettings, Duration, Duration), SessionError> {
    // Both are logged and the URL is where requests go: never clean them
    // silently (a URL parser drops tabs and newlines), refuse them.
    let id = &w.connection_id;
    if id.is_empty()
        || id.len() > 63
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(SessionError::Handshake(format!(
            "the broker sent an invalid connection id {:?}",
            sanitize::text(id, 64)
        )));
    }
    if w.gitlab_url.len() > sanitize::MAX_URL_BYTES || w.gitlab_url.chars().any(sanitize::is_unsafe)
    {
        return Err(SessionError::Handshake(
            "the broker sent a GitLab URL that is too long or holds control characters".into(),
        ));
    }
    let flow = FlowSettings {
        window_bytes: w.window_bytes,
        min_frame_cost: w.min_frame_cost,
        max_chunk_bytes: w.max_chunk_bytes,
    };
    flow.validate().map_err(|e| {
        SessionError::Handshake(format!("the broker's flow settings are unusable: {e}"))
    })?;
    let interval = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(100)));
    let timeout = Duration::from_millis(u64::from(w.heartbeat_timeout_ms)).max(interval * 2);
    Ok((flow, interval, timeout))
}

/// The GitLab client for the URL the broker sent: validated like every
/// GitLab URL, equal to the pin when there is one, and, pinned or not, on the
/// origin of the first Welcome this agent accepted (an unpinned agent would
/// otherwise go wherever a compromised broker points it).
fn upstream_for(ctx: &SessionContext, welcome_url: &str) -> Result<Upstream, SessionError> {
    let asked = gitlab_url::parse_gitlab_url(welcome_url).map_err(SessionError::BadGitlabUrl)?;
    if let Some(pinned) = &ctx.cfg.gitlab_url {
        if pinned.as_str().trim_end_matches('/') != asked.as_str().trim_end_matches('/') {
            return Err(SessionError::PinMismatch {
                asked: asked.to_string(),
                pinned: pinned.to_string(),
            });
        }
    }
    let asked_origin = gitlab_url::origin(&asked);
    let mut first = ctx.first_origin.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = first.as_ref().filter(|f| **f != asked_origin) {
        return Err(SessionError::OriginChanged {
            first: f.clone(),
            asked: asked_origin,
        });
    }
    let mut cache = ctx.upstream_cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(u) = cache.as_ref() {
        if u.base() == asked.as_str().trim_end_matches('/') {
            return Ok(u.clone());
        }
    }
    let u = Upstream::with_resolve(
        UpstreamConfig {
            base_url: asked,
            extra_ca_pem: ctx.cfg.extra_ca_pem.clone(),
            proxy: ctx.cfg.proxy.clone(),
            connect_timeout: ctx.cfg.connect_timeout,
            policy: ctx.cfg.policy.clone(),
        },
        &ctx.cfg.resolve,
    )
    .map_err(|e| SessionError::Upstream(e.to_string()))?;
    if let Some(p) = &u.route().proxy {
        info!(proxy = %p, gitlab = %u.base(), "GitLab requests go through the proxy");
    }
    *cache = Some(u.clone());
    first.get_or_insert(asked_origin);
    Ok(u)
}

/// What the dispatcher decided about the stream.
#[derive(Debug, PartialEq, Eq)]
enum Dispatch {
    /// Keep reading.
    Continue,
    /// The broker asks this stream to drain (its reason, cleaned).
    Drain(String),
    /// The broker broke the protocol too often: end the stream.
    End(String),
}

/// The dispatcher's own state.
struct Reader {
    shared: Arc<Shared>,
    session_cancel: CancellationToken,
    /// Highest request id seen: a frame for an id at or below it with no
    /// entry is a late frame of a finished request, one above it is bogus.
    last_id: u64,
    violations: Violations,
    /// Tests keep started requests here instead of replaying them.
    #[cfg(test)]
    held: Option<
        Vec<(
            RequestHead,
            Option<gitproxy_shared::tunnel::body::BodyReceiver>,
        )>,
    >,
}

impl Reader {
    fn new(shared: Arc<Shared>, session_cancel: CancellationToken) -> Self {
        Reader {
            shared,
            session_cancel,
            last_id: 0,
            violations: Violations::new("broker"),
            #[cfg(test)]
            held: None,
        }
    }

    /// Handles one frame without waiting.
    fn dispatch(&mut self, m: BrokerMessage) -> Dispatch {
        let flow = match m.msg {
            Some(In::RequestHead(h)) => self.start(h),
            Some(In::Data(d)) => self.data(d.id, d.data),
            Some(In::End(e)) => self.end(e.id),
            Some(In::Cancel(Cancel { id })) => {
                // A Cancel may overtake its own RequestHead (control frames
                // go first), so an unknown id is not a violation.
                if let Some(e) = self.shared.lock().remove(&id) {
                    debug!(request_id = id, "cancelled by the broker");
                    e.cancel.cancel();
                    e.credit.close();
                }
                ControlFlow::Continue(())
            }
            Some(In::Credit(c)) => self.credit(c.id, c.bytes),
            Some(In::Ping(p)) => {
                self.shared.control.pong(p.nonce);
                ControlFlow::Continue(())
            }
            Some(In::Pong(_)) => ControlFlow::Continue(()),
            Some(In::Drain(d)) => {
                return Dispatch::Drain(sanitize::owned(&d.reason, sanitize::MAX_REASON_BYTES))
            }
            Some(In::Welcome(_)) => self.violation(0, "a second Welcome"),
            None => {
                debug!("frame of an unknown kind ignored (newer broker?)");
                ControlFlow::Continue(())
            }
        };
        match flow {
            ControlFlow::Continue(()) => Dispatch::Continue,
            ControlFlow::Break(reason) => Dispatch::End(reason),
        }
    }

    /// Counts one violation by the broker; `Break` at the limit.
    fn violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        match self.violations.record(id, what) {
            Verdict::Continue => ControlFlow::Continue(()),
            Verdict::End(reason) => ControlFlow::Break(reason),
        }
    }

    /// A violation about request `id`: it ends here if it is live.
    fn request_violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        self.shared.protocol_error(id, what);
        self.violation(id, what)
    }

    /// Whether `id` can only be bogus (never sent by the broker).
    fn never_sent(&self, id: u64) -> bool {
        id == 0 || id > self.last_id
    }

    fn start(&mut self, h: RequestHead) -> ControlFlow<String> {
        let id = h.id;
        if id == 0 {
            return self.violation(id, "RequestHead with id 0");
        }
        // Ids are unique per stream but may arrive out of order (the broker
        // allocates them before queueing), so only a live id is a reuse.
        if self.shared.lock().contains_key(&id) {
            return self.request_violation(id, "request id reused");
        }
        self.last_id = self.last_id.max(id);
        let method = sanitize::owned(&h.method, sanitize::MAX_METHOD_BYTES);
        let path = sanitize::owned(
            h.path.split('?').next().unwrap_or(""),
            sanitize::MAX_PATH_BYTES,
        );
        if let Err(reason) = self.shared.cfg.policy.check(&h.method, &h.path) {
            let reason = sanitize::text(&reason, sanitize::MAX_REASON_BYTES);
            warn!(request_id = id, method = %method, path = %path, error = "blocked_by_policy", "refused by policy: {reason}");
            self.shared.metrics.request_finished(
                Outcome::Status(ErrorCode::BlockedByPolicy.http_status()),
                Some(ErrorCode::BlockedByPolicy.as_str()),
                0,
            );
            self.shared.reply_error(
                id,
                &GitproxyError::new(
                    ErrorCode::BlockedByPolicy,
                    format!("refused by the agent's policy: {reason}"),
                ),
            );
            return ControlFlow::Continue(());
        }
        let (body_tx, body_rx) = if h.end_of_stream {
            (None, None)
        } else {
            let (t, r) = body::channel(
                id,
                self.shared.cfg.flow,
                self.shared.control.clone(),
                h.content_length,
            );
            (Some(t), Some(r))
        };
        let credit = SendCredit::new(self.shared.broker_flow.window_bytes as usize);
        let cancel = self.session_cancel.child_token();
        self.shared.lock().insert(
            id,
            Inflight {
                body: body_tx,
                credit: credit.clone(),
                cancel: cancel.clone(),
            },
        );
        #[cfg(test)]
        if let Some(held) = self.held.as_mut() {
            held.push((h, body_rx));
            return ControlFlow::Continue(());
        }
        let span = tracing::info_span!("request", request_id = id, method = %method, path = %path);
        let shared = self.shared.clone();
        tokio::spawn(request::serve(shared, h, body_rx, credit, cancel).instrument(span));
        ControlFlow::Continue(())
    }

    fn data(&mut self, id: u64, data: bytes::Bytes) -> ControlFlow<String> {
        if data.len() > self.shared.cfg.flow.max_chunk_bytes as usize {
            return self.request_violation(id, "Data frame larger than the largest chunk");
        }
        let len = data.len();
        let res = {
            let map = self.shared.lock();
            match map.get(&id) {
                None => None,
                Some(Inflight { body: None, .. }) => Some(Err("Data after End")),
                Some(Inflight { body: Some(b), .. }) => Some(match b.push(data) {
                    Ok(()) => {
                        self.shared.metrics.request_bytes(len);
                        Ok(())
                    }
                    Err(PushError::Gone) => Ok(()),
                    Err(PushError::Overrun) => Err("Data beyond the granted credit"),
                }),
            }
        };
        match res {
            None if self.never_sent(id) => self.violation(id, "Data for a request never sent"),
            Some(Err(what)) => self.request_violation(id, what),
            _ => ControlFlow::Continue(()),
        }
    }

    fn end(&mut self, id: u64) -> ControlFlow<String> {
        let res = {
            let mut map = self.shared.lock();
            match map.get_mut(&id) {
                None => None,
                Some(e) => Some(e.body.take().map(BodySender::end).ok_or("End after End")),
            }
        };
        match res {
            None if self.never_sent(id) => self.violation(id, "End for a request never sent"),
            Some(Err(what)) => self.request_violation(id, what),
            _ => ControlFlow::Continue(()),
        }
    }

    fn credit(&mut self, id: u64, bytes: u32) -> ControlFlow<String> {
        let res = self
            .shared
            .lock()
            .get(&id)
            .map(|e| e.credit.grant(bytes as usize));
        match res {
            None if self.never_sent(id) => self.violation(id, "Credit for a request never sent"),
            Some(Err(e)) => self.request_violation(id, &e.to_string()),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
mod props;
