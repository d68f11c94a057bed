//! The api listener's routes: the front door, `/healthz`, `/readyz`, the
//! connection API under `/v1`, the operator console under `/ui/`, and gRPC (`gitproxy.v1.Admin`, health,
//! reflection) on the same port.

pub mod admin;
pub mod connections;
pub mod error;
pub mod gitlab;
pub mod merge_requests;
pub mod projects;
pub mod test_connection;

use crate::frontdoor;
use crate::state::AppState;
use axum::extract::State;
use axum::routing::{any, get, post};
use axum::Router;
use gitproxy_proto::v1::admin_server::AdminServer;
use http::StatusCode;
use std::sync::Arc;

/// Builds the api listener's service.
pub fn router(
    state: Arc<AppState>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<Router> {
    let admin = AdminServer::with_interceptor(
        admin::AdminService::new(state.clone()),
        admin::auth(state.clone()),
    );
    let grpc = tonic::service::Routes::new(admin)
        .add_service(health)
        .add_service(crate::server::reflection_v1(crate::server::Listener::Api)?)
        .add_service(crate::server::reflection_v1alpha(
            crate::server::Listener::Api,
        )?)
        .into_axum_router();
    // Everything under /v1 needs the API key: one layer, not a check per handler.
    let v1 = Router::new()
        .route("/v1/connections", get(connections::list))
        .route(
            "/v1/connections/{id}",
            get(connections::get_one)
                .put(connections::put)
                .delete(connections::delete),
        )
        .route(
            "/v1/connections/{id}/access-key",
            post(connections::access_key),
        )
        .route("/v1/connections/{id}/test", post(test_connection::handle))
        .route("/v1/events", get(crate::console::events::handle))
        .route("/v1/connections/{id}/projects", get(projects::handle))
        .route(
            "/v1/connections/{id}/merge-requests",
            get(merge_requests::list).post(merge_requests::create),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Ok(Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(v1)
        .merge(crate::console::routes())
        .route("/metrics", get(metrics))
        .route("/gitlab/{*rest}", any(frontdoor::handle))
        .with_state(state)
        .merge(grpc)
        .fallback(fallback))
}

/// Refuses `/v1` calls without the right `X-Gitproxy-Key`.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    req: http::Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> http::Response<axum::body::Body> {
    match connections::authorize(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => *r,
    }
}

/// Anything else: CONNECT (never tunnelled) is a policy refusal, the rest
/// is not found.
async fn fallback(req: http::Request<axum::body::Body>) -> http::Response<axum::body::Body> {
    use gitproxy_shared::errors::{ErrorCode, GitproxyError};
    let e = if req.method() == http::Method::CONNECT {
        GitproxyError::new(ErrorCode::BlockedByPolicy, "CONNECT is never forwarded")
    } else {
        GitproxyError::new(
            ErrorCode::UnknownConnection,
            "no such endpoint: the front door is /gitlab/{connection}/{path}",
        )
    };
    frontdoor::respond::error_response(&e)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if state.store.as_cluster().is_some_and(|s| !s.loaded()) {
        // Cluster mode, Redis not read yet: the API-made connections are
        // missing, so callers would get unknown_connection for them.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "API store not loaded from Redis yet\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// `GET /metrics`: OpenMetrics text format (no API key).
async fn metrics(State(state): State<Arc<AppState>>) -> http::Response<axum::body::Body> {
    let conns = state.connections();
    let mut agents = std::collections::BTreeMap::new();
    for s in state.registry.all() {
        if !s.is_closed() {
            *agents.entry(s.conn_id.clone()).or_insert(0usize) += 1;
        }
    }
    let g = crate::observe::Gauges {
        connections: conns
            .all()
            .iter()
            .map(|c| (c.id.clone(), c.mode.as_str()))
            .collect(),
        agents,
        in_flight: state.in_flight_counts(),
    };
    let text = state.observer.render_with(&g, |r| {
        if let Some(c) = &state.cluster {
            c.registry.register_metrics(r);
        }
    });
    let mut r = http::Response::new(axum::body::Body::from(text));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(crate::observe::metrics::CONTENT_TYPE),
    );
    r
}
