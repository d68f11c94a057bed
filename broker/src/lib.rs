//! The gitproxy broker.
//!
//! Agents dial in on the agent listener (`gitproxy.v1.Tunnel`); cloud
//! applications call the front door on the api listener with ordinary GitLab
//! requests, which the broker delivers through the connection's agent or
//! directly.
//!
//! Layout:
//! - [`config`]: flags, TOML file, the validated connection table.
//! - [`tunnel`]: agent streams: authentication, sessions, the registry.
//! - [`frontdoor`]: `ANY /gitlab/{connection}/{path...}`.
//! - [`api`]: `/healthz`, `/readyz`, `/v1/...` and the Admin gRPC service.
//! - [`console`]: the operator's web UI (`/ui/`) and `/v1/events`.
//! - [`server`]: listeners and the shutdown tree; [`listener`]: accepting,
//!   handshakes, connection limits and timeouts; [`reload`]: SIGHUP.
//! - [`state`]: what every part shares.
//! - [`cluster`]: cluster mode (several replicas on Redis).

// No panic on the request path: peer input, configuration and I/O errors
// are answered, never unwrapped (tests may unwrap).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod console;
pub mod frontdoor;
pub mod keygen;
pub mod listener;
pub mod observe;
pub mod reload;
pub mod server;
pub mod state;
pub mod store;
pub mod tunnel;

use config::{BrokerConfig, Cli, Command};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Runs the command the user asked for; the binary's whole body.
pub fn main_with(cli: Cli) -> ExitCode {
    let args = match cli.command {
        Some(Command::Keygen) => {
            let (key, hash) = keygen::generate();
            println!("{key}");
            println!("access_key_sha256 = \"{hash}\"");
            return ExitCode::SUCCESS;
        }
        Some(Command::Serve(a)) => *a,
        None => cli.serve,
    };
    let _log = gitproxy_shared::logging::init(args.log_format);
    let workers = usize::from(args.worker_threads);
    let (cfg, file) = match BrokerConfig::load(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e:#}");
            return ExitCode::from(64);
        }
    };
    let rt = match gitproxy_shared::runtime::build(workers) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(cfg, file))
}

/// Binds the listeners, joins the cluster (peer listener first: the registry
/// advertises its bound port), opens the API store, merges it with the config
/// file and serves until shutdown. Configuration and store errors exit 64.
async fn serve(cfg: BrokerConfig, file: config::file::FileConfig) -> ExitCode {
    let listeners = match server::Listeners::bind(&cfg).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cluster = match (&cfg.cluster, &listeners.peer) {
        (Some(c), Some(peer)) => {
            let joined = peer
                .local_addr()
                .map_err(anyhow::Error::from)
                .and_then(|addr| cluster::Cluster::new(c.clone(), &cfg.extra_ca_pem, addr));
            match joined {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!("invalid cluster configuration: {e:#}");
                    return ExitCode::from(64);
                }
            }
        }
        (Some(_), None) => {
            tracing::error!("cluster mode needs the peer listener (--peer-listen)");
            return ExitCode::from(64);
        }
        (None, _) => None,
    };
    let store = match open_store(&cfg, cluster.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            if cfg.cluster.is_some() {
                tracing::error!("cannot open the API store in Redis: {e:#}");
            } else {
                tracing::error!("invalid data directory: {e:#}");
            }
            return ExitCode::from(64);
        }
    };
    let connections = match config::ConnectionSet::from_sources(
        &file,
        cfg.base_dir.as_deref(),
        &store.snapshot().connections,
        &cfg.extra_ca_pem,
        &cfg.policy,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration (config file merged with the API store): {e:#}");
            return ExitCode::from(64);
        }
    };
    if !store.persistent() {
        tracing::warn!("no --data-dir: connections cannot be changed through the API, and merge-request tracking is kept in memory only");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(gitproxy_shared::signal::shutdown_on_signal(
        shutdown.clone(),
    ));
    tracing::info!(
        version = gitproxy_shared::VERSION,
        connections = connections.all().len(),
        data_dir = ?cfg.data_dir,
        redis = cfg.cluster.as_ref().map(|c| c.redis_url.as_str()).unwrap_or("-"),
        replica = cfg.cluster.as_ref().map(|c| c.replica_id.as_str()).unwrap_or("-"),
        "gitproxy-broker starting"
    );
    let state = state::AppState::new(cfg, file, store, connections, cluster);
    match server::run(state, listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The API store: in Redis in cluster mode (read once now; a Redis that does
/// not answer yet is not fatal, the store loads when it does), else the file
/// under `--data-dir`. A store that cannot be read (a corrupt file, a store
/// key that does not open Redis's values) is.
async fn open_store(
    cfg: &BrokerConfig,
    cluster: Option<&std::sync::Arc<cluster::Cluster>>,
) -> anyhow::Result<store::Store> {
    let Some(cluster) = cluster else {
        return store::Store::open(cfg.data_dir.as_deref());
    };
    let store = store::Store::cluster(cluster)?;
    if let Some(c) = store.as_cluster() {
        match c.load().await {
            Ok(_) => tracing::info!(
                version = c.version(),
                connections = c.snapshot().connections.len(),
                "API store loaded from Redis"
            ),
            Err(e) if e.is_unavailable() => tracing::warn!(
                "{e}; starting with the config file's connections only: the API-made ones load as soon as Redis answers"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    if cfg.data_dir.is_some() {
        tracing::info!("cluster mode: the API store lives in Redis, not under --data-dir");
    }
    Ok(store)
}
