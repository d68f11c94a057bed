//! The agent's dispatcher against a fake broker, in process, on tokio's
//! paused clock. Requests the dispatcher starts are held (not replayed to
//! GitLab) so the test sees their bodies; what the agent answers is read
//! from its outbound queue. Every violation by the broker gives its
//! documented outcome (a live request ends with an `Error protocol_error`
//! frame and a failed body; frames for ids never sent only count; late
//! frames are ignored), silence ends the session, and interleaved requests
//! get exactly their bytes.

use super::props::shared_parts;
use super::reader::{Dispatch, Reader};
use super::serve::{serve, Heartbeat};
use super::*;
use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, broker_message::Msg as In, AgentMessage, BrokerMessage, Cancel,
    Credit, Data, End, RequestHead,
};
use gitproxy_shared::errors::ErrorCode;
use gitproxy_shared::tunnel::body::BodyReceiver;
use gitproxy_shared::tunnel::FlowSettings;

struct Fake {
    reader: Reader,
    out: queue::Receiver<AgentMessage>,
}

fn shared() -> (Arc<Shared>, queue::Receiver<AgentMessage>) {
    let (cfg, upstream) = shared_parts();
    let (tx, out) = queue::channel(4096, queue::QUEUE_BYTES);
    let shared = Arc::new(Shared {
        cfg,
        upstream,
        tx,
        broker_flow: FlowSettings::default(),
        inline_bodies: true,
        metrics: Default::default(),
        control: gitproxy_shared::tunnel::outbound::Control::new(),
        inflight: Mutex::new(Default::default()),
        idle: Default::default(),
    });
    (shared, out)
}

fn fake() -> Fake {
    let (shared, out) = shared();
    let mut reader = Reader::new(shared, CancellationToken::new());
    reader.held = Some(Vec::new());
    Fake { reader, out }
}

fn head(id: u64, end_of_stream: bool) -> In {
    In::RequestHead(RequestHead {
        id,
        method: "POST".into(),
        path: "/api/v4/projects".into(),
        end_of_stream,
        ..Default::default()
    })
}

fn data(id: u64, n: usize, byte: u8) -> In {
    In::Data(Data {
        id,
        data: Bytes::from(vec![byte; n]),
    })
}

impl Fake {
    fn send(&mut self, m: In) -> Dispatch {
        self.reader.dispatch(BrokerMessage { msg: Some(m) })
    }

    /// The Error frames the agent sent so far: (id, code).
    fn errors(&mut self) -> Vec<(u64, String)> {
        let mut v = vec![];
        while let Ok(m) = self.out.try_recv() {
            if let Some(Out::Error(e)) = m.msg {
                v.push((e.id, e.code));
            }
        }
        v
    }

    fn violations(&self) -> u32 {
        self.reader.violations.total()
    }

    /// The body of held request `id`.
    fn body(&mut self, id: u64) -> BodyReceiver {
        let held = self.reader.held.as_mut().expect("held");
        let i = held.iter().position(|(h, _)| h.id == id).expect("held id");
        held.remove(i).1.expect("a body")
    }

    fn live(&self, id: u64) -> bool {
        self.reader.shared.lock().contains_key(&id)
    }
}

async fn read_body(mut b: BodyReceiver) -> Result<Vec<u8>, ErrorCode> {
    let mut out = vec![];
    loop {
        let frame =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut b), cx))
                .await;
        match frame {
            None => return Ok(out),
            Some(Ok(f)) => out.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Some(Err(e)) => return Err(e.error),
        }
    }
}

