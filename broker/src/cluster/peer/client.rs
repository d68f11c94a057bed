//! The client side of the peer channel: one HTTP/2 connection per peer
//! address, dialled on first use, shared by every request to that replica
//! and dialled again when it closes.
//!
//! A request is either answered, or fails in one of two ways the forwarder
//! treats differently ([`PeerError`]): the replica could not be reached
//! (nothing was sent: the request may go elsewhere), or it went away after
//! the request was sent (it may have reached GitLab).

use super::{
    AUTH_HEADER, CONNECTION_WINDOW, CONNECT_TIMEOUT, FROM_HEADER, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT, REDIAL_AFTER, STREAM_WINDOW,
};
use bytes::Bytes;
use gitproxy_shared::Secret;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::debug;

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of a request to a peer.
pub type PeerBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The replica could not be reached; nothing was sent.
    #[error("cannot reach the replica at {addr}: {why}")]
    Unreachable {
        /// Peer address.
        addr: String,
        /// What failed.
        why: String,
    },
    /// The request was sent, and the replica went away before answering.
    #[error("the replica at {addr} went away before answering: {why}")]
    Lost {
        /// Peer address.
        addr: String,
        /// What failed.
        why: String,
    },
}

#[derive(Default)]
struct Conn {
    sender: tokio::sync::Mutex<Option<SendRequest<PeerBody>>>,
    /// Last failed dial (time, reason).
    failed: Mutex<Option<(Instant, String)>>,
}

/// Most peer addresses remembered; beyond, those without a connection are
/// forgotten (replicas come and go with their addresses).
const MAX_PEERS: usize = 256;

/// Pooled HTTP/2 connections to the other replicas.
pub struct PeerClient {
    secret: HeaderValue,
    from: HeaderValue,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    h2: http2::Builder<TokioExecutor>,
}

impl PeerClient {
    /// A client proving `secret`, naming itself `replica_id`.
    pub fn new(secret: &Secret, replica_id: &str) -> anyhow::Result<Self> {
        let mut secret = HeaderValue::from_str(secret.expose()).map_err(|_| {
            anyhow::anyhow!("GITPROXY_PEER_SECRET_FILE must hold printable characters only")
        })?;
        secret.set_sensitive(true);
        let from = HeaderValue::from_str(replica_id)
            .map_err(|_| anyhow::anyhow!("unusable --replica-id"))?;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .max_header_list_size(gitproxy_shared::headers::MAX_HEADER_BYTES as u32 * 2);
        Ok(PeerClient {
            secret,
            from,
            conns: Mutex::new(HashMap::new()),
            h2,
        })
    }

    /// Sends `req` (absolute URI on `addr`) with this replica's credentials.
    pub async fn send(
        &self,
        addr: &str,
        mut req: Request<PeerBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        let h = req.headers_mut();
        h.insert(AUTH_HEADER, self.secret.clone());
        h.insert(FROM_HEADER, self.from.clone());
        let lost = |e: hyper::Error| PeerError::Lost {
            addr: addr.to_string(),
            why: e.to_string(),
        };
        let mut sender = self.sender(addr, false).await?;
        match sender.try_send_request(req).await {
            Ok(r) => Ok(r),
            Err(mut e) => match e.take_message() {
                // The pooled connection closed before the request left:
                // nothing was sent, dial once more.
                Some(req) => {
                    let mut sender = self.sender(addr, true).await?;
                    sender.send_request(req).await.map_err(lost)
                }
                None => Err(lost(e.into_error())),
            },
        }
    }

    fn conn(&self, addr: &str) -> Arc<Conn> {
        let mut map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(addr) {
            return c.clone();
        }
        if map.len() >= MAX_PEERS {
            map.retain(|_, c| {
                c.sender
                    .try_lock()
                    .map(|s| s.as_ref().is_some_and(|s| !s.is_closed()))
                    .unwrap_or(true)
            });
        }
        map.entry(addr.to_string()).or_default().clone()
    }

    async fn sender(&self, addr: &str, redial: bool) -> Result<SendRequest<PeerBody>, PeerError> {
        let conn = self.conn(addr);
        let mut slot = conn.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !redial && !s.is_closed()) {
            return Ok(s.clone());
        }
        *slot = None;
        let unreachable = |why: String| PeerError::Unreachable {
            addr: addr.to_string(),
            why,
        };
        if let Some((at, why)) = conn
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if at.elapsed() < REDIAL_AFTER {
                return Err(unreachable(why.clone()));
            }
        }
        let dial = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            self.h2
                .handshake::<_, PeerBody>(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())
        };
        let r = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs_f32()
            )),
        };
        match r {
            Ok((sender, connection)) => {
                *conn.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let peer = addr.to_string();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        debug!(peer = %peer, "peer connection ended: {e}");
                    }
                });
                debug!(peer = %addr, "peer connection opened");
                *slot = Some(sender.clone());
                Ok(sender)
            }
            Err(why) => {
                *conn.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), why.clone()));
                Err(unreachable(why))
            }
        }
    }
}
