//! Delivery of a front-door request, through the connection's agent or
//! directly, streaming both ways, and the answer rebuilt for the caller.
//! Response bodies carry the body idle timeout (`gitproxy_shared::idle`).

use super::body::{CountedBody, Finish, Guards, Logged};
use super::credentials;
use super::origin::{self, FrontBase};
use super::rewrite::Rewriter;
use super::target::Target;
use crate::config::Connection;
use crate::observe::RequestRecord;
use crate::state::{AppState, InFlightGuard};
use axum::body::Body;
use gitproxy_proto::v1::{Header, RequestHead};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::headers;
use gitproxy_shared::idle::IdleTimeout;
use gitproxy_shared::upstream::RequestBody;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn rewriter(state: &AppState, conn: &Connection, parts: &http::request::Parts) -> Rewriter {
    let origins = std::iter::once(&conn.gitlab_url).chain(conn.external_url.as_ref());
    let front = match parts.extensions.get::<FrontBase>() {
        Some(b) => b.0.clone(),
        None => origin::front_base(state, &conn.id, parts),
    };
    Rewriter::for_urls(origins, front)
}

/// Rebuilds GitLab's answer for the caller: hop-by-hop headers dropped,
/// `Link`/`Location` rewritten to the front door.
fn answer_headers(wire: &[Header], rw: &Rewriter) -> Result<HeaderMap, GitproxyError> {
    let mut map =
        headers::from_wire(wire).map_err(|e| GitproxyError::new(ErrorCode::ProtocolError, e))?;
    for name in [http::header::LINK, http::header::LOCATION] {
        let values: Vec<HeaderValue> = map.get_all(&name).iter().cloned().collect();
        if values.is_empty() {
            continue;
        }
        map.remove(&name);
        for v in values {
            let new = v.to_str().ok().and_then(|s| {
                if name == http::header::LINK {
                    rw.link(s)
                } else {
                    rw.location(s)
                }
            });
            match new.and_then(|n| HeaderValue::from_str(&n).ok()) {
                Some(n) => map.append(&name, n),
                None => map.append(&name, v),
            };
        }
    }
    Ok(map)
}

