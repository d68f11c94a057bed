//! Forwarding a front-door request to the replica that holds an agent of
//! its connection (cluster mode), streaming both ways.
//!
//! The caller's API key, the policy and the in-flight slot were checked
//! here; the peer serves the request with its own agent and rewrites
//! `Link`/`Location` to the front-door base computed here, so the caller
//! sees the replica it asked. What the peer answers is passed on as is;
//! gitproxy errors it made come back as errors (same code, message, hint).
//!
//! Attempts (at most [`MAX_ATTEMPTS`], each to another replica, the registry
//! read afresh between them; an agent that meanwhile connected here is used
//! here):
//! - the peer cannot be reached (nothing was sent), or it answers
//!   `agent_not_connected` (a stale registry entry: it used no agent): the
//!   request goes elsewhere, body included as long as no more than
//!   [`REPLAY_BYTES`] of it were read ([`Replay`]);
//! - the peer went away after the request was sent: `agent_disconnected`,
//!   except for a `GET`/`HEAD`/`OPTIONS` without body, tried once more
//!   elsewhere (the rule of a local agent's death);
//! - the peer dies mid-body: the caller's body is cut with an error
//!   (`agent_disconnected`), never ended cleanly.

use super::body::{BoxError, Finish, Guards};
use super::forward::{self, content_length, is_idempotent};
use super::origin::{self, FrontBase};
use super::target::Target;
use crate::cluster::peer::client::{PeerBody, PeerError};
use crate::cluster::peer::replay::Replay;
use crate::cluster::peer::{BASE_HEADER, MAX_ERROR_BODY, REPLAY_BYTES, REPLICA_HEADER};
use crate::cluster::registry::RemoteAgent;
use crate::cluster::Cluster;
use crate::config::Connection;
use crate::observe::RequestRecord;
use crate::state::{AppState, InFlightGuard};
use axum::body::Body;
use bytes::Bytes;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::headers;
use gitproxy_shared::idle::IdleTimeout;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, error};

/// Most replicas one request is sent to.
pub const MAX_ATTEMPTS: usize = 3;
/// Limit on reading a peer's gitproxy error body.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Request headers that describe one hop (HTTP/2 forbids them too).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The caller's headers as they go to the peer: without hop-by-hop headers,
/// `Host` (the URI carries the authority) and every `X-Gitproxy-*` header
/// (a caller cannot pass as a replica); with the front-door base.
fn peer_headers(caller: &HeaderMap, base: &str) -> Result<HeaderMap, GitproxyError> {
    let listed: Vec<String> = caller
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(caller.len() + 1);
    for (n, v) in caller {
        let name = n.as_str();
        if HOP_BY_HOP.contains(&name)
            || name == "host"
            || name.starts_with(headers::GITPROXY_PREFIX)
            || listed.iter().any(|l| l == name)
        {
            continue;
        }
        out.append(n.clone(), v.clone());
    }
    let base = HeaderValue::from_str(base).map_err(|_| {
        GitproxyError::new(
            ErrorCode::BadRequest,
            "the front-door base is not a valid header value",
        )
    })?;
    out.insert(BASE_HEADER, base);
    Ok(out)
}

/// Picks a replica not tried yet: one with a non-draining stream if any,
/// chosen at random weighted by its streams (so agents share the load).
fn choose<'a>(candidates: &'a [RemoteAgent], tried: &[String]) -> Option<&'a RemoteAgent> {
    let open: Vec<&RemoteAgent> = candidates
        .iter()
        .filter(|a| !tried.contains(&a.replica))
        .collect();
    let ready: Vec<&RemoteAgent> = open.iter().copied().filter(|a| !a.entry.draining).collect();
    let pool = if ready.is_empty() { open } else { ready };
    match pool.len() {
        0 => None,
        n => Some(pool[rand::random_range(0..n)]),
    }
}

fn not_connected(conn: &str) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::AgentNotConnected,
        format!("no agent is connected for connection {conn}"),
    )
}

/// The answer when the replica holding the agent went away after taking
/// the request.
fn lost_at(replica: &str) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::AgentDisconnected,
        format!("the broker replica holding the agent ({replica}) went away before answering this request"),
    )
}

