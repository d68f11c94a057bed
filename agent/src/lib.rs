//! The gitproxy on-premise agent.
//!
//! It dials the broker (directly or through the corporate proxy with HTTP
//! `CONNECT`), opens one `gitproxy.v1.Tunnel/Connect` stream, replays the
//! requests it receives against the local GitLab and streams the answers back.
//! It opens no listening socket: its health is published in a state file that
//! `gitproxy-agent health` reads.
//!
//! Layout:
//! - [`config`]: command line and environment, validated into [`config::AgentConfig`].
//! - [`dial`]: the transport to the broker (TCP, proxy CONNECT, TLS).
//! - [`supervisor`]: keeps one session up; reconnects with [`backoff`]; drains.
//! - [`session`]: one tunnel stream: handshake, frame dispatch, heartbeats.
//! - [`request`]: one request replayed against GitLab; [`record`]: its
//!   record, source of its log line and metrics.
//! - [`health`]: the state file; [`metrics`]: the agent's counters, written
//!   beside it; [`check`]: step-by-step diagnostics.

// No panic on the request path: peer input, configuration and I/O errors
// are answered, never unwrapped (tests may unwrap).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod backoff;
pub mod check;
pub mod config;
pub mod dial;
pub mod health;
pub mod metrics;
pub mod record;
pub mod request;
pub mod session;
pub mod supervisor;

use config::{Cli, Command};
use std::process::ExitCode;

/// Runs the command the user asked for; the binary's whole body.
pub fn main_with(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Run(Box::default())) {
        Command::Run(args) => {
            let _log = gitproxy_shared::logging::init(args.log_format);
            let workers = usize::from(args.worker_threads);
            let cfg = match config::AgentConfig::from_args(*args) {
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
            rt.block_on(async move {
                let shutdown = tokio_util::sync::CancellationToken::new();
                tokio::spawn(gitproxy_shared::signal::shutdown_on_signal(
                    shutdown.clone(),
                ));
                supervisor::run(std::sync::Arc::new(cfg), shutdown).await
            });
            ExitCode::SUCCESS
        }
        Command::Health(args) => health::probe(&args.state_file, args.max_age, args.metrics),
        Command::Check(args) => {
            // Diagnostics print to stdout; logs only on request.
            let _log = std::env::var_os("RUST_LOG")
                .is_some()
                .then(|| gitproxy_shared::logging::init(args.log_format));
            let cfg = match config::AgentConfig::from_args(*args) {
                Ok(c) => c,
                Err(e) => {
                    println!("FAIL  configuration          {e:#}");
                    return ExitCode::from(64);
                }
            };
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(check::run(&cfg)),
                Err(e) => {
                    println!("FAIL  cannot start the runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
