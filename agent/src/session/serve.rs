//! The loop of one open stream: the broker's frames into the dispatcher,
//! pings on the heartbeat period (silence past the timeout ends the
//! session), the broker's drain (a successor stream opens, this one ends
//! once idle and the successor is up) and the agent's own shutdown (drain,
//! then a grace period).

use super::reader::{Dispatch, Reader};
use super::{SessionContext, SessionEnd, SessionError, SessionEvent, Shared};
use futures::{Stream, StreamExt};
use gitproxy_proto::v1::{agent_message::Msg as Out, AgentMessage, BrokerMessage, Drain, Ping};
use gitproxy_shared::sanitize;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The heartbeat the Welcome set.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heartbeat {
    /// Ping period.
    pub(super) interval: Duration,
    /// Silence after which the broker is dead.
    pub(super) timeout: Duration,
}

/// Serves the stream `inbound` (after the handshake) until it ends;
/// `half_close` ends our half gracefully.
pub(super) async fn serve<S>(
    ctx: &SessionContext,
    shared: Arc<Shared>,
    mut inbound: S,
    half_close: &CancellationToken,
    heartbeat: Heartbeat,
) -> Result<SessionEnd, SessionError>
where
    S: Stream<Item = Result<BrokerMessage, tonic::Status>> + Unpin,
{
    let cfg = ctx.cfg.clone();
    // Every request task is a child of this token: when the session ends,
    // for whatever reason, the upstream requests are aborted.
    let session_cancel = CancellationToken::new();
    let _abort_requests = session_cancel.clone().drop_guard();

    let mut reader = Reader::new(shared.clone(), session_cancel.clone());
    let hb_timeout = heartbeat.timeout;
    let mut heartbeat = tokio::time::interval(heartbeat.interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut ping_nonce = 0u64;
    let mut drain: Option<Drainage> = None;
    let mut successor = ctx.connected_generation.clone();
    let far_future = Instant::now() + Duration::from_secs(365 * 24 * 3600);

    loop {
        if let Some(d) = &drain {
            let successor_up = d.shutdown || *successor.borrow() > ctx.generation;
            if successor_up && shared.in_flight() == 0 {
                let end = if d.shutdown {
                    SessionEnd::ShutDown
                } else {
                    SessionEnd::Drained
                };
                return Ok(finish(half_close, &mut inbound, end).await);
            }
        }
        let deadline = drain.as_ref().map(|d| d.deadline).unwrap_or(far_future);
        tokio::select! {
            msg = inbound.next() => match msg {
                Some(Ok(m)) => {
                    last_seen = Instant::now();
                    match reader.dispatch(m) {
                        Dispatch::Continue => {}
                        Dispatch::Drain(reason) => {
                            if drain.is_none() {
                                info!(reason = %reason, in_flight = shared.in_flight(), "the broker asked to drain: opening a new stream, finishing in-flight requests here");
                                drain = Some(Drainage { shutdown: false, deadline: Instant::now() + cfg.shutdown_grace.max(Duration::from_secs(60)) });
                                let _ = ctx.events.send(SessionEvent::DrainRequested { generation: ctx.generation }).await;
                            }
                        }
                        Dispatch::End(reason) => {
                            reader.violations.flush();
                            return Err(SessionError::Protocol(reason));
                        }
                    }
                }
                None => {
                    return match &drain {
                        Some(d) if d.shutdown => Ok(SessionEnd::ShutDown),
                        Some(_) => Ok(SessionEnd::Drained),
                        None => Ok(SessionEnd::BrokerClosed),
                    };
                }
                Some(Err(s)) => return Err(SessionError::Stream(format!("{}: {}", s.code(), sanitize::text(s.message(), sanitize::MAX_REASON_BYTES)))),
            },
            _ = heartbeat.tick() => {
                let silent = last_seen.elapsed();
                if silent > hb_timeout {
                    return Err(SessionError::HeartbeatTimeout(silent));
                }
                reader.violations.flush();
                ping_nonce += 1;
                // A full queue means frames are flowing anyway.
                let _ = shared.tx.try_send(AgentMessage { msg: Some(Out::Ping(Ping { nonce: ping_nonce })) });
            }
            _ = ctx.shutdown.cancelled(), if drain.as_ref().is_none_or(|d| !d.shutdown) => {
                info!(in_flight = shared.in_flight(), "draining: the broker will send no new requests");
                let _ = shared.tx.send(AgentMessage { msg: Some(Out::Drain(Drain { reason: "agent shutting down".into() })) }).await;
                drain = Some(Drainage { shutdown: true, deadline: Instant::now() + cfg.shutdown_grace });
            }
            _ = shared.idle.notified(), if drain.is_some() => {}
            _ = successor.changed(), if drain.is_some() => {}
            _ = tokio::time::sleep_until(deadline), if drain.is_some() => {
                warn!(abandoned = shared.in_flight(), "drain grace period over: abandoning in-flight requests");
                return Ok(finish(half_close, &mut inbound, SessionEnd::ShutDown).await);
            }
        }
    }
}

/// Ends a session gracefully: every queued frame goes out, then the end of
/// our half; the broker then closes its half. Bounded, so a silent broker
/// cannot hold the agent.
async fn finish<S>(half_close: &CancellationToken, inbound: &mut S, end: SessionEnd) -> SessionEnd
where
    S: Stream<Item = Result<BrokerMessage, tonic::Status>> + Unpin,
{
    half_close.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = inbound.next().await {}
    })
    .await;
    end
}

struct Drainage {
    shutdown: bool,
    deadline: Instant,
}
