//! The product's error codes (SPEC section 3.1), their HTTP status and the
//! hint an operator needs, and the classification of network failures into
//! those codes by walking the error's source chain.

use serde::Serialize;
use std::error::Error as StdError;
use std::fmt;

/// Errors made by gitproxy itself (never by GitLab). Sent to callers with
/// header `X-Gitproxy-Error: <code>` and a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Missing or wrong `X-Gitproxy-Key`.
    Unauthorized,
    /// No such connection.
    UnknownConnection,
    /// Agent mode and no agent is connected.
    AgentNotConnected,
    /// The agent went away during the request.
    AgentDisconnected,
    /// Refused by the request policy (broker or agent).
    BlockedByPolicy,
    /// GitLab could not be reached (DNS, refused, connect timeout, reset).
    UpstreamUnreachable,
    /// TLS to GitLab failed.
    UpstreamTls,
    /// The corporate proxy answered with an error.
    ProxyError,
    /// The request's deadline passed.
    Timeout,
    /// Too many requests in flight for the connection.
    Overloaded,
    /// A peer broke the tunnel protocol (frame order, credit, sizes).
    ProtocolError,
    /// The request itself is malformed.
    BadRequest,
    /// A bug or an unexpected local failure.
    Internal,
    /// Cluster mode: the shared store (Redis) cannot be written or read.
    StoreUnavailable,
    /// GitLab kept answering 429 beyond the broker's retry budget.
    RateLimited,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::Unauthorized,
        ErrorCode::UnknownConnection,
        ErrorCode::AgentNotConnected,
        ErrorCode::AgentDisconnected,
        ErrorCode::BlockedByPolicy,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTls,
        ErrorCode::ProxyError,
        ErrorCode::Timeout,
        ErrorCode::Overloaded,
        ErrorCode::ProtocolError,
        ErrorCode::BadRequest,
        ErrorCode::Internal,
        ErrorCode::StoreUnavailable,
        ErrorCode::RateLimited,
    ];

    /// The wire name (`X-Gitproxy-Error`, JSON `error`, tunnel `Error.code`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownConnection => "unknown_connection",
            ErrorCode::AgentNotConnected => "agent_not_connected",
            ErrorCode::AgentDisconnected => "agent_disconnected",
            ErrorCode::BlockedByPolicy => "blocked_by_policy",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTls => "upstream_tls",
            ErrorCode::ProxyError => "proxy_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ProtocolError => "protocol_error",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Internal => "internal",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    /// Parses a wire name; unknown names become `Internal` so a newer peer
    /// never breaks an older one.
    pub fn parse(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Internal)
    }

    /// HTTP status the front door answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::UnknownConnection => 404,
            ErrorCode::AgentNotConnected | ErrorCode::Overloaded | ErrorCode::StoreUnavailable => {
                503
            }
            ErrorCode::AgentDisconnected
            | ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTls
            | ErrorCode::ProxyError
            | ErrorCode::ProtocolError => 502,
            ErrorCode::BlockedByPolicy => 403,
            ErrorCode::Timeout => 504,
            ErrorCode::BadRequest => 400,
            ErrorCode::Internal => 500,
            ErrorCode::RateLimited => 429,
        }
    }

    /// Whether the answer carries `Retry-After`.
    pub fn retry_after_secs(self) -> Option<u32> {
        match self {
            ErrorCode::AgentNotConnected => Some(5),
            ErrorCode::Overloaded => Some(1),
            // Redis restarting or failing over: writes come back in seconds.
            ErrorCode::StoreUnavailable => Some(5),
            _ => None,
        }
    }

    /// The generic hint for this code; specific failures refine it.
    pub fn default_hint(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "Send the API key in the X-Gitproxy-Key header.",
            ErrorCode::UnknownConnection => {
                "Check the connection id in the URL (/gitlab/{connection}/...); GET /v1/connections lists them."
            }
            ErrorCode::AgentNotConnected => {
                "Start the gitproxy-agent for this connection (helm install gitproxy-agent) and check its logs; `gitproxy-agent check` diagnoses broker reachability, TLS and the accessKey."
            }
            ErrorCode::AgentDisconnected => {
                "The agent went away while serving this request (restart, crash or network cut). Retry; if it repeats, check the agent's logs and resources."
            }
            ErrorCode::BlockedByPolicy => {
                "Only the GitLab REST API (/api/v4/..., /api/graphql) and git smart HTTP paths may be sent to GitLab."
            }
            ErrorCode::UpstreamUnreachable => {
                "Check the GitLab URL, DNS and firewall from where the request is replayed. If GitLab is only reachable through the corporate proxy, set proxy.httpsProxy."
            }
            ErrorCode::UpstreamTls => {
                "TLS to GitLab failed. If GitLab uses a certificate from an internal CA, set customCaCert (GITPROXY_CA_CERT_FILE) to that CA bundle."
            }
            ErrorCode::ProxyError => {
                "The corporate proxy could not reach GitLab. If GitLab is inside your network, add its host to proxy.noProxy (NO_PROXY)."
            }
            ErrorCode::Timeout => "GitLab did not answer in time. Check GitLab's load, or raise the request timeout.",
            ErrorCode::Overloaded => "Too many requests in flight for this connection; retry after the delay.",
            ErrorCode::ProtocolError => {
                "The agent and broker disagreed on the tunnel protocol. Run the same gitproxy version on both sides."
            }
            ErrorCode::BadRequest => "The request is malformed.",
            ErrorCode::Internal => "An unexpected error occurred in gitproxy; see its logs.",
            ErrorCode::StoreUnavailable => {
                "The shared store (Redis, --redis-url) cannot be reached or read, so the change was not saved: check Redis and this replica's connection to it (its logs say why), then retry. Front-door requests keep using the connections loaded last."
            }
            ErrorCode::RateLimited => {
                "GitLab is rate-limiting the token's user or the broker's address (429) for longer than the broker waits (--gitlab-rate-limit-budget, GITPROXY_GITLAB_RATE_LIMIT_BUDGET). Retry later, raise the budget, or raise GitLab's user and IP rate limits (Admin > Settings > Network) for this user."
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error made by gitproxy, with the operator's next step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{error}: {message}")]
pub struct GitproxyError {
    /// The code's wire name (kept as a string in JSON).
    #[serde(serialize_with = "ser_code")]
    pub error: ErrorCode,
    /// What happened, for humans. Never contains secrets.
    pub message: String,
    /// What to change.
    pub hint: String,
}

fn ser_code<S: serde::Serializer>(c: &ErrorCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(c.as_str())
}

impl GitproxyError {
    /// An error with the code's default hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        GitproxyError {
            error: code,
            message: message.into(),
            hint: code.default_hint().to_string(),
        }
    }

    /// Replaces the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.error
    }

    /// The JSON body `{"error", "message", "hint"}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"error\":\"{}\"}}", self.error))
    }
}

