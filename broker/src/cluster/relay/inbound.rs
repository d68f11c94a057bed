//! The receiving side of a relayed connection (peer listener): the
//! preamble is read and its secret checked before anything else; a
//! connection without it is the peer listener's ordinary HTTP.

use super::{CLIENT_HEADER, MAX_PREAMBLE_BYTES, PREAMBLE_LINE};
use crate::cluster::peer::server::Gate;
use crate::cluster::peer::{AUTH_HEADER, FROM_HEADER};
use bytes::{Bytes, BytesMut};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// What the first bytes of a peer-listener connection were.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Not a relayed connection: the peer listener's own HTTP.
    Peer,
    /// A caller's connection relayed by replica `from`.
    Relayed {
        /// The relaying replica's id.
        from: Arc<str>,
        /// The caller's address, as the relaying replica saw it.
        client: SocketAddr,
    },
    /// Refused (wrong secret, a bad or slow preamble); answered and done.
    Refused,
}

/// The peer listener's acceptance of relayed connections.
pub struct Inbound {
    gate: Arc<Gate>,
    api: axum::Router,
    observer: Option<Arc<crate::observe::Observer>>,
}

impl Inbound {
    /// Relayed connections are served by `api` (the api listener's router).
    pub fn new(
        gate: Arc<Gate>,
        api: axum::Router,
        observer: Option<Arc<crate::observe::Observer>>,
    ) -> Self {
        Inbound {
            gate,
            api,
            observer,
        }
    }

    /// The router relayed connections are served by.
    pub fn api_router(&self) -> &axum::Router {
        &self.api
    }

    /// Reads the preamble of a relayed connection, if it starts with one,
    /// before `deadline`. Returns what the bytes were and the bytes read
    /// past the preamble (to serve first).
    pub async fn open<IO>(
        &self,
        io: &mut IO,
        peer: SocketAddr,
        deadline: Instant,
    ) -> (Opened, Bytes)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            let line = PREAMBLE_LINE.as_bytes();
            let k = buf.len().min(line.len());
            if buf[..k] != line[..k] {
                return (Opened::Peer, buf.freeze());
            }
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) if k == line.len() => {
                    let opened = self.check(&req, peer);
                    let rest = buf.split_off(n).freeze();
                    if opened == Opened::Refused {
                        let _ = io.write_all(&refusal()).await;
                        let _ = io.shutdown().await;
                    }
                    return (opened, rest);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_PREAMBLE_BYTES => {}
                _ => {
                    self.gate.refused(Some(peer), "a malformed relay preamble");
                    return (Opened::Refused, Bytes::new());
                }
            }
            match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ if buf.is_empty() => return (Opened::Refused, Bytes::new()),
                // Not all of a preamble in time: whatever it was, it is not
                // served (the peer listener's handshake deadline).
                _ => return (Opened::Refused, Bytes::new()),
            }
        }
    }

    fn check(&self, req: &httparse::Request<'_, '_>, peer: SocketAddr) -> Opened {
        let get = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let Some(presented) = get(AUTH_HEADER) else {
            self.gate.refused(Some(peer), "no peer secret");
            return Opened::Refused;
        };
        if !self.gate.admits(presented) {
            self.gate.refused(Some(peer), "wrong peer secret");
            return Opened::Refused;
        }
        self.gate.accepted();
        if let Some(o) = &self.observer {
            o.relayed("in");
        }
        let from = crate::cluster::peer::server::replica_name(
            get(FROM_HEADER)
                .and_then(|v| http::HeaderValue::from_bytes(v).ok())
                .as_ref(),
        );
        // An authenticated replica names the caller; a value that is not an
        // address is logged as the replica's own.
        let client = get(CLIENT_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(peer);
        Opened::Relayed {
            from: from.into(),
            client,
        }
    }
}

/// The answer to a refused preamble: the relaying replica passes it on to
/// its caller as the answer to the first request.
fn refusal() -> Vec<u8> {
    let e = GitproxyError::new(
        ErrorCode::Internal,
        "a broker replica refused the peer secret of the replica this request reached",
    )
    .with_hint("Every broker replica must read the same GITPROXY_PEER_SECRET_FILE.");
    let body = e.to_json();
    format!(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\nx-gitproxy-error: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        e.error.as_str(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitproxy_shared::Secret;

    async fn opened(sent: &[u8]) -> (Opened, Bytes, Vec<u8>) {
        let gate = Gate::new(Secret::new("s3cret-s3cret-s3cret"));
        let inbound = Inbound::new(gate, axum::Router::new(), None);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        b.write_all(sent).await.unwrap();
        drop(b.shutdown().await);
        let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (o, rest) = inbound.open(&mut a, peer, deadline).await;
        drop(a);
        let mut answer = Vec::new();
        b.read_to_end(&mut answer).await.unwrap();
        (o, rest, answer)
    }

    fn preamble(secret: &str) -> Vec<u8> {
        let mut p = PREAMBLE_LINE.as_bytes().to_vec();
        p.extend_from_slice(
            format!("{AUTH_HEADER}: {secret}\r\n{FROM_HEADER}: r1\r\n{CLIENT_HEADER}: 192.0.2.7:5555\r\n\r\nGET /x HTTP/1.1\r\n").as_bytes(),
        );
        p
    }

    #[tokio::test]
    async fn a_relayed_connection_needs_the_secret() {
        let (o, rest, answer) = opened(&preamble("s3cret-s3cret-s3cret")).await;
        assert_eq!(
            o,
            Opened::Relayed {
                from: "r1".into(),
                client: "192.0.2.7:5555".parse().unwrap()
            }
        );
        assert_eq!(rest, "GET /x HTTP/1.1\r\n");
        assert!(answer.is_empty());

        let (o, rest, answer) = opened(&preamble("guess")).await;
        assert_eq!(o, Opened::Refused);
        assert!(rest.is_empty() || o == Opened::Refused);
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
        assert!(answer.contains("GITPROXY_PEER_SECRET_FILE"));
        assert!(!answer.contains("guess") && !answer.contains("s3cret"));

        // Ordinary peer-listener HTTP is left alone, bytes included.
        let (o, rest, _) = opened(b"GET /gitlab/acme/x HTTP/1.1\r\n\r\n").await;
        assert_eq!(o, Opened::Peer);
        assert_eq!(rest, "GET /gitlab/acme/x HTTP/1.1\r\n\r\n");
        // A preamble cut short is refused, not served.
        let (o, _, _) = opened(&PREAMBLE_LINE.as_bytes()[..20]).await;
        assert_eq!(o, Opened::Refused);
    }
}
