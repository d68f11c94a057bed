//! `gitlab-sandbox`: runs the sandbox GitLab as a process. Prints one JSON line
//! `{"listening":"127.0.0.1:PORT","external_url":"...","token":"..."}` when ready, then
//! serves until SIGINT/SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use gitproxy_integration_tests::sandbox::{demo, GitlabVersion, RateLimit, Sandbox, SandboxConfig};

#[derive(Parser, Debug)]
#[command(
    name = "gitlab-sandbox",
    about = "A simulated GitLab Self-Managed server"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// URL the instance calls itself (Link headers, web_url); default http://<bound addr>.
    #[arg(long)]
    external_url: Option<String>,
    /// Serve under this path prefix, as GitLab's relative_url_root (e.g. /gitlab).
    #[arg(long)]
    relative_url_root: Option<String>,
    /// The host gitlab.yml names (Link headers keep the request's scheme); with --external-port.
    #[arg(long)]
    external_host: Option<String>,
    /// The port gitlab.yml names (e.g. 443 while serving plain http).
    #[arg(long)]
    external_port: Option<u16>,
    /// Where bare repositories live; default a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed the demo user, token and projects.
    #[arg(long)]
    demo: bool,
    /// Seed a group tree (subgroups, shared groups and projects, an archived and an
    /// empty project, a group access token, a service account): see `sandbox::demo::seed_groups`.
    #[arg(long, conflicts_with = "demo")]
    groups: bool,
    /// The demo token's value.
    #[arg(long, default_value = "sandbox-demo-token")]
    token: String,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The GitLab release to imitate (e.g. 14.10, 15.3, 16.11, 17.5).
    #[arg(long, default_value_t = GitlabVersion::LATEST)]
    gitlab_version: GitlabVersion,
    /// Throttle: at most this many requests per --rate-limit-period (429 beyond, as Rack::Attack).
    #[arg(long)]
    rate_limit: Option<u32>,
    /// The throttle's period in seconds.
    #[arg(long, default_value_t = 1)]
    rate_limit_period: u64,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let (_tmp, data_dir) = match &args.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((std::fs::read(c)?, std::fs::read(k)?)),
        _ => None,
    };
    let cfg = SandboxConfig {
        listen: args.listen,
        external_url: args.external_url.clone(),
        relative_url_root: args.relative_url_root.clone(),
        external_host: args.external_host.clone(),
        external_port: args.external_port,
        data_dir,
        tls,
        gitlab_version: args.gitlab_version,
        rate_limit: args
            .rate_limit
            .map(|n| RateLimit::per(n, args.rate_limit_period)),
    };
    let (sb, addr) = Sandbox::start(cfg).await?;
    if args.demo {
        let sb2 = sb.clone();
        let token = args.token.clone();
        tokio::task::spawn_blocking(move || demo::seed(&sb2, &token)).await??;
    }
    let mut line = serde_json::json!({
        "listening": addr.to_string(),
        "external_url": sb.external_url(),
        "token": args.token,
        "gitlab_version": args.gitlab_version.to_string(),
    });
    if args.groups {
        let sb2 = sb.clone();
        let token = args.token.clone();
        let g = tokio::task::spawn_blocking(move || demo::seed_groups(&sb2, &token)).await??;
        line["group_token"] = serde_json::json!(g.group_token);
        line["service_token"] = serde_json::json!(g.service_token);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    shutdown_signal().await;
    sb.shutdown();
    Ok(())
}