/// Reads the gitproxy error a peer answered with (`X-Gitproxy-Error`).
async fn peer_error(resp: Response<Incoming>, replica: &str) -> GitproxyError {
    let code = resp
        .headers()
        .get("x-gitproxy-error")
        .and_then(|v| v.to_str().ok())
        .map(ErrorCode::parse)
        .unwrap_or(ErrorCode::Internal);
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
    let parsed = match tokio::time::timeout(ERROR_BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).ok(),
        _ => None,
    };
    let text = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(|s| {
                gitproxy_shared::sanitize::owned(
                    s,
                    gitproxy_shared::sanitize::MAX_ERROR_MESSAGE_BYTES,
                )
            })
    };
    if code == ErrorCode::Unauthorized {
        // The caller's key was checked here: the peer refused our secret.
        error!(replica, "another replica refused this replica's peer secret: give every replica the same GITPROXY_PEER_SECRET_FILE");
        return GitproxyError::new(
            ErrorCode::Internal,
            format!("broker replica {replica} refused this replica's peer secret"),
        )
        .with_hint("Every broker replica must read the same GITPROXY_PEER_SECRET_FILE.");
    }
    let mut e = GitproxyError::new(
        code,
        text("message").unwrap_or_else(|| format!("broker replica {replica} answered {code}")),
    );
    if let Some(h) = text("hint") {
        e.hint = h;
    }
    e
}

/// Sends the request to the replicas holding `candidates` (see the module
/// documentation for the attempts) and streams the answer back.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    state: &Arc<AppState>,
    cluster: &Arc<Cluster>,
    conn: &Arc<Connection>,
    t: Target,
    req: Request<Body>,
    slot: InFlightGuard,
    rec: &mut RequestRecord,
    candidates: Arc<[RemoteAgent]>,
) -> Result<Response<Body>, GitproxyError> {
    let (parts, body) = req.into_parts();
    let base = match parts.extensions.get::<FrontBase>() {
        Some(b) => b.0.clone(),
        None => origin::front_base(state, &conn.id, &parts),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| format!("/gitlab/{}{}", conn.id, t.target));
    let to_peer = peer_headers(&parts.headers, &base)?;
    let bytes_in = Arc::new(AtomicU64::new(0));
    let has_body = !body.is_end_stream();
    let replay = has_body.then(|| {
        Replay::new(
            body,
            REPLAY_BYTES,
            content_length(&parts.headers),
            bytes_in.clone(),
        )
    });
    let bodyless_idempotent = !has_body && is_idempotent(&parts.method);
    let mut candidates = candidates;
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<GitproxyError> = None;
    let mut lost_once = false;
    // Relayed to a replica that went away before answering, and sent again
    // here (`cluster::relay`): that was this request's first attempt.
    if let Some(lost) = parts.extensions.get::<origin::LostAt>() {
        tried.push(lost.0.to_string());
        lost_once = true;
        last = Some(lost_at(&lost.0));
    }
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            // The agent may have moved here meanwhile (rolling restart).
            if state.registry.local_state(&conn.id).1 {
                let body = match &replay {
                    None => Body::empty(),
                    Some(r) => match r.next_attempt() {
                        Some(v) => Body::new(v),
                        None => break,
                    },
                };
                let mut req = Request::new(body);
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                req.extensions_mut().insert(FrontBase(base.clone()));
                return forward::via_agent(state, conn, t, req, slot, rec).await;
            }
            candidates = match cluster.registry.lookup(&conn.id, true).await {
                Ok(c) => c,
                Err(e) => {
                    return Err(
                        last.unwrap_or_else(|| super::route::registry_unreachable(&conn.id, &e))
                    )
                }
            };
        }
        let Some(target) = choose(&candidates, &tried) else {
            break;
        };
        let body: PeerBody = match &replay {
            None => http_body_util::Empty::<Bytes>::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
            Some(r) => match r.next_attempt() {
                Some(v) => v.boxed_unsync(),
                None => break,
            },
        };
        let uri = format!("http://{}{path}", target.peer);
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri.parse().map_err(|_| {
            GitproxyError::new(
                ErrorCode::Internal,
                format!(
                    "the registry names an unusable peer address for replica {}",
                    target.replica
                ),
            )
        })?;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = to_peer.clone();
        tried.push(target.replica.clone());
        let resp = match cluster.peers.send(&target.peer, req).await {
            Ok(r) => r,
            Err(e @ PeerError::Unreachable { .. }) => {
                debug!(connection = %conn.id, replica = %target.replica, "{e}");
                last = Some(
                    GitproxyError::new(
                        ErrorCode::AgentNotConnected,
                        format!(
                            "the broker replica holding the agent of connection {} ({}) cannot be reached",
                            conn.id, target.replica
                        ),
                    )
                    .with_hint("The replica the agent is connected to does not answer (stopped, or the network between replicas is cut); the agent reconnects to another replica, and its registry entries expire within the registry TTL (--registry-ttl, 30 s by default). Check --peer-advertise and the peer port between replicas."),
                );
                continue;
            }
            Err(e @ PeerError::Lost { .. }) => {
                debug!(connection = %conn.id, replica = %target.replica, "{e}");
                let err = lost_at(&target.replica);
                if bodyless_idempotent && !lost_once {
                    lost_once = true;
                    last = Some(err);
                    continue;
                }
                return Err(err);
            }
        };
        state.observer.forwarded(&conn.id, "out");
        if resp.headers().contains_key("x-gitproxy-error") {
            let e = peer_error(resp, &target.replica).await;
            if e.error == ErrorCode::AgentNotConnected {
                // A stale entry: the peer used no agent; try elsewhere.
                debug!(connection = %conn.id, replica = %target.replica, "the peer holds no agent any more");
                last = Some(e);
                continue;
            }
            return Err(e);
        }
        return Ok(answer(
            state,
            cluster,
            resp,
            target.replica.clone(),
            slot,
            rec,
            bytes_in,
        ));
    }
    Err(last.unwrap_or_else(|| not_connected(&conn.id)))
}

