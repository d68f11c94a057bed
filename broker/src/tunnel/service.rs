//! `gitproxy.v1.Tunnel/Connect`: authenticates the agent by its accessKey,
//! runs the Hello/Welcome handshake (the Hello's strings cleaned and
//! bounded before anything stores or logs them) and hands the stream to a
//! session.

use super::session::{control_to_msg, AgentIdentity, AgentSession, SessionSettings};
use crate::state::AppState;
use futures::{Stream, StreamExt};
use gitproxy_proto::v1::{
    agent_message::Msg as In, broker_message::Msg as Out, tunnel_server::Tunnel, AgentMessage,
    BrokerMessage, Hello, Welcome,
};
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::frames;
use gitproxy_shared::tunnel::outbound::{Control, Outbound};
use gitproxy_shared::tunnel::queue::{self, QUEUE_BYTES, QUEUE_MESSAGES};
use gitproxy_shared::tunnel::FlowSettings;
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};

/// The Tunnel service.
#[derive(Clone)]
pub struct TunnelService {
    state: Arc<AppState>,
}

impl TunnelService {
    /// A service over the broker's state.
    pub fn new(state: Arc<AppState>) -> Self {
        TunnelService { state }
    }
}

/// The same answer for every authentication failure, so a caller learns
/// nothing about which part was wrong.
fn unauthenticated() -> Status {
    Status::unauthenticated("invalid accessKey")
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<BrokerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Tunnel for TunnelService {
    type ConnectStream = BoxStream;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<BoxStream>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(key) = key else {
            warn!(peer = %peer, "agent refused: no accessKey");
            return Err(unauthenticated());
        };
        let Some(conn) = self.state.connections().find_by_access_key(key) else {
            warn!(peer = %peer, "agent refused: unknown accessKey");
            return Err(unauthenticated());
        };
        if self.state.is_draining() {
            return Err(Status::unavailable(
                "the broker is shutting down; reconnect to another instance",
            ));
        }
        let mut inbound = req.into_inner();
        // The Hello is part of the handshake: the same limit as TLS and
        // the HTTP/2 preface.
        let hello_timeout = self.state.config.listeners.handshake_timeout;
        let hello = match tokio::time::timeout(hello_timeout, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(In::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {}s",
                    hello_timeout.as_secs_f64()
                )))
            }
        };
        let agent = match check_hello(&hello) {
            Ok(a) => a,
            Err(why) => {
                warn!(connection = %conn.id, peer = %peer, "agent refused: {why}");
                return Err(Status::invalid_argument(why));
            }
        };
        let pinned = hello.pinned_gitlab_url.trim_end_matches('/');
        if !pinned.is_empty() && pinned != conn.gitlab_url.as_str().trim_end_matches('/') {
            let pinned = sanitize::text(pinned, sanitize::MAX_URL_BYTES);
            warn!(connection = %conn.id, instance = %agent.instance, "agent refused: pinned to another GitLab URL");
            return Err(Status::failed_precondition(format!(
                "this agent is pinned to {pinned} but connection {} uses {}",
                conn.id, conn.gitlab_url
            )));
        }
        let t = &self.state.config.tunnel;
        let agent_flow = FlowSettings {
            window_bytes: hello.window_bytes,
            ..FlowSettings::default()
        };
        agent_flow
            .validate()
            .map_err(|e| Status::invalid_argument(format!("unusable window: {e}")))?;
        let settings = SessionSettings {
            flow: t.flow,
            agent_flow,
            heartbeat_interval: t.heartbeat_interval,
            heartbeat_timeout: t.heartbeat_timeout,
            max_age: t.max_connection_age,
            body_idle_timeout: t.body_idle_timeout,
            // The first few names only: a Hello is peer input.
            agent_inline_bodies: hello
                .capabilities
                .iter()
                .take(16)
                .any(|c| c == frames::INLINE_BODY),
        };
        // Boxed messages: tokio allocates a channel's first block of 32
        // slots up front, 32 × 112 bytes per idle agent unboxed.
        let (tx, rx) = queue::channel::<Box<BrokerMessage>>(QUEUE_MESSAGES, QUEUE_BYTES);
        let control = Control::new();
        let welcome = BrokerMessage {
            msg: Some(Out::Welcome(Welcome {
                connection_id: conn.id.clone(),
                gitlab_url: conn.gitlab_url.to_string(),
                window_bytes: t.flow.window_bytes,
                min_frame_cost: t.flow.min_frame_cost,
                max_chunk_bytes: t.flow.max_chunk_bytes,
                heartbeat_interval_ms: t.heartbeat_interval.as_millis() as u32,
                heartbeat_timeout_ms: t.heartbeat_timeout.as_millis() as u32,
                capabilities: vec![frames::INLINE_BODY.to_string()],
            })),
        };
        tx.try_send(Box::new(welcome))
            .map_err(|_| Status::internal("cannot queue Welcome"))?;
        // `stop` cuts the stream at broker shutdown; `closed` (its child) is
        // the session's own end: the stream then flushes what is queued
        // (e.g. the Welcome of an agent that half-closed at once) and ends.
        let stop = self.state.shutdown_children.child_token();
        let closed = stop.child_token();
        let session = AgentSession::new(
            conn.id.clone(),
            agent.clone(),
            settings,
            tx,
            control.clone(),
            closed.clone(),
            self.state.observer.clone(),
        );
        self.state.registry.add(session.clone());
        info!(
            connection = %conn.id,
            instance = %agent.instance,
            version = %agent.version,
            holds_token = agent.holds_token,
            peer = %peer,
            "agent connected"
        );
        self.state
            .observer
            .agent_connected(&conn.id, &agent.instance, &agent.version);
        let span = tracing::info_span!("agent", connection = %conn.id, instance = %agent.instance);
        let registry = self.state.registry.clone();
        // `run` ends the session (registry, pending requests, the
        // disconnected event) however its task ends, panic included.
        tokio::spawn(
            async move {
                session.run(inbound, registry).await;
            }
            .in_current_span()
            .instrument(span),
        );
        let out = Outbound::new(control, rx, |c| Box::new(control_to_msg(c)))
            .closed_by(closed)
            .take_until(cancelled(stop))
            .map(|m| Ok(*m));
        Ok(Response::new(Box::pin(out)))
    }
}

