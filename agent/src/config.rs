//! Command line and environment of `gitproxy-agent`, validated into one
//! [`AgentConfig`]. Every bad value is reported before the agent starts.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use gitproxy_shared::logging::LogFormat;
use gitproxy_shared::policy::Policy;
use gitproxy_shared::secret::{redact_url, Secret};
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::upstream::ProxySettings;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// The on-premise agent of gitproxy: tunnels the cloud's GitLab requests to
/// your GitLab over one outbound connection.
#[derive(Debug, Parser)]
#[command(
    name = "gitproxy-agent",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect to the broker and serve requests (the default).
    Run(Box<RunArgs>),
    /// Exit 0 when the running agent is connected to the broker (for exec probes).
    Health(HealthArgs),
    /// Diagnose the setup step by step (broker, TLS, accessKey, GitLab, token); exit 0 when all pass.
    Check(Box<RunArgs>),
}

/// Settings of `run`; each flag also reads its environment variable.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Broker agent-listener URL, e.g. https://broker.example.com:8443.
    #[arg(long, env = "GITPROXY_BROKER_URL")]
    pub broker_url: Option<String>,
    /// The accessKey for this connection.
    #[arg(long, env = "GITPROXY_ACCESS_KEY", hide_env_values = true)]
    pub access_key: Option<String>,
    /// File holding the accessKey.
    #[arg(long, env = "GITPROXY_ACCESS_KEY_FILE")]
    pub access_key_file: Option<PathBuf>,
    /// Pins the GitLab base URL; a broker asking for another is refused.
    #[arg(long, env = "GITPROXY_GITLAB_URL")]
    pub gitlab_url: Option<String>,
    /// A GitLab token the agent injects, replacing cloud-sent credentials.
    #[arg(long, env = "GITPROXY_GITLAB_TOKEN", hide_env_values = true)]
    pub gitlab_token: Option<String>,
    /// File holding that token.
    #[arg(long, env = "GITPROXY_GITLAB_TOKEN_FILE")]
    pub gitlab_token_file: Option<PathBuf>,
    /// PEM bundle of extra CAs to trust (broker and GitLab).
    #[arg(long, env = "GITPROXY_CA_CERT_FILE")]
    pub ca_cert_file: Option<PathBuf>,
    /// The same bundle as one base64 string (Helm's customCaCert).
    #[arg(long, env = "GITPROXY_CA_CERT", hide_env_values = true)]
    pub ca_cert: Option<String>,
    /// Proxy for https:// destinations (default: HTTPS_PROXY or https_proxy).
    #[arg(long)]
    pub https_proxy: Option<String>,
    /// Proxy for http:// destinations (default: HTTP_PROXY or http_proxy).
    #[arg(long)]
    pub http_proxy: Option<String>,
    /// Hosts, domains (.corp.example), IPs and CIDRs reached without the proxy
    /// (default: NO_PROXY or no_proxy).
    #[arg(long)]
    pub no_proxy: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "GITPROXY_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Threads that serve requests (0 = one per CPU core). One carries the
    /// agent's traffic at the least CPU per request; raise it only for
    /// many large transfers at once.
    #[arg(long, env = "GITPROXY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,
    /// Where the running agent publishes its state for `gitproxy-agent health`.
    #[arg(
        long,
        env = "GITPROXY_STATE_FILE",
        default_value = "/tmp/gitproxy-agent/state.json"
    )]
    pub state_file: PathBuf,
    /// Name of this agent instance (default: $HOSTNAME).
    #[arg(long, env = "GITPROXY_INSTANCE")]
    pub instance: Option<String>,
    /// Extra path prefixes allowed besides the GitLab API and git smart HTTP.
    #[arg(long, env = "GITPROXY_ALLOW_PATH_PREFIXES", value_delimiter = ',')]
    pub allow_path_prefix: Vec<String>,
    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, env = "GITPROXY_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Limit on connecting to the broker and to GitLab.
    #[arg(long, env = "GITPROXY_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Static host overrides `host=ip` (like curl's --resolve), for names the
    /// agent's DNS cannot resolve; applies to the broker and GitLab.
    #[arg(long, env = "GITPROXY_RESOLVE", value_delimiter = ',')]
    pub resolve: Vec<String>,
    /// A body that sends no data for this long while the agent waits for it
    /// (GitLab's response, the broker's request body) ends with `timeout`
    /// (0s = never).
    #[arg(long, env = "GITPROXY_BODY_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,
    /// Per-request receive window in bytes (memory bound per request body).
    #[arg(long, env = "GITPROXY_WINDOW_BYTES", default_value_t = FlowSettings::default().window_bytes, hide = true)]
    pub window_bytes: u32,
}

