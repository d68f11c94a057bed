//! The agent listener's connections, handed to tonic as a stream of
//! handshaken streams (`serve_with_incoming_shutdown`).
//!
//! The accept loop ([`Acceptor`]: cap, back-off) spawns one task per
//! connection that does the TLS handshake (rustls, ALPN `h2`) and reads the
//! HTTP/2 preface within `--handshake-timeout`; a client that does neither in
//! time is closed. Finished handshakes go to tonic through a bounded channel.
//! The connection's slot travels inside [`AgentConn`], so it counts against
//! the cap until tonic drops the connection.

use super::accept::{Accepted, Acceptor};
use super::io::{handshake, Protocol, Rewind, ServerStream};
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

/// Handshaken connections waiting for tonic to take them.
const READY_QUEUE: usize = 64;

/// A connection on the agent listener after its handshake.
pub struct AgentConn {
    io: Rewind<ServerStream>,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for AgentConn {
    // The TCP addresses, so `Request::remote_addr` works with or without TLS.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accepts on `acceptor` until `stop`, and yields each connection once its
/// handshake is done.
pub fn incoming(
    mut acceptor: Acceptor,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) -> ReceiverStream<Result<AgentConn, Infallible>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    tokio::spawn(async move {
        while let Some(accepted) = acceptor.next(&stop).await {
            if tx.is_closed() {
                break;
            }
            tokio::spawn(admit(accepted, tls.clone(), handshake_timeout, tx.clone()));
        }
        // Dropping the acceptor closes the listening socket.
    });
    ReceiverStream::new(rx)
}

async fn admit(
    accepted: Accepted,
    tls: Option<TlsAcceptor>,
    timeout: Duration,
    ready: mpsc::Sender<Result<AgentConn, Infallible>>,
) {
    let Accepted { stream, peer, slot } = accepted;
    let info = TcpConnectInfo {
        local_addr: stream.local_addr().ok(),
        remote_addr: Some(peer),
    };
    let deadline = Instant::now() + timeout;
    match handshake(stream, tls.as_ref(), deadline).await {
        Ok((Protocol::Http2, io)) => {
            let conn = AgentConn {
                io,
                info,
                _slot: slot,
            };
            // Fails only when the listener is shutting down.
            let _ = ready.send(Ok(conn)).await;
        }
        Ok((Protocol::Http1, _)) => {
            debug!(listener = "agent", peer = %peer, "not HTTP/2 (gRPC); closing");
        }
        Err(e) => {
            debug!(listener = "agent", peer = %peer, "connection closed before its first request: {e}");
        }
    }
}
