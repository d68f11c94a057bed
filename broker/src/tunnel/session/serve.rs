//! The session task: reads the agent's frames into the dispatcher, pings on
//! the heartbeat period, asks for a drain at the max connection age, and —
//! however the task ends (the stream ended, an error, a panic, an abort) —
//! removes the session from the registry and fails its pending requests, so
//! a dead session is never picked again.

use super::{disconnected_before_head, AgentSession, Pending};
use crate::tunnel::registry::Registry;
use futures::{Stream, StreamExt};
use gitproxy_proto::v1::{broker_message::Msg as Out, AgentMessage, BrokerMessage, Ping};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::sanitize;
use std::ops::ControlFlow;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::info;

impl AgentSession {
    /// Runs the dispatcher until the stream ends, then fails what is left;
    /// the future's output is why it ended. The same clean-up runs if the
    /// future is dropped (even before its first poll) or panics: the guard
    /// that does it ([`Departure`]) is made here, not inside the future.
    pub fn run<S>(
        self: Arc<Self>,
        inbound: S,
        registry: Arc<Registry>,
    ) -> impl std::future::Future<Output = String> + Send
    where
        S: Stream<Item = Result<AgentMessage, tonic::Status>> + Unpin + Send,
    {
        let departure = Departure {
            session: self.clone(),
            registry,
            reason: None,
        };
        self.serve(inbound, departure)
    }

    async fn serve<S>(self: Arc<Self>, mut inbound: S, mut departure: Departure) -> String
    where
        S: Stream<Item = Result<AgentMessage, tonic::Status>> + Unpin + Send,
    {
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let mut nonce = 0u64;
        let age_limit = (!self.settings.max_age.is_zero()).then(|| {
            // ±10% jitter so a fleet does not drain at once.
            let jitter = rand::random_range(0.9..1.1);
            Instant::now() + self.settings.max_age.mul_f64(jitter)
        });
        let reason = loop {
            tokio::select! {
                _ = self.closed.cancelled() => break "closed by the broker".to_string(),
                m = inbound.next() => match m {
                    Some(Ok(m)) => {
                        last_seen = Instant::now();
                        if let ControlFlow::Break(reason) = self.dispatch(m) {
                            break reason;
                        }
                    }
                    None => break "the agent closed the stream".to_string(),
                    Some(Err(s)) => break format!(
                        "stream error: {}",
                        sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)
                    ),
                },
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() > self.settings.heartbeat_timeout {
                        break format!("no frame from the agent for {:?}", last_seen.elapsed());
                    }
                    self.violations.flush();
                    nonce += 1;
                    let _ = self.tx.try_send(Box::new(BrokerMessage { msg: Some(Out::Ping(Ping { nonce })) }));
                }
                _ = async { tokio::time::sleep_until(age_limit.unwrap_or_else(Instant::now)).await }, if age_limit.is_some() && !self.is_draining() => {
                    self.drain("max connection age reached");
                }
            }
        };
        departure.reason = Some(reason.clone());
        drop(departure);
        reason
    }

    /// Ends the session: no new request can use it, it leaves the registry,
    /// and every pending request fails (before its head: the caller gets
    /// `agent_disconnected`; mid-body: a cut body, never a clean end).
    pub(super) fn end(&self, registry: &Registry, reason: &str) {
        self.closed.cancel();
        registry.remove_session(self);
        let pending: Vec<Pending> = self.lock().drain().map(|(_, p)| p).collect();
        let n = pending.len();
        for p in pending {
            p.credit.close();
            if let Some(h) = p.head {
                let _ = h.send(Err(disconnected_before_head()));
            } else if let Some(b) = p.body {
                b.fail(GitproxyError::new(
                    ErrorCode::AgentDisconnected,
                    "the agent went away in the middle of the response",
                ));
            }
        }
        self.violations.flush();
        info!(connection = %self.conn_id, instance = %self.instance, failed_in_flight = n, "agent disconnected: {reason}");
        self.observer
            .agent_disconnected(&self.conn_id, &self.instance, reason);
    }
}

/// Runs the end of a session however its task ends: normally (with the
/// reason), or by a panic or an abort (the future dropped), so a dead
/// session never stays registered and no caller waits on it forever.
struct Departure {
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    reason: Option<String>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                "the session task panicked".to_string()
            } else {
                "the session task was stopped".to_string()
            }
        });
        self.session.end(&self.registry, &reason);
    }
}
