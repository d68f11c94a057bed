//! The front-door base URL a caller sees (`https://gitproxy.example.com/gitlab/acme`),
//! which GitLab's `Link`/`Location` headers are rewritten to.
//!
//! Where it comes from, in order:
//! 1. requests the broker makes itself: `http://gitproxy.internal` (see [`super::internal`]);
//! 2. `--public-url` when configured: the operator says what callers use;
//! 3. `X-Forwarded-Proto` / `X-Forwarded-Host`, only when the TCP peer is one of
//!    `--trusted-proxy` (a load balancer or ingress that sets them): from anyone else
//!    they are ignored, so a caller cannot make the broker name another host;
//! 4. the request's own `Host` header (HTTP/1.1) or `:authority` (HTTP/2), and the api
//!    listener's scheme.

use crate::state::AppState;
use http::request::Parts;
use http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The TCP peer of an api-listener connection, put in each request's extensions by the
/// listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Marks a request the broker makes itself (Test Connection, catalogue, merge requests).
#[derive(Debug, Clone, Copy)]
pub struct InternalRequest;

/// Marks a request another replica forwarded (cluster mode), trusted only
/// because the peer listener checked the shared secret: it is served by this
/// replica's agents, never forwarded again, and answered with the
/// front-door base the forwarding replica computed for its caller.
#[derive(Debug, Clone)]
pub struct FromPeer {
    /// The forwarding replica's id.
    pub replica: String,
    /// The front-door base the caller sees (`http://host:port/gitlab/{id}`).
    pub base: String,
}

/// Marks a request of a caller connection another replica relayed here
/// whole (cluster mode, `cluster::relay`): served as if the caller had
/// connected here, counted as forwarded in.
#[derive(Debug, Clone)]
pub struct Relayed(pub std::sync::Arc<str>);

/// Marks a request that was relayed to replica `0`, which went away
/// before answering it, and is now served here (`cluster::relay`): the
/// per-request path counts that replica as tried and the request as lost
/// once, as if it had forwarded it there itself.
#[derive(Debug, Clone)]
pub struct LostAt(pub std::sync::Arc<str>);

/// The front-door base of a request, computed once when it arrives.
#[derive(Debug, Clone)]
pub struct FrontBase(pub String);

/// Proxies whose `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `10.0.0.0/8`, `192.168.1.5`, `::1` (an address alone is a /32 or /128).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let net = match e.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => match e.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                        "trusted proxy {e:?} is neither an IP address nor a CIDR like 10.0.0.0/8"
                    ))
                    }
                },
            };
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    /// Whether `ip` is a trusted proxy (IPv4-mapped IPv6 peers count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// True when none is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The first value of a header, trimmed (proxies append with commas).
fn first(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A host (and port) fit to be written into a URL: no scheme, path, userinfo,
/// whitespace or other delimiters.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// The front-door base for connection `conn` of a request with `parts`.
pub fn front_base(state: &AppState, conn: &str, parts: &Parts) -> String {
    if parts.extensions.get::<InternalRequest>().is_some() {
        return format!("http://{}/gitlab/{conn}", super::internal::INTERNAL_HOST);
    }
    if let Some(public) = &state.config.public_url {
        return format!("{}/gitlab/{conn}", public.as_str().trim_end_matches('/'));
    }
    let own_scheme = if state.config.api_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let trusted = parts
        .extensions
        .get::<PeerAddr>()
        .is_some_and(|p| state.config.trusted_proxies.contains(p.0.ip()));
    let h = &parts.headers;
    let forwarded = |name: &str| if trusted { first(h, name) } else { None };
    let scheme = forwarded("x-forwarded-proto")
        .filter(|s| s == "http" || s == "https")
        .unwrap_or_else(|| own_scheme.to_string());
    let host = forwarded("x-forwarded-host")
        .filter(|s| valid_host(s))
        .or_else(|| first(h, "host").filter(|s| valid_host(s)))
        .or_else(|| {
            parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .filter(|s| valid_host(s))
        })
        .unwrap_or_else(|| state.config.api_listen.to_string());
    format!("{scheme}://{host}/gitlab/{conn}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_parse_and_match() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), " 192.168.1.5 ".into(), "".into()])
            .unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("192.168.1.5".parse().unwrap()));
        assert!(t.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!t.contains("192.168.1.6".parse().unwrap()));
        assert!(!t.contains("127.0.0.1".parse().unwrap()));
        assert!(TrustedProxies::parse(&["proxy.corp".into()]).is_err());
    }

    #[test]
    fn hosts_with_delimiters_are_not_used() {
        assert!(valid_host("broker.example.com:8080"));
        assert!(valid_host("[::1]:8080"));
        assert!(!valid_host("evil.example/x"));
        assert!(!valid_host("user@evil"));
        assert!(!valid_host("a b"));
        assert!(!valid_host(""));
    }
}
