//! The HTTP client that replays a request against GitLab: used by the agent,
//! and by the broker for direct-mode connections.
//!
//! One [`Upstream`] serves one GitLab base URL, so whether it goes through the
//! corporate proxy is decided once, with the same `HTTPS_PROXY`/`NO_PROXY`
//! rules curl and Go use (hyper-util's matcher: exact host, domain suffix,
//! IP, CIDR, `*`). Failures are classified into the product's error codes.
//! Every request URI is the base joined with the target
//! (`gitlab_url::JoinBase`, which refuses what the URL library would
//! rewrite), checked (same origin, under the base path, inside the policy)
//! before it is sent. The client is hyper-util's pooled HTTP/1.1 client over
//! our own connector (`connect`: resolve overrides, proxy, TLS, timeout);
//! `body` holds the request body type and helpers to read answers.

use crate::errors::{classify_upstream, proxy_error, ErrorCode, GitproxyError, Route};
use crate::gitlab_url::{self, GitlabUrlError};
use crate::policy::Policy;
use crate::secret::redact_url;
use crate::tls;
use connect::Connector;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;
use url::Url;

mod body;
mod connect;

use body::ClientBody;
pub use body::{collect, content_length, next_chunk, RequestBody, Response};
pub use connect::ProxyDial;

/// Corporate proxy settings, as the environment variables give them.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    /// `HTTP_PROXY` / `http_proxy`.
    pub http_proxy: Option<String>,
    /// `HTTPS_PROXY` / `https_proxy`.
    pub https_proxy: Option<String>,
    /// `NO_PROXY` / `no_proxy`.
    pub no_proxy: Option<String>,
}

fn env_either(upper: &str) -> Option<String> {
    std::env::var(upper)
        .ok()
        .or_else(|| std::env::var(upper.to_ascii_lowercase()).ok())
        .filter(|v| !v.trim().is_empty())
}

impl ProxySettings {
    /// Reads `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY` in either case.
    pub fn from_env() -> Self {
        ProxySettings {
            http_proxy: env_either("HTTP_PROXY"),
            https_proxy: env_either("HTTPS_PROXY"),
            no_proxy: env_either("NO_PROXY"),
        }
    }

    fn matcher(&self) -> Matcher {
        let mut b = Matcher::builder();
        if let Some(p) = &self.http_proxy {
            b = b.http(p.clone());
        }
        if let Some(p) = &self.https_proxy {
            b = b.https(p.clone());
        }
        if let Some(n) = &self.no_proxy {
            b = b.no(n.clone());
        }
        b.build()
    }

    /// The proxy URL (with its credentials) to use for `url`, if any.
    pub fn proxy_for(&self, url: &Url) -> Option<ProxyChoice> {
        let uri: http::Uri = url.as_str().parse().ok()?;
        let intercept = self.matcher().intercept(&uri)?;
        let configured = if url.scheme() == "https" {
            self.https_proxy.clone()
        } else {
            self.http_proxy.clone()
        }?;
        Some(ProxyChoice {
            uri: intercept.uri().clone(),
            basic_auth: intercept.basic_auth().cloned(),
            configured,
        })
    }
}

/// The proxy chosen for a destination.
#[derive(Debug, Clone)]
pub struct ProxyChoice {
    /// The proxy's address (no credentials).
    pub uri: http::Uri,
    /// `Proxy-Authorization` value from the URL's userinfo.
    pub basic_auth: Option<http::HeaderValue>,
    configured: String,
}

impl ProxyChoice {
    /// The proxy URL without credentials, for messages.
    pub fn display(&self) -> String {
        redact_url(&self.configured)
    }
}

/// How an [`Upstream`] is built.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// GitLab's base URL (may carry a path prefix, e.g. `https://host/gitlab`).
    pub base_url: Url,
    /// Extra CAs (PEM) trusted besides the public roots.
    pub extra_ca_pem: Vec<u8>,
    /// Corporate proxy.
    pub proxy: ProxySettings,
    /// Limit on establishing a connection (TCP, proxy, TLS).
    pub connect_timeout: Duration,
    /// What may be sent: checked once more on each final request URL.
    pub policy: Policy,
}

