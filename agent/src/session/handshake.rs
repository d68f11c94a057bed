//! The Hello/Welcome handshake, used by every session and by
//! `gitproxy-agent check` (so `check` proves exactly what a session needs).
//!
//! The agent queues its `Hello` before the call opens, authenticates with
//! `authorization: Bearer <accessKey>` and waits for the broker's `Welcome`,
//! which is validated before anything uses it: the connection id and GitLab
//! URL are logged and the URL is where requests go, so either is refused
//! rather than cleaned when it holds control characters; the URL must pass
//! the GitLab URL rules and equal the pin; the flow settings must be usable.

use super::{SessionError, CAPABILITIES};
use crate::config::AgentConfig;
use gitproxy_proto::v1::tunnel_client::TunnelClient;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, broker_message::Msg as In, AgentMessage, BrokerMessage, Hello,
    Welcome,
};
use gitproxy_shared::gitlab_url;
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::outbound::Outbound;
use gitproxy_shared::tunnel::queue;
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::VERSION;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;

/// How long the broker has to send its Welcome once the stream is open.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// An open, validated tunnel stream.
pub struct Opened {
    /// The broker's half of the stream (after the Welcome).
    pub inbound: tonic::Streaming<BrokerMessage>,
    /// The Welcome as received.
    pub welcome: Welcome,
    /// The GitLab base URL the broker asks for (validated, equal to the pin).
    pub gitlab_url: url::Url,
    /// The broker's receive flow control (response bodies).
    pub broker_flow: FlowSettings,
    /// Ping period.
    pub heartbeat_interval: Duration,
    /// Silence after which the broker is dead.
    pub heartbeat_timeout: Duration,
}

/// The agent's Hello, naming itself `instance`.
pub fn hello(cfg: &AgentConfig, instance: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(Out::Hello(Hello {
            version: VERSION.to_string(),
            instance: instance.to_string(),
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
            pinned_gitlab_url: cfg
                .gitlab_url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
            holds_token: cfg.gitlab_token.is_some(),
            window_bytes: cfg.flow.window_bytes,
        })),
    }
}

/// Opens `Tunnel/Connect` on `client` with `outbound` as our half: queues
/// the Hello (as `instance`) on `tx`, the channel `outbound` reads, then waits
/// for the Welcome and validates it.
pub async fn open(
    client: &mut TunnelClient<Channel>,
    cfg: &AgentConfig,
    instance: &str,
    tx: &queue::Sender<AgentMessage>,
    outbound: Outbound<AgentMessage>,
) -> Result<Opened, SessionError> {
    tx.try_send(hello(cfg, instance))
        .map_err(|_| SessionError::Handshake("cannot queue Hello".into()))?;
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

    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
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
        Err(_) => {
            return Err(SessionError::Handshake(format!(
                "no Welcome within {}s",
                WELCOME_TIMEOUT.as_secs()
            )))
        }
    };
    let (broker_flow, heartbeat_interval, heartbeat_timeout) = check_welcome(&welcome)?;
    let gitlab_url = welcome_url(cfg, &welcome.gitlab_url)?;
    Ok(Opened {
        inbound,
        welcome,
        gitlab_url,
        broker_flow,
        heartbeat_interval,
        heartbeat_timeout,
    })
}

/// The Welcome's connection id, URL text and flow settings, checked.
pub(super) fn check_welcome(
    w: &Welcome,
) -> Result<(FlowSettings, Duration, Duration), SessionError> {
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

/// The GitLab URL the broker sent: validated like every GitLab URL, and
/// equal to the pin when there is one.
fn welcome_url(cfg: &AgentConfig, welcome_url: &str) -> Result<url::Url, SessionError> {
    let asked = gitlab_url::parse_gitlab_url(welcome_url).map_err(SessionError::BadGitlabUrl)?;
    if let Some(pinned) = &cfg.gitlab_url {
        if pinned.as_str().trim_end_matches('/') != asked.as_str().trim_end_matches('/') {
            return Err(SessionError::PinMismatch {
                asked: asked.to_string(),
                pinned: pinned.to_string(),
            });
        }
    }
    Ok(asked)
}
