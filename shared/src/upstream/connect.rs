//! How the GitLab client opens a connection: TCP (with the static `--resolve`
//! overrides), through the corporate proxy when one applies, then TLS with
//! our rustls configuration, all within the connect timeout.
//!
//! The route is fixed per client (one GitLab base URL), so each connection
//! takes one of three shapes:
//! - direct: TCP to GitLab, TLS for `https`;
//! - tunnel (`https` GitLab through the proxy): TCP to the proxy, `CONNECT`
//!   with `Proxy-Authorization` from the proxy URL's userinfo, then TLS to
//!   GitLab inside the tunnel;
//! - forward (`http` GitLab through the proxy): TCP to the proxy, marked as
//!   proxied so requests go in absolute form (the caller of the client adds
//!   `Proxy-Authorization`).
//!
//! An `https://` proxy is reached over TLS (the same trust as GitLab's).
//!
//! Errors keep their source chain (`rustls::Error`, `std::io::Error`,
//! hyper-util's "dns error" and "tunnel error") for
//! `errors::classify_upstream`, and never name the request URL.

use crate::errors::ProxyTlsError;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tower::Service;

/// Boxed error, as hyper-util's client wants it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<Conn>, BoxError>> + Send>>;

/// Where connections go.
#[derive(Clone)]
enum Route {
    /// Straight to GitLab.
    Direct,
    /// `CONNECT` through the proxy (https GitLab), then TLS to GitLab.
    Tunnel(Tunnel<Dial>),
    /// Every connection to the proxy itself (http GitLab).
    Forward(Uri, Dial),
}

/// The client's connector (a `tower::Service<Uri>`).
#[derive(Clone)]
pub(super) struct Connector {
    dial: Dial,
    route: Route,
    timeout: Duration,
}

impl Connector {
    /// `proxy`: the proxy's URI and its `Proxy-Authorization`, when the
    /// base URL goes through one; `https` (the base URL's scheme) says which
    /// way: tunnel or forward.
    pub(super) fn new(
        tls: rustls::ClientConfig,
        resolve: &[(String, IpAddr)],
        proxy: Option<(Uri, Option<HeaderValue>)>,
        https: bool,
        timeout: Duration,
    ) -> Self {
        let dial = Dial::new(tls, resolve, false);
        let to_proxy = Dial {
            to_proxy: true,
            ..dial.clone()
        };
        let route = match proxy {
            None => Route::Direct,
            Some((uri, auth)) if https => {
                let mut tunnel = Tunnel::new(uri, to_proxy);
                if let Some(auth) = auth {
                    tunnel = tunnel.with_auth(auth);
                }
                Route::Tunnel(tunnel)
            }
            Some((uri, _)) => Route::Forward(uri, to_proxy),
        };
        Connector {
            dial,
            route,
            timeout,
        }
    }
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let timeout = self.timeout;
        let connect: Connecting = match &self.route {
            Route::Direct => self.dial.conn(dst, false),
            Route::Tunnel(t) => {
                let f = t.clone().call(dst.clone());
                let tls = self.dial.tls.clone();
                Box::pin(async move {
                    let tunnel = f.await?.into_inner();
                    Ok(Conn::new(handshake(&tls, &dst, tunnel).await?, false))
                })
            }
            Route::Forward(proxy, dial) => dial.clone().conn(proxy.clone(), true),
        };
        Box::pin(async move {
            match tokio::time::timeout(timeout, connect).await {
                Ok(r) => r,
                Err(_) => Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection within the connect timeout ({}s)",
                        timeout.as_secs_f32()
                    ),
                )) as BoxError),
            }
        })
    }
}

/// One hop: TCP to the URI's host and port, then TLS when its scheme is
/// `https` (GitLab, or an https proxy).
#[derive(Clone)]
struct Dial {
    tcp: HttpConnector<StaticResolver>,
    tls: TlsConnector,
    /// This hop is the corporate proxy: a failed TLS handshake is the
    /// proxy's ([`ProxyTlsError`]), so the error names the proxy's
    /// certificate, not GitLab's.
    to_proxy: bool,
}

type Dialing = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, BoxError>> + Send>>;

