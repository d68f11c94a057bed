//! An accepted connection before HTTP: the stream (plain or TLS), the
//! handshake that must finish within one deadline (the TLS handshake, then
//! the first bytes that tell HTTP/1.x from the HTTP/2 preface), and
//! [`Rewind`], which hands the bytes the detection read back to the HTTP
//! server.
//!
//! A client that connects and sends nothing, or sends its TLS ClientHello or
//! its preface a byte at a time, is closed when the deadline passes: neither
//! rustls nor hyper's HTTP/2 server bound these waits themselves.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The client preface every HTTP/2 connection starts with (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP version a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 (the preface was received in full).
    Http2,
}

/// Why a connection was closed before HTTP started.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The deadline passed first.
    #[error("handshake not finished within the handshake timeout")]
    Timeout,
    /// rustls refused the handshake.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The client closed the connection before its first request.
    #[error("closed before the first request")]
    Closed,
    /// Reading the first bytes failed.
    #[error("read failed: {0}")]
    Io(io::Error),
}

/// An accepted stream, with or without TLS.
pub enum ServerStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream that first replays bytes already read from it.
pub struct Rewind<IO> {
    pre: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// `pre` is read first, then `inner`.
    pub fn new(pre: Bytes, inner: IO) -> Self {
        Rewind { pre, inner }
    }

    /// Puts `front` before what is left to replay (bytes a reader took from
    /// this stream and gives back).
    pub fn prepend(&mut self, front: Bytes) {
        if front.is_empty() {
            return;
        }
        self.pre = if self.pre.is_empty() {
            front
        } else {
            let mut b = BytesMut::with_capacity(front.len() + self.pre.len());
            b.extend_from_slice(&front);
            b.extend_from_slice(&self.pre);
            b.freeze()
        };
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.pre.is_empty() {
            let n = me.pre.len().min(buf.remaining());
            buf.put_slice(&me.pre[..n]);
            me.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads until the first bytes differ from the HTTP/2 preface (HTTP/1.x)
/// or match all of it (HTTP/2); returns what was read, to replay.
pub async fn sniff<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> Result<(Protocol, Bytes), HandshakeError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = io.read_buf(&mut buf).await.map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        let k = buf.len().min(H2_PREFACE.len());
        if buf[..k] != H2_PREFACE[..k] {
            return Ok((Protocol::Http1, buf.freeze()));
        }
        if k == H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf.freeze()));
        }
    }
}

/// The TLS handshake (when `tls` is set), then [`sniff`], both before
/// `deadline`.
pub async fn handshake(
    stream: TcpStream,
    tls: Option<&TlsAcceptor>,
    deadline: Instant,
) -> Result<(Protocol, Rewind<ServerStream>), HandshakeError> {
    let work = async {
        let mut s = match tls {
            None => ServerStream::Plain(stream),
            Some(acceptor) => ServerStream::Tls(Box::new(
                acceptor.accept(stream).await.map_err(HandshakeError::Tls)?,
            )),
        };
        let (protocol, pre) = sniff(&mut s).await?;
        Ok((protocol, Rewind::new(pre, s)))
    };
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(parts: &[&[u8]]) -> Result<(Protocol, Vec<u8>), HandshakeError> {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        // The client is dropped after its last part: end of stream.
        let writer = tokio::spawn(async move {
            for p in parts {
                client.write_all(&p).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let r = sniff(&mut server).await;
        writer.await.unwrap();
        let (p, pre) = r?;
        // Everything read is replayed, then the rest of the stream.
        let mut rw = Rewind::new(pre, server);
        let mut replay = vec![0u8; 64];
        let n = rw.read(&mut replay).await.unwrap();
        Ok((p, replay[..n].to_vec()))
    }

    #[tokio::test]
    async fn tells_http1_from_the_h2_preface() {
        let (p, replay) = sniffed(&[b"GET / HTTP/1.1\r\n"]).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(replay, b"GET / HTTP/1.1\r\n");
        // "PRI" alone is not enough; a diverging byte makes it HTTP/1.
        let (p, replay) = sniffed(&[b"P", b"R", b"X"]).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(replay, b"PRX");
        let (p, replay) = sniffed(&[&H2_PREFACE[..5], &H2_PREFACE[5..], b"\0\0"])
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http2);
        assert!(replay.starts_with(H2_PREFACE));
    }

    #[tokio::test]
    async fn closed_before_any_request() {
        assert!(matches!(sniffed(&[]).await, Err(HandshakeError::Closed)));
        assert!(matches!(
            sniffed(&[&H2_PREFACE[..10]]).await,
            Err(HandshakeError::Closed)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let r = handshake(s, None, deadline).await;
        assert!(matches!(r, Err(HandshakeError::Timeout)));
        assert!(Instant::now() >= deadline);
    }
}
