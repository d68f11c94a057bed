//! The agent's dispatcher: every frame the broker sends, judged by the shared
//! frame rules ([`gitproxy_shared::tunnel::frames`]) and carried out without
//! waiting. Heads spawn a request task, body chunks go into the request's
//! credit-bounded channel, credit and cancels update shared state, so a slow
//! GitLab or a slow caller for one request never holds up the others.
//!
//! What the broker sends is checked too: a frame the protocol does not allow
//! ends the request it concerns with `protocol_error` (an Error frame tells
//! the broker) and counts as a violation; past the limit the stream ends and
//! the supervisor reconnects.

use super::shared::{Inflight, Shared};
use crate::record::RequestRecord;
use crate::request;
use gitproxy_proto::v1::{broker_message::Msg as In, BrokerMessage, Cancel, RequestHead};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::body::{self, PushError};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::frames::{Frame, FrameRules, RequestState, Side, Step, Violation};
use gitproxy_shared::tunnel::violations::{Verdict, Violations};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// What the dispatcher decided about the stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Dispatch {
    /// Keep reading.
    Continue,
    /// The broker asks this stream to drain (its reason, cleaned).
    Drain(String),
    /// The broker broke the protocol too often: end the stream.
    End(String),
}

/// The dispatcher's own state.
pub(super) struct Reader {
    pub(super) shared: Arc<Shared>,
    session_cancel: CancellationToken,
    /// Highest request id seen: a frame for an id at or below it with no
    /// entry is a late frame of a finished request, one above it is bogus.
    last_id: u64,
    pub(super) violations: Violations,
    /// Tests keep started requests here instead of replaying them.
    #[cfg(test)]
    pub(super) held: Option<
        Vec<(
            RequestHead,
            Option<gitproxy_shared::tunnel::body::BodyReceiver>,
        )>,
    >,
}

impl Reader {
    pub(super) fn new(shared: Arc<Shared>, session_cancel: CancellationToken) -> Self {
        Reader {
            shared,
            session_cancel,
            last_id: 0,
            violations: Violations::new("broker"),
            #[cfg(test)]
            held: None,
        }
    }

    /// Handles one frame without waiting.
    pub(super) fn dispatch(&mut self, m: BrokerMessage) -> Dispatch {
        let flow = match m.msg {
            Some(In::RequestHead(h)) => self.start(h),
            Some(In::Data(d)) => {
                let id = d.id;
                let len = d.data.len();
                let res = {
                    let mut map = self.shared.lock();
                    match self.judge(&mut map, id, Frame::Data { len: d.data.len() }) {
                        Ok(Step::Data) => match map.get(&id).and_then(|e| e.body.as_ref()) {
                            Some(b) => match b.push(d.data) {
                                Ok(()) => {
                                    self.shared.metrics.request_bytes(len);
                                    Ok(())
                                }
                                Err(PushError::Gone) => Ok(()),
                                Err(PushError::Overrun) => Err(Violation::BeyondCredit),
                            },
                            None => Ok(()),
                        },
                        other => other.map(drop),
                    }
                };
                self.outcome(id, res)
            }
            Some(In::End(e)) => {
                let res = {
                    let mut map = self.shared.lock();
                    match self.judge(&mut map, e.id, Frame::End) {
                        Ok(Step::End) => {
                            if let Some(b) = map.get_mut(&e.id).and_then(|e| e.body.take()) {
                                b.end();
                            }
                            Ok(())
                        }
                        other => other.map(drop),
                    }
                };
                self.outcome(e.id, res)
            }
            Some(In::Cancel(Cancel { id })) => {
                let mut map = self.shared.lock();
                if let Ok(Step::Abort) = self.judge(&mut map, id, Frame::Abort) {
                    if let Some(e) = map.remove(&id) {
                        debug!(request_id = id, "cancelled by the broker");
                        e.cancel.cancel();
                        e.credit.close();
                    }
                }
                ControlFlow::Continue(())
            }
            Some(In::Credit(c)) => {
                let res = {
                    let mut map = self.shared.lock();
                    match self.judge(&mut map, c.id, Frame::Credit) {
                        Ok(Step::Credit) => map
                            .get(&c.id)
                            .map_or(Ok(()), |e| e.credit.grant(c.bytes as usize))
                            .map_err(Violation::Credit),
                        other => other.map(drop),
                    }
                };
                self.outcome(c.id, res)
            }
            Some(In::Ping(p)) => {
                self.shared.control.pong(p.nonce);
                ControlFlow::Continue(())
            }
            Some(In::Pong(_)) => ControlFlow::Continue(()),
            Some(In::Drain(d)) => {
                return Dispatch::Drain(sanitize::owned(&d.reason, sanitize::MAX_REASON_BYTES))
            }
            Some(In::Welcome(_)) => self.violation(0, "a second Welcome"),
            None => {
                debug!("frame of an unknown kind ignored (newer broker?)");
                ControlFlow::Continue(())
            }
        };
        match flow {
            ControlFlow::Continue(()) => Dispatch::Continue,
            ControlFlow::Break(reason) => Dispatch::End(reason),
        }
    }

