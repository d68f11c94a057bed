//! The per-request frame rules of `gitproxy.v1.Tunnel`, for both ends.
//!
//! One request is two halves: the broker sends `RequestHead → Data* → End`
//! (or `Cancel` at any time), the agent answers `ResponseHead → Data* → End`
//! (or `Error` at any time); `end_of_stream` on a head stands for an
//! immediate `End`; `Credit` may come whenever the request is live. A head
//! may carry the whole body (`ResponseHead.body`) when the reading end
//! offered the `inline-body-v1` capability ([`INLINE_BODY`]): then it must
//! also end the stream, and the body is bounded like one `Data` frame. Each
//! dispatcher keeps one [`RequestState`] per live request (the peer's half as
//! seen here) and passes every inbound frame through [`FrameRules::on_frame`],
//! which moves the state and answers either the [`Step`] to take or the
//! [`Violation`] the peer committed. So the order rules live here once; the
//! dispatchers only carry out the steps (deliver a head, push a chunk, end a
//! body, grant credit).
//!
//! Request ids are chosen by the broker, unique on a stream, and **may arrive
//! out of order**: the broker allocates an id before it queues the head, and
//! several callers queue concurrently, so id 7 can overtake id 6. An id at or
//! below the highest one seen that has no live request is a late frame of a
//! request that already finished here (cancelled, failed, completed) and is
//! ignored; an id above it (or 0) was never sent and is a violation.

/// The capability by which an end offers to read heads that carry a whole
/// small body: one frame for a small answer instead of head, `Data`, `End`.
pub const INLINE_BODY: &str = "inline-body-v1";

/// Which end reads the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The broker, reading the agent's answers to requests it opened.
    Broker,
    /// The agent, reading the broker's requests (a head opens one).
    Agent,
}

/// An inbound frame, reduced to what the order rules need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// `RequestHead` (at the agent) or `ResponseHead` (at the broker).
    Head {
        /// No body follows.
        end_of_stream: bool,
        /// Length of the body the head carries (0: none).
        body_len: usize,
    },
    /// A body chunk of `len` bytes.
    Data {
        /// Payload length.
        len: usize,
    },
    /// The end of the peer's body.
    End,
    /// The peer ends the request: `Error` (agent → broker) or `Cancel`
    /// (broker → agent).
    Abort,
    /// Credit for our half.
    Credit,
}

impl Frame {
    fn name(self, side: Side) -> &'static str {
        match (self, side) {
            (Frame::Head { .. }, Side::Broker) => "ResponseHead",
            (Frame::Head { .. }, Side::Agent) => "RequestHead",
            (Frame::Data { .. }, _) => "Data",
            (Frame::End, _) => "End",
            (Frame::Abort, Side::Broker) => "Error",
            (Frame::Abort, Side::Agent) => "Cancel",
            (Frame::Credit, _) => "Credit",
        }
    }
}

/// Where one live request stands: the peer's half as seen by this end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    /// Opened here (broker) and waiting for the peer's head.
    AwaitingHead,
    /// The head arrived; body chunks may follow.
    Body,
    /// The peer's half ended (`End`, or a head with `end_of_stream`); our
    /// half may still be running.
    Ended,
}

impl RequestState {
    /// The state right after a head.
    pub fn after_head(end_of_stream: bool) -> Self {
        if end_of_stream {
            RequestState::Ended
        } else {
            RequestState::Body
        }
    }
}

/// What the dispatcher does with a legal frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Deliver the head (at the agent: start the request, its state
    /// [`RequestState::after_head`]); `body` when a body follows.
    Head {
        /// A body follows.
        body: bool,
    },
    /// Push the chunk into the request's body channel (which checks the
    /// credit and reports [`Violation::BeyondCredit`]).
    Data,
    /// End the request's body cleanly.
    End,
    /// The peer ended the request: drop it here.
    Abort,
    /// Add the credit to the request's send credit.
    Credit,
    /// A late frame of a request that already finished here: ignore it.
    Late,
}

