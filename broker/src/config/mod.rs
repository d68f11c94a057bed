//! Configuration of the broker: clap flags (each with a `GITPROXY_*`
//! variable) over an optional TOML file, validated into one [`BrokerConfig`].
//!
//! - [`cli`]: the command line.
//! - [`file`]: the TOML file's schema.
//! - [`connections`]: the validated connection table the broker serves.
//! - [`cluster`]: cluster mode (Redis, peers, the store key).

pub mod cli;
pub mod cluster;
pub mod connections;
pub mod file;

pub use cli::{Cli, Command, ServeArgs};
pub use connections::{Connection, ConnectionSet, Mode};

use crate::frontdoor::origin::TrustedProxies;
use anyhow::{bail, Context};
use gitproxy_shared::policy::Policy;
use gitproxy_shared::tunnel::FlowSettings;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Tunnel tuning (flags only; defaults suit production).
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// How often each side pings.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is dead.
    pub heartbeat_timeout: Duration,
    /// Streams older than this are asked to drain (0 = never).
    pub max_connection_age: Duration,
    /// Limit on waiting for GitLab's response head.
    pub request_timeout: Duration,
    /// Longest silence of a body while someone waits for it (0 = never).
    pub body_idle_timeout: Duration,
    /// Most requests in flight per connection before `overloaded`.
    pub max_in_flight: usize,
    /// Per-request flow control of response bodies.
    pub flow: FlowSettings,
}

/// Limits of the two listeners against idle, slow and too many connections.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Limit on a request head from its first byte (api listener, HTTP/1.1).
    pub header_read_timeout: Duration,
    /// Limit on TLS plus the first bytes / HTTP/2 preface (both listeners).
    pub handshake_timeout: Duration,
    /// An api connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Most open api connections.
    pub max_api_connections: usize,
    /// Most open agent connections.
    pub max_agent_connections: usize,
}

/// The validated broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Longest total wait of one broker-made GitLab request on 429 `Retry-After`.
    pub gitlab_rate_limit_budget: Duration,
    /// Agent listener address.
    pub agent_listen: SocketAddr,
    /// API listener address.
    pub api_listen: SocketAddr,
    /// Agent listener TLS (cert, key).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// API listener TLS (cert, key).
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// Where API-made connections persist.
    pub data_dir: Option<PathBuf>,
    /// The TOML file, reloaded on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// The file's directory (resolves relative `token_file`s).
    pub base_dir: Option<PathBuf>,
    /// Tunnel tuning.
    pub tunnel: TunnelSettings,
    /// How long in-flight requests may take on shutdown.
    pub shutdown_grace: Duration,
    /// Timeouts and connection caps of the listeners.
    pub listeners: ListenerSettings,
    /// The broker's early policy check (the agent's holds regardless):
    /// the built-in rules plus `--allow-path-prefix`. Fixed for the life of
    /// the process; the front door reads it from here on every request.
    pub policy: Policy,
    /// Extra CAs (PEM) for direct-mode GitLabs.
    pub extra_ca_pem: Vec<u8>,
    /// The front door's public base URL (Link/Location rewriting).
    pub public_url: Option<url::Url>,
    /// Proxies whose X-Forwarded-* headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Cluster mode (several replicas on Redis); `None`: one process.
    pub cluster: Option<cluster::ClusterSettings>,
}

