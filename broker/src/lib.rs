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
    gitproxy_shared::logging::init(args.log_format);
    let cfg = match BrokerConfig::load(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e:#}");
            return ExitCode::from(64);
        }
    };
    let store = match store::Store::open(cfg.data_dir.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("invalid data directory: {e:#}");
            return ExitCode::from(64);
        }
    };
    let connections = match config::ConnectionSet::from_sources(
        &cfg.file,
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
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let listeners = server::Listeners::bind(&cfg).await?;
        let cluster = match (&cfg.cluster, &listeners.peer) {
            (Some(c), Some(peer)) => Some(cluster::Cluster::new(
                c.clone(),
                &cfg.extra_ca_pem,
                peer.local_addr()?,
            )?),
            _ => None,
        };
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
        let state = state::AppState::new(cfg, store, connections, cluster);
        server::run(state, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
