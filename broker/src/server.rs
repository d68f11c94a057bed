//! The broker's listeners and its shutdown tree. How each listener accepts,
//! handshakes and watches its connections is in [`crate::listener`].
//!
//! Shutdown: the signal sets readiness false and asks every agent to drain;
//! the api listener stops accepting and waits (up to the grace period) for
//! in-flight requests to finish; then every agent stream is closed and the
//! agent listener stops.

use crate::config::BrokerConfig;
use crate::listener::accept::Acceptor;
use crate::state::AppState;
use crate::tunnel::service::TunnelService;
use anyhow::Context;
use gitproxy_proto::v1::tunnel_server::TunnelServer;
use gitproxy_shared::tunnel::limits::MAX_MESSAGE_BYTES;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// TCP keepalive probes on agent connections after this much silence (the
/// HTTP/2 pings normally notice a dead agent first).
const AGENT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The bound listeners (bound before `run`, so callers know the addresses).
pub struct Listeners {
    /// Agent listener.
    pub agent: TcpListener,
    /// API listener.
    pub api: TcpListener,
    /// Peer listener (cluster mode).
    pub peer: Option<TcpListener>,
}

impl Listeners {
    /// Binds both addresses.
    pub async fn bind(cfg: &BrokerConfig) -> anyhow::Result<Self> {
        let agent = TcpListener::bind(cfg.agent_listen)
            .await
            .with_context(|| format!("cannot bind the agent listener on {}", cfg.agent_listen))?;
        let api = TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| format!("cannot bind the api listener on {}", cfg.api_listen))?;
        let peer =
            match &cfg.cluster {
                Some(c) => Some(TcpListener::bind(c.peer_listen).await.with_context(|| {
                    format!("cannot bind the peer listener on {}", c.peer_listen)
                })?),
                None => None,
            };
        Ok(Listeners { agent, api, peer })
    }
}

/// The services a listener serves, for reflection.
#[derive(Debug, Clone, Copy)]
pub enum Listener {
    /// Tunnel, health, reflection.
    Agent,
    /// Admin, health, reflection.
    Api,
}

fn reflection_builder(l: Listener) -> tonic_reflection::server::Builder<'static> {
    use tonic_reflection::pb::{v1, v1alpha};
    let own = match l {
        Listener::Agent => "gitproxy.v1.Tunnel",
        Listener::Api => "gitproxy.v1.Admin",
    };
    // Explicit names: the descriptor set holds both gitproxy services, and
    // each listener lists only what it serves (both reflection versions).
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gitproxy_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
        .with_service_name(own)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Reflection, `grpc.reflection.v1`. Fails only if the descriptor sets
/// embedded at build time are invalid (a build defect, reported at start).
pub fn reflection_v1(
    l: Listener,
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    reflection_builder(l)
        .build_v1()
        .context("the embedded gRPC descriptor sets are invalid")
}

/// Reflection, `grpc.reflection.v1alpha` (what common grpcurl builds speak).
pub fn reflection_v1alpha(
    l: Listener,
) -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    reflection_builder(l)
        .build_v1alpha()
        .context("the embedded gRPC descriptor sets are invalid")
}