async fn cancelled(t: CancellationToken) {
    t.cancelled().await
}

/// Reads who the agent is from its Hello, every string cleaned and bounded
/// (`gitproxy_shared::sanitize`). Refused (the reason is returned): an
/// instance name with no letter or digit (empty, or nothing but control
/// characters and punctuation — no operator could tell such agents apart),
/// and a pinned URL longer than a URL can usefully be. Everything else is
/// kept, cleaned: a long instance name or version is cut, control
/// characters are replaced, capabilities beyond the first few are ignored.
fn check_hello(hello: &Hello) -> Result<AgentIdentity, String> {
    let instance = sanitize::owned(hello.instance.trim(), sanitize::MAX_INSTANCE_BYTES);
    if !sanitize::is_meaningful(&instance) {
        return Err(
            "the Hello's instance name has no letter or digit: set GITPROXY_INSTANCE".into(),
        );
    }
    if hello.pinned_gitlab_url.len() > sanitize::MAX_URL_BYTES {
        return Err(format!(
            "the Hello's pinned GitLab URL is longer than {} bytes",
            sanitize::MAX_URL_BYTES
        ));
    }
    let version = sanitize::owned(hello.version.trim(), sanitize::MAX_VERSION_BYTES);
    Ok(AgentIdentity {
        instance,
        version: if version.is_empty() {
            "unknown".into()
        } else {
            version
        },
        holds_token: hello.holds_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(instance: &str) -> Hello {
        Hello {
            version: "0.1.0".into(),
            instance: instance.into(),
            capabilities: vec![],
            pinned_gitlab_url: String::new(),
            holds_token: false,
            window_bytes: 512 * 1024,
        }
    }

    #[test]
    fn hello_strings_are_cleaned_and_bounded() {
        let mut h = hello(&format!("pod-1\n\x1b[31m{}", "a".repeat(10_000)));
        h.version = format!("1.2\r\n{}", "9".repeat(10_000));
        let a = check_hello(&h).unwrap();
        assert!(
            a.instance.starts_with("pod-1\u{fffd}\u{fffd}[31m"),
            "{}",
            a.instance
        );
        assert!(a.instance.len() <= sanitize::MAX_INSTANCE_BYTES);
        assert!(a.version.len() <= sanitize::MAX_VERSION_BYTES);
        assert!(!a.instance.contains('\n') && !a.version.contains('\n'));
        let mut h = hello("pod-2");
        h.version = " ".into();
        assert_eq!(check_hello(&h).unwrap().version, "unknown");
    }

    #[test]
    fn meaningless_instances_and_huge_pins_are_refused() {
        for bad in ["", "   ", "\n\n\x1b", "-- .. --"] {
            assert!(check_hello(&hello(bad)).is_err(), "{bad:?}");
        }
        let mut h = hello("pod-3");
        h.pinned_gitlab_url = format!("https://{}", "a".repeat(5000));
        assert!(check_hello(&h).is_err());
    }
}
