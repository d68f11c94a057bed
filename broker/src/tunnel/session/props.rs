//! Property tests of the broker's dispatcher, in process: a session over
//! in-memory channels (no tonic stream), a few requests registered the way
//! `send_request` registers them, then any sequence of agent frames — heads
//! with random ids, statuses and header counts, data of random sizes, ends,
//! errors, credits, pings, drains, second Hellos, unknown kinds, and bytes
//! that merely decode as frames. Whatever comes: no panic, memory bounded by
//! the windows, every request with a defined outcome, and the session ended
//! exactly at the violation limit. Plus the session's clean-up when its task
//! is aborted or panics.

use super::*;
use crate::observe::Gauges;
use crate::tunnel::registry::Registry;
use futures::FutureExt;
use gitproxy_proto::v1::{
    agent_message::Msg as In, AgentMessage, Data, End, Error as ErrorFrame, Hello, Ping,
    ResponseHead,
};
use gitproxy_shared::headers::MAX_HEADER_COUNT;
use gitproxy_shared::tunnel::limits::MAX_PROTOCOL_VIOLATIONS;
use http_body_util::BodyExt;
use proptest::prelude::*;
use prost::Message;

/// Requests registered before the frames arrive (ids 1..=ISSUED).
const ISSUED: u64 = 6;

struct Harness {
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    observer: Arc<Observer>,
    heads: Vec<(u64, HeadReceiver)>,
    _out: queue::Receiver<Box<BrokerMessage>>,
}

fn settings() -> SessionSettings {
    SessionSettings {
        flow: FlowSettings::default(),
        agent_flow: FlowSettings::default(),
        heartbeat_interval: Duration::from_secs(15),
        heartbeat_timeout: Duration::from_secs(40),
        max_age: Duration::ZERO,
        body_idle_timeout: Duration::from_secs(300),
        agent_inline_bodies: true,
    }
}

fn harness(issued: u64) -> Harness {
    let (tx, out) = queue::channel(1024, queue::QUEUE_BYTES);
    let observer = Arc::new(Observer::new());
    let session = AgentSession::new(
        "acme".into(),
        AgentIdentity {
            instance: "agent-0".into(),
            version: "test".into(),
            holds_token: false,
        },
        settings(),
        tx,
        Control::new(),
        CancellationToken::new(),
        observer.clone(),
    );
    let registry = Arc::new(Registry::default());
    registry.add(session.clone());
    let heads = (0..issued)
        .map(|_| {
            let (id, rx, _credit) = session.register();
            (id, rx)
        })
        .collect();
    Harness {
        session,
        registry,
        observer,
        heads,
        _out: out,
    }
}

fn violations_metric(o: &Observer) -> u64 {
    let text = o.render(&Gauges {
        connections: vec![("acme".into(), "agent")],
        agents: Default::default(),
        in_flight: Default::default(),
    });
    text.lines()
        .find_map(|l| l.strip_prefix("gitproxy_protocol_violations_total{connection=\"acme\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Pending entries are only issued ids, and no body buffers more than the
/// window.
fn check_bounds(s: &AgentSession) {
    let window = s.settings.flow.window_bytes as usize;
    let map = s.lock();
    assert!(map.len() as u64 <= ISSUED);
    for (id, p) in map.iter() {
        assert!(
            (1..=ISSUED).contains(id),
            "pending id {id} was never issued"
        );
        if let Some(b) = &p.body {
            assert!(b.buffered() <= window, "{} buffered", b.buffered());
        }
    }
}

#[derive(Debug, PartialEq)]
enum BodyState {
    Open,
    Ended,
    Failed(ErrorCode),
}

/// Reads what is buffered without waiting.
fn drain_body(b: &mut BodyReceiver) -> BodyState {
    loop {
        match b.frame().now_or_never() {
            None => return BodyState::Open,
            Some(None) => return BodyState::Ended,
            Some(Some(Ok(_))) => continue,
            Some(Some(Err(e))) => return BodyState::Failed(e.error),
        }
    }
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=ISSUED,
        1 => Just(0u64),
        1 => (ISSUED + 1)..1_000,
        1 => Just(u64::MAX),
    ]
}

fn status() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 200u32..600,
        1 => 0u32..200,
        1 => 600u32..1_100,
        1 => any::<u32>(),
    ]
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    prop_oneof![
        6 => proptest::collection::vec(
            ("[a-z-]{1,12}|.{0,6}", proptest::collection::vec(any::<u8>(), 0..24))
                .prop_map(|(name, value)| Header { name, value }),
            0..8,
        ),
        // Small in bytes, huge in count: once a panic in `HeaderMap`.
        1 => prop_oneof![MAX_HEADER_COUNT - 2..MAX_HEADER_COUNT + 40, 30_000usize..33_000].prop_map(|n| {
            (0..n)
                .map(|_| Header {
                    name: "x".into(),
                    value: vec![],
                })
                .collect()
        }),
        1 => Just(vec![Header {
            name: "content-length".into(),
            value: b"18446744073709551616".to_vec(),
        }]),
    ]
}

fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..4_096, 2 => 60_000usize..70_000]
}

fn code() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("upstream_unreachable".to_string()),
        Just("timeout".to_string()),
        Just("agent_disconnected".to_string()),
        Just("unauthorized".to_string()),
        ".{0,16}",
    ]
}

fn frame() -> impl Strategy<Value = AgentMessage> {
    let m = prop_oneof![
        4 => (id(), status(), headers(), any::<bool>(), prop_oneof![3 => Just(0usize), 1 => data_len()]).prop_map(|(id, status, headers, end_of_stream, n)| {
            // Sometimes a whole body in the head (`inline-body-v1`), legal or not.
            In::ResponseHead(ResponseHead { id, status, headers, end_of_stream, body: Bytes::from(vec![7u8; n]) })
        }),
        6 => (id(), data_len()).prop_map(|(id, n)| In::Data(Data { id, data: Bytes::from(vec![7u8; n]) })),
        2 => id().prop_map(|id| In::End(End { id })),
        2 => (id(), code(), ".{0,40}", ".{0,40}").prop_map(|(id, code, message, hint)| {
            In::Error(ErrorFrame { id, code, message, hint })
        }),
        2 => (id(), any::<u32>()).prop_map(|(id, bytes)| In::Credit(gitproxy_proto::v1::Credit { id, bytes })),
        1 => any::<u64>().prop_map(|nonce| In::Ping(Ping { nonce })),
        1 => any::<u64>().prop_map(|nonce| In::Pong(Pong { nonce })),
        1 => ".{0,40}".prop_map(|reason| In::Drain(Drain { reason })),
        1 => Just(In::Hello(Hello::default())),
    ];
    prop_oneof![20 => m.prop_map(|m| AgentMessage { msg: Some(m) }), 1 => Just(AgentMessage { msg: None })]
}

