//! Test harness: real gitproxy binaries started on ephemeral ports, waited on
//! through their log lines (never sleeps), plus an in-process upstream whose
//! behaviour the tunnel tests need to observe (streamed bodies, dropped
//! connections).
//!
//! - [`process`]: a child process whose JSON log lines can be awaited.
//! - [`broker`] / [`agent`]: the two programs with test configuration.
//! - [`fake_agent`]: a scripted agent speaking the real protocol, to play a
//!   hostile or broken agent against the real broker.
//! - [`upstream`]: a GitLab-shaped HTTP server for tunnel mechanics.
//! - [`pattern`]: deterministic byte streams for byte-exact transfer checks.
//! - [`pki`]: private CAs and certificates made at run time (rcgen).
//! - [`proxy`]: a real tinyproxy as the corporate proxy.
//! - [`redis`]: a real redis-server; [`cluster`]: broker replicas sharing it;
//!   [`haproxy`]: a real load balancer in front of them.
//! - [`fdlimit`]: the open-file limit for benchmarks holding many sockets.
//! - [`fake_broker`]: a scripted broker speaking the real tunnel protocol,
//!   to drive the real agent with hostile input.

pub mod agent;
pub mod broker;
pub mod cluster;
pub mod fake_agent;
pub mod fake_broker;
pub mod fdlimit;
pub mod haproxy;
pub mod pattern;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

/// Default limit for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// Where the gitproxy binaries are: `GITPROXY_BIN_DIR`, or the workspace's
/// target directory for the profile the tests were built with.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("GITPROXY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join(profile)
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --release --bins), or set GITPROXY_BIN_DIR",
        p.display()
    );
    p
}

/// Installs the TLS provider used by test clients (idempotent).
pub fn init() {
    gitproxy_shared::tls::install_default_provider();
}

/// A plain HTTP client for tests.
pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .tls_backend_preconfigured(
            gitproxy_shared::tls::client_config(b"", &[b"http/1.1"]).expect("tls config"),
        )
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client")
}
