//! The api listener: HTTP/1.1 and HTTP/2 (h2c with prior knowledge, or ALPN
//! `h2` with `--api-tls-cert`) in front of the axum router, with the limits
//! an internet-facing server needs.
//!
//! Per connection, in its own task (never in the accept loop):
//! 1. the handshake ([`super::io::handshake`]): TLS, then the first bytes,
//!    within `--handshake-timeout`;
//! 2. hyper's HTTP/1 or HTTP/2 server, chosen by those bytes;
//! 3. a [`ConnWatch`] deadline: `--header-read-timeout` from the first byte
//!    of an HTTP/1 request head, `--idle-timeout` with no request in flight.
//!    An idle connection is closed gracefully (HTTP/2: GOAWAY); an
//!    incomplete head is cut.
//!
//! HTTP/2 connections are also pinged ([`H2_KEEPALIVE_INTERVAL`]), so a
//! vanished client is noticed while its requests are still running.
//!
//! Shutdown: the accept loop stops (the listening socket closes), every
//! connection is asked to finish gracefully, and the listener waits for them
//! up to the grace period.

use super::accept::{Accepted, Acceptor};
use super::io::{handshake, Protocol};
use super::watch::{ConnWatch, Expiry, InFlightBody, Tracked};
use crate::config::ListenerSettings;
use gitproxy_shared::headers::MAX_HEADER_BYTES;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// How often an HTTP/2 connection is pinged.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an HTTP/2 ping may go unanswered before the connection is closed.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// After a graceful close of an idle connection, how long the client has to
/// take the last bytes (HTTP/2 GOAWAY) before the socket is closed anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Largest HTTP/1.1 buffer per connection, each way (see `serve_as`).
const H1_MAX_BUF: usize = 256 * 1024;

/// What tells one HTTP listener from another (the api listener and the
/// peer listener share this code).
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Name in log lines (`listener = ...`).
    pub name: &'static str,
    /// HTTP/2 stream window.
    pub stream_window: u32,
    /// HTTP/2 connection window.
    pub connection_window: u32,
    /// Concurrent HTTP/2 streams per connection (`None`: hyper's 200).
    pub max_streams: Option<u32>,
}

impl Profile {
    /// The api listener.
    pub const API: Profile = Profile {
        name: "api",
        stream_window: 4 * 1024 * 1024,
        connection_window: 8 * 1024 * 1024,
        max_streams: None,
    };
}

/// What a listener does with an HTTP/1.1 connection before hyper sees it
/// (cluster mode, `crate::cluster::relay`).
#[derive(Clone, Default)]
pub enum Relay {
    /// Nothing: hyper serves every connection.
    #[default]
    Off,
    /// The api listener: a connection whose first request goes to another
    /// replica is relayed there.
    Out(Arc<crate::cluster::relay::Outbound>),
    /// The peer listener: connections other replicas relay are served by
    /// the api router.
    In(Arc<crate::cluster::relay::Inbound>),
}

