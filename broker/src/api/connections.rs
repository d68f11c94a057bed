//! `/v1/connections`: the connections and the agents serving them (`GET`),
//! and their management (`PUT`, `DELETE`, `POST .../access-key`). Secrets
//! are never part of a view.
//!
//! Writes go to the API store (persisted under `--data-dir`, refused
//! without one; in Redis in cluster mode) and the table is rebuilt from the
//! config file merged with the store (see `ConnectionSet::from_sources`) and
//! swapped in whole. In cluster mode a write first reloads the store (so it
//! starts from what the other replicas wrote) and answers once every live
//! replica applied it (see `crate::store::cluster`).

use super::error::ApiError;
use crate::config::connections::{valid_id, validate_fields};
use crate::config::{Connection, ConnectionSet, Mode};
use crate::frontdoor::respond::error_response;
use crate::state::AppState;
use crate::store::{StoreError, StoredConnection, Written};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{HeaderMap, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// "file", "api" or "file+api".
    pub source: &'static str,
    /// Whether a token is configured (never the token itself).
    pub has_token: bool,
    /// Whether an accessKey is configured (agent mode).
    pub has_access_key: bool,
    /// The URL GitLab calls itself, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
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
    /// Requests in flight (agents held by this replica; in cluster mode
    /// other replicas' agents show none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<usize>,
    /// Cluster mode: the replica holding the agent's stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Cluster mode: whether the stream is draining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<bool>,
}

/// The view of one connection (the agents held by this replica).
pub fn view(state: &AppState, c: &Connection) -> ConnectionView {
    let replica = state.cluster.as_ref().map(|c| c.replica_id().to_string());
    let agents: Vec<AgentView> = state
        .registry
        .sessions(&c.id)
        .iter()
        .filter(|s| !s.is_closed())
        .map(|s| AgentView {
            instance: s.instance.clone(),
            version: s.version.clone(),
            connected_since: humantime::format_rfc3339_seconds(s.connected_since).to_string(),
            in_flight: Some(s.in_flight()),
            replica: replica.clone(),
            draining: replica.as_ref().map(|_| s.is_draining()),
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
        source: c.source.as_str(),
        has_token: c.token.is_some(),
        has_access_key: c.access_key_sha256.is_some(),
        external_url: c.external_url.as_ref().map(|u| u.to_string()),
        agents,
    }
}

/// Cluster mode: adds the agents other live replicas hold (from the
/// registry) to `views`. Redis unreachable: the views keep this replica's
/// agents only.
pub async fn add_remote_agents(state: &AppState, views: &mut [ConnectionView]) {
    let Some(cluster) = &state.cluster else {
        return;
    };
    let ids: Vec<String> = views
        .iter()
        .filter(|v| v.mode == Mode::Agent.as_str())
        .map(|v| v.id.clone())
        .collect();
    let remote = match cluster.registry.lookup_many(&ids).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("connection views without other replicas' agents: {e}");
            return;
        }
    };
    for v in views.iter_mut() {
        let Some(agents) = remote.get(&v.id) else {
            continue;
        };
        for a in agents {
            let since = humantime::parse_rfc3339_weak(&a.entry.connected_since)
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_else(|_| a.entry.connected_since.clone());
            v.agents.push(AgentView {
                instance: a.entry.instance.clone(),
                version: a.entry.version.clone(),
                connected_since: since,
                in_flight: None,
                replica: Some(a.replica.clone()),
                draining: Some(a.entry.draining),
            });
        }
        if !v.agents.is_empty() && v.status == "disconnected" {
            v.status = "connected";
        }
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
pub async fn list(State(state): State<Arc<AppState>>) -> Response<Body> {
    let mut connections: Vec<_> = state
        .connections()
        .all()
        .iter()
        .map(|c| view(&state, c))
        .collect();
    add_remote_agents(&state, &mut connections).await;
    Json(serde_json::json!({ "connections": connections })).into_response()
}

/// `GET /v1/connections/{id}`.
pub async fn get_one(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response<Body> {
    match state.connections().get(&id) {
        Some(c) => {
            let mut v = [view(&state, &c)];
            add_remote_agents(&state, &mut v).await;
            let [v] = v;
            Json(v).into_response()
        }
        None => error_response(&GitproxyError::new(
            ErrorCode::UnknownConnection,
            format!("no connection named {id:?}"),
        )),
    }
}

/// Body of `PUT /v1/connections/{id}`; fields left out keep their values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    /// "agent" or "direct".
    pub mode: Option<String>,
    /// GitLab base URL.
    pub gitlab_url: Option<String>,
    /// The URL GitLab calls itself; "" clears it.
    pub external_url: Option<String>,
    /// GitLab token.
    pub token: Option<gitproxy_shared::Secret>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The API's answer to a store that refused a write.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NoDataDir => ApiError::new(
            409,
            "persistence_disabled",
            e.to_string(),
            "Start the broker with --data-dir (GITPROXY_DATA_DIR) so API-made connections persist.",
        ),
        StoreError::Io { .. } => ApiError::new(
            500,
            "storage_error",
            e.to_string(),
            "Check that the data directory is writable and not full.",
        ),
        StoreError::Unavailable(_) | StoreError::WrongKey { .. } | StoreError::Corrupt { .. } => {
            GitproxyError::new(ErrorCode::StoreUnavailable, e.to_string()).into()
        }
    }
}

