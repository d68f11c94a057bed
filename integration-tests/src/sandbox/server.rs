//! The listener: accept loop (plain or rustls TLS), HTTP/1.1 + h2 via hyper, the
//! top-level dispatch between `/api/v4`, git smart HTTP and everything else, and the
//! audit trail (request log, credentials seen).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::api;
use super::git_http;
use super::Inner;

/// Every credential a request carries, in a stable order: `PRIVATE-TOKEN`,
/// `Authorization` (Bearer token or Basic password), `private_token`/`access_token` query.
fn all_credentials(headers: &HeaderMap, query: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(v) = headers.get("private-token").and_then(|v| v.to_str().ok()) {
        out.push(v.trim().to_string());
    }
    if let Some((_, p)) = api::basic_credential(headers) {
        out.push(p);
    } else if let Some(a) = headers.get(http::header::AUTHORIZATION) {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, a.clone());
        if let Some(t) = api::api_credential(&h, &[]) {
            out.push(t);
        }
    }
    for (k, v) in query {
        if k == "private_token" || k == "access_token" {
            out.push(v.clone());
        }
    }
    out
}

/// Serves one request.
pub async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let query = api::parse_query(req.uri().query().unwrap_or(""));
    {
        let creds = all_credentials(req.headers(), &query);
        let mut st = inner.lock();
        st.request_log.push((req.method().to_string(), pq));
        st.seen_tokens.extend(creds);
    }
    // Rack::Attack runs before GitLab's routes, for the API and git alike.
    if let Some(t) = &inner.throttle {
        if let Err(refusal) = t.admit() {
            inner.lock().throttled += 1;
            return refusal.into_response();
        }
    }
    if path == "/api/v4" || path.starts_with("/api/v4/") {
        let cred = api::api_credential(req.headers(), &query);
        return api::serve(&inner, req, cred).await;
    }
    if let Some(route) = git_http::match_route(&path) {
        let password = api::basic_credential(req.headers()).map(|(_, p)| p);
        return git_http::serve(&inner, route, req, password).await;
    }
    let mut r = Response::new(Body::from("404 Not Found\n"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Builds a rustls acceptor (ring provider) from PEM cert chain and key.
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .context("parsing TLS certificate PEM")?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .context("parsing TLS key PEM")?
        .ok_or_else(|| anyhow::anyhow!("no private key in PEM"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate/key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn serve_conn<I>(inner: Arc<Inner>, io: I, stop: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(handle(inner, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop.cancelled() => {}
    }
}

/// Accepts connections until `stop` is cancelled, then closes the listening
/// socket and cancels `closed`.
pub async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    closed: CancellationToken,
) {
    let _closed = closed.drop_guard();
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("sandbox accept: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (inner, stop, tls) = (inner.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_conn(inner, tcp, stop).await,
                Some(acc) => {
                    let accepted = tokio::select! {
                        r = acc.accept(tcp) => r,
                        _ = stop.cancelled() => return,
                    };
                    if let Ok(s) = accepted {
                        serve_conn(inner, s, stop).await;
                    }
                }
            }
        });
    }
    // Parameters outlive locals: close the socket before `_closed` fires.
    drop(listener);
}