impl Dial {
    fn new(tls: rustls::ClientConfig, resolve: &[(String, IpAddr)], to_proxy: bool) -> Self {
        let mut tcp = HttpConnector::new_with_resolver(StaticResolver {
            overrides: resolve.into(),
            gai: GaiResolver::new(),
        });
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        Dial {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            to_proxy,
        }
    }

    /// A connection to `dst` as hyper sees it (`proxied`: see [`Conn`]).
    fn conn(&mut self, dst: Uri, proxied: bool) -> Connecting {
        let f = self.call(dst);
        Box::pin(async move { Ok(Conn::new(f.await?.into_inner(), proxied)) })
    }
}

/// The hop to the corporate proxy for a client other than GitLab's (the
/// agent's dial to the broker), for hyper-util's `Tunnel`: TCP with the
/// `--resolve` overrides, then TLS when the proxy URL is `https://`, a
/// failed handshake marked [`ProxyTlsError`]. The same hop as the GitLab
/// client's, so one `HTTPS_PROXY` means the same thing for both.
#[derive(Clone)]
pub struct ProxyDial(Dial);

impl ProxyDial {
    /// `tls`: the trust for an https proxy (the customer's CAs; no ALPN).
    pub fn new(tls: rustls::ClientConfig, resolve: &[(String, IpAddr)]) -> Self {
        ProxyDial(Dial::new(tls, resolve, true))
    }
}

impl Service<Uri> for ProxyDial {
    type Response = TokioIo<Conn>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        self.0.conn(dst, false)
    }
}

impl Service<Uri> for Dial {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Dialing;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Dialing {
        let tcp = self.tcp.call(dst.clone());
        let tls = self.tls.clone();
        let to_proxy = self.to_proxy;
        Box::pin(async move {
            let tcp: Stream = Box::new(tcp.await?.into_inner());
            if dst.scheme() != Some(&http::uri::Scheme::HTTPS) {
                return Ok(TokioIo::new(tcp));
            }
            match handshake(&tls, &dst, tcp).await {
                Ok(tls) => Ok(TokioIo::new(tls)),
                Err(e) if to_proxy => Err(Box::new(ProxyTlsError(e)) as BoxError),
                Err(e) => Err(e),
            }
        })
    }
}

/// TLS with `dst`'s host over `io`. tokio-rustls fails with an io::Error
/// wrapping the rustls::Error, which classification finds.
async fn handshake(tls: &TlsConnector, dst: &Uri, io: Stream) -> Result<Stream, BoxError> {
    let host = dst.host().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let name = ServerName::try_from(host.to_string()).map_err(io::Error::other)?;
    Ok(Box::new(tls.connect(name, io).await?))
}

/// DNS with static overrides (curl's `--resolve`): an overridden host gets
/// its IP (the port comes from the URL), any other goes to the system.
#[derive(Clone)]
pub(super) struct StaticResolver {
    overrides: Arc<[(String, IpAddr)]>,
    gai: GaiResolver,
}

type Resolving = Pin<Box<dyn Future<Output = Result<Addrs, io::Error>> + Send>>;

/// Addresses of one name.
pub(super) type Addrs = std::vec::IntoIter<SocketAddr>;

impl Service<Name> for StaticResolver {
    type Response = Addrs;
    type Error = io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        if let Some((_, ip)) = self
            .overrides
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(name.as_str()))
        {
            // Port 0: the connector puts in the URL's.
            let addrs = vec![SocketAddr::new(*ip, 0)].into_iter();
            return Box::pin(std::future::ready(Ok(addrs)));
        }
        let f = self.gai.call(name);
        Box::pin(async move { Ok(f.await?.collect::<Vec<_>>().into_iter()) })
    }
}

/// The byte stream of a connection: TCP, TLS over TCP, or TLS over TLS
/// (a tunnel through an https proxy).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Stream = Box<dyn Io>;

/// One connection as hyper sees it (through `TokioIo`); `proxied` makes
/// the client send absolute-form requests (plain http through the proxy).
pub struct Conn {
    io: Stream,
    proxied: bool,
}

impl Conn {
    fn new(io: Stream, proxied: bool) -> TokioIo<Self> {
        TokioIo::new(Conn { io, proxied })
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
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
