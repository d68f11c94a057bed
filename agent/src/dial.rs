//! The transport to the broker: TCP, through the corporate proxy with HTTP
//! `CONNECT` unless `NO_PROXY` matches the broker (TLS to the proxy first
//! when its URL is `https://`, as for GitLab), then TLS (rustls, public
//! roots plus the customer's CAs) for `https://` broker URLs. The resulting
//! byte stream is handed to tonic, which speaks HTTP/2 over it.

use crate::config::AgentConfig;
use gitproxy_proto::v1::tunnel_client::TunnelClient;
use gitproxy_shared::errors::{Chain, ProxyTlsError};
use gitproxy_shared::upstream::ProxyDial;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

/// A connected byte stream to the broker.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Why the broker could not be reached; each variant names a `check` step.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP or proxy failure.
    #[error("cannot reach the broker at {addr}{via}: {detail}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// " through proxy X" or "".
        via: String,
        /// The cause.
        detail: String,
    },
    /// The proxy refused the CONNECT.
    #[error("the proxy {proxy} refused to CONNECT to the broker at {addr}: {detail}")]
    ProxyRefused {
        /// The proxy, redacted.
        proxy: String,
        /// host:port.
        addr: String,
        /// The cause.
        detail: String,
    },
    /// The TLS handshake failed (untrusted certificate, wrong name...).
    #[error("TLS to the broker at {addr} failed: {detail}")]
    Tls {
        /// host:port.
        addr: String,
        /// The cause.
        detail: String,
        /// True when the certificate's CA is unknown.
        unknown_ca: bool,
    },
    /// TLS with an `https://` corporate proxy failed (its certificate, not
    /// the broker's).
    #[error("TLS to the corporate proxy {proxy} failed: {detail}")]
    ProxyTls {
        /// The proxy, redacted.
        proxy: String,
        /// The cause.
        detail: String,
        /// True when the certificate's CA is unknown.
        unknown_ca: bool,
    },
    /// Anything else.
    #[error("cannot connect to the broker: {0}")]
    Other(String),
}

impl DialError {
    /// The fix an operator should try.
    pub fn hint(&self) -> &'static str {
        match self {
            DialError::Unreachable { .. } => "Check GITPROXY_BROKER_URL, DNS and the egress firewall; if outbound traffic must use the corporate proxy, set proxy.httpsProxy (HTTPS_PROXY).",
            DialError::ProxyRefused { .. } => "The corporate proxy must allow CONNECT to the broker's host and port; check its ACLs and the proxy credentials in proxy.httpsProxy.",
            DialError::Tls { unknown_ca: true, .. } => "The broker's certificate comes from a CA the agent does not trust (x509: certificate signed by unknown authority). If a TLS-inspecting proxy or a private CA is in the way, set customCaCert (GITPROXY_CA_CERT_FILE).",
            DialError::Tls { .. } => "Check that GITPROXY_BROKER_URL uses the host name the broker's certificate was issued for.",
            DialError::ProxyTls { unknown_ca: true, .. } => "The corporate proxy is reached over TLS (an https:// proxy URL) and its certificate comes from a CA the agent does not trust (x509: certificate signed by unknown authority): add that CA to customCaCert (GITPROXY_CA_CERT_FILE; one bundle may hold several CAs), or use the proxy's http:// URL if it has one.",
            DialError::ProxyTls { .. } => "The agent could not speak TLS with the corporate proxy: check that proxy.httpsProxy names the proxy's TLS port and the host name its certificate was issued for, or use its http:// URL.",
            DialError::Other(_) => "Check GITPROXY_BROKER_URL.",
        }
    }
}

/// The broker's `host:port` and host name.
fn broker_target(cfg: &AgentConfig) -> (String, u16) {
    let url = &cfg.broker_url;
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    (host, url.port_or_known_default().unwrap_or(443))
}

/// How the TCP connection to the broker was made, for `check`.
pub fn describe_route(cfg: &AgentConfig) -> String {
    match cfg.proxy.proxy_for(&cfg.broker_url) {
        Some(p) => format!("through proxy {} (CONNECT)", p.display()),
        None => "direct".to_string(),
    }
}