impl Default for RunArgs {
    fn default() -> Self {
        // Parsing no arguments applies the environment and the defaults.
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            run: RunArgs,
        }
        match Only::try_parse_from(["gitproxy-agent"]) {
            Ok(o) => o.run,
            Err(e) => e.exit(),
        }
    }
}

/// Settings of `health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The running agent's state file.
    #[arg(
        long,
        env = "GITPROXY_STATE_FILE",
        default_value = "/tmp/gitproxy-agent/state.json"
    )]
    pub state_file: PathBuf,
    /// A state older than this counts as dead (the agent refreshes it every 10s).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_age: Duration,
    /// Print the agent's metrics (OpenMetrics text) on stdout; the verdict
    /// goes to stderr, the exit status stays the same.
    #[arg(long)]
    pub metrics: bool,
}

/// The validated configuration of a running agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Broker agent-listener URL.
    pub broker_url: Url,
    /// The accessKey.
    pub access_key: Secret,
    /// Pinned GitLab base URL.
    pub gitlab_url: Option<Url>,
    /// Token injected by the agent.
    pub gitlab_token: Option<Secret>,
    /// Extra CAs (PEM).
    pub extra_ca_pem: Vec<u8>,
    /// Corporate proxy.
    pub proxy: ProxySettings,
    /// State file for `health`.
    pub state_file: PathBuf,
    /// Instance name sent in Hello.
    pub instance: String,
    /// Request policy.
    pub policy: Policy,
    /// Grace period on shutdown.
    pub shutdown_grace: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Flow control of request bodies received.
    pub flow: FlowSettings,
    /// Static host overrides.
    pub resolve: Vec<(String, std::net::IpAddr)>,
    /// Longest silence of a body while the agent waits for it (0 = never).
    pub body_idle_timeout: Duration,
}

fn secret_from(
    value: Option<String>,
    file: Option<PathBuf>,
    name: &str,
) -> anyhow::Result<Option<Secret>> {
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(_), Some(_)) => bail!("set either {name} or {name}_FILE, not both"),
        (Some(v), None) => Ok(Some(Secret::new(v.trim().to_string()))),
        (None, Some(f)) => {
            let v = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {name}_FILE {}", f.display()))?;
            let v = v.trim().to_string();
            if v.is_empty() {
                bail!("{name}_FILE {} is empty", f.display());
            }
            Ok(Some(Secret::new(v)))
        }
        (None, None) => Ok(None),
    }
}

fn parse_http_url(s: &str, what: &str) -> anyhow::Result<Url> {
    let u = Url::parse(s).with_context(|| format!("{what} {:?} is not a URL", redact_url(s)))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        bail!(
            "{what} {} must be an http:// or https:// URL",
            redact_url(s)
        );
    }
    if !u.username().is_empty() || u.password().is_some() {
        bail!("{what} must not carry credentials");
    }
    Ok(u)
}