/// A frame for an id the session never issued.
fn bogus_frame() -> impl Strategy<Value = AgentMessage> {
    let bogus_id = prop_oneof![Just(0u64), (ISSUED + 1)..u64::MAX];
    (bogus_id, 0..5u8).prop_map(|(id, kind)| {
        let m = match kind {
            0 => In::Data(Data {
                id,
                data: Bytes::from_static(b"x"),
            }),
            1 => In::End(End { id }),
            2 => In::ResponseHead(ResponseHead {
                id,
                status: 200,
                headers: vec![],
                end_of_stream: false,
                body: Bytes::new(),
            }),
            3 => In::Error(ErrorFrame {
                id,
                code: "internal".into(),
                message: String::new(),
                hint: String::new(),
            }),
            _ => In::Credit(gitproxy_proto::v1::Credit { id, bytes: 1 }),
        };
        AgentMessage { msg: Some(m) }
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Feeds `frames`, checking the bounds after each; returns the index of
/// the frame that ended the session, if one did.
fn feed(h: &Harness, frames: Vec<AgentMessage>) -> Option<usize> {
    for (i, f) in frames.into_iter().enumerate() {
        let flow = h.session.dispatch(f);
        check_bounds(&h.session);
        if flow.is_break() {
            return Some(i);
        }
    }
    None
}

/// Every request has a defined outcome now (answered with a valid head,
/// failed with a named code, or still pending here), and once the session
/// ends none is left waiting.
fn check_outcomes(h: Harness) {
    let mut bodies = Vec::new();
    let mut heads = Vec::new();
    for (id, mut rx) in h.heads {
        match rx.try_recv() {
            Ok(Ok(a)) => {
                assert!((200..=599).contains(&a.status), "status {}", a.status);
                assert!(a.headers.len() <= MAX_HEADER_COUNT);
                if let Some(mut b) = a.body {
                    if drain_body(&mut b) == BodyState::Open {
                        assert!(h.session.lock().contains_key(&id), "open body, no entry");
                    }
                    bodies.push(b);
                }
            }
            Ok(Err(e)) => assert!(
                AGENT_CODES.contains(&e.error),
                "request {id} failed with {:?}",
                e.error
            ),
            Err(oneshot::error::TryRecvError::Empty) => {
                assert!(h.session.lock().contains_key(&id), "waiting, no entry");
                heads.push(rx);
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                panic!("request {id} was dropped without an answer")
            }
        }
    }
    h.session.end(&h.registry, "test over");
    assert!(h.registry.pick("acme").is_none());
    for mut rx in heads {
        let e = rx.try_recv().expect("a head after the end").unwrap_err();
        assert_eq!(e.error, ErrorCode::AgentDisconnected);
    }
    for mut b in bodies {
        assert_ne!(drain_body(&mut b), BodyState::Open, "a body left open");
    }
    assert!(h.session.lock().is_empty());
}

proptest! {
    #[test]
    fn prop_any_frame_sequence_is_handled(frames in proptest::collection::vec(frame(), 0..120)) {
        rt().block_on(async {
            let h = harness(ISSUED);
            let ended = feed(&h, frames);
            let total = h.session.violations.total();
            prop_assert_eq!(violations_metric(&h.observer), u64::from(total));
            prop_assert!(total <= MAX_PROTOCOL_VIOLATIONS);
            prop_assert_eq!(ended.is_some(), total == MAX_PROTOCOL_VIOLATIONS);
            check_outcomes(h);
            Ok(())
        })?;
    }

    #[test]
    fn prop_frames_for_never_issued_ids_end_the_session_at_the_limit(
        frames in proptest::collection::vec(bogus_frame(), 0..(2 * MAX_PROTOCOL_VIOLATIONS as usize))
    ) {
        rt().block_on(async {
            let h = harness(ISSUED);
            let n = frames.len();
            let ended = feed(&h, frames);
            let limit = MAX_PROTOCOL_VIOLATIONS as usize;
            if n >= limit {
                prop_assert_eq!(ended, Some(limit - 1));
            } else {
                prop_assert_eq!(ended, None);
            }
            prop_assert_eq!(violations_metric(&h.observer), n.min(limit) as u64);
            // The requests themselves were not touched.
            prop_assert_eq!(h.session.lock().len() as u64, ISSUED);
            Ok(())
        })?;
    }

    #[test]
    fn prop_arbitrary_bytes_decode_and_dispatch_without_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        seed in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        rt().block_on(async {
            let h = harness(ISSUED);
            if let Ok(m) = AgentMessage::decode(&bytes[..]) {
                let _ = h.session.dispatch(m);
            }
            // A valid frame with a few bytes changed.
            let mut enc = seed.encode_to_vec();
            if !enc.is_empty() {
                for (i, b) in flips {
                    let i = i.index(enc.len());
                    enc[i] = b;
                }
            }
            if let Ok(m) = AgentMessage::decode(&enc[..]) {
                let _ = h.session.dispatch(m);
            }
            check_bounds(&h.session);
            check_outcomes(h);
            Ok::<(), TestCaseError>(())
        })?;
    }
}

/// A session task that is aborted or panics still leaves the registry and
/// fails its pending requests (the zombie of issue 10).
#[tokio::test]
async fn a_session_task_that_dies_leaves_no_zombie() {
    for panics in [false, true] {
        let h = harness(2);
        let (session, registry, observer) =
            (h.session.clone(), h.registry.clone(), h.observer.clone());
        let task = if panics {
            let inbound = futures::stream::poll_fn(
                |_| -> std::task::Poll<Option<Result<AgentMessage, tonic::Status>>> {
                    panic!("a bug in the dispatcher")
                },
            );
            tokio::spawn(session.clone().run(inbound, registry.clone()))
        } else {
            let inbound = futures::stream::pending::<Result<AgentMessage, tonic::Status>>();
            tokio::spawn(session.clone().run(inbound, registry.clone()))
        };
        if !panics {
            tokio::task::yield_now().await;
            task.abort();
        }
        let e = task.await.unwrap_err();
        assert_eq!(e.is_panic(), panics);
        assert!(session.is_closed());
        assert!(
            registry.pick("acme").is_none(),
            "a dead session is still picked"
        );
        for (_, rx) in h.heads {
            let err = rx.await.expect("an answer").unwrap_err();
            assert_eq!(err.error, ErrorCode::AgentDisconnected);
        }
        let text = observer.render(&Gauges {
            connections: vec![("acme".into(), "agent")],
            agents: Default::default(),
            in_flight: Default::default(),
        });
        assert!(text.contains("gitproxy_agent_disconnections_total{connection=\"acme\"} 1"));
    }
}

/// The retry of a request picks another session, never the one that failed.
#[test]
fn pick_excluding_skips_the_sessions_tried() {
    let a = harness(0);
    let b = harness(0);
    let registry = Registry::default();
    registry.add(a.session.clone());
    registry.add(b.session.clone());
    for _ in 0..4 {
        let first = registry.pick("acme").expect("a session");
        let other = registry
            .pick_excluding("acme", std::slice::from_ref(&first))
            .expect("another session");
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(registry
            .pick_excluding("acme", &[first.clone(), other.clone()])
            .is_none());
    }
}
