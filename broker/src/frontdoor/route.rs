//! Cluster mode: where a front-door request of an agent-mode connection is
//! served.
//!
//! 1. A local stream that is not draining: here ([`forward::via_agent`]).
//! 2. Otherwise the tunnel registry (cached lookup) is asked which other
//!    live replicas hold streams of the connection:
//!    - a non-draining one elsewhere: forwarded there
//!      ([`remote::forward`]) — also when this replica holds only draining
//!      streams, so that during a rolling restart new requests follow the
//!      agent to its new replica;
//!    - only draining ones elsewhere but a local one: here;
//!    - nothing anywhere: `agent_not_connected`.
//! 3. Registry unreachable (Redis down): a local stream, even draining,
//!    serves; without one the answer is `agent_not_connected` with a hint
//!    naming the registry.
//!
//! A request another replica forwarded never comes here: it is served
//! locally (`frontdoor::forward_request`).

use super::forward;
use super::remote;
use super::target::Target;
use crate::cluster::registry::RegistryError;
use crate::cluster::Cluster;
use crate::config::Connection;
use crate::observe::RequestRecord;
use crate::state::{AppState, InFlightGuard};
use axum::body::Body;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use http::{Request, Response};
use std::sync::Arc;
use tracing::debug;

/// The answer when a replica without a local agent cannot read the
/// registry.
pub fn registry_unreachable(conn: &str, e: &RegistryError) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::AgentNotConnected,
        format!("no agent of connection {conn} is connected to this replica, and {e}"),
    )
    .with_hint(
        "The tunnel registry (Redis, GITPROXY_REDIS_URL) is unreachable, so this broker replica cannot find the replica the agent is connected to. Requests reaching that replica keep working; check Redis. Service resumes on its own when Redis is back.",
    )
}

/// Serves a request of agent-mode connection `conn` through a local agent
/// or the replica holding one.
pub async fn via_cluster(
    state: &Arc<AppState>,
    cluster: &Arc<Cluster>,
    conn: &Arc<Connection>,
    t: Target,
    req: Request<Body>,
    slot: InFlightGuard,
    rec: &mut RequestRecord,
) -> Result<Response<Body>, GitproxyError> {
    let (any_local, ready_local) = state.registry.local_state(&conn.id);
    if ready_local {
        return forward::via_agent(state, conn, t, req, slot, rec).await;
    }
    let remote = match cluster.registry.lookup(&conn.id, false).await {
        Ok(r) => r,
        Err(e) if any_local => {
            debug!(connection = %conn.id, "registry unreachable; serving on a draining local stream: {e}");
            return forward::via_agent(state, conn, t, req, slot, rec).await;
        }
        Err(e) => return Err(registry_unreachable(&conn.id, &e)),
    };
    let ready_remote = remote.iter().any(|a| !a.entry.draining);
    if remote.is_empty() || (any_local && !ready_remote) {
        // Local (draining) streams, or none anywhere (`agent_not_connected`).
        return forward::via_agent(state, conn, t, req, slot, rec).await;
    }
    remote::forward(state, cluster, conn, t, req, slot, rec, remote).await
}
