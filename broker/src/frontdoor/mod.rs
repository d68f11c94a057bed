//! The front door, `ANY /gitlab/{connection}/{path...}`: what cloud
//! applications call with any stock GitLab client.
//!
//! - [`target`]: splitting the raw URI into connection and GitLab target.
//! - [`credentials`]: adding the connection's token when the caller sent none.
//! - [`rewrite`]: `Link`/`Location` headers from GitLab's URL to the front door.
//! - [`origin`]: the front-door base URL callers see (public URL, trusted proxies).
//! - [`forward`]: delivery, through an agent or directly, streaming both ways.
//! - [`route`]: cluster mode: a local agent, or the replica holding one;
//!   [`remote`]: forwarding a request to that replica.
//! - [`body`]: bodies that count bytes, finish the request's record (log
//!   line, metrics, event: `observe::record`) and hold the request's guards
//!   until the answer is fully sent.
//! - [`respond`]: gitproxy's own error answers.

pub mod body;
pub mod credentials;
pub mod forward;
pub mod internal;
pub mod origin;
pub mod remote;
pub mod respond;
pub mod rewrite;
pub mod route;
pub mod target;

use crate::config::Mode;
use crate::observe::RequestRecord;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{Request, Response};
use respond::error_response;
use std::sync::Arc;

/// Handles one front-door request.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request<Body>) -> Response<Body> {
    let mut r = match serve(&state, req, false).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    // Cluster mode, `--replica-header`: which replica served (a forwarded
    // answer already names the replica that held the agent).
    if let Some(c) = state.cluster.as_ref().filter(|c| c.settings.replica_header) {
        if let Ok(v) = http::HeaderValue::from_str(c.replica_id()) {
            r.headers_mut()
                .entry(crate::cluster::peer::REPLICA_HEADER)
                .or_insert(v);
        }
    }
    r
}

/// Serves one front-door request; `internal` requests (made by the broker
/// itself: Test Connection, catalogue, merge requests) skip the caller's API
/// key check, and take every other step real requests take. Errors made by
/// gitproxy are recorded (metrics, WatchTunnel) and returned.
pub async fn serve(
    state: &Arc<AppState>,
    req: Request<Body>,
    internal: bool,
) -> Result<Response<Body>, GitproxyError> {
    // The request's record once its connection is known; a delivered
    // answer takes it into its body (`body::Logged`).
    let mut rec = None;
    let r = forward_request(state, req, internal, &mut rec).await;
    if let (Err(e), Some(mut rec)) = (&r, rec) {
        rec.status = e.error.http_status();
        rec.error = e.error.as_str();
        rec.stop_clock();
        state.observer.request_finished(&rec);
    }
    r
}

async fn forward_request(
    state: &Arc<AppState>,
    mut req: Request<Body>,
    internal: bool,
    rec: &mut Option<RequestRecord>,
) -> Result<Response<Body>, GitproxyError> {
    let started = std::time::Instant::now();
    let conns = state.connections();
    // A request another replica forwarded: that replica checked the
    // caller's key (the peer listener checked the replica's secret).
    let from_peer = req.extensions().get::<origin::FromPeer>().cloned();
    let presented = req.headers().get("x-gitproxy-key").map(|v| v.as_bytes());
    if !internal && from_peer.is_none() && !conns.api_key_ok(presented) {
        return Err(GitproxyError::new(
            ErrorCode::Unauthorized,
            if presented.is_some() {
                "wrong X-Gitproxy-Key"
            } else {
                "missing X-Gitproxy-Key"
            },
        ));
    }
    let t = target::parse(req.version(), req.uri())?;
    let conn = conns.get(&t.connection).ok_or_else(|| {
        GitproxyError::new(
            ErrorCode::UnknownConnection,
            format!("no connection named {:?}", t.connection),
        )
    })?;
    let rec = rec.insert(RequestRecord::new(
        conn.id.clone(),
        req.method().to_string(),
        t.path_only().to_string(),
        started,
    ));
    rec.seq = state
        .observer
        .request_started(&conn.id, &rec.method, &rec.path);
    if from_peer.is_some() || req.extensions().get::<origin::Relayed>().is_some() {
        state.observer.forwarded(&conn.id, "in");
    }
    if let Err(reason) = state.config.policy.check(req.method().as_str(), &t.target) {
        tracing::warn!(connection = %conn.id, method = %req.method(), path = %t.path_only(), error = "blocked_by_policy", "refused by the broker's policy: {reason}");
        return Err(GitproxyError::new(
            ErrorCode::BlockedByPolicy,
            format!("refused by the broker's policy: {reason}"),
        ));
    }
    let Some(slot) = state.try_acquire(&conn.id, state.config.tunnel.max_in_flight) else {
        return Err(GitproxyError::new(
            ErrorCode::Overloaded,
            format!(
                "more than {} requests in flight for connection {}",
                state.config.tunnel.max_in_flight, conn.id
            ),
        ));
    };
    if internal {
        req.extensions_mut().insert(origin::InternalRequest);
    }
    let (mut parts, req_body) = req.into_parts();
    let base = match &from_peer {
        Some(p) if p.base.ends_with(&format!("/gitlab/{}", conn.id)) => p.base.clone(),
        Some(_) => {
            return Err(GitproxyError::new(
                ErrorCode::BadRequest,
                "the forwarding replica named the front-door base of another connection",
            ))
        }
        None => origin::front_base(state, &conn.id, &parts),
    };
    parts.extensions.insert(origin::FrontBase(base));
    let req = Request::from_parts(parts, req_body);
    match conn.mode {
        // Cluster mode: the agent may be held by another replica; a request
        // forwarded here is served here.
        Mode::Agent => match (&state.cluster, &from_peer) {
            (Some(cluster), None) => {
                route::via_cluster(state, cluster, &conn, t, req, slot, rec).await
            }
            _ => forward::via_agent(state, &conn, t, req, slot, rec).await,
        },
        Mode::Direct => forward::direct(state, &conn, t, req, slot, rec).await,
    }
}
