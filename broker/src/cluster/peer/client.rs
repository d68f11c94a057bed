//! The client side of the peer channel: a pool of keep-alive HTTP/1.1
//! connections per peer address, shared by every request to that replica.
//!
//! HTTP/1.1 rather than one multiplexed HTTP/2 connection: a forwarded
//! request then costs both replicas what a caller's request costs (no HPACK,
//! stream state or flow-control windows on top), a finished response needs
//! no END_STREAM/RST_STREAM exchange, and a bulk transfer has a TCP
//! connection of its own instead of sharing one connection window with
//! everything else. The price is one TCP connection per request in flight
//! between two replicas; idle ones are kept ([`POOL_IDLE_PER_PEER`], for
//! [`POOL_IDLE_TIMEOUT`]) so the steady state dials nothing.
//!
//! A request is either answered, or fails in one of two ways the forwarder
//! treats differently ([`PeerError`]): the replica could not be reached
//! (nothing was sent: the request may go elsewhere), or it went away after
//! the request was sent (it may have reached GitLab).

use super::{
    AUTH_HEADER, CONNECT_TIMEOUT, FROM_HEADER, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    POOL_IDLE_PER_PEER, POOL_IDLE_TIMEOUT, REDIAL_AFTER,
};
use bytes::Bytes;
use gitproxy_shared::Secret;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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

/// Most peer addresses whose last failed dial is remembered.
const MAX_PEERS: usize = 256;

/// Pooled HTTP/1.1 connections to the other replicas.
pub struct PeerClient {
    secret: HeaderValue,
    from: HeaderValue,
    client: Client<HttpConnector, PeerBody>,
    /// Last failed dial per address (time, reason): requests fail at once
    /// for [`REDIAL_AFTER`] instead of each waiting for the connect timeout.
    failed: Mutex<HashMap<String, (Instant, String)>>,
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
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // A frozen or partitioned replica is noticed by TCP keep-alive on
        // idle pooled connections (a request in flight has its own timeouts).
        http.set_keepalive(Some(KEEPALIVE_INTERVAL));
        http.set_keepalive_interval(Some(KEEPALIVE_TIMEOUT / 3));
        http.set_keepalive_retries(Some(3));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_PEER)
            .build(http);
        Ok(PeerClient {
            secret,
            from,
            client,
            failed: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `req` (absolute URI on `addr`) with this replica's credentials.
    pub async fn send(
        &self,
        addr: &str,
        mut req: Request<PeerBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        if let Some(why) = self.recently_failed(addr) {
            return Err(PeerError::Unreachable {
                addr: addr.to_string(),
                why,
            });
        }
        let h = req.headers_mut();
        h.insert(AUTH_HEADER, self.secret.clone());
        h.insert(FROM_HEADER, self.from.clone());
        *req.version_mut() = http::Version::HTTP_11;
        match self.client.request(req).await {
            Ok(r) => Ok(r),
            // No connection: nothing was sent. (A pooled connection that
            // closed before the request left is retried on a fresh one by
            // the pool itself.)
            Err(e) if e.is_connect() => {
                let why = error_chain(&e);
                self.remember_failure(addr, &why);
                Err(PeerError::Unreachable {
                    addr: addr.to_string(),
                    why,
                })
            }
            Err(e) => Err(PeerError::Lost {
                addr: addr.to_string(),
                why: error_chain(&e),
            }),
        }
    }

    pub(crate) fn recently_failed(&self, addr: &str) -> Option<String> {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failed.get(addr) {
            Some((at, why)) if at.elapsed() < REDIAL_AFTER => Some(why.clone()),
            Some(_) => {
                failed.remove(addr);
                None
            }
            None => None,
        }
    }

    pub(crate) fn remember_failure(&self, addr: &str, why: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.len() >= MAX_PEERS {
            failed.retain(|_, (at, _)| at.elapsed() < REDIAL_AFTER);
        }
        if failed.len() < MAX_PEERS {
            failed.insert(addr.to_string(), (Instant::now(), why.to_string()));
        }
    }
}

/// The error and its sources on one line ("client error (Connect): tcp
/// connect error: Connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_peer_nobody_listens_on_is_unreachable_and_remembered() {
        let secret = Secret::new("testpat-peer-secret".to_string());
        let c = PeerClient::new(&secret, "r0").unwrap();
        // A port nobody listens on: bind, learn the port, close.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let mut req = Request::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        *req.uri_mut() = format!("http://{addr}/gitlab/acme/x").parse().unwrap();
        let e = c.send(&addr, req).await.unwrap_err();
        assert!(matches!(e, PeerError::Unreachable { .. }), "{e}");
        assert!(!e.to_string().contains("testpat"), "{e}");
        assert!(c.recently_failed(&addr).is_some());
        assert!(c.recently_failed("127.0.0.1:1").is_none());
    }
}