impl AgentConfig {
    /// Validates the arguments.
    pub fn from_args(a: RunArgs) -> anyhow::Result<Self> {
        let broker = a
            .broker_url
            .as_deref()
            .context("GITPROXY_BROKER_URL is required (e.g. https://broker.example.com:8443)")?;
        let broker_url = parse_http_url(broker, "GITPROXY_BROKER_URL")?;
        let access_key = secret_from(a.access_key, a.access_key_file, "GITPROXY_ACCESS_KEY")?
            .context("GITPROXY_ACCESS_KEY or GITPROXY_ACCESS_KEY_FILE is required")?;
        let gitlab_url = a
            .gitlab_url
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                gitproxy_shared::gitlab_url::parse_gitlab_url(s)
                    .map_err(|e| anyhow::anyhow!("GITPROXY_GITLAB_URL: {e}"))
            })
            .transpose()?;
        let gitlab_token =
            secret_from(a.gitlab_token, a.gitlab_token_file, "GITPROXY_GITLAB_TOKEN")?;
        let extra_ca_pem =
            gitproxy_shared::tls::extra_ca_pem(a.ca_cert_file.as_deref(), a.ca_cert.as_deref())?;
        // Fail now, not at the first connection, when the bundle is unusable.
        gitproxy_shared::tls::root_store(&extra_ca_pem)?;
        let env = ProxySettings::from_env();
        let proxy = ProxySettings {
            http_proxy: a.http_proxy.or(env.http_proxy),
            https_proxy: a.https_proxy.or(env.https_proxy),
            no_proxy: a.no_proxy.or(env.no_proxy),
        };
        for p in [&proxy.http_proxy, &proxy.https_proxy]
            .into_iter()
            .flatten()
        {
            parse_http_url(&strip_userinfo_for_check(p), "proxy URL")?;
        }
        let policy =
            Policy::with_extra_prefixes(a.allow_path_prefix).map_err(anyhow::Error::msg)?;
        let flow = FlowSettings {
            window_bytes: a.window_bytes,
            ..FlowSettings::default()
        };
        flow.validate().map_err(anyhow::Error::msg)?;
        let resolve = a
            .resolve
            .iter()
            .filter(|r| !r.trim().is_empty())
            .map(|r| {
                let (h, ip) = r.split_once('=').with_context(|| {
                    format!("GITPROXY_RESOLVE entry {r:?} must look like host=ip")
                })?;
                let ip = ip.trim().parse().with_context(|| {
                    format!("GITPROXY_RESOLVE entry {r:?}: {ip:?} is not an IP address")
                })?;
                Ok((h.trim().to_ascii_lowercase(), ip))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let instance = a
            .instance
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("agent-{}", std::process::id()));
        Ok(AgentConfig {
            broker_url,
            access_key,
            gitlab_url,
            gitlab_token,
            extra_ca_pem,
            proxy,
            state_file: a.state_file,
            instance,
            policy,
            shutdown_grace: a.shutdown_grace,
            connect_timeout: a.connect_timeout,
            flow,
            resolve,
            body_idle_timeout: a.body_idle_timeout,
        })
    }
}

/// Proxy URLs may carry credentials; validate the rest of the URL.
fn strip_userinfo_for_check(p: &str) -> String {
    let with_scheme = if p.contains("://") {
        p.to_string()
    } else {
        format!("http://{p}")
    };
    redact_url(&with_scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_out_of_range_is_a_clear_error() {
        let e = Cli::try_parse_from(["gitproxy-agent", "run", "--worker-threads", "5000"])
            .expect_err("5000 threads accepted");
        let text = e.to_string();
        assert!(text.contains("--worker-threads"), "{text}");
        assert!(text.contains("5000 is not in 0..=1024"), "{text}");
        let ok = Cli::try_parse_from(["gitproxy-agent", "run", "--worker-threads", "4"]).unwrap();
        match ok.command {
            Some(Command::Run(a)) => assert_eq!(a.worker_threads, 4),
            other => panic!("not run: {other:?}"),
        }
    }

    fn args() -> RunArgs {
        RunArgs {
            broker_url: Some("http://127.0.0.1:8443".into()),
            access_key: Some("k".into()),
            ..RunArgs::default()
        }
    }

    #[test]
    fn requires_broker_and_key() {
        let mut a = args();
        a.broker_url = None;
        assert!(AgentConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("GITPROXY_BROKER_URL"));
        let mut a = args();
        a.access_key = None;
        assert!(AgentConfig::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("GITPROXY_ACCESS_KEY"));
        assert!(AgentConfig::from_args(args()).is_ok());
    }

    #[test]
    fn rejects_bad_urls_without_echoing_secrets() {
        let mut a = args();
        a.broker_url = Some("ftp://user:hunter2@x".into());
        let e = AgentConfig::from_args(a).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let mut a = args();
        a.ca_cert = Some("not base64!".into());
        assert!(AgentConfig::from_args(a).is_err());
    }

    /// A pin that would let requests escape the policy is refused at start.
    #[test]
    fn refuses_hostile_gitlab_pins() {
        for pin in [
            "https://gitlab.example/#",
            "https://gitlab.example/base#x",
            "https://gitlab.example/?",
            "https://user:s3cret@gitlab.example",
            "https://gitlab.example/a/../admin",
            "https://gitlab.example/%2e%2e/admin",
            "https://gitlab.example\\admin",
            "https://gitlab.example/a b",
            "http:gitlab.example",
        ] {
            let mut a = args();
            a.gitlab_url = Some(pin.into());
            let e = format!("{:#}", AgentConfig::from_args(a).expect_err(pin));
            assert!(e.contains("GITPROXY_GITLAB_URL"), "{pin}: {e}");
            assert!(!e.contains("s3cret"), "{pin}: {e}");
        }
        let mut a = args();
        a.gitlab_url = Some("https://gitlab.example/gitlab/".into());
        assert!(AgentConfig::from_args(a).is_ok());
    }
}