/// Violations about a live request end it: `Error protocol_error` to the
/// broker, its body cut (the request task is cancelled), one violation
/// counted; the stream goes on.
#[tokio::test(start_paused = true)]
async fn violations_end_the_live_request() {
    let flow = FlowSettings::default();
    let (window, chunk) = (flow.window_bytes as usize, flow.max_chunk_bytes as usize);
    let over = (window / chunk) as u64 + 1;
    // (what, frames, whether the body had ended cleanly before)
    let cases: Vec<(&str, Vec<In>, bool)> = vec![
        ("oversized frame", vec![data(1, chunk + 1, 0)], false),
        (
            "beyond credit",
            (0..over).map(|_| data(1, chunk, 0)).collect(),
            false,
        ),
        ("reused id", vec![head(1, false)], false),
        (
            "data after end",
            vec![In::End(End { id: 1 }), data(1, 1, 0)],
            true,
        ),
        (
            "end after end",
            vec![In::End(End { id: 1 }), In::End(End { id: 1 })],
            true,
        ),
        (
            "credit beyond the window",
            vec![In::Credit(Credit {
                id: 1,
                bytes: u32::MAX,
            })],
            false,
        ),
    ];
    for (what, frames, ended) in cases {
        let mut f = fake();
        assert_eq!(f.send(head(1, false)), Dispatch::Continue);
        let body = f.body(1);
        for fr in frames {
            assert_eq!(f.send(fr), Dispatch::Continue, "{what}");
        }
        assert_eq!(
            f.errors(),
            vec![(1, "protocol_error".to_string())],
            "{what}"
        );
        assert!(!f.live(1), "{what}");
        assert_eq!(f.violations(), 1, "{what}");
        if ended {
            assert_eq!(read_body(body).await, Ok(vec![]), "{what}");
        } else {
            // Cut, never a clean end (the request task is cancelled).
            assert!(read_body(body).await.is_err(), "{what}");
        }
    }
}

/// A small request body whole in its head (`inline-body-v1`, which every
/// Hello offers) is the request's whole body; a head carrying a body without
/// ending the stream, or one above the largest chunk, is answered with
/// `protocol_error` and counted, and the stream goes on.
#[tokio::test(start_paused = true)]
async fn a_whole_body_in_the_head_and_its_violations() {
    let chunk = FlowSettings::default().max_chunk_bytes as usize;
    let with_body = |id, end_of_stream, n: usize| {
        In::RequestHead(RequestHead {
            id,
            method: "POST".into(),
            path: "/api/v4/projects".into(),
            end_of_stream,
            body: Bytes::from(vec![5u8; n]),
            ..Default::default()
        })
    };
    let mut f = fake();
    assert_eq!(f.send(with_body(1, true, chunk)), Dispatch::Continue);
    assert_eq!(read_body(f.body(1)).await, Ok(vec![5u8; chunk]));
    // Counted as its Data frames would have been.
    let counted = format!("gitproxy_agent_request_bytes_total {chunk}");
    let text = f.reader.shared.metrics.render();
    assert!(text.lines().any(|l| l == counted), "{text}");
    for (id, frame) in [
        (2, with_body(2, false, 3)),
        (3, with_body(3, true, chunk + 1)),
    ] {
        assert_eq!(f.send(frame), Dispatch::Continue, "{id}");
        assert_eq!(f.errors(), vec![(id, "protocol_error".to_string())], "{id}");
        assert!(!f.live(id), "{id}");
    }
    assert_eq!(f.violations(), 2);
    assert_eq!(f.send(head(4, true)), Dispatch::Continue);
    assert!(f.live(4));
}

/// Frames for ids never sent only count (no answer); a Cancel for an id
/// not seen yet is not a violation (it may overtake its head); frames
/// after a Cancel are late and ignored; lower ids than the highest seen
/// are legal (ids may arrive out of order).
#[tokio::test(start_paused = true)]
async fn unknown_late_and_out_of_order_ids() {
    let mut f = fake();
    f.send(head(0, true));
    f.send(data(7, 1, 0));
    f.send(In::End(End { id: 7 }));
    f.send(In::Credit(Credit { id: 7, bytes: 1 }));
    assert_eq!(f.violations(), 4);
    f.send(In::Cancel(Cancel { id: 50 }));
    assert_eq!(f.violations(), 4);
    // Out of order: 5 then 3, both live.
    f.send(head(5, false));
    f.send(head(3, true));
    assert!(f.live(5) && f.live(3));
    // Cancelled, then late frames.
    let body = f.body(5);
    f.send(In::Cancel(Cancel { id: 5 }));
    assert!(!f.live(5));
    f.send(data(5, 10, 1));
    f.send(In::End(End { id: 5 }));
    f.send(In::Credit(Credit { id: 5, bytes: 1 }));
    assert_eq!(f.violations(), 4);
    assert!(f.errors().is_empty());
    assert!(read_body(body).await.is_err(), "a cancelled body is cut");
}

