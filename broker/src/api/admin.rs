//! `gitproxy.v1.Admin` over gRPC on the api listener, authenticated with
//! metadata `x-gitproxy-key`.

use super::connections::view;
use crate::state::AppState;
use futures::Stream;
use gitproxy_proto::v1 as pb;
use gitproxy_proto::v1::admin_server::Admin;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The Admin service.
pub struct AdminService {
    state: Arc<AppState>,
}

impl AdminService {
    /// A service over the broker's state.
    pub fn new(state: Arc<AppState>) -> Self {
        AdminService { state }
    }
}

/// The interceptor checking `x-gitproxy-key`.
pub fn auth(
    state: Arc<AppState>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let presented = req.metadata().get("x-gitproxy-key").map(|v| v.as_bytes());
        if state.connections().api_key_ok(presented) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong x-gitproxy-key"))
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TunnelEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_connections(
        &self,
        _req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let connections = self
            .state
            .connections()
            .all()
            .iter()
            .map(|c| {
                let v = view(&self.state, c);
                pb::Connection {
                    id: v.id,
                    mode: v.mode.to_string(),
                    gitlab_url: v.gitlab_url,
                    status: v.status.to_string(),
                    agents: v
                        .agents
                        .into_iter()
                        .map(|a| pb::AgentInfo {
                            instance: a.instance,
                            version: a.version,
                            connected_since: a.connected_since,
                            in_flight: a.in_flight.unwrap_or(0) as u64,
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListConnectionsResponse { connections }))
    }

    async fn test_connection(
        &self,
        req: Request<pb::TestConnectionRequest>,
    ) -> Result<Response<pb::TestConnectionResponse>, Status> {
        let id = req.into_inner().connection_id;
        let Some(conn) = self.state.connections().get(&id) else {
            return Err(Status::not_found(format!("no connection named {id:?}")));
        };
        let report = super::test_connection::run(&self.state, &conn).await;
        Ok(Response::new(pb::TestConnectionResponse {
            ok: report.ok,
            checks: report
                .checks
                .into_iter()
                .map(|c| pb::Check {
                    name: c.name.to_string(),
                    status: c.status.to_string(),
                    detail: c.detail,
                    hint: c.hint,
                })
                .collect(),
        }))
    }

    type WatchTunnelStream = EventStream;

    async fn watch_tunnel(
        &self,
        req: Request<pb::WatchTunnelRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let id = req.into_inner().connection_id;
        if self.state.connections().get(&id).is_none() {
            return Err(Status::not_found(format!("no connection named {id:?}")));
        }
        // Subscribe before answering, so nothing sent after the call
        // returns is missed. A watcher slower than the traffic lags: it
        // loses the oldest events (a warning is logged), traffic never waits.
        let rx = self.state.observer.subscribe();
        let stop = self.state.draining.clone();
        let stream = futures::stream::unfold(rx, move |mut rx| {
            let id = id.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return None,
                        r = rx.recv() => r,
                    };
                    match next {
                        Ok(ev) if ev.connection == id => return Some((Ok(ev.event), rx)),
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(connection = %id, lost = n, "a WatchTunnel caller is too slow: events dropped");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