pub(super) fn respond<B>(
    status: u16,
    hdrs: HeaderMap,
    body: B,
    finish: Finish,
    guards: Guards,
) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<super::body::BoxError>,
{
    let mut r = Response::new(Body::new(Logged::new(body, finish, guards)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *r.headers_mut() = hdrs;
    r
}

/// Drops the caller's request head once what it holds was copied out.
///
/// hyper parses a head without copying: its URI and header values are
/// slices of the connection's read buffer (8 KiB or more). Held while the
/// answer is awaited (which may be seconds), they keep that buffer alive, so
/// hyper allocates a second one to watch the connection meanwhile: with
/// 1,000 requests in flight that was 8 MiB of the broker's peak RSS. Once
/// they are dropped, hyper reuses its buffer.
fn release_head(parts: http::request::Parts) {
    drop(parts);
}

pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Delivers through one of the connection's agents.
pub async fn via_agent(
    state: &Arc<AppState>,
    conn: &Arc<Connection>,
    t: Target,
    req: Request<Body>,
    slot: InFlightGuard,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, GitproxyError> {
    let (parts, body) = req.into_parts();
    let wire_headers = headers::request_to_wire(&parts.headers);
    let (method, length) = (parts.method.clone(), content_length(&parts.headers));
    let rewriter = rewriter(state, conn, &parts);
    release_head(parts);
    let body = (!body.is_end_stream()).then_some(body);
    let retryable = body.is_none() && is_idempotent(&method);
    let mut body = body;
    // Sessions that failed this request; the one retry goes elsewhere.
    let mut tried: Vec<Arc<crate::tunnel::AgentSession>> = Vec::new();
    let mut failed: Option<GitproxyError> = None;
    let (answer, guard, session_instance) = loop {
        let Some(session) = state.registry.pick_excluding(&conn.id, &tried) else {
            return Err(failed.unwrap_or_else(|| {
                GitproxyError::new(
                    ErrorCode::AgentNotConnected,
                    format!("no agent is connected for connection {}", conn.id),
                )
            }));
        };
        let mut hdrs = wire_headers.clone();
        if !session.holds_token && !credentials::caller_has_credentials(&hdrs, &t.target) {
            if let Some(token) = &conn.token {
                credentials::inject(&mut hdrs, &t.target, token);
            }
        }
        let head = RequestHead {
            id: 0,
            method: method.as_str().to_string(),
            path: t.target.clone(),
            headers: hdrs,
            timeout_ms: 0,
            end_of_stream: false,
            content_length: length,
            body: Default::default(),
        };
        let bytes_in = Arc::new(AtomicU64::new(0));
        match session
            .send_request(
                head,
                body.take(),
                state.config.tunnel.request_timeout,
                bytes_in.clone(),
            )
            .await
        {
            Ok((a, g)) => break (a, (g, bytes_in), session.instance.clone()),
            // A request without body that never got an answer from a dying
            // agent is safe to try once more on another agent, if any (never
            // the one that failed it).
            Err(e) if e.error == ErrorCode::AgentDisconnected && retryable && tried.is_empty() => {
                tried.push(session);
                failed = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        }
    };
    let (guard, bytes_in) = guard;
    let hdrs = answer_headers(&answer.headers, &rewriter)?;
    (rec.request_id, rec.mode, rec.agent) = (guard.id(), "agent", session_instance);
    rec.status = answer.status;
    let log = Finish {
        record: rec.take(),
        bytes_in,
        observer: state.observer.clone(),
    };
    let guards = Guards {
        request: Some(guard),
        slot,
    };
    let idle = state.config.tunnel.body_idle_timeout;
    Ok(match answer.body {
        // The agent applies the idle timeout to GitLab's body; this is the
        // backstop for an agent that keeps a body open without data.
        Some(b) => respond(
            answer.status,
            hdrs,
            IdleTimeout::new(b, idle, "the agent"),
            log,
            guards,
        ),
        None => respond(
            answer.status,
            hdrs,
            http_body_util::Empty::<bytes::Bytes>::new(),
            log,
            guards,
        ),
    })
}

/// Delivers from the broker itself (direct mode).
pub async fn direct(
    state: &Arc<AppState>,
    conn: &Arc<Connection>,
    t: Target,
    req: Request<Body>,
    slot: InFlightGuard,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, GitproxyError> {
    let upstream = conn.upstream.as_ref().ok_or_else(|| {
        GitproxyError::new(ErrorCode::Internal, "direct connection without a client")
    })?;
    let (parts, body) = req.into_parts();
    let mut wire = headers::request_to_wire(&parts.headers);
    let (method, length) = (parts.method.clone(), content_length(&parts.headers));
    let rewriter = rewriter(state, conn, &parts);
    release_head(parts);
    if !credentials::caller_has_credentials(&wire, &t.target) {
        if let Some(token) = &conn.token {
            credentials::inject(&mut wire, &t.target, token);
        }
    }
    let mut hdrs =
        headers::from_wire(&wire).map_err(|e| GitproxyError::new(ErrorCode::BadRequest, e))?;
    for v in hdrs.values_mut() {
        v.set_sensitive(true);
    }
    let bytes_in = Arc::new(AtomicU64::new(0));
    let body = (!body.is_end_stream())
        .then(|| RequestBody::wrap(CountedBody::new(body, length, bytes_in.clone())));
    let timeout = state.config.tunnel.request_timeout;
    let resp =
        match tokio::time::timeout(timeout, upstream.send(method, &t.target, hdrs, body)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(GitproxyError::new(
                    ErrorCode::Timeout,
                    format!("GitLab did not answer within {}s", timeout.as_secs()),
                ))
            }
        };
    let status = resp.status().as_u16();
    let wire = headers::response_to_wire(resp.headers());
    let hdrs = answer_headers(&wire, &rewriter)?;
    (rec.mode, rec.status) = ("direct", status);
    let log = Finish {
        record: rec.take(),
        bytes_in,
        observer: state.observer.clone(),
    };
    let idle = state.config.tunnel.body_idle_timeout;
    Ok(respond(
        status,
        hdrs,
        IdleTimeout::new(resp.into_body(), idle, "GitLab"),
        log,
        Guards {
            request: None,
            slot,
        },
    ))
}
