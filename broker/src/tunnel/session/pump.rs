//! The body pump: streams a caller's request body to the agent within the
//! agent's credit, on its own task, so a slow caller holds up nothing else;
//! or, for a small body of known length, reads it whole first so it goes in
//! the request's head.

use super::AgentSession;
use bytes::Bytes;
use gitproxy_proto::v1::{broker_message::Msg as Out, BrokerMessage, Data, End};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::tunnel::credit::SendCredit;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

impl AgentSession {
    /// Reads a small body of known length to its end, before anything is
    /// sent to the agent, so it can go whole in the head. Fails as the pump
    /// does: a stalled or broken body is the caller's `bad_request`, and so is
    /// a body longer than it declared.
    pub(super) async fn whole_body<B>(
        &self,
        body: &mut B,
        max: usize,
    ) -> Result<Bytes, GitproxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let idle = self.settings.body_idle_timeout;
        let mut first: Option<Bytes> = None;
        let mut rest = bytes::BytesMut::new();
        loop {
            let Some(frame) = gitproxy_shared::idle::within(idle, body.frame()).await else {
                return Err(stalled(idle));
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(unreadable(&e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            let len = first.as_ref().map_or(0, Bytes::len) + rest.len() + data.len();
            if len > max {
                return Err(GitproxyError::new(
                    ErrorCode::BadRequest,
                    "the request body is longer than its Content-Length",
                ));
            }
            match first.take() {
                None if rest.is_empty() => first = Some(data),
                f => {
                    rest.extend_from_slice(&f.unwrap_or_default());
                    rest.extend_from_slice(&data);
                }
            }
        }
        Ok(first.unwrap_or_else(|| rest.freeze()))
    }

    /// Streams the caller's body to the agent, spending the agent's credit.
    /// A body that stalls (no data for the body idle time while we wait for
    /// it) ends the request.
    pub(super) async fn pump<B>(
        self: Arc<Self>,
        id: u64,
        mut body: B,
        credit: SendCredit,
        cancel: CancellationToken,
        bytes_in: Arc<AtomicU64>,
    ) where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let flow = self.settings.agent_flow;
        let idle = self.settings.body_idle_timeout;
        let max = flow.max_chunk_bytes as usize;
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                f = gitproxy_shared::idle::within(idle, body.frame()) => f,
            };
            let Some(frame) = frame else {
                info!(connection = %self.conn_id, request_id = id, idle_s = idle.as_secs_f32(), "the caller's request body stalled: no data for the body idle time; ending the request");
                self.fail(id, stalled(idle));
                self.control.cancel(id);
                return;
            };
            match frame {
                None => {
                    let end = Box::new(BrokerMessage {
                        msg: Some(Out::End(End { id })),
                    });
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = self.tx.send(end) => {}
                    }
                    return;
                }
                Some(Err(e)) => {
                    debug!(request_id = id, "the caller's request body failed: {e}");
                    self.fail(id, unreadable(&e));
                    self.control.cancel(id);
                    return;
                }
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    while !data.is_empty() {
                        let part = data.split_to(data.len().min(max));
                        let n = part.len() as u64;
                        let msg = Box::new(BrokerMessage {
                            msg: Some(Out::Data(Data { id, data: part })),
                        });
                        let sent = tokio::select! {
                            _ = cancel.cancelled() => false,
                            ok = async {
                                credit.acquire(flow.frame_cost(n as usize)).await.is_ok()
                                    && self.tx.send_data(msg, n as usize).await.is_ok()
                            } => ok,
                        };
                        if !sent {
                            return;
                        }
                        bytes_in.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The caller's body sent nothing for the body idle time.
fn stalled(idle: Duration) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::BadRequest,
        format!(
            "the request body stalled: no data from the caller for {}s (GITPROXY_BODY_IDLE_TIMEOUT)",
            idle.as_secs_f32()
        ),
    )
}

/// The caller's body failed.
fn unreadable(e: &impl std::fmt::Display) -> GitproxyError {
    GitproxyError::new(
        ErrorCode::BadRequest,
        format!("the request body could not be read: {e}"),
    )
}