/// The peer's answer, streamed to the caller.
#[allow(clippy::too_many_arguments)]
fn answer(
    state: &Arc<AppState>,
    cluster: &Cluster,
    resp: Response<Incoming>,
    replica: String,
    slot: InFlightGuard,
    rec: &mut RequestRecord,
    bytes_in: Arc<AtomicU64>,
) -> Response<Body> {
    let status = resp.status().as_u16();
    let (rp, rbody) = resp.into_parts();
    let mut hdrs = headers::strip_response(rp.headers);
    if cluster.settings.replica_header {
        if let Ok(v) = HeaderValue::from_str(&replica) {
            hdrs.insert(REPLICA_HEADER, v);
        }
    }
    let who = replica.clone();
    let body = rbody.map_err(move |e| -> BoxError {
        Box::new(GitproxyError::new(
            ErrorCode::AgentDisconnected,
            format!(
                "the broker replica holding the agent ({who}) went away in the middle of the response: {e}"
            ),
        ))
    });
    let idle = state.config.tunnel.body_idle_timeout;
    (rec.mode, rec.agent, rec.status) = ("forwarded", replica, status);
    let log = Finish {
        record: rec.take(),
        bytes_in,
        observer: state.observer.clone(),
    };
    forward::respond(
        status,
        hdrs,
        IdleTimeout::new(body, idle, "the replica holding the agent"),
        log,
        Guards {
            request: None,
            slot,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::registry::AgentEntry;

    fn agent(replica: &str, draining: bool) -> RemoteAgent {
        RemoteAgent {
            replica: replica.into(),
            peer: "127.0.0.1:1".into(),
            relay: true,
            entry: AgentEntry {
                instance: "a".into(),
                version: "1".into(),
                connected_since: "2026-01-01T00:00:00.000Z".into(),
                draining,
                holds_token: false,
            },
        }
    }

    #[test]
    fn non_draining_replicas_first_and_never_twice() {
        let c = [agent("r0", true), agent("r1", false)];
        for _ in 0..20 {
            assert_eq!(choose(&c, &[]).unwrap().replica, "r1");
        }
        assert_eq!(choose(&c, &["r1".into()]).unwrap().replica, "r0");
        assert!(choose(&c, &["r1".into(), "r0".into()]).is_none());
    }

    #[test]
    fn callers_cannot_pass_as_a_replica() {
        let mut h = HeaderMap::new();
        h.insert("x-gitproxy-peer-auth", "guess".parse().unwrap());
        h.insert(
            "x-gitproxy-peer-base",
            "http://evil/gitlab/acme".parse().unwrap(),
        );
        h.insert("x-gitproxy-key", "k".parse().unwrap());
        h.insert("connection", "keep-alive, x-custom".parse().unwrap());
        h.insert("x-custom", "1".parse().unwrap());
        h.insert("host", "broker".parse().unwrap());
        h.insert("private-token", "t".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        let out = peer_headers(&h, "http://broker:8080/gitlab/acme").unwrap();
        assert_eq!(out[BASE_HEADER], "http://broker:8080/gitlab/acme");
        assert_eq!(out.get_all(BASE_HEADER).iter().count(), 1);
        for gone in [
            "x-gitproxy-peer-auth",
            "x-gitproxy-key",
            "connection",
            "x-custom",
            "host",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
        assert_eq!(out["private-token"], "t");
        assert_eq!(out["content-length"], "5");
    }
}
