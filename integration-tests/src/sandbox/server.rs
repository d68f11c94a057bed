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
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

fn not_found() -> Response<Body> {
    let mut r = Response::new(Body::from("404 Not Found\n"));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Under a relative URL root, the request with the root taken off its path, or
/// `None` when the path is outside the root (GitLab's web server answers 404).
fn strip_root(root: &str, req: Request<Incoming>) -> Option<Request<Incoming>> {
    if root.is_empty() {
        return Some(req);
    }
    let path = req.uri().path();
    let rest = path.strip_prefix(root)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    let pq = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = pq.parse().ok();
    parts.uri = http::Uri::from_parts(uri).ok()?;
    Some(Request::from_parts(parts, body))
}

/// GitLab lets `git clone https://host/group/project` work (no `.git`): its routes
/// (`config/routes/git_http.rb`, "Redirect /group/project/info/refs to
/// /group/project.git/info/refs") answer the handshake, and only the handshake, with
/// Rails' `redirect`: a 301 whose `Location` is built from the request's scheme,
/// host and script name (the relative URL root). git follows it and keeps the `.git`
/// base for the rest of the exchange.
fn gitless_redirect(inner: &Inner, req: &Request<Incoming>) -> Option<Response<Body>> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return None;
    }
    let project = req.uri().path().strip_suffix("/info/refs")?;
    let project = project.trim_start_matches('/');
    let segments: Vec<&str> = project.split('/').collect();
    if segments.len() < 2
        || project.ends_with(".git")
        || segments
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return None;
    }
    let query = req.uri().query().unwrap_or("");
    if !(query.is_empty()
        || query == "service=git-upload-pack"
        || query == "service=git-receive-pack")
    {
        return None;
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))?;
    let mut location = format!(
        "{}://{host}{}/{project}.git/info/refs",
        inner.scheme, inner.relative_url_root
    );
    if !query.is_empty() {
        location.push('?');
        location.push_str(query);
    }
    let body =
        format!("<html><body>You are being <a href=\"{location}\">redirected</a>.</body></html>");
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    Some(r)
}

/// Serves one request.
pub async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string());
        let query = api::parse_query(req.uri().query().unwrap_or(""));
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
    let Some(req) = strip_root(&inner.relative_url_root, req) else {
        return not_found();
    };
    let path = req.uri().path().to_string();
    let query = api::parse_query(req.uri().query().unwrap_or(""));
    if path == "/api/v4" || path.starts_with("/api/v4/") {
        let cred = api::api_credential(req.headers(), &query);
        return api::serve(&inner, req, cred).await;
    }
    if let Some(redirect) = gitless_redirect(&inner, &req) {
        return redirect;
    }
    if let Some(route) = git_http::match_route(&path) {
        let password = api::basic_credential(req.headers()).map(|(_, p)| p);
        return git_http::serve(&inner, route, req, password).await;
    }
    not_found()
}

/// Builds a rustls acceptor (ring provider) from PEM cert chain and key.
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing TLS certificate PEM")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in PEM");
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Err(pem::Error::NoItemsFound) => anyhow::bail!("no private key in PEM"),
        other => other.context("parsing TLS key PEM")?,
    };
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
