//! The command line of `gitproxy-broker`.

use clap::{Args, Parser, Subcommand};
use gitproxy_shared::logging::LogFormat;
use std::path::PathBuf;
use std::time::Duration;

/// The gitproxy broker: delivers cloud GitLab requests directly or through
/// the customer's on-premise agent.
#[derive(Debug, Parser)]
#[command(
    name = "gitproxy-broker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of `serve` when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker (the default).
    Serve(Box<ServeArgs>),
    /// Print a new random key and the TOML line holding its SHA-256.
    Keygen,
}

/// Settings of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Agent listener address [default: 0.0.0.0:8443].
    #[arg(long, env = "GITPROXY_AGENT_LISTEN")]
    pub agent_listen: Option<String>,
    /// API listener address [default: 127.0.0.1:8080].
    #[arg(long, env = "GITPROXY_API_LISTEN")]
    pub api_listen: Option<String>,
    /// PEM certificate chain for the agent listener's TLS.
    #[arg(long, env = "GITPROXY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the agent listener's TLS.
    #[arg(long, env = "GITPROXY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate chain for the api listener's TLS.
    #[arg(long, env = "GITPROXY_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key for the api listener's TLS.
    #[arg(long, env = "GITPROXY_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Where API-made connections persist.
    #[arg(long, env = "GITPROXY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The TOML configuration file.
    #[arg(long, env = "GITPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "GITPROXY_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Threads that serve requests (0 = one per CPU core the process may
    /// use). One spends the least CPU per request and answers soonest (no
    /// hand-offs between threads); a fleet scales out with replicas (cluster
    /// mode), or one replica uses more cores with more threads.
    #[arg(long, env = "GITPROXY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,
    /// How often the broker pings each agent.
    #[arg(long, env = "GITPROXY_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Silence after which an agent (or the broker, for the agent) is dead;
    /// with the ping period this bounds detection (40s + 15s < 60s).
    #[arg(long, env = "GITPROXY_HEARTBEAT_TIMEOUT", default_value = "40s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,
    /// Agent streams older than this are asked to drain and reconnect (0s = never).
    #[arg(long, env = "GITPROXY_MAX_CONNECTION_AGE", default_value = "2h", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// Limit on waiting for GitLab's response head.
    #[arg(long, env = "GITPROXY_REQUEST_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// A response or request body that sends no data for this long while
    /// someone waits for it ends with `timeout` (0s = never).
    #[arg(long, env = "GITPROXY_BODY_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,
    /// Longest total wait of one broker-made GitLab request (Test Connection,
    /// catalogue page, merge-request step) on GitLab's 429 `Retry-After`
    /// before it fails as `rate_limited` (0s = never wait).
    #[arg(long, env = "GITPROXY_GITLAB_RATE_LIMIT_BUDGET", default_value = "30s", value_parser = humantime::parse_duration)]
    pub gitlab_rate_limit_budget: Duration,
    /// Most requests in flight per connection before answering `overloaded`.
    #[arg(long, env = "GITPROXY_MAX_IN_FLIGHT", default_value_t = 2048)]
    pub max_in_flight: usize,
    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, env = "GITPROXY_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Extra path prefixes allowed besides the GitLab API and git smart HTTP
    /// (must match the agents' GITPROXY_ALLOW_PATH_PREFIXES).
    #[arg(long, env = "GITPROXY_ALLOW_PATH_PREFIXES", value_delimiter = ',')]
    pub allow_path_prefix: Vec<String>,
    /// The front door's public base URL as callers reach it (e.g.
    /// https://gitproxy.example.com): GitLab's Link/Location headers are
    /// rewritten to it. Without it, the request's Host is used.
    #[arg(long, env = "GITPROXY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Load balancers or ingresses (IPs or CIDRs, comma-separated) whose
    /// X-Forwarded-Proto / X-Forwarded-Host headers are believed; from
    /// anyone else they are ignored.
    #[arg(
        long = "trusted-proxy",
        env = "GITPROXY_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// PEM bundle of extra CAs trusted for direct-mode GitLabs.
    #[arg(long, env = "GITPROXY_CA_CERT_FILE")]
    pub ca_cert_file: Option<PathBuf>,
    /// Limit on receiving a request head on the api listener, counted from
    /// its first byte (HTTP/1.1; slowloris).
    #[arg(long, env = "GITPROXY_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Limit on a new connection's handshake: TLS, then the first bytes
    /// (HTTP version detection, the HTTP/2 preface), on both listeners.
    #[arg(long, env = "GITPROXY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// An api connection with no request in flight for this long is closed
    /// (keep it above the idle timeout of a load balancer in front).
    #[arg(long, env = "GITPROXY_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most open connections on the api listener; more wait in the listen queue.
    #[arg(long, env = "GITPROXY_MAX_API_CONNECTIONS", default_value_t = 4096)]
    pub max_api_connections: usize,
    /// Most open connections on the agent listener; more wait in the listen queue.
    #[arg(long, env = "GITPROXY_MAX_AGENT_CONNECTIONS", default_value_t = 16384)]
    pub max_agent_connections: usize,
    /// Cluster mode: the Redis (or Valkey) URL, redis:// or rediss:// (TLS),
    /// shared by every replica; the password goes in GITPROXY_REDIS_PASSWORD_FILE.
    #[arg(long, env = "GITPROXY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// File holding the Redis password.
    #[arg(long, env = "GITPROXY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// Cluster mode: where this replica listens for the other replicas.
    #[arg(long, env = "GITPROXY_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Cluster mode: the host:port other replicas dial to reach this one
    /// (default: --peer-listen when it is not a wildcard address).
    #[arg(long, env = "GITPROXY_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Cluster mode: file holding the secret replicas prove to each other.
    #[arg(long, env = "GITPROXY_PEER_SECRET_FILE")]
    pub peer_secret_file: Option<PathBuf>,
    /// Cluster mode: file holding the 32-byte key (hex or base64) that
    /// encrypts GitLab tokens stored in Redis.
    #[arg(long, env = "GITPROXY_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
    /// Cluster mode: this replica's name in the registry (default: the host
    /// name and a random suffix).
    #[arg(long, env = "GITPROXY_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Cluster mode: answer every front-door request with
    /// `X-Gitproxy-Replica` naming the replica that served it (debugging).
    #[arg(long, env = "GITPROXY_REPLICA_HEADER")]
    pub replica_header: bool,
    /// Cluster mode: lifetime of this replica's registry key without a
    /// refresh (refreshed every third of it): how long a dead replica's
    /// agent streams may still be read. At least 3s.
    #[arg(long, env = "GITPROXY_REGISTRY_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub registry_ttl: Duration,
    /// Per-request receive window in bytes (memory bound per response body).
    #[arg(long, env = "GITPROXY_WINDOW_BYTES", default_value_t = gitproxy_shared::tunnel::FlowSettings::default().window_bytes, hide = true)]
    pub window_bytes: u32,
}