/// Failure to build an [`Upstream`].
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    /// The base URL is unusable.
    #[error(transparent)]
    BadUrl(#[from] GitlabUrlError),
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The proxy URL is unusable.
    #[error("invalid proxy URL {0}")]
    BadProxy(String),
    /// The HTTP client refused the settings.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A client bound to one GitLab.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, ClientBody>,
    join: gitlab_url::JoinBase,
    base: String,
    policy: Policy,
    route: Route,
    /// `Proxy-Authorization` for plain-http GitLab through the proxy
    /// (absolute-form requests); a tunnel sends it in its `CONNECT`.
    forward_auth: Option<HeaderValue>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the client.
    pub fn new(cfg: UpstreamConfig) -> Result<Self, UpstreamBuildError> {
        Upstream::with_resolve(cfg, &[])
    }

    /// Builds the client with static host overrides (`host` → `ip`, like
    /// curl's `--resolve`), for split-horizon DNS the agent cannot query.
    pub fn with_resolve(
        cfg: UpstreamConfig,
        resolve: &[(String, std::net::IpAddr)],
    ) -> Result<Self, UpstreamBuildError> {
        let url = &gitlab_url::parse_gitlab_url(cfg.base_url.as_str())?;
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let join = gitlab_url::JoinBase::new(url)
            .map_err(|why| UpstreamBuildError::Client(why.to_string()))?;
        let tls = tls::client_config(&cfg.extra_ca_pem, &[b"http/1.1"])?;
        let https = url.scheme() == "https";
        let choice = cfg.proxy.proxy_for(url);
        if let Some(choice) = &choice {
            if choice.uri.host().is_none() {
                return Err(UpstreamBuildError::BadProxy(choice.display()));
            }
        }
        let forward_auth = match &choice {
            Some(c) if !https => c.basic_auth.clone().map(|mut v| {
                v.set_sensitive(true);
                v
            }),
            _ => None,
        };
        let connector = Connector::new(
            tls,
            resolve,
            choice
                .as_ref()
                .map(|c| (c.uri.clone(), c.basic_auth.clone())),
            https,
            cfg.connect_timeout,
        );
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Upstream {
            client,
            join,
            base: url.as_str().trim_end_matches('/').to_string(),
            policy: cfg.policy,
            route: Route {
                gitlab_host: host,
                proxy: choice.map(|c| c.display()),
            },
            forward_auth,
        })
    }

    /// Where requests go, for hints.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URI a request for `target` goes to, refused with
    /// `blocked_by_policy` unless it stays on the base URL's origin, under its
    /// path, and the path relative to the base passes the policy (checked
    /// again on the target as sent when encoding changed it).
    pub fn request_uri(&self, method: &Method, target: &str) -> Result<http::Uri, GitproxyError> {
        let blocked = |why: String| {
            GitproxyError::new(
                ErrorCode::BlockedByPolicy,
                format!("refused by the GitLab client: {why}"),
            )
        };
        self.policy
            .check(method.as_str(), target)
            .map_err(blocked)?;
        let (uri, relative) = self.join.join(target).map_err(blocked)?;
        if relative != target {
            self.policy
                .check(method.as_str(), &relative)
                .map_err(blocked)?;
        }
        Ok(uri)
    }

    /// Sends one request: `target` is the origin-form path and query relative
    /// to the base URL. The response's body is not read.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        mut headers: HeaderMap,
        body: Option<RequestBody>,
    ) -> Result<Response, GitproxyError> {
        let uri = self.request_uri(&method, target)?;
        // What the previous client (reqwest) added by default.
        headers
            .entry(http::header::ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        if let Some(auth) = &self.forward_auth {
            headers.insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        let mut req = http::Request::new(ClientBody::from(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        // hyper-util's errors never name the request URL (its query may
        // carry tokens).
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| classify_upstream(&e, &self.route))?;
        if let Some(proxy) = &self.route.proxy {
            if is_proxy_generated_failure(resp.status(), resp.headers()) {
                return Err(proxy_error(
                    &self.route.gitlab_host,
                    proxy,
                    &format!(
                        "the corporate proxy answered {} instead of GitLab",
                        resp.status()
                    ),
                ));
            }
        }
        Ok(resp)
    }
}

/// A 502/503/504 made by a proxy rather than passed through from GitLab.
/// Squid marks its own pages with `X-Squid-Error`, RFC 9209 proxies with
/// `Proxy-Status`, tinyproxy and others name themselves in `Server`.
fn is_proxy_generated_failure(status: StatusCode, headers: &HeaderMap) -> bool {
    if !matches!(status.as_u16(), 502..=504) {
        return false;
    }
    if headers.contains_key("x-squid-error") || headers.contains_key("proxy-status") {
        return true;
    }
    headers
        .get(http::header::SERVER)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            let s = s.to_ascii_lowercase();
            s.contains("squid") || s.contains("tinyproxy") || s.contains("proxy")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(no: &str) -> ProxySettings {
        ProxySettings {
            http_proxy: Some("http://proxy.corp:3128".into()),
            https_proxy: Some("http://user:pw@proxy.corp:3128".into()),
            no_proxy: Some(no.into()),
        }
    }

    #[test]
    fn no_proxy_matches_host_domain_ip_cidr_star() {
        let u = |s: &str| Url::parse(s).unwrap();
        let s = settings("gitlab.corp.example, .internal, 10.0.0.0/8, 192.168.1.5");
        assert!(s.proxy_for(&u("https://gitlab.corp.example/")).is_none());
        assert!(s.proxy_for(&u("https://git.internal/")).is_none());
        assert!(s.proxy_for(&u("https://10.1.2.3/")).is_none());
        assert!(s.proxy_for(&u("http://192.168.1.5:8080/")).is_none());
        let p = s.proxy_for(&u("https://gitlab.com/")).unwrap();
        assert!(p.basic_auth.is_some());
        assert!(!p.display().contains("pw"));
        assert!(settings("*").proxy_for(&u("https://gitlab.com/")).is_none());
    }

    #[test]
    fn proxy_generated_pages_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert("server", "squid/5.7".parse().unwrap());
        assert!(is_proxy_generated_failure(StatusCode::BAD_GATEWAY, &h));
        assert!(!is_proxy_generated_failure(StatusCode::NOT_FOUND, &h));
        assert!(!is_proxy_generated_failure(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new()
        ));
    }

    fn upstream(base: &str) -> Result<Upstream, UpstreamBuildError> {
        crate::tls::install_default_provider();
        Upstream::new(UpstreamConfig {
            base_url: Url::parse(base).unwrap(),
            extra_ca_pem: Vec::new(),
            proxy: ProxySettings::default(),
            connect_timeout: Duration::from_secs(5),
            policy: Policy::default(),
        })
    }

    #[test]
    fn refuses_hostile_base_urls() {
        for b in [
            "http://127.0.0.1:1/#",
            "http://127.0.0.1:1/base#x",
            "http://127.0.0.1:1/?",
            "http://u:p@127.0.0.1:1/",
        ] {
            let e = upstream(b).expect_err(b).to_string();
            assert!(!e.contains(":p@"), "{e}");
        }
    }

    #[test]
    fn request_urls_stay_under_the_base_and_inside_the_policy() {
        let u = upstream("http://127.0.0.1:1/gitlab/").unwrap();
        let url = u
            .request_uri(&Method::GET, "/api/v4/projects/g%2Fp?ref=a%2Fb")
            .unwrap();
        assert_eq!(
            url.to_string(),
            "http://127.0.0.1:1/gitlab/api/v4/projects/g%2Fp?ref=a%2Fb"
        );
        for (m, t) in [
            ("GET", "/admin/users"),
            ("GET", "/api/v4/../../admin"),
            ("GET", "/api/v4/x#y"),
            ("GET", "//evil.example/api/v4/x"),
            ("PROPFIND", "/api/v4/x"),
        ] {
            let e = u
                .request_uri(&Method::from_bytes(m.as_bytes()).unwrap(), t)
                .expect_err(t);
            assert_eq!(e.error, ErrorCode::BlockedByPolicy, "{t}");
        }
    }

    /// A server answering one request with 204; yields the request head.
    async fn one_request() -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        });
        (addr, server)
    }

    /// What reaches the wire: the caller's percent-encoding, under the base
    /// path.
    #[tokio::test]
    async fn sends_to_the_joined_url() {
        let (addr, server) = one_request().await;
        let u = upstream(&format!("http://{addr}/gitlab")).unwrap();
        let resp = u
            .send(
                Method::GET,
                "/api/v4/projects/group%2Fproject?x=1;y=%2F",
                HeaderMap::new(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        let head = server.await.unwrap();
        assert_eq!(
            head.lines().next().unwrap(),
            "GET /gitlab/api/v4/projects/group%2Fproject?x=1;y=%2F HTTP/1.1"
        );
    }

    /// Plain-http GitLab through the proxy: absolute form, with the proxy
    /// URL's credentials; `--resolve` names reach the override's IP.
    #[tokio::test]
    async fn forwards_through_the_proxy_and_honours_resolve() {
        crate::tls::install_default_provider();
        let (proxy, server) = one_request().await;
        let cfg = |base: &str, proxy: Option<String>| UpstreamConfig {
            base_url: Url::parse(base).unwrap(),
            extra_ca_pem: Vec::new(),
            proxy: ProxySettings {
                http_proxy: proxy,
                ..ProxySettings::default()
            },
            connect_timeout: Duration::from_secs(5),
            policy: Policy::default(),
        };
        let version = |u: Upstream, server: tokio::task::JoinHandle<String>| async move {
            let resp = u
                .send(Method::GET, "/api/v4/version", HeaderMap::new(), None)
                .await
                .unwrap();
            assert_eq!(resp.status(), 204);
            server.await.unwrap()
        };
        let u = Upstream::new(cfg(
            "http://gitlab.invalid:8080/gitlab",
            Some(format!("http://user:pw@{proxy}")),
        ))
        .unwrap();
        let head = version(u, server).await;
        assert!(
            head.starts_with("GET http://gitlab.invalid:8080/gitlab/api/v4/version HTTP/1.1\r\n"),
            "{head}"
        );
        // base64("user:pw")
        assert!(
            head.to_ascii_lowercase()
                .contains("proxy-authorization: basic dxnlcjpwdw=="),
            "{head}"
        );

        let (addr, server) = one_request().await;
        let u = Upstream::with_resolve(
            cfg(&format!("http://gitlab.invalid:{}", addr.port()), None),
            &[("GitLab.invalid".into(), addr.ip())],
        )
        .unwrap();
        let head = version(u, server).await;
        assert!(
            head.starts_with("GET /api/v4/version HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(!head.to_ascii_lowercase().contains("proxy-authorization"));
    }

    /// Nothing listening: `upstream_unreachable`, and the message does not
    /// carry the request's query.
    #[tokio::test]
    async fn refused_is_unreachable_without_the_query() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let u = upstream(&format!("http://{addr}")).unwrap();
        let e = u
            .send(
                Method::GET,
                "/api/v4/projects?private_token=testpat-query",
                HeaderMap::new(),
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(e.error, ErrorCode::UpstreamUnreachable, "{}", e.message);
        assert!(e.message.contains("refused"), "{}", e.message);
        assert!(!e.message.contains("testpat"), "{}", e.message);
    }
}