/// At the violation limit the dispatcher ends the stream.
#[tokio::test(start_paused = true)]
async fn too_many_violations_end_the_stream() {
    let mut f = fake();
    let limit = f.reader.violations.limit();
    for i in 1..limit {
        assert_eq!(f.send(data(u64::MAX, 1, 0)), Dispatch::Continue, "{i}");
    }
    assert!(matches!(f.send(data(u64::MAX, 1, 0)), Dispatch::End(_)));
}

/// Many requests, their body frames interleaved: each request's body holds
/// exactly its bytes, in order.
#[tokio::test(start_paused = true)]
async fn interleaved_requests_get_their_bytes() {
    const N: u64 = 32;
    let mut f = fake();
    // Heads out of order, as the broker may queue them.
    for id in (1..=N).rev() {
        f.send(head(id, false));
    }
    for round in 0..6u8 {
        for id in 1..=N {
            f.send(data(id, id as usize, (id as u8) ^ round));
        }
    }
    for id in 1..=N {
        f.send(In::End(End { id }));
    }
    assert_eq!(f.violations(), 0);
    assert!(f.errors().is_empty());
    for id in 1..=N {
        let want: Vec<u8> = (0..6u8)
            .flat_map(|r| vec![(id as u8) ^ r; id as usize])
            .collect();
        let body = f.body(id);
        assert_eq!(read_body(body).await, Ok(want), "request {id}");
    }
}

/// Silence from the broker past the heartbeat timeout ends the session;
/// pings go out meanwhile and any frame counts as a sign of life.
#[tokio::test(start_paused = true)]
async fn heartbeat_silence_ends_the_session() {
    let (shared, mut out) = shared();
    let (events, _events_rx) = mpsc::channel(4);
    let (_gen_tx, connected_generation) = watch::channel(1);
    let ctx = SessionContext {
        cfg: shared.cfg.clone(),
        generation: 1,
        events,
        shutdown: CancellationToken::new(),
        connected_generation,
        upstream_cache: Default::default(),
        first_origin: Default::default(),
        metrics: Default::default(),
    };
    let (to_agent, inbound) = fmpsc::unbounded::<Result<BrokerMessage, tonic::Status>>();
    let heartbeat = Heartbeat {
        interval: Duration::from_secs(15),
        timeout: Duration::from_secs(40),
    };
    let half_close = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let session = serve(&ctx, shared, inbound, &half_close, heartbeat);
    let feeder = async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(30)).await; // paused clock: no real wait
            let pong = In::Pong(gitproxy_proto::v1::Pong { nonce: 0 });
            to_agent
                .unbounded_send(Ok(BrokerMessage { msg: Some(pong) }))
                .unwrap();
        }
        std::future::pending::<()>().await
    };
    let end = tokio::select! {
        end = session => end,
        _ = feeder => unreachable!(),
    };
    match end {
        Err(SessionError::HeartbeatTimeout(silent)) => {
            assert!(silent > Duration::from_secs(40) && silent <= Duration::from_secs(60));
        }
        other => panic!("expected a heartbeat timeout, got {other:?}"),
    }
    let lived = started.elapsed();
    assert!(lived >= Duration::from_secs(130), "{lived:?}");
    let mut pings = 0;
    while let Ok(m) = out.try_recv() {
        pings += usize::from(matches!(m.msg, Some(Out::Ping(_))));
    }
    assert!(pings >= 5, "{pings} pings");
}
