//! The broker's dispatcher: every frame the agent sends, judged by the shared
//! frame rules ([`gitproxy_shared::tunnel::frames`]) and carried out without
//! waiting. Response heads complete the request's oneshot, body chunks go
//! into its credit-bounded channel, credit and pings update shared state.
//!
//! Everything the agent sends is untrusted: a frame the protocol does not
//! allow ends the request it concerns with `protocol_error` (and a `Cancel`
//! goes to the agent) and counts as a violation
//! (`gitproxy_shared::tunnel::violations`); past the limit the session ends.
//! Nothing an agent sends can panic the dispatcher.

use super::{AgentSession, Answer, Pending, AGENT_CODES};
use bytes::Bytes;
use gitproxy_proto::v1::{agent_message::Msg as In, AgentMessage, End, ResponseHead};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::body::{self, PushError};
use gitproxy_shared::tunnel::frames::{Frame, FrameRules, Side, Step, Violation};
use gitproxy_shared::tunnel::violations::Verdict;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use tracing::{debug, info};

impl AgentSession {
    /// Handles one frame without waiting; `Break` ends the session.
    pub(super) fn dispatch(&self, m: AgentMessage) -> ControlFlow<String> {
        match m.msg {
            Some(In::ResponseHead(h)) => self.response_head(h),
            Some(In::Data(d)) => self.data(d.id, d.data),
            Some(In::End(End { id })) => self.end_frame(id),
            Some(In::Error(e)) => {
                let code = ErrorCode::parse(&e.code);
                let err = GitproxyError {
                    error: if AGENT_CODES.contains(&code) {
                        code
                    } else {
                        ErrorCode::Internal
                    },
                    message: sanitize::owned(&e.message, sanitize::MAX_ERROR_MESSAGE_BYTES),
                    hint: sanitize::owned(&e.hint, sanitize::MAX_ERROR_HINT_BYTES),
                };
                let step = self.judge(&mut self.lock(), e.id, Frame::Abort);
                match step {
                    Ok(Step::Abort) => {
                        self.fail(e.id, err);
                        ControlFlow::Continue(())
                    }
                    other => self.outcome(e.id, other.map(drop)),
                }
            }
            Some(In::Credit(c)) => {
                let res = {
                    let mut map = self.lock();
                    match self.judge(&mut map, c.id, Frame::Credit) {
                        Ok(Step::Credit) => map
                            .get(&c.id)
                            .map_or(Ok(()), |p| p.credit.grant(c.bytes as usize))
                            .map_err(Violation::Credit),
                        other => other.map(drop),
                    }
                };
                self.outcome(c.id, res)
            }
            Some(In::Ping(p)) => {
                self.control.pong(p.nonce);
                ControlFlow::Continue(())
            }
            Some(In::Pong(_)) => ControlFlow::Continue(()),
            Some(In::Drain(d)) => {
                if !self.draining.swap(true, Ordering::SeqCst) {
                    self.changed();
                }
                let reason = sanitize::text(&d.reason, sanitize::MAX_REASON_BYTES);
                info!(connection = %self.conn_id, instance = %self.instance, reason = %reason, "the agent is draining");
                ControlFlow::Continue(())
            }
            Some(In::Hello(_)) => self.violation(0, "a second Hello"),
            None => {
                debug!("frame of an unknown kind ignored (newer agent?)");
                ControlFlow::Continue(())
            }
        }
    }

    /// Runs the frame rules for request `id` over its pending entry.
    fn judge(
        &self,
        map: &mut HashMap<u64, Pending>,
        id: u64,
        frame: Frame,
    ) -> Result<Step, Violation> {
        let rules = FrameRules {
            side: Side::Broker,
            max_chunk_bytes: self.settings.flow.max_chunk_bytes as usize,
            // Every Welcome offers it.
            inline_bodies: true,
        };
        let issued = self.next_id.load(Ordering::Relaxed);
        rules.on_frame(map.get_mut(&id).map(|p| &mut p.state), id, issued, frame)
    }

