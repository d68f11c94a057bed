//! The front door, `ANY /gitlab/{connection}/{path...}`: what cloud
//! applications call with any stock GitLab client.
//!
//! - [`target`]: splitting the raw URI into connection and GitLab target.
//! - [`credentials`]: adding the connection's token when the caller sent none.
//! - [`rewrite`]: `Link`/`Location` headers from GitLab's URL to the front door.
//! - [`forward`]: delivery, through an agent or directly, streaming both ways.
//! - [`body`]: bodies that count bytes, log the request line and hold the
//!   request's guards until the answer is fully sent.
//! - [`respond`]: gitproxy's own error answers.

pub mod body;
pub mod credentials;
pub mod forward;
pub mod respond;
pub mod rewrite;
pub mod target;

use crate::config::Mode;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{Request, Response};
use respond::error_response;
use std::sync::Arc;

/// Handles one front-door request.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request<Body>) -> Response<Body> {
    match forward_request(&state, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn forward_request(
    state: &Arc<AppState>,
    req: Request<Body>,
) -> Result<Response<Body>, GitproxyError> {
    let conns = state.connections();
    let presented = req.headers().get("x-gitproxy-key").map(|v| v.as_bytes());
    if !conns.api_key_ok(presented) {
        return Err(GitproxyError::new(
            ErrorCode::Unauthorized,
            if presented.is_some() {
                "wrong X-Gitproxy-Key"
            } else {
                "missing X-Gitproxy-Key"
            },
        ));
    }
    let t = target::parse(req.uri())?;
    let conn = conns.get(&t.connection).ok_or_else(|| {
        GitproxyError::new(
            ErrorCode::UnknownConnection,
            format!("no connection named {:?}", t.connection),
        )
    })?;
    if let Err(reason) =
        gitproxy_shared::policy::Policy::default().check(req.method().as_str(), &t.target)
    {
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
    match conn.mode {
        Mode::Agent => forward::via_agent(state, &conn, t, req, slot).await,
        Mode::Direct => forward::direct(state, &conn, t, req, slot).await,
    }
}
