//! Keeps the agent connected: one session at a time serves new requests;
//! when the broker asks a session to drain, a successor is opened at once
//! while the old one finishes its in-flight requests. Failed attempts are
//! retried with capped, jittered backoff; the agent's state is published for
//! `gitproxy-agent health`, and its metrics beside it.

use crate::backoff::{Backoff, HEALTHY_AFTER};
use crate::config::AgentConfig;
use crate::health;
use crate::metrics::{self, AgentMetrics};
use crate::session::{self, SessionContext, SessionEnd, SessionError, SessionEvent};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

/// How often the state file is refreshed.
const STATE_REFRESH: Duration = Duration::from_secs(10);

/// How often the metrics file is rewritten when something changed.
const METRICS_FLUSH: Duration = Duration::from_secs(1);

/// Runs until `shutdown` is cancelled and every session has drained.
pub async fn run(cfg: Arc<AgentConfig>, shutdown: CancellationToken) {
    info!(
        broker = %cfg.broker_url,
        instance = %cfg.instance,
        version = gitproxy_shared::VERSION,
        pinned_gitlab = cfg.gitlab_url.as_ref().map(|u| u.as_str()).unwrap_or("-"),
        holds_token = cfg.gitlab_token.is_some(),
        "gitproxy-agent starting"
    );
    health::publish(&cfg.state_file, false, None);
    let agent_metrics = Arc::new(AgentMetrics::new());
    let metrics_file = metrics::path_for(&cfg.state_file);
    agent_metrics.flush(&metrics_file);
    let mut flush = tokio::time::interval(METRICS_FLUSH);
    let (events_tx, mut events) = mpsc::channel::<SessionEvent>(16);
    let (gen_tx, gen_rx) = watch::channel(0u64);
    let upstream_cache = Arc::new(Mutex::new(None));
    // Kept across reconnects, in memory: see `session::upstream_for`.
    let first_origin = Arc::new(Mutex::new(None));
    let mut sessions: JoinSet<(u64, Instant, Result<SessionEnd, SessionError>)> = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut generation = 0u64;
    // The session that takes new requests, and when it connected.
    let mut current: Option<u64> = None;
    let mut connected_at: Option<Instant> = None;
    let mut next_attempt = Some(Instant::now());
    let mut refresh = tokio::time::interval(STATE_REFRESH);

    loop {
        tokio::select! {
            _ = async { tokio::time::sleep_until(next_attempt.unwrap_or_else(Instant::now)).await }, if next_attempt.is_some() && !shutdown.is_cancelled() => {
                next_attempt = None;
                generation += 1;
                current = Some(generation);
                connected_at = None;
                let ctx = SessionContext {
                    cfg: cfg.clone(),
                    generation,
                    events: events_tx.clone(),
                    shutdown: shutdown.clone(),
                    connected_generation: gen_rx.clone(),
                    upstream_cache: upstream_cache.clone(),
                    first_origin: first_origin.clone(),
                    metrics: agent_metrics.clone(),
                };
                let span = tracing::info_span!("session", generation);
                let g = generation;
                sessions.spawn(async move {
                    let started = Instant::now();
                    (g, started, session::run(ctx).await)
                }.instrument(span));
            }
            Some(ev) = events.recv() => match ev {
                SessionEvent::Connected { generation: g, connection, gitlab } => {
                    if Some(g) == current {
                        connected_at = Some(Instant::now());
                        let _ = gen_tx.send(g);
                        health::publish(&cfg.state_file, true, None);
                        agent_metrics.set_connected(true);
                        // Before the log line, so whoever waits for it reads
                        // metrics that know the connection.
                        agent_metrics.flush(&metrics_file);
                        info!(connection = %connection, gitlab = %gitlab, generation = g, "connected to the broker");
                    }
                }
                SessionEvent::DrainRequested { generation: g } => {
                    if Some(g) == current && !shutdown.is_cancelled() {
                        // Open the successor now; the old stream finishes its work.
                        next_attempt = Some(Instant::now());
                    }
                }
            },
            Some(joined) = sessions.join_next() => {
                let Ok((g, _started, result)) = joined else {
                    error!("a session task panicked");
                    if !shutdown.is_cancelled() && next_attempt.is_none() {
                        next_attempt = Some(Instant::now() + backoff.next_delay());
                    }
                    continue;
                };
                let is_current = Some(g) == current;
                match &result {
                    Ok(end) => info!(generation = g, "session ended: {end:?}"),
                    Err(e) => {
                        let delay_hint = if is_current { " (will retry)" } else { "" };
                        match e {
                            SessionError::Dial(d) => error!(generation = g, hint = d.hint(), "{e}{delay_hint}"),
                            _ => error!(generation = g, "{e}{delay_hint}"),
                        }
                    }
                }
                if !is_current {
                    continue;
                }
                current = None;
                let healthy = connected_at.take().is_some_and(|t| t.elapsed() >= HEALTHY_AFTER);
                health::publish(&cfg.state_file, false, result.as_ref().err().map(|e| e.to_string()));
                agent_metrics.set_connected(false);
                agent_metrics.flush(&metrics_file);
                if shutdown.is_cancelled() {
                    continue;
                }
                if healthy {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                info!(delay_ms = delay.as_millis() as u64, "reconnecting to the broker");
                next_attempt = Some(Instant::now() + delay);
            }
            _ = refresh.tick() => {
                health::publish(&cfg.state_file, connected_at.is_some(), None);
            }
            _ = flush.tick() => agent_metrics.flush(&metrics_file),
            _ = shutdown.cancelled(), if sessions.is_empty() => break,
        }
        if shutdown.is_cancelled() && sessions.is_empty() {
            break;
        }
    }
    health::publish(&cfg.state_file, false, Some("stopped".into()));
    for f in [&cfg.state_file, &metrics_file] {
        if let Err(e) = std::fs::remove_file(f) {
            warn!(path = %f.display(), "cannot remove the file: {e}");
        }
    }
    info!("gitproxy-agent stopped");
}
