//! The peer listener: serves forwarded front-door requests to the other
//! replicas, and to nobody else.
//!
//! Every request is checked first: without the shared secret (or with
//! another one) it gets 401 `unauthorized` whatever its path, and the
//! refusal is logged once per episode (then a summary at most every 10 s),
//! so a scanner can neither learn anything nor flood the log. An
//! authenticated request must be `/gitlab/{connection}/...`; it is served
//! by this replica's own agents (`crate::frontdoor::serve` with
//! [`FromPeer`]), never forwarded again.

use super::{AUTH_HEADER, BASE_HEADER, FROM_HEADER};
use crate::frontdoor::origin::{FromPeer, PeerAddr};
use crate::frontdoor::respond::error_response;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::log_limit::{EpisodeLog, Report};
use gitproxy_shared::secret::ct_eq;
use gitproxy_shared::Secret;
use http::{Request, Response};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// At most one summary line about refused requests this often.
pub const REFUSALS_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest front-door base accepted from a peer.
const MAX_BASE_BYTES: usize = 2048;

/// What the peer listener's handler needs.
pub struct PeerServer {
    state: Arc<AppState>,
    gate: Arc<Gate>,
}

/// The peer listener's door: the shared secret, and the log of refusals
/// (its HTTP requests and relayed connections share both).
pub struct Gate {
    secret: Secret,
    refusals: Mutex<EpisodeLog>,
}

/// The peer listener's service.
pub fn router(state: Arc<AppState>, gate: Arc<Gate>) -> axum::Router {
    let s = Arc::new(PeerServer { state, gate });
    axum::Router::new().fallback(handle).with_state(s)
}

impl Gate {
    /// The door for `secret`.
    pub fn new(secret: Secret) -> Arc<Self> {
        Arc::new(Gate {
            secret,
            refusals: Mutex::new(EpisodeLog::new(REFUSALS_LOG_EVERY)),
        })
    }

    /// Whether `presented` is the shared secret (constant time).
    pub fn admits(&self, presented: &[u8]) -> bool {
        ct_eq(presented, self.secret.expose().as_bytes())
    }

    /// Logs a refusal (once per episode, then a summary at most every 10 s).
    pub fn refused(&self, peer: Option<SocketAddr>, why: &'static str) {
        let report = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure(Instant::now());
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        match report {
            Report::Started => warn!(
                listener = "peer",
                peer = %peer,
                "peer listener refused a request: {why} (it serves gitproxy replicas sharing GITPROXY_PEER_SECRET_FILE only)"
            ),
            Report::Ongoing {
                count,
                total,
                lasted,
            } => warn!(
                listener = "peer",
                peer = %peer,
                refused = count,
                total,
                lasted_ms = lasted.as_millis() as u64,
                "peer listener still refusing requests without the peer secret"
            ),
            Report::Suppressed => {}
        }
    }

    /// Ends an episode of refusals.
    pub fn accepted(&self) {
        let ended = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .success(Instant::now());
        if let Some(end) = ended {
            info!(
                listener = "peer",
                refused = end.total,
                lasted_ms = end.lasted.as_millis() as u64,
                "peer listener: refusals ended"
            );
        }
    }
}

/// A replica id as a peer names itself, if it looks like one.
pub fn replica_name(v: Option<&http::HeaderValue>) -> String {
    v.and_then(|v| v.to_str().ok())
        .filter(|s| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        })
        .unwrap_or("unknown")
        .to_string()
}

/// The front-door base a peer computed, if it is an http(s) URL.
fn front_base(v: Option<&http::HeaderValue>) -> Option<String> {
    let s = v?.to_str().ok()?;
    if s.len() > MAX_BASE_BYTES {
        return None;
    }
    let u = url::Url::parse(s).ok()?;
    (matches!(u.scheme(), "http" | "https") && u.host_str().is_some() && u.query().is_none())
        .then(|| s.to_string())
}

async fn handle(State(ps): State<Arc<PeerServer>>, mut req: Request<Body>) -> Response<Body> {
    let peer = req.extensions().get::<PeerAddr>().copied();
    let presented = req.headers().get(AUTH_HEADER);
    let ok = presented.is_some_and(|v| ps.gate.admits(v.as_bytes()));
    if !ok {
        ps.gate.refused(
            peer.map(|p| p.0),
            if presented.is_some() {
                "wrong peer secret"
            } else {
                "no peer secret"
            },
        );
        return error_response(&GitproxyError::new(
            ErrorCode::Unauthorized,
            "this listener serves gitproxy replicas only",
        ));
    }
    ps.gate.accepted();
    if !req.uri().path().starts_with("/gitlab/") {
        return error_response(&GitproxyError::new(
            ErrorCode::UnknownConnection,
            "the peer listener serves forwarded front-door requests (/gitlab/{connection}/...) only",
        ));
    }
    let Some(base) = front_base(req.headers().get(BASE_HEADER)) else {
        return error_response(&GitproxyError::new(
            ErrorCode::BadRequest,
            "a forwarded request must name its front-door base",
        ));
    };
    let from = replica_name(req.headers().get(FROM_HEADER));
    for h in [AUTH_HEADER, BASE_HEADER, FROM_HEADER] {
        req.headers_mut().remove(h);
    }
    req.extensions_mut().insert(FromPeer {
        replica: from,
        base,
    });
    match crate::frontdoor::serve(&ps.state, req, false).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_fields_are_checked() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(replica_name(Some(&v("r1"))), "r1");
        assert_eq!(replica_name(Some(&v("r1/../x"))), "unknown");
        assert_eq!(replica_name(None), "unknown");
        assert!(front_base(Some(&v("http://10.0.0.1:8080/gitlab/acme"))).is_some());
        assert!(front_base(Some(&v("javascript:alert(1)"))).is_none());
        assert!(front_base(Some(&v("http://h/gitlab/acme?x=1"))).is_none());
        assert!(front_base(None).is_none());
    }
}
