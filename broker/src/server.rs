//! The broker's listeners and its shutdown tree.
//!
//! Shutdown: the signal sets readiness false and asks every agent to drain;
//! the api listener stops accepting and waits (up to the grace period) for
//! in-flight requests to finish; then every agent stream is closed and the
//! agent listener stops.

use crate::config::BrokerConfig;
use crate::state::AppState;
use crate::tunnel::service::TunnelService;
use anyhow::Context;
use gitproxy_proto::v1::tunnel_server::TunnelServer;
use gitproxy_shared::tunnel::limits::MAX_MESSAGE_BYTES;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{info, warn};

/// The bound listeners (bound before `run`, so callers know the addresses).
pub struct Listeners {
    /// Agent listener.
    pub agent: TcpListener,
    /// API listener.
    pub api: TcpListener,
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
        Ok(Listeners { agent, api })
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

/// Reflection, `grpc.reflection.v1`.
pub fn reflection_v1(
    l: Listener,
) -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    match reflection_builder(l).build_v1() {
        Ok(s) => s,
        Err(e) => panic!("the embedded descriptor sets are invalid: {e}"),
    }
}

/// Reflection, `grpc.reflection.v1alpha` (what common grpcurl builds speak).
pub fn reflection_v1alpha(
    l: Listener,
) -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    match reflection_builder(l).build_v1alpha() {
        Ok(s) => s,
        Err(e) => panic!("the embedded descriptor sets are invalid: {e}"),
    }
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
        .map(
            |(c, k)| -> anyhow::Result<tonic::transport::ServerTlsConfig> {
                let cert =
                    std::fs::read(c).with_context(|| format!("cannot read {}", c.display()))?;
                let key =
                    std::fs::read(k).with_context(|| format!("cannot read {}", k.display()))?;
                // Validate early with rustls for a clear message.
                gitproxy_shared::tls::server_config(c, k, &[b"h2"])?;
                Ok(tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)))
            },
        )
        .transpose()?;
    let api_tls = cfg
        .api_tls
        .as_ref()
        .map(|(c, k)| gitproxy_shared::tls::server_config(c, k, &[b"h2", b"http/1.1"]))
        .transpose()?
        .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));

    crate::reload::spawn(state.clone(), shutdown.clone());

    // Agent listener.
    let (agent_health, agent_health_svc) = tonic_health::server::health_reporter();
    agent_health
        .set_serving::<TunnelServer<TunnelService>>()
        .await;
    let tunnel = TunnelServer::new(TunnelService::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = agent_tls {
        builder = builder
            .tls_config(tls)
            .context("invalid agent listener TLS")?;
    }
    let agent_stop = CancellationToken::new();
    let agent_server = builder
        .add_service(tunnel)
        .add_service(agent_health_svc)
        .add_service(reflection_v1(Listener::Agent))
        .add_service(reflection_v1alpha(Listener::Agent))
        .serve_with_incoming_shutdown(
            // Our own listener, so tonic's tcp_nodelay does not apply: set it
            // here, or small frames wait for delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(listeners.agent)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            agent_stop.clone().cancelled_owned(),
        );
    let agent_task = tokio::spawn(agent_server);
    info!(listener = "agent", addr = %agent_addr, tls = state.config.tls.is_some(), "listening");

    // API listener.
    let (api_health, api_health_svc) = tonic_health::server::health_reporter();
    api_health.set_serving::<gitproxy_proto::v1::admin_server::AdminServer<crate::api::admin::AdminService>>().await;
    let router = crate::api::router(state.clone(), api_health_svc);
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
    serve_api(listeners.api, router, api_tls, shutdown.clone(), grace).await;

    // The api listener has drained (or the grace period ran out): close
    // the agent streams and stop the agent listener.
    agent_health
        .set_not_serving::<TunnelServer<TunnelService>>()
        .await;
    state.shutdown_children.cancel();
    agent_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), agent_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("agent listener ended with an error: {e}"),
        Ok(Err(e)) => warn!("agent listener task failed: {e}"),
        Err(_) => warn!("agent listener did not stop within 5s"),
    }
    info!("gitproxy-broker stopped");
    Ok(())
}

/// Serves HTTP/1.1 and HTTP/2 (h2c, or TLS with ALPN) on the api listener.
/// Handshakes run in the connection's own task, never in the accept loop.
async fn serve_api(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http2()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024);
    let http = Arc::new(http);
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // The peer travels with each request: X-Forwarded-* are believed
        // only from trusted proxies (frontdoor::origin).
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut r: http::Request<hyper::body::Incoming>| {
                r.extensions_mut()
                    .insert(crate::frontdoor::origin::PeerAddr(peer));
                r
            },
        ));
        let http = http.clone();
        match &tls {
            None => {
                let conn = http
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(peer = %peer, "api connection ended: {e}");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, "api TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = http
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(peer = %peer, "api connection ended: {e}");
                    }
                });
            }
        }
    }
    drop(listener);
    info!(
        grace_s = grace.as_secs(),
        "api listener closed; waiting for in-flight requests"
    );
    tokio::select! {
        _ = graceful.shutdown() => info!("all api connections finished"),
        _ = tokio::time::sleep(grace) => warn!("grace period over; closing remaining api connections"),
    }
}