    /// Carries out the verdict on a frame: nothing, or a violation.
    fn outcome(&self, id: u64, res: Result<(), Violation>) -> ControlFlow<String> {
        match res {
            Ok(()) => ControlFlow::Continue(()),
            Err(v) => self.request_violation(id, &v.to_string()),
        }
    }

    /// Counts one violation by the agent; `Break` once the limit is reached.
    fn violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        self.observer.protocol_violation(&self.conn_id);
        match self.violations.record(id, what) {
            Verdict::Continue => ControlFlow::Continue(()),
            Verdict::End(reason) => ControlFlow::Break(reason),
        }
    }

    /// A violation about request `id`: if it is pending here it ends with
    /// `protocol_error` and the agent is told to drop it.
    fn request_violation(&self, id: u64, what: &str) -> ControlFlow<String> {
        let err = GitproxyError::new(
            ErrorCode::ProtocolError,
            format!("the agent broke the tunnel protocol: {what}"),
        );
        if self.fail(id, err) {
            self.control.cancel(id);
        }
        self.violation(id, what)
    }

    fn response_head(&self, h: ResponseHead) -> ControlFlow<String> {
        let id = h.id;
        let mut map = self.lock();
        let step = self.judge(
            &mut map,
            id,
            Frame::Head {
                end_of_stream: h.end_of_stream,
                body_len: h.body.len(),
            },
        );
        let body_follows = match step {
            Ok(Step::Head { body }) => body,
            other => {
                drop(map);
                return self.outcome(id, other.map(drop));
            }
        };
        // Everything about the head is checked before it reaches the caller.
        let status = u16::try_from(h.status)
            .ok()
            .filter(|s| (200..=599).contains(s));
        let headers = gitproxy_shared::headers::from_wire(&h.headers);
        let (status, headers_map) = match (status, headers) {
            (Some(s), Ok(m)) => (s, m),
            (None, _) => {
                drop(map);
                let what = format!("invalid status {} (allowed: 200-599)", h.status);
                return self.outcome(id, Err(Violation::BadHead(what)));
            }
            (_, Err(e)) => {
                drop(map);
                let what = format!("unusable response headers: {e}");
                return self.outcome(id, Err(Violation::BadHead(what)));
            }
        };
        let content_length = headers_map
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(p) = map.get_mut(&id) else {
            return ControlFlow::Continue(());
        };
        let head_tx = p.head.take();
        let body = if body_follows {
            let (tx, rx) =
                body::channel(id, self.settings.flow, self.control.clone(), content_length);
            p.body = Some(tx);
            Some(rx)
        } else {
            map.remove(&id);
            // A small answer whole in its head (the rules bounded it).
            (!h.body.is_empty()).then(|| {
                body::BodyReceiver::whole(id, h.body, self.settings.flow, self.control.clone())
            })
        };
        drop(map);
        if let Some(head_tx) = head_tx {
            let _ = head_tx.send(Ok(Answer {
                status,
                headers: h.headers,
                body,
            }));
        }
        ControlFlow::Continue(())
    }

    fn data(&self, id: u64, data: Bytes) -> ControlFlow<String> {
        let res = {
            let mut map = self.lock();
            match self.judge(&mut map, id, Frame::Data { len: data.len() }) {
                Ok(Step::Data) => match map.get(&id).and_then(|p| p.body.as_ref()) {
                    Some(b) => match b.push(data) {
                        Err(PushError::Overrun) => Err(Violation::BeyondCredit),
                        // The consumer went away; its guard ends the request.
                        Err(PushError::Gone) | Ok(()) => Ok(()),
                    },
                    None => Ok(()),
                },
                other => other.map(drop),
            }
        };
        self.outcome(id, res)
    }

    fn end_frame(&self, id: u64) -> ControlFlow<String> {
        let res = {
            let mut map = self.lock();
            match self.judge(&mut map, id, Frame::End) {
                // The response is complete: nothing more is expected.
                Ok(Step::End) => {
                    if let Some(b) = map.remove(&id).and_then(|p| p.body) {
                        b.end();
                    }
                    Ok(())
                }
                other => other.map(drop),
            }
        };
        self.outcome(id, res)
    }
}