/// Runs the broker until `shutdown` is cancelled and the drain is over.
pub async fn run(
    state: Arc<AppState>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = &state.config;
    let agent_addr = listeners.agent.local_addr()?;
    let api_addr = listeners.api.local_addr()?;
    let grace = cfg.shutdown_grace;
    let agent_tls = cfg
        .tls
        .as_ref()
        .map(|(c, k)| gitproxy_shared::tls::server_config(c, k, &[b"h2"]))
        .transpose()?
        .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let api_tls = cfg
        .api_tls
        .as_ref()
        .map(|(c, k)| gitproxy_shared::tls::server_config(c, k, &[b"h2", b"http/1.1"]))
        .transpose()?
        .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let limits = cfg.listeners.clone();

    crate::reload::spawn(state.clone(), shutdown.clone());
    crate::store::sync::spawn(state.clone(), shutdown.clone());

    // Agent listener.
    let (agent_health, agent_health_svc) = tonic_health::server::health_reporter();
    agent_health
        .set_serving::<TunnelServer<TunnelService>>()
        .await;
    let tunnel = TunnelServer::new(TunnelService::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let agent_stop = CancellationToken::new();
    // Our own accept loop (cap, back-off) and handshake (TLS and the HTTP/2
    // preface within the handshake timeout); TCP_NODELAY is set there, or
    // small frames wait for delayed ACKs (~40 ms).
    let agent_incoming = crate::listener::agent::incoming(
        Acceptor::new(
            listeners.agent,
            "agent",
            limits.max_agent_connections,
            Some(AGENT_TCP_KEEPALIVE),
        ),
        agent_tls,
        limits.handshake_timeout,
        agent_stop.clone(),
    );
    let agent_server = builder
        .add_service(tunnel)
        .add_service(agent_health_svc)
        .add_service(reflection_v1(Listener::Agent)?)
        .add_service(reflection_v1alpha(Listener::Agent)?)
        .serve_with_incoming_shutdown(agent_incoming, agent_stop.clone().cancelled_owned());
    let agent_task = tokio::spawn(agent_server);
    info!(listener = "agent", addr = %agent_addr, tls = state.config.tls.is_some(), "listening");

    // API listener.
    let (api_health, api_health_svc) = tonic_health::server::health_reporter();
    api_health.set_serving::<gitproxy_proto::v1::admin_server::AdminServer<crate::api::admin::AdminService>>().await;
    let router = crate::api::router(state.clone(), api_health_svc)?;
    // First step of the shutdown tree: readiness false, agents drained, new
    // agent streams refused; the api listener then drains its requests.
    tokio::spawn({
        let (state, shutdown) = (state.clone(), shutdown.clone());
        let (agent_health, api_health) = (agent_health.clone(), api_health.clone());
        async move {
            shutdown.cancelled().await;
            state.begin_drain();
            agent_health
                .set_not_serving::<TunnelServer<TunnelService>>()
                .await;
            api_health
                .set_not_serving::<gitproxy_proto::v1::admin_server::AdminServer<crate::api::admin::AdminService>>()
                .await;
        }
    });
    info!(listener = "api", addr = %api_addr, tls = api_tls.is_some(), "listening");
    // Cluster mode: the registry mirror and the peer listener. The peer
    // listener keeps serving while the api listener drains (other replicas
    // may still forward requests for the agents held here) and stops after
    // it, with what is left of the grace period.
    let drain_started = std::time::Instant::now();
    let cluster_tasks = match (&state.cluster, listeners.peer) {
        (Some(cluster), Some(peer)) => Some(start_cluster(
            &state,
            cluster.clone(),
            peer,
            limits.clone(),
            router.clone(),
        )?),
        _ => None,
    };
    // Cluster mode: HTTP/1.1 connections whose requests go to another
    // replica are relayed there whole (`cluster::relay`).
    let relay = match &state.cluster {
        Some(c) => crate::listener::api::Relay::Out(Arc::new(
            crate::cluster::relay::Outbound::new(state.clone(), c.clone()),
        )),
        None => crate::listener::api::Relay::Off,
    };
    crate::listener::api::serve(
        Acceptor::new(listeners.api, "api", limits.max_api_connections, None),
        (router, relay),
        api_tls,
        limits,
        shutdown.clone(),
        grace,
    )
    .await;

    // The api listener has drained (or the grace period ran out): close
    // the agent streams and stop the agent listener.
    agent_health
        .set_not_serving::<TunnelServer<TunnelService>>()
        .await;
    // Cluster mode: wait for the agents to move before the peer listener
    // stops (see `wait_for_handover`).
    if cluster_tasks.is_some() {
        let left = grace
            .saturating_sub(drain_started.elapsed())
            .min(HANDOVER_WAIT);
        wait_for_handover(&state, left).await;
    }
    // Requests other replicas forwarded here finish on the local agents
    // with what is left of the grace period.
    let cluster_tasks = match cluster_tasks {
        Some(c) => Some(
            c.drain_peers(grace.saturating_sub(drain_started.elapsed()))
                .await,
        ),
        None => None,
    };
    state.shutdown_children.cancel();
    agent_stop.cancel();
    if let Some(c) = cluster_tasks {
        c.deregister().await;
    }
    match tokio::time::timeout(Duration::from_secs(5), agent_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("agent listener ended with an error: {e}"),
        Ok(Err(e)) => warn!("agent listener task failed: {e}"),
        Err(_) => warn!("agent listener did not stop within 5s"),
    }
    info!("gitproxy-broker stopped");
    Ok(())
}

/// Cluster mode: the longest a stopping replica waits for its drained
/// agents to close their streams here (an agent that finds no other
/// replica, e.g. the last one of a cluster shutting down, keeps its stream).
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Cluster mode, after the api listener drained: waits (at most `limit`)
/// until every agent stream held here is closed. Each drained agent opens
/// its successor on another replica first (through the load balancer) and
/// closes its stream here once that one is connected and this one idle.
/// Until then the other replicas may still see only this replica's
/// (draining) streams in the registry and forward here; closing the peer
/// listener or the streams earlier would leave those requests with no
/// agent at all (`agent_not_connected` in the middle of a rolling restart).
async fn wait_for_handover(state: &AppState, limit: Duration) {
    let sessions: Vec<_> = state
        .registry
        .all()
        .into_iter()
        .filter(|s| !s.is_closed())
        .collect();
    if sessions.is_empty() {
        return;
    }
    info!(
        streams = sessions.len(),
        "waiting for the drained agents to move to another replica"
    );
    let all_closed = futures::future::join_all(sessions.iter().map(|s| s.wait_closed()));
    match tokio::time::timeout(limit, all_closed).await {
        Ok(_) => info!("every agent stream held here is closed"),
        Err(_) => warn!(
            left = sessions.iter().filter(|s| !s.is_closed()).count(),
            "agents still connected here after {}s; closing their streams",
            limit.as_secs_f64()
        ),
    }
}

/// The background parts of cluster mode.
struct ClusterTasks {
    /// Stops the peer listener (after the api drain).
    peer_stop: CancellationToken,
    peer: Option<tokio::task::JoinHandle<()>>,
    /// Stops the registry mirror (it then removes this replica).
    registry_stop: CancellationToken,
    registry: tokio::task::JoinHandle<()>,
}

impl ClusterTasks {
    /// Stops the peer listener and waits (at most `left`) for the requests
    /// it is serving.
    async fn drain_peers(mut self, left: Duration) -> Self {
        self.peer_stop.cancel();
        if let Some(t) = self.peer.take() {
            if tokio::time::timeout(left, t).await.is_err() {
                warn!("grace period over; closing remaining peer connections");
            }
        }
        self
    }

    /// Removes this replica from the registry (its streams are closed).
    async fn deregister(self) {
        self.registry_stop.cancel();
        let bound = crate::cluster::redis::RESPONSE_TIMEOUT + Duration::from_secs(1);
        if tokio::time::timeout(bound, self.registry).await.is_err() {
            warn!("the tunnel registry did not stop in time");
        }
    }
}

fn start_cluster(
    state: &Arc<AppState>,
    cluster: Arc<crate::cluster::Cluster>,
    peer: TcpListener,
    limits: crate::config::ListenerSettings,
    api_router: axum::Router,
) -> anyhow::Result<ClusterTasks> {
    use crate::cluster::peer;
    let peer_addr = peer.local_addr()?;
    let registry_stop = CancellationToken::new();
    let registry = tokio::spawn(
        cluster
            .registry
            .clone()
            .run(state.registry.clone(), registry_stop.clone()),
    );
    tokio::spawn(
        cluster
            .registry
            .clone()
            .follow_changes(registry_stop.clone()),
    );
    let peer_stop = CancellationToken::new();
    let gate = peer::server::Gate::new(cluster.settings.peer_secret.clone());
    let router = peer::server::router(state.clone(), gate.clone());
    let relay = crate::listener::api::Relay::In(Arc::new(crate::cluster::relay::Inbound::new(
        gate,
        api_router,
        Some(state.observer.clone()),
    )));
    let profile = crate::listener::api::Profile {
        name: "peer",
        stream_window: peer::STREAM_WINDOW,
        connection_window: peer::CONNECTION_WINDOW,
        max_streams: Some(state.config.tunnel.max_in_flight.min(u32::MAX as usize) as u32),
    };
    let grace = state.config.shutdown_grace;
    let peer_task = tokio::spawn(crate::listener::api::serve_as(
        profile,
        Acceptor::new(peer, "peer", peer::MAX_PEER_CONNECTIONS, None),
        (router, relay),
        None,
        limits,
        peer_stop.clone(),
        grace,
    ));
    info!(
        listener = "peer",
        addr = %peer_addr,
        advertise = %cluster.advertise,
        replica = %cluster.replica_id(),
        "listening"
    );
    Ok(ClusterTasks {
        peer_stop,
        peer: Some(peer_task),
        registry_stop,
        registry,
    })
}
