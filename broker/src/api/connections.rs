//! `GET /v1/connections[/{id}]`: connections and the agents serving them.
//! Secrets are never part of a view.

use crate::config::{Connection, Mode};
use crate::frontdoor::respond::error_response;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{HeaderMap, Response};
use serde::Serialize;
use std::sync::Arc;

/// One connection as the API shows it.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    /// Id.
    pub id: String,
    /// "agent" or "direct".
    pub mode: &'static str,
    /// GitLab base URL.
    pub gitlab_url: String,
    /// "connected", "disconnected" or "direct".
    pub status: &'static str,
    /// Connected agents.
    pub agents: Vec<AgentView>,
}

/// One connected agent.
#[derive(Debug, Serialize)]
pub struct AgentView {
    /// Instance name.
    pub instance: String,
    /// Version.
    pub version: String,
    /// RFC 3339.
    pub connected_since: String,
    /// Requests in flight.
    pub in_flight: usize,
}

/// The view of one connection.
pub fn view(state: &AppState, c: &Connection) -> ConnectionView {
    let agents: Vec<AgentView> = state
        .registry
        .sessions(&c.id)
        .iter()
        .filter(|s| !s.is_closed())
        .map(|s| AgentView {
            instance: s.instance.clone(),
            version: s.version.clone(),
            connected_since: humantime::format_rfc3339_seconds(s.connected_since).to_string(),
            in_flight: s.in_flight(),
        })
        .collect();
    let status = match (c.mode, agents.is_empty()) {
        (Mode::Direct, _) => "direct",
        (Mode::Agent, false) => "connected",
        (Mode::Agent, true) => "disconnected",
    };
    ConnectionView {
        id: c.id.clone(),
        mode: c.mode.as_str(),
        gitlab_url: c.gitlab_url.to_string(),
        status,
        agents,
    }
}

/// Checks the caller's API key.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response<Body>>> {
    let presented = headers.get("x-gitproxy-key").map(|v| v.as_bytes());
    if state.connections().api_key_ok(presented) {
        Ok(())
    } else {
        Err(Box::new(error_response(&GitproxyError::new(
            ErrorCode::Unauthorized,
            "missing or wrong X-Gitproxy-Key",
        ))))
    }
}

/// `GET /v1/connections`.
pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response<Body> {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let connections: Vec<_> = state
        .connections()
        .all()
        .iter()
        .map(|c| view(&state, c))
        .collect();
    Json(serde_json::json!({ "connections": connections })).into_response()
}

/// `GET /v1/connections/{id}`.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    match state.connections().get(&id) {
        Some(c) => Json(view(&state, &c)).into_response(),
        None => error_response(&GitproxyError::new(
            ErrorCode::UnknownConnection,
            format!("no connection named {id:?}"),
        )),
    }
}