impl BrokerConfig {
    /// Merges flags over the file and validates everything. Returns the
    /// settings and the file as read at start: the file is state (reloaded
    /// on SIGHUP, kept by `AppState`), the settings never change.
    pub fn load(a: ServeArgs) -> anyhow::Result<(Self, file::FileConfig)> {
        let file = match &a.config {
            Some(p) => file::FileConfig::read(p)?,
            None => file::FileConfig::default(),
        };
        let agent_listen = pick_addr(
            a.agent_listen,
            file.agent_listen.as_deref(),
            "0.0.0.0:8443",
            "agent_listen",
        )?;
        let api_listen = pick_addr(
            a.api_listen,
            file.api_listen.as_deref(),
            "127.0.0.1:8080",
            "api_listen",
        )?;
        let tls = pair(
            a.tls_cert.or(file.tls_cert.clone()),
            a.tls_key.or(file.tls_key.clone()),
            "--tls-cert",
            "--tls-key",
        )?;
        let api_tls = pair(
            a.api_tls_cert.or(file.api_tls_cert.clone()),
            a.api_tls_key.or(file.api_tls_key.clone()),
            "--api-tls-cert",
            "--api-tls-key",
        )?;
        let base_dir = a
            .config
            .as_ref()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()));
        let extra_ca_pem = gitproxy_shared::tls::extra_ca_pem(a.ca_cert_file.as_deref(), None)?;
        let policy =
            Policy::with_extra_prefixes(a.allow_path_prefix.clone()).map_err(anyhow::Error::msg)?;
        // Validated here so a bad file stops the start with exit 64; the
        // table served is the file merged with the API store (`AppState`).
        let connections =
            ConnectionSet::from_file(&file, base_dir.as_deref(), &extra_ca_pem, &policy)?;
        if !api_listen.ip().is_loopback() && connections.api_keys_empty() {
            bail!(
                "the api listener {api_listen} is not on loopback and no API key is configured: add api_keys_sha256 to the config file (gitproxy-broker keygen makes one), or bind it to 127.0.0.1"
            );
        }
        let public_url = a
            .public_url
            .clone()
            .or(file.public_url.clone())
            .filter(|u| !u.trim().is_empty())
            .map(|u| parse_public_url(&u))
            .transpose()?;
        let trusted_proxies = TrustedProxies::parse(if a.trusted_proxies.is_empty() {
            &file.trusted_proxies
        } else {
            &a.trusted_proxies
        })
        .map_err(anyhow::Error::msg)?;
        let flow = FlowSettings {
            window_bytes: a.window_bytes,
            ..FlowSettings::default()
        };
        flow.validate().map_err(anyhow::Error::msg)?;
        for (flag, d) in [
            ("--header-read-timeout", a.header_read_timeout),
            ("--handshake-timeout", a.handshake_timeout),
            ("--idle-timeout", a.idle_timeout),
        ] {
            if d.is_zero() {
                bail!("{flag} must be more than 0s");
            }
        }
        if a.max_api_connections == 0 || a.max_agent_connections == 0 {
            bail!("--max-api-connections and --max-agent-connections must be at least 1");
        }
        let cluster = cluster::ClusterSettings::load(cluster::ClusterArgs {
            redis_url: a.redis_url.clone(),
            redis_password_file: a.redis_password_file.clone(),
            peer_listen: a.peer_listen.clone(),
            peer_advertise: a.peer_advertise.clone(),
            peer_secret_file: a.peer_secret_file.clone(),
            store_key_file: a.store_key_file.clone(),
            replica_id: a.replica_id.clone(),
            replica_header: a.replica_header,
            registry_ttl: a.registry_ttl,
        })?;
        if a.heartbeat_timeout < a.heartbeat_interval * 2 {
            bail!("--heartbeat-timeout must be at least twice --heartbeat-interval");
        }
        let config = BrokerConfig {
            gitlab_rate_limit_budget: a.gitlab_rate_limit_budget,
            agent_listen,
            api_listen,
            tls,
            api_tls,
            data_dir: a.data_dir.or(file.data_dir.clone()),
            config_file: a.config,
            base_dir,
            tunnel: TunnelSettings {
                heartbeat_interval: a.heartbeat_interval,
                heartbeat_timeout: a.heartbeat_timeout,
                max_connection_age: a.max_connection_age,
                request_timeout: a.request_timeout,
                body_idle_timeout: a.body_idle_timeout,
                max_in_flight: a.max_in_flight,
                flow,
            },
            shutdown_grace: a.shutdown_grace,
            listeners: ListenerSettings {
                header_read_timeout: a.header_read_timeout,
                handshake_timeout: a.handshake_timeout,
                idle_timeout: a.idle_timeout,
                max_api_connections: a.max_api_connections,
                max_agent_connections: a.max_agent_connections,
            },
            policy,
            extra_ca_pem,
            public_url,
            trusted_proxies,
            cluster,
        };
        Ok((config, file))
    }
}

/// `--public-url`: an http(s) URL with a host and optional path, nothing else.
fn parse_public_url(s: &str) -> anyhow::Result<url::Url> {
    let bad = || {
        anyhow::anyhow!(
            "--public-url {:?} must be an http:// or https:// URL with a host and an optional path, without credentials, query or fragment",
            gitproxy_shared::secret::redact_url(s)
        )
    };
    let u = url::Url::parse(s.trim()).map_err(|_| bad())?;
    if !matches!(u.scheme(), "http" | "https")
        || u.host_str().is_none()
        || !u.username().is_empty()
        || u.password().is_some()
        || s.contains('?')
        || s.contains('#')
    {
        return Err(bad());
    }
    Ok(u)
}

fn pick_addr(
    flag: Option<String>,
    file: Option<&str>,
    default: &str,
    what: &str,
) -> anyhow::Result<SocketAddr> {
    let s = flag.as_deref().or(file).unwrap_or(default);
    s.parse()
        .with_context(|| format!("{what} {s:?} is not an address like 127.0.0.1:8080"))
}

fn pair(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    c: &str,
    k: &str,
) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => bail!("{c} and {k} go together: set both or neither"),
    }
}