/// Reloads the store (cluster mode: what other replicas wrote) before a
/// change is computed from it. Runs under the state's write lock.
async fn refresh(state: &AppState) -> Result<(), ApiError> {
    crate::store::sync::refresh(state)
        .await
        .map(|_| ())
        .map_err(store_error)
}

/// Validates the store with `change` applied, persists it and swaps the new
/// table in. Runs under the state's write lock; the caller waits for the
/// other replicas ([`crate::store::Store::wait_applied`]) once it let go of
/// the lock.
async fn commit(
    state: &AppState,
    next: BTreeMap<String, StoredConnection>,
) -> Result<Written, ApiError> {
    let set = ConnectionSet::from_sources(
        &state.file(),
        state.config.base_dir.as_deref(),
        &next,
        &state.config.extra_ca_pem,
        &state.config.policy,
    )
    .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let written = state
        .store
        .save_connections(next)
        .await
        .map_err(store_error)?;
    crate::reload::apply(state, set);
    Ok(written)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid("connection ids match [a-z0-9-]{1,63}"))
    }
}

/// `PUT /v1/connections/{id}`: creates or updates.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Response<Body> {
    match put_inner(&state, &id, &body).await {
        Ok((created, v, written)) => {
            state.store.wait_applied(written).await;
            let mut r = Json(v).into_response();
            if created {
                *r.status_mut() = http::StatusCode::CREATED;
            }
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn put_inner(
    state: &Arc<AppState>,
    id: &str,
    body: &[u8],
) -> Result<(bool, ConnectionView, Written), ApiError> {
    check_id(id)?;
    let b: PutBody = serde_json::from_slice(body).map_err(|e| {
        // serde's message names the field, never the value.
        ApiError::invalid(format!("the body is not a connection: {e}"))
    })?;
    validate_fields(
        b.mode.as_deref(),
        b.gitlab_url.as_deref(),
        b.external_url.as_deref(),
    )
    .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    if b.token.as_ref().is_some_and(|t| t.is_empty()) {
        return Err(ApiError::invalid("token must not be empty"));
    }
    let _w = state.write_lock.lock().await;
    refresh(state).await?;
    let created = state.connections().get(id).is_none();
    let mut next = state.store.snapshot().connections;
    let mut e = next.remove(id).filter(|e| !e.deleted).unwrap_or_default();
    if let Some(m) = b.mode {
        e.mode = Some(m);
    }
    if let Some(u) = b.gitlab_url {
        e.gitlab_url = Some(u);
    }
    if let Some(u) = b.external_url {
        e.external_url = Some(u);
    }
    let rotated = b.token.is_some();
    if let Some(t) = b.token {
        e.token = Some(t);
    }
    e.updated_at = now();
    next.insert(id.to_string(), e);
    let written = commit(state, next).await?;
    tracing::info!(connection = %id, created, token_changed = rotated, store_version = written.version(), "connection saved through the API");
    let c = state
        .connections()
        .get(id)
        .ok_or_else(|| ApiError::unknown(id))?;
    Ok((created, view(state, &c), written))
}

/// `DELETE /v1/connections/{id}`.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response<Body> {
    match delete_inner(&state, &id).await {
        Ok(written) => {
            state.store.wait_applied(written).await;
            http::StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn delete_inner(state: &AppState, id: &str) -> Result<Written, ApiError> {
    let _w = state.write_lock.lock().await;
    // Cluster mode: the connection may have been made (or deleted) through
    // another replica a moment ago.
    refresh(state).await?;
    if state.connections().get(id).is_none() {
        return Err(ApiError::unknown(id));
    }
    let mut next = state.store.snapshot().connections;
    let in_file = state.file().connections.iter().any(|c| c.id == id);
    if in_file {
        next.insert(
            id.to_string(),
            StoredConnection {
                deleted: true,
                updated_at: now(),
                ..Default::default()
            },
        );
    } else {
        next.remove(id);
    }
    let written = commit(state, next).await?;
    tracing::info!(connection = %id, store_version = written.version(), "connection deleted through the API");
    Ok(written)
}

/// `POST /v1/connections/{id}/access-key`: a new accessKey, shown only in
/// this answer; agents holding the previous one are disconnected.
pub async fn access_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response<Body> {
    match access_key_inner(&state, &id).await {
        Ok((key, hash, written)) => {
            state.store.wait_applied(written).await;
            let mut r = Json(serde_json::json!({"access_key": key, "access_key_sha256": hash}))
                .into_response();
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn access_key_inner(
    state: &AppState,
    id: &str,
) -> Result<(String, String, Written), ApiError> {
    let _w = state.write_lock.lock().await;
    refresh(state).await?;
    let Some(c) = state.connections().get(id) else {
        return Err(ApiError::unknown(id));
    };
    if c.mode != Mode::Agent {
        return Err(ApiError::new(
            409,
            "not_agent_mode",
            format!("connection {id} is in direct mode: it has no agents and needs no accessKey"),
            "Switch it to agent mode first: PUT {\"mode\": \"agent\"}.",
        ));
    }
    let (key, hash) = crate::keygen::generate();
    let mut next = state.store.snapshot().connections;
    let mut e = next.remove(id).filter(|e| !e.deleted).unwrap_or_default();
    e.access_key_sha256 = Some(hash.clone());
    e.updated_at = now();
    next.insert(id.to_string(), e);
    let written = commit(state, next).await?;
    tracing::info!(connection = %id, access_key_sha256 = %hash, store_version = written.version(), "new accessKey issued through the API");
    Ok((key, hash, written))
}