struct Shared {
    name: &'static str,
    router: axum::Router,
    relay: Relay,
    tls: Option<TlsAcceptor>,
    settings: ListenerSettings,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Serves the api listener until `shutdown`, then drains its connections
/// for at most `grace`.
pub async fn serve(
    acceptor: Acceptor,
    (router, relay): (axum::Router, Relay),
    tls: Option<TlsAcceptor>,
    settings: ListenerSettings,
    shutdown: CancellationToken,
    grace: Duration,
) {
    serve_as(
        Profile::API,
        acceptor,
        (router, relay),
        tls,
        settings,
        shutdown,
        grace,
    )
    .await
}

/// Serves an HTTP listener described by `profile` until `shutdown`, then
/// drains its connections for at most `grace`.
pub async fn serve_as(
    profile: Profile,
    mut acceptor: Acceptor,
    (router, relay): (axum::Router, Relay),
    tls: Option<TlsAcceptor>,
    settings: ListenerSettings,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut h1 = http1::Builder::new();
    // hyper's own header timer starts when a connection goes idle, so it
    // would also be the keep-alive idle limit; the ConnWatch counts the
    // header-read timeout from the first byte of a head instead.
    h1.keep_alive(true).header_read_timeout(None);
    // hyper buffers up to ~400 KiB per connection by default, each way: a
    // head or request body read, a response body taken from us that the
    // caller has not read yet. 256 KiB still holds four of the largest tunnel
    // chunks and any head within the 64 KiB header limit, and keeps the
    // direct-mode download rate (128 KiB cut it by a quarter: GitLab's body
    // arrives in reads of up to ~400 KiB); the socket buffers the rest.
    h1.max_buf_size(H1_MAX_BUF);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .initial_stream_window_size(profile.stream_window)
        .initial_connection_window_size(profile.connection_window)
        .max_concurrent_streams(profile.max_streams.or(Some(200)))
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        // The same head limit as over HTTP/1.1.
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let shared = Arc::new(Shared {
        name: profile.name,
        router,
        relay,
        tls,
        settings,
        h1,
        h2,
    });
    let tracker = TaskTracker::new();
    while let Some(accepted) = acceptor.next(&shutdown).await {
        tracker.spawn(serve_connection(shared.clone(), accepted, shutdown.clone()));
    }
    // Closes the listening socket: new clients are refused from now on.
    drop(acceptor);
    tracker.close();
    let name = profile.name;
    info!(
        listener = name,
        grace_s = grace.as_secs(),
        "{name} listener closed; waiting for in-flight requests"
    );
    tokio::select! {
        _ = tracker.wait() => info!(listener = name, "all {name} connections finished"),
        _ = tokio::time::sleep(grace) => warn!(listener = name, "grace period over; closing remaining {name} connections"),
    }
}

async fn serve_connection(shared: Arc<Shared>, accepted: Accepted, shutdown: CancellationToken) {
    let Accepted {
        stream,
        peer,
        slot: _slot,
    } = accepted;
    let s = &shared.settings;
    let deadline = Instant::now() + s.handshake_timeout;
    let (protocol, mut io) = match handshake(stream, shared.tls.as_ref(), deadline).await {
        Ok(x) => x,
        Err(e) => {
            debug!(listener = shared.name, peer = %peer, "connection closed before its first request: {e}");
            return;
        }
    };
    let mut router = shared.router.clone();
    // Who the caller is: the TCP peer, or the caller of a relayed connection.
    let mut client = peer;
    let mut relayed: Option<Arc<str>> = None;
    let mut replayed = None;
    if protocol == Protocol::Http1 {
        use crate::cluster::relay::{inbound::Opened, outbound::Ending};
        match &shared.relay {
            Relay::Off => {}
            Relay::Out(out) => {
                let timeouts = crate::cluster::relay::outbound::Timeouts {
                    header: s.header_read_timeout,
                    idle: s.idle_timeout,
                };
                match out.serve(io, peer, timeouts, &shutdown).await {
                    Ending::Closed => return,
                    Ending::Local(pre, back, again) => {
                        io = back;
                        io.prepend(pre);
                        replayed = again;
                    }
                }
            }
            Relay::In(inbound) => match inbound.open(&mut io, peer, deadline).await {
                (Opened::Peer, pre) => io.prepend(pre),
                (Opened::Relayed { from, client: c }, pre) => {
                    io.prepend(pre);
                    client = c;
                    router = inbound.api_router().clone();
                    relayed = Some(from);
                }
                (Opened::Refused, _) => return,
            },
        }
    }
    // A relayed connection: the relaying replica closes it when idle.
    let idle_timeout = match relayed {
        Some(_) => s.idle_timeout + crate::cluster::relay::PEER_IDLE_MARGIN,
        None => s.idle_timeout,
    };
    let watch = ConnWatch::new(
        protocol == Protocol::Http1,
        idle_timeout,
        s.header_read_timeout,
    );
    // The first requests served here after a relay's peer went away are
    // those it had taken (`cluster::relay::outbound::Replayed`).
    let lost = replayed.map(|r| (r.replica, std::sync::atomic::AtomicUsize::new(r.requests)));
    let svc = {
        let watch = watch.clone();
        hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            if let Some((replica, left)) = &lost {
                use std::sync::atomic::Ordering::Relaxed;
                if left
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    req.extensions_mut()
                        .insert(crate::frontdoor::origin::LostAt(replica.clone()));
                }
            }
            let guard = watch.request_started();
            let router = router.clone();
            // The peer travels with each request: X-Forwarded-* are believed
            // only from trusted proxies (frontdoor::origin).
            req.extensions_mut()
                .insert(crate::frontdoor::origin::PeerAddr(client));
            if let Some(from) = &relayed {
                req.extensions_mut()
                    .insert(crate::frontdoor::origin::Relayed(from.clone()));
            }
            async move {
                let resp = match router.oneshot(req).await {
                    Ok(r) => r,
                    Err(e) => match e {},
                };
                Ok::<_, Infallible>(resp.map(|b| InFlightBody::new(b, guard)))
            }
        })
    };
    match protocol {
        Protocol::Http1 => {
            let io = TokioIo::new(Tracked::new(io, watch.clone()));
            drive(
                shared.h1.serve_connection(io, svc),
                &watch,
                shared.name,
                peer,
                &shutdown,
            )
            .await;
        }
        Protocol::Http2 => {
            let io = TokioIo::new(io);
            drive(
                shared.h2.serve_connection(io, svc),
                &watch,
                shared.name,
                peer,
                &shutdown,
            )
            .await;
        }
    }
}

/// Runs one HTTP connection to its end: closed by the client, idle, an
/// incomplete head, or the broker's shutdown.
async fn drive<C>(
    conn: C,
    watch: &ConnWatch,
    name: &'static str,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut expired = std::pin::pin!(watch.expired());
    let mut closing_since: Option<Instant> = None;
    let mut draining = false;
    loop {
        let force_at = closing_since.map(|t| t + CLOSE_GRACE);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(listener = name, peer = %peer, "api connection ended: {e}");
                }
                return;
            }
            why = &mut expired, if closing_since.is_none() => match why {
                Expiry::HeadTimeout => {
                    debug!(listener = name, peer = %peer, "request head not complete within the header-read timeout; closing");
                    return;
                }
                Expiry::Idle => {
                    debug!(listener = name, peer = %peer, "idle; closing");
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
            },
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = sleep_until_opt(force_at), if force_at.is_some() => {
                if watch.in_flight() == 0 {
                    debug!(listener = name, peer = %peer, "idle connection did not close; closing the socket");
                    return;
                }
                // A request slipped in before the GOAWAY: let it finish.
                closing_since = Some(Instant::now());
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
