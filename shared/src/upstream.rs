//! The HTTP client that replays a request against GitLab: used by the agent,
//! and by the broker for direct-mode connections.
//!
//! One [`Upstream`] serves one GitLab base URL, so whether it goes through the
//! corporate proxy is decided once, with the same `HTTPS_PROXY`/`NO_PROXY`
//! rules curl and Go use (hyper-util's matcher: exact host, domain suffix,
//! IP, CIDR, `*`). Failures are classified into the product's error codes.
//! Every request URL is built with the URL library from the base and the
//! target, and checked (same origin, under the base path, inside the policy)
//! before it is sent.

use crate::errors::{classify_upstream, proxy_error, ErrorCode, GitproxyError, Route};
use crate::gitlab_url::{self, GitlabUrlError};
use crate::policy::Policy;
use crate::secret::redact_url;
use crate::tls;
use http::{HeaderMap, Method, StatusCode};
use hyper_util::client::proxy::matcher::Matcher;
use std::time::Duration;
use url::Url;

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
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    base_url: Url,
    base: String,
    policy: Policy,
    route: Route,
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
        let tls = tls::client_config(&cfg.extra_ca_pem, &[b"http/1.1"])?;
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64);
        for (host, ip) in resolve {
            // reqwest takes the port from the URL.
            builder = builder.resolve(host, std::net::SocketAddr::new(*ip, 0));
        }
        let choice = cfg.proxy.proxy_for(url);
        let mut proxy_display = None;
        if let Some(choice) = &choice {
            let mut proxy = reqwest::Proxy::all(choice.uri.to_string())
                .map_err(|_| UpstreamBuildError::BadProxy(choice.display()))?;
            if let Some(auth) = &choice.basic_auth {
                proxy = proxy.custom_http_auth(auth.clone());
            }
            builder = builder.proxy(proxy);
            proxy_display = Some(choice.display());
        }
        let client = builder
            .build()
            .map_err(|e| UpstreamBuildError::Client(e.to_string()))?;
        Ok(Upstream {
            client,
            base_url: url.clone(),
            base: url.as_str().trim_end_matches('/').to_string(),
            policy: cfg.policy,
            route: Route {
                gitlab_host: host,
                proxy: proxy_display,
            },
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

    /// The URL a request for `target` goes to, refused with
    /// `blocked_by_policy` unless it stays on the base URL's origin, under its
    /// path, and the path relative to the base passes the policy.
    pub fn request_url(&self, method: &Method, target: &str) -> Result<Url, GitproxyError> {
        let blocked = |why: String| {
            GitproxyError::new(
                ErrorCode::BlockedByPolicy,
                format!("refused by the GitLab client: {why}"),
            )
        };
        self.policy
            .check(method.as_str(), target)
            .map_err(blocked)?;
        let url = gitlab_url::join(&self.base_url, target).map_err(blocked)?;
        let relative = gitlab_url::relative_target(&self.base_url, &url)
            .ok_or_else(|| blocked("the request URL leaves the GitLab base URL".into()))?;
        self.policy
            .check(method.as_str(), &relative)
            .map_err(blocked)?;
        Ok(url)
    }

    /// Sends one request: `target` is the origin-form path and query relative
    /// to the base URL. The response's body is not read.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        headers: HeaderMap,
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, GitproxyError> {
        let url = self.request_url(&method, target)?;
        let mut req = self.client.request(method, url).headers(headers);
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req
            .send()
            .await
            // reqwest's message names the URL, query and all, and queries
            // may carry tokens (`private_token=`): drop it.
            .map_err(|e| classify_upstream(&e.without_url(), &self.route))?;
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
            .request_url(&Method::GET, "/api/v4/projects/g%2Fp?ref=a%2Fb")
            .unwrap();
        assert_eq!(
            url.as_str(),
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
                .request_url(&Method::from_bytes(m.as_bytes()).unwrap(), t)
                .expect_err(t);
            assert_eq!(e.error, ErrorCode::BlockedByPolicy, "{t}");
        }
    }

    /// What reaches the wire: the caller's percent-encoding, under the base
    /// path.
    #[tokio::test]
    async fn sends_to_the_joined_url() {
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
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap()
                .to_string()
        });
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
        assert_eq!(
            server.await.unwrap(),
            "GET /gitlab/api/v4/projects/group%2Fproject?x=1;y=%2F HTTP/1.1"
        );
    }
}