    /// Runs the frame rules for request `id` over its live entry.
    fn judge(
        &self,
        map: &mut HashMap<u64, Inflight>,
        id: u64,
        frame: Frame,
    ) -> Result<Step, Violation> {
        let rules = FrameRules {
            side: Side::Agent,
            max_chunk_bytes: self.shared.cfg.flow.max_chunk_bytes as usize,
            // Every Hello offers it.
            inline_bodies: true,
        };
        rules.on_frame(
            map.get_mut(&id).map(|e| &mut e.state),
            id,
            self.last_id,
            frame,
        )
    }

    /// Carries out the verdict on a frame: nothing, or a violation.
    fn outcome(&self, id: u64, res: Result<(), Violation>) -> ControlFlow<String> {
        match res {
            Ok(()) => ControlFlow::Continue(()),
            Err(v) => self.request_violation(id, &v.to_string()),
        }
    }

    /// Counts one violation by the broker; `Break` at the limit.
    fn violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        match self.violations.record(id, what) {
            Verdict::Continue => ControlFlow::Continue(()),
            Verdict::End(reason) => ControlFlow::Break(reason),
        }
    }

    /// A violation about request `id`: it ends here if it is live.
    fn request_violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        self.shared.protocol_error(id, what);
        self.violation(id, what)
    }

    fn start(&mut self, mut h: RequestHead) -> ControlFlow<String> {
        let id = h.id;
        let frame = Frame::Head {
            end_of_stream: h.end_of_stream,
            body_len: h.body.len(),
        };
        // Ids are unique per stream but may arrive out of order (see the
        // frame rules), so only a live id is a reuse.
        let step = self.judge(&mut self.shared.lock(), id, frame);
        match step {
            Ok(Step::Head { .. }) => {}
            // A new request the broker now waits on, refused for the body
            // its head carries: answer it, so the caller is not left hanging.
            Err(v @ (Violation::InlineBody(_) | Violation::OversizedData))
                if id != 0 && !self.shared.lock().contains_key(&id) =>
            {
                let err =
                    GitproxyError::new(ErrorCode::ProtocolError, format!("protocol error: {v}"));
                self.shared.reply_error(id, &err);
                self.last_id = self.last_id.max(id);
                return self.violation(id, &v.to_string());
            }
            other => return self.outcome(id, other.map(drop)),
        }
        self.last_id = self.last_id.max(id);
        if let Err(reason) = self.shared.cfg.policy.check(&h.method, &h.path) {
            let method = sanitize::owned(&h.method, sanitize::MAX_METHOD_BYTES);
            let path = sanitize::owned(
                h.path.split('?').next().unwrap_or(""),
                sanitize::MAX_PATH_BYTES,
            );
            let reason = sanitize::text(&reason, sanitize::MAX_REASON_BYTES);
            RequestRecord::new(id, method.into(), path.into())
                .refused(&self.shared.metrics, &reason);
            self.shared.reply_error(
                id,
                &GitproxyError::new(
                    ErrorCode::BlockedByPolicy,
                    format!("refused by the agent's policy: {reason}"),
                ),
            );
            return ControlFlow::Continue(());
        }
        let (body_tx, body_rx) = if !h.body.is_empty() {
            // A small request whole in its head (the rules bounded it).
            let whole = std::mem::take(&mut h.body);
            // Counted as its Data frames would have been.
            self.shared.metrics.request_bytes(whole.len());
            let flow = self.shared.cfg.flow;
            let rx = body::BodyReceiver::whole(id, whole, flow, self.shared.control.clone());
            (None, Some(rx))
        } else if h.end_of_stream {
            (None, None)
        } else {
            let (t, r) = body::channel(
                id,
                self.shared.cfg.flow,
                self.shared.control.clone(),
                h.content_length,
            );
            (Some(t), Some(r))
        };
        let credit = SendCredit::new(self.shared.broker_flow.window_bytes as usize);
        let cancel = self.session_cancel.child_token();
        self.shared.lock().insert(
            id,
            Inflight {
                state: RequestState::after_head(h.end_of_stream),
                body: body_tx,
                credit: credit.clone(),
                cancel: cancel.clone(),
            },
        );
        #[cfg(test)]
        if let Some(held) = self.held.as_mut() {
            held.push((h, body_rx));
            return ControlFlow::Continue(());
        }
        // No span per request: every line of a request names its
        // `request_id`, and a span costs ~4 % of the agent's CPU per request.
        let shared = self.shared.clone();
        tokio::spawn(request::serve(shared, h, body_rx, credit, cancel));
        ControlFlow::Continue(())
    }
}