/// What the request was sent through, to name the right fix.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// The GitLab host (and port when not default), as in hints.
    pub gitlab_host: String,
    /// The proxy the request went through, redacted, if any.
    pub proxy: Option<String>,
}

/// The `status_class` label both programs' metrics give an HTTP status
/// (`2xx`, ...; anything outside 100–499 counts as `5xx`).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Turns a failure to reach GitLab into the product's error, by walking the
/// source chain: TLS verification errors, proxy tunnel refusals, DNS,
/// refused connections and timeouts each name their fix.
pub fn classify_upstream(err: &(dyn StdError + 'static), route: &Route) -> GitproxyError {
    let chain = Chain::new(err);
    let host = &route.gitlab_host;

    if chain.find::<ProxyTlsError>().is_some() {
        return classify_proxy_tls(chain.find::<rustls::Error>(), &chain.text(), route);
    }
    if let Some(tls) = chain.find::<rustls::Error>() {
        return classify_tls(tls, host);
    }
    let text = chain.text();
    if let Some(proxy) = &route.proxy {
        // hyper-util's CONNECT tunnel reports "unsuccessful tunnel" when the
        // proxy answers the CONNECT with anything but 2xx (e.g. 502/503/403).
        if text.contains("tunnel") || text.contains("proxy") {
            return proxy_error(
                host,
                proxy,
                &format!("the proxy refused to open a tunnel to {host}: {text}"),
            );
        }
    }
    if text.contains("dns error") || text.contains("failed to lookup address") {
        return GitproxyError::new(
            ErrorCode::UpstreamUnreachable,
            format!("cannot resolve the GitLab host {host}: {text}"),
        )
        .with_hint(format!(
            "DNS cannot resolve {host} from where the request is replayed. Check the GitLab URL; if only the corporate proxy can resolve it, set proxy.httpsProxy and keep {host} out of proxy.noProxy."
        ));
    }
    if let Some(io) = chain.find::<std::io::Error>() {
        use std::io::ErrorKind::*;
        if matches!(io.kind(), TimedOut) {
            return GitproxyError::new(
                ErrorCode::UpstreamUnreachable,
                format!("connecting to {host} timed out: {text}"),
            );
        }
        if matches!(io.kind(), ConnectionRefused) {
            if let Some(proxy) = &route.proxy {
                return GitproxyError::new(
                    ErrorCode::ProxyError,
                    format!("the corporate proxy {proxy} refused the connection: {text}"),
                )
                .with_hint(format!(
                    "Check proxy.httpsProxy ({proxy}). If {host} is inside your network, add it to proxy.noProxy."
                ));
            }
            return GitproxyError::new(
                ErrorCode::UpstreamUnreachable,
                format!("{host} refused the connection: {text}"),
            )
            .with_hint(format!(
                "Nothing accepts connections at {host}. Check the GitLab URL (scheme and port) and that GitLab is running."
            ));
        }
    }
    if text.contains("timed out") || text.contains("deadline") {
        return GitproxyError::new(
            ErrorCode::Timeout,
            format!("GitLab did not answer in time: {text}"),
        );
    }
    GitproxyError::new(
        ErrorCode::UpstreamUnreachable,
        format!("request to {host} failed: {text}"),
    )
}

/// The `proxy_error` for `host`, naming the noProxy fix.
pub fn proxy_error(host: &str, proxy: &str, message: &str) -> GitproxyError {
    let bare = host.split(':').next().unwrap_or(host);
    GitproxyError::new(ErrorCode::ProxyError, message.to_string()).with_hint(format!(
        "The corporate proxy ({proxy}) could not reach {bare} (Bad Gateway). GitLab inside your network must not go through the proxy: add {bare} (or its domain, or its CIDR) to proxy.noProxy (NO_PROXY)."
    ))
}

/// A TLS handshake with an `https://` corporate proxy failed (the proxy's
/// certificate, not GitLab's: the connector marks that hop).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with the corporate proxy failed")]
pub struct ProxyTlsError(#[source] pub Box<dyn StdError + Send + Sync>);

/// `proxy_error` for a failed TLS handshake with the proxy itself: the
/// request never left for GitLab, and the fix is the agent's trust of the
/// proxy's certificate (customCaCert) or the proxy URL's host name.
fn classify_proxy_tls(tls: Option<&rustls::Error>, text: &str, route: &Route) -> GitproxyError {
    use rustls::{CertificateError, Error as E};
    let proxy = route.proxy.as_deref().unwrap_or("the corporate proxy");
    let (what, hint) = match tls {
        Some(E::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(E::InvalidCertificate(CertificateError::BadSignature)) => (
            "x509: certificate signed by unknown authority".to_string(),
            format!("The corporate proxy ({proxy}) is reached over TLS, and its certificate comes from a CA the agent does not trust. Add that CA to customCaCert in the Helm values (--set-file customCaCert=ca.pem, or GITPROXY_CA_CERT_FILE; one bundle may hold several CAs), or use the proxy's http:// URL if it has one."),
        ),
        Some(E::InvalidCertificate(CertificateError::NotValidForName))
        | Some(E::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => (
            "x509: certificate is not valid for the proxy's host name".to_string(),
            format!("The host name of proxy.httpsProxy ({proxy}) is not in the proxy's certificate: use the name the certificate was issued for."),
        ),
        Some(E::InvalidCertificate(CertificateError::Expired))
        | Some(E::InvalidCertificate(CertificateError::ExpiredContext { .. })) => (
            "x509: certificate has expired".to_string(),
            format!("The corporate proxy's TLS certificate has expired ({proxy}): ask its owners to renew it."),
        ),
        _ => (
            format!("TLS handshake failed: {text}"),
            format!("The agent could not speak TLS with the corporate proxy ({proxy}). Check that proxy.httpsProxy names a TLS port when it starts with https://, or use the proxy's http:// URL."),
        ),
    };
    GitproxyError::new(
        ErrorCode::ProxyError,
        format!(
            "{what} (the corporate proxy {proxy}, on the way to {})",
            route.gitlab_host
        ),
    )
    .with_hint(hint)
}

fn classify_tls(tls: &rustls::Error, host: &str) -> GitproxyError {
    use rustls::{CertificateError, Error as E};
    match tls {
        E::InvalidCertificate(CertificateError::UnknownIssuer)
        | E::InvalidCertificate(CertificateError::BadSignature) => GitproxyError::new(
            ErrorCode::UpstreamTls,
            format!("x509: certificate signed by unknown authority (GitLab at {host})"),
        )
        .with_hint(
            "GitLab's certificate comes from a CA the agent does not trust. Set customCaCert in the Helm values (--set-file customCaCert=ca.pem, or GITPROXY_CA_CERT_FILE) to your internal CA bundle.",
        ),
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => GitproxyError::new(
            ErrorCode::UpstreamTls,
            format!("x509: certificate has expired (GitLab at {host})"),
        )
        .with_hint("GitLab's TLS certificate has expired: renew it on the GitLab server."),
        E::InvalidCertificate(CertificateError::NotValidForName)
        | E::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => GitproxyError::new(
            ErrorCode::UpstreamTls,
            format!("x509: certificate is not valid for {host}"),
        )
        .with_hint("The GitLab URL's host name is not in GitLab's certificate: use the name the certificate was issued for."),
        other => GitproxyError::new(
            ErrorCode::UpstreamTls,
            format!("TLS handshake with {host} failed: {other}"),
        ),
    }
}

/// The source chain of an error, for classification and one-line messages.
pub struct Chain<'a> {
    errors: Vec<&'a (dyn StdError + 'static)>,
}

impl<'a> Chain<'a> {
    /// Collects `err` and its sources.
    pub fn new(err: &'a (dyn StdError + 'static)) -> Self {
        let mut errors = Vec::new();
        let mut cur = Some(err);
        while let Some(e) = cur {
            errors.push(e);
            // `io::Error::source` skips the error it wraps (it returns the
            // wrapped error's source), which would hide e.g. rustls errors.
            cur = match e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => e.source(),
            };
            if errors.len() > 32 {
                break;
            }
        }
        Chain { errors }
    }

    /// The first error of type `T` in the chain.
    pub fn find<T: StdError + 'static>(&self) -> Option<&'a T> {
        self.errors.iter().find_map(|e| e.downcast_ref::<T>())
    }

    /// Every distinct message of the chain joined by ": ".
    pub fn text(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for e in &self.errors {
            let s = e.to_string();
            if !out.iter().any(|o| o.contains(&s)) {
                out.push(s);
            }
        }
        out.join(": ")
    }
}

#[cfg(test)]
mod tests;