/// Opens the TCP connection to the broker: directly, or through the
/// corporate proxy with `CONNECT` unless `NO_PROXY` matches the broker.
pub async fn dial_tcp(cfg: &AgentConfig) -> Result<Box<dyn Io>, DialError> {
    let (host, port) = broker_target(cfg);
    let addr = format!("{host}:{port}");
    let fut = async {
        match cfg.proxy.proxy_for(&cfg.broker_url) {
            None => {
                let target = match cfg
                    .resolve
                    .iter()
                    .find(|(h, _)| h.eq_ignore_ascii_case(&host))
                {
                    Some((_, ip)) => std::net::SocketAddr::new(*ip, port).to_string(),
                    None => addr.clone(),
                };
                let s = TcpStream::connect(&target)
                    .await
                    .map_err(|e| DialError::Unreachable {
                        addr: addr.clone(),
                        via: String::new(),
                        detail: e.to_string(),
                    })?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s) as Box<dyn Io>)
            }
            Some(choice) => {
                // The same hop as the GitLab client's: an https:// proxy is
                // reached over TLS with the customer's CAs.
                let tls = gitproxy_shared::tls::client_config(&cfg.extra_ca_pem, &[])
                    .map_err(|e| DialError::Other(e.to_string()))?;
                let mut tunnel = Tunnel::new(choice.uri.clone(), ProxyDial::new(tls, &cfg.resolve));
                if let Some(auth) = choice.basic_auth.clone() {
                    tunnel = tunnel.with_auth(auth);
                }
                let dst: http::Uri = format!("https://{addr}")
                    .parse()
                    .map_err(|e| DialError::Other(format!("{e}")))?;
                let io = tunnel.call(dst).await.map_err(|e| {
                    let chain = Chain::new(&e);
                    let detail = chain.text();
                    if chain.find::<ProxyTlsError>().is_some() {
                        let unknown_ca = chain.find::<rustls::Error>().is_some_and(|t| {
                            matches!(
                                t,
                                rustls::Error::InvalidCertificate(
                                    rustls::CertificateError::UnknownIssuer
                                )
                            )
                        });
                        DialError::ProxyTls {
                            proxy: choice.display(),
                            detail: if unknown_ca {
                                "x509: certificate signed by unknown authority".to_string()
                            } else {
                                detail
                            },
                            unknown_ca,
                        }
                    } else if detail.contains("unsuccessful") || detail.contains("tunnel") {
                        DialError::ProxyRefused {
                            proxy: choice.display(),
                            addr: addr.clone(),
                            detail,
                        }
                    } else {
                        DialError::Unreachable {
                            addr: addr.clone(),
                            via: format!(" through proxy {}", choice.display()),
                            detail,
                        }
                    }
                })?;
                Ok(Box::new(TokioIo::new(io)) as Box<dyn Io>)
            }
        }
    };
    timed(cfg, &addr, fut).await
}

/// Runs the TLS handshake with the broker when its URL is `https://`.
pub async fn tls(cfg: &AgentConfig, tcp: Box<dyn Io>) -> Result<Box<dyn Io>, DialError> {
    if cfg.broker_url.scheme() != "https" {
        return Ok(tcp);
    }
    let (host, port) = broker_target(cfg);
    let addr = format!("{host}:{port}");
    let fut = async {
        let tls = gitproxy_shared::tls::client_config(&cfg.extra_ca_pem, &[b"h2"])
            .map_err(|e| DialError::Other(e.to_string()))?;
        let name =
            ServerName::try_from(host.clone()).map_err(|e| DialError::Other(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let unknown_ca = Chain::new(&e).find::<rustls::Error>().is_some_and(|t| {
                    matches!(
                        t,
                        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
                    )
                });
                let detail = if unknown_ca {
                    "x509: certificate signed by unknown authority".to_string()
                } else {
                    Chain::new(&e).text()
                };
                DialError::Tls {
                    addr: addr.clone(),
                    detail,
                    unknown_ca,
                }
            })?;
        Ok(Box::new(stream) as Box<dyn Io>)
    };
    timed(cfg, &addr, fut).await
}

async fn timed<T>(
    cfg: &AgentConfig,
    addr: &str,
    fut: impl std::future::Future<Output = Result<T, DialError>>,
) -> Result<T, DialError> {
    match tokio::time::timeout(cfg.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Unreachable {
            addr: addr.to_string(),
            via: String::new(),
            detail: format!("timed out after {:?}", cfg.connect_timeout),
        }),
    }
}

/// Dials the broker and returns a stream ready for HTTP/2.
pub async fn dial(cfg: &AgentConfig) -> Result<Box<dyn Io>, DialError> {
    let tcp = dial_tcp(cfg).await?;
    tls(cfg, tcp).await
}

/// Dials and wraps the stream in a tonic client. HTTP/2 windows are sized so
/// one bulk transfer is not capped by the 64 KiB default (the per-request
/// credit, not HTTP/2, separates requests on the stream).
pub async fn connect(cfg: &AgentConfig) -> Result<TunnelClient<Channel>, DialError> {
    let io = dial(cfg).await?;
    over(io).await
}

/// Speaks HTTP/2 over an established stream to the broker.
pub async fn over(io: Box<dyn Io>) -> Result<TunnelClient<Channel>, DialError> {
    let slot = Arc::new(std::sync::Mutex::new(Some(io)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let slot = slot.clone();
        async move {
            let io = slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| std::io::Error::other("the broker connection was already used"))?;
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    });
    let channel = Endpoint::from_static("http://broker.invalid")
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| DialError::Other(Chain::new(&e).text()))?;
    Ok(TunnelClient::new(channel)
        .max_decoding_message_size(gitproxy_shared::tunnel::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gitproxy_shared::tunnel::limits::MAX_MESSAGE_BYTES))
}