/// A frame the protocol does not allow. Each ends the live request it
/// concerns (if any) with `protocol_error` and counts as one violation of
/// the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A head with request id 0.
    #[error("{0} with id 0")]
    IdZero(&'static str),
    /// A frame for an id above every id issued on the stream.
    #[error("{0} for a request never sent")]
    NeverSent(&'static str),
    /// A second head for a live request (at the agent: a reused id).
    #[error("a second {0} for a live request id")]
    DuplicateHead(&'static str),
    /// `Data` before the head.
    #[error("Data before the head")]
    DataBeforeHead,
    /// `End` before the head.
    #[error("End before the head")]
    EndBeforeHead,
    /// `Data` after the body ended.
    #[error("Data after End")]
    DataAfterEnd,
    /// A second `End`.
    #[error("End after End")]
    DuplicateEnd,
    /// A `Data` payload above `max_chunk_bytes`.
    #[error("Data frame larger than the largest chunk")]
    OversizedData,
    /// More data than the credit granted (the receiver's window).
    #[error("Data beyond the granted credit")]
    BeyondCredit,
    /// A `Credit` that would exceed the window.
    #[error("{0}")]
    Credit(crate::tunnel::credit::CreditError),
    /// A head whose contents are unusable (status, header count or size).
    #[error("{0}")]
    BadHead(String),
    /// A head carrying a body this end did not offer to read, or carrying
    /// one without ending the stream.
    #[error("{0}")]
    InlineBody(&'static str),
}

/// The frame rules of one end of a stream.
#[derive(Debug, Clone, Copy)]
pub struct FrameRules {
    /// Which end reads.
    pub side: Side,
    /// Largest `Data` payload allowed (the reader's `max_chunk_bytes`),
    /// and largest body a head may carry.
    pub max_chunk_bytes: usize,
    /// This end offered [`INLINE_BODY`]: heads may carry a whole body.
    pub inline_bodies: bool,
}

impl FrameRules {
    /// Judges `frame` for request `id`: `state` is the live request's state
    /// (moved here on a legal frame), `None` when no request with that id is
    /// live; `highest_id` is the highest id issued (broker) or seen (agent)
    /// on this stream.
    pub fn on_frame(
        &self,
        state: Option<&mut RequestState>,
        id: u64,
        highest_id: u64,
        frame: Frame,
    ) -> Result<Step, Violation> {
        match frame {
            Frame::Data { len } if len > self.max_chunk_bytes => {
                return Err(Violation::OversizedData)
            }
            Frame::Head {
                end_of_stream,
                body_len,
            } if body_len > 0 => {
                if !self.inline_bodies {
                    return Err(Violation::InlineBody(
                        "a head carrying a body, which this end did not offer to read",
                    ));
                }
                if !end_of_stream {
                    return Err(Violation::InlineBody(
                        "a head carrying a body without ending the stream",
                    ));
                }
                if body_len > self.max_chunk_bytes {
                    return Err(Violation::OversizedData);
                }
            }
            _ => {}
        }
        let name = frame.name(self.side);
        let Some(state) = state else {
            return match (frame, self.side) {
                (Frame::Head { end_of_stream, .. }, Side::Agent) if id != 0 => Ok(Step::Head {
                    body: !end_of_stream,
                }),
                (Frame::Head { .. }, Side::Agent) => Err(Violation::IdZero(name)),
                // A Cancel may overtake its own RequestHead (control frames
                // go first), so an unknown id is never a violation.
                (Frame::Abort, Side::Agent) => Ok(Step::Late),
                _ if id == 0 || id > highest_id => Err(Violation::NeverSent(name)),
                _ => Ok(Step::Late),
            };
        };
        use RequestState::*;
        match (*state, frame) {
            (_, Frame::Abort) => Ok(Step::Abort),
            (_, Frame::Credit) => Ok(Step::Credit),
            (AwaitingHead, Frame::Head { end_of_stream, .. }) => {
                *state = RequestState::after_head(end_of_stream);
                Ok(Step::Head {
                    body: !end_of_stream,
                })
            }
            (Body | Ended, Frame::Head { .. }) => Err(Violation::DuplicateHead(name)),
            (AwaitingHead, Frame::Data { .. }) => Err(Violation::DataBeforeHead),
            (AwaitingHead, Frame::End) => Err(Violation::EndBeforeHead),
            (Body, Frame::Data { .. }) => Ok(Step::Data),
            (Body, Frame::End) => {
                *state = Ended;
                Ok(Step::End)
            }
            (Ended, Frame::Data { .. }) => Err(Violation::DataAfterEnd),
            (Ended, Frame::End) => Err(Violation::DuplicateEnd),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: FrameRules = FrameRules {
        side: Side::Broker,
        max_chunk_bytes: 10,
        inline_bodies: true,
    };
    const AGENT: FrameRules = FrameRules {
        side: Side::Agent,
        max_chunk_bytes: 10,
        inline_bodies: false,
    };
    const HEAD: Frame = Frame::Head {
        end_of_stream: false,
        body_len: 0,
    };

    #[test]
    fn a_head_carries_a_body_only_when_offered_whole_and_small() {
        let whole = |body_len| Frame::Head {
            end_of_stream: true,
            body_len,
        };
        let mut s = RequestState::AwaitingHead;
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, whole(10)),
            Ok(Step::Head { body: false })
        );
        assert_eq!(s, RequestState::Ended);
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::Data { len: 1 }),
            Err(Violation::DataAfterEnd)
        );
        let mut s = RequestState::AwaitingHead;
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, whole(11)),
            Err(Violation::OversizedData)
        );
        let open = Frame::Head {
            end_of_stream: false,
            body_len: 3,
        };
        assert!(matches!(
            BROKER.on_frame(Some(&mut s), 1, 1, open),
            Err(Violation::InlineBody(_))
        ));
        assert_eq!(s, RequestState::AwaitingHead);
        // Not offered: even a whole small body is refused.
        assert!(matches!(
            AGENT.on_frame(None, 1, 0, whole(3)),
            Err(Violation::InlineBody(_))
        ));
        assert_eq!(
            AGENT.on_frame(None, 1, 0, whole(0)),
            Ok(Step::Head { body: false })
        );
    }

    #[test]
    fn the_legal_order_walks_head_data_end() {
        let mut s = RequestState::AwaitingHead;
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, HEAD),
            Ok(Step::Head { body: true })
        );
        assert_eq!(s, RequestState::Body);
        for f in [
            Frame::Data { len: 10 },
            Frame::Credit,
            Frame::Data { len: 0 },
        ] {
            assert!(BROKER.on_frame(Some(&mut s), 1, 1, f).is_ok());
        }
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::End),
            Ok(Step::End)
        );
        assert_eq!(s, RequestState::Ended);
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::Credit),
            Ok(Step::Credit)
        );
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::Abort),
            Ok(Step::Abort)
        );
    }

    #[test]
    fn out_of_order_frames_are_violations() {
        let mut s = RequestState::AwaitingHead;
        let data = Frame::Data { len: 1 };
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, data),
            Err(Violation::DataBeforeHead)
        );
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::End),
            Err(Violation::EndBeforeHead)
        );
        let mut s = RequestState::Body;
        assert_eq!(
            BROKER.on_frame(Some(&mut s), 1, 1, Frame::Data { len: 11 }),
            Err(Violation::OversizedData)
        );
        assert!(matches!(
            BROKER.on_frame(Some(&mut s), 1, 1, HEAD),
            Err(Violation::DuplicateHead(_))
        ));
        let mut s = RequestState::Ended;
        assert_eq!(
            AGENT.on_frame(Some(&mut s), 1, 1, data),
            Err(Violation::DataAfterEnd)
        );
        assert_eq!(
            AGENT.on_frame(Some(&mut s), 1, 1, Frame::End),
            Err(Violation::DuplicateEnd)
        );
        assert!(matches!(
            AGENT.on_frame(Some(&mut s), 1, 1, HEAD),
            Err(Violation::DuplicateHead("RequestHead"))
        ));
    }

    #[test]
    fn unknown_ids_are_late_or_never_sent() {
        for rules in [BROKER, AGENT] {
            assert_eq!(rules.on_frame(None, 3, 5, Frame::End), Ok(Step::Late));
            assert_eq!(
                rules.on_frame(None, 6, 5, Frame::Credit),
                Err(Violation::NeverSent("Credit"))
            );
            assert_eq!(
                rules.on_frame(None, 0, 5, Frame::Data { len: 1 }),
                Err(Violation::NeverSent("Data"))
            );
        }
        assert_eq!(
            BROKER.on_frame(None, 9, 5, Frame::Abort),
            Err(Violation::NeverSent("Error"))
        );
        assert_eq!(
            BROKER.on_frame(None, 9, 5, HEAD),
            Err(Violation::NeverSent("ResponseHead"))
        );
        // At the agent a head opens a request, lower ids included; a Cancel
        // for an id not seen yet overtook its head.
        assert_eq!(
            AGENT.on_frame(None, 2, 5, HEAD),
            Ok(Step::Head { body: true })
        );
        assert_eq!(AGENT.on_frame(None, 9, 5, Frame::Abort), Ok(Step::Late));
        assert_eq!(
            AGENT.on_frame(None, 0, 5, HEAD),
            Err(Violation::IdZero("RequestHead"))
        );
    }
}
