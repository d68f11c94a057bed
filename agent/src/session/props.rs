//! Property tests of the agent's dispatcher (`Reader`), in process: a
//! `Shared` over in-memory channels whose started requests are held instead
//! of replayed against GitLab, then any sequence of broker frames — heads
//! with random ids, methods and paths, data of random sizes, ends, cancels,
//! credits, pings, drains, second Welcomes, unknown kinds, and bytes that
//! merely decode as frames. Whatever comes: no panic, memory bounded by the
//! window, every request with a defined outcome (live here, or answered
//! with an Error frame), and the stream ended exactly at the violation
//! limit.

use super::handshake::check_welcome;
use super::reader::{Dispatch, Reader};
use super::*;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, broker_message::Msg as In, AgentMessage, BrokerMessage, Cancel,
    Credit, Drain, Ping, Pong, RequestHead, Welcome,
};
use gitproxy_proto::v1::{Data, End};
use gitproxy_shared::errors::ErrorCode;
use gitproxy_shared::sanitize;
use gitproxy_shared::tunnel::body::BodyReceiver;
use gitproxy_shared::tunnel::limits::MAX_PROTOCOL_VIOLATIONS;
use gitproxy_shared::tunnel::outbound::Control;
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::upstream::UpstreamConfig;
use http_body_util_lite::frame_now;
use proptest::prelude::*;
use prost::Message;
use std::collections::HashMap;
use tokio::sync::Notify;

mod http_body_util_lite {
    use gitproxy_shared::tunnel::body::BodyReceiver;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// One frame of `b` if ready now: `None` when it would wait.
    pub fn frame_now(
        b: &mut BodyReceiver,
    ) -> Option<Option<Result<http_body::Frame<bytes::Bytes>, gitproxy_shared::GitproxyError>>>
    {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match http_body::Body::poll_frame(Pin::new(b), &mut cx) {
            Poll::Ready(f) => Some(f),
            Poll::Pending => None,
        }
    }
}

struct Harness {
    reader: Reader,
    out: queue::Receiver<AgentMessage>,
    /// Ids the broker cancelled (a defined outcome without an answer).
    cancelled: std::collections::BTreeSet<u64>,
}

/// The configuration and GitLab client every case shares: building them
/// (clap, trust stores) costs far more than a case, and no case changes them.
pub(super) fn shared_parts() -> (Arc<crate::config::AgentConfig>, Upstream) {
    static PARTS: std::sync::OnceLock<(Arc<crate::config::AgentConfig>, Upstream)> =
        std::sync::OnceLock::new();
    PARTS
        .get_or_init(|| {
            gitproxy_shared::tls::install_default_provider();
            let cfg = crate::config::AgentConfig::from_args(crate::config::RunArgs {
                broker_url: Some("http://127.0.0.1:9".into()),
                access_key: Some("k".into()),
                ..crate::config::RunArgs::default()
            })
            .expect("config");
            let upstream = Upstream::new(UpstreamConfig {
                base_url: url::Url::parse("http://127.0.0.1:9").expect("url"),
                extra_ca_pem: vec![],
                proxy: Default::default(),
                connect_timeout: Duration::from_secs(1),
                policy: Default::default(),
            })
            .expect("upstream");
            (Arc::new(cfg), upstream)
        })
        .clone()
}

fn harness() -> Harness {
    let (cfg, upstream) = shared_parts();
    // Room for every Error frame a case can make, so none is spawned.
    let (tx, out) = queue::channel(4096, queue::QUEUE_BYTES);
    let shared = Arc::new(Shared {
        cfg,
        upstream,
        tx,
        broker_flow: FlowSettings::default(),
        inline_bodies: true,
        metrics: Default::default(),
        control: Control::new(),
        inflight: Mutex::new(HashMap::new()),
        idle: Notify::new(),
    });
    let mut reader = Reader::new(shared, CancellationToken::new());
    reader.held = Some(Vec::new());
    Harness {
        reader,
        out,
        cancelled: Default::default(),
    }
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 1u64..=8, 1 => Just(0u64), 1 => 9u64..1_000, 1 => Just(u64::MAX)]
}

fn data_len() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..4_096, 2 => 60_000usize..70_000]
}

fn frame() -> impl Strategy<Value = BrokerMessage> {
    let path = prop_oneof![
        Just("/api/v4/version".to_string()),
        Just("/g/p.git/git-upload-pack".to_string()),
        Just("/../etc/passwd".to_string()),
        Just("/admin/users".to_string()),
        ".{0,40}",
    ];
    let method = prop_oneof![
        Just("GET".to_string()),
        Just("POST".to_string()),
        Just("CONNECT".to_string()),
        ".{0,12}",
    ];
    let m = prop_oneof![
        4 => (id(), method, path, any::<bool>(), proptest::option::of(any::<u64>()), prop_oneof![3 => Just(0usize), 1 => 0usize..70_000]).prop_map(
            // Sometimes a whole body in the head (`inline-body-v1`), legal or not.
            |(id, method, path, end_of_stream, content_length, n)| In::RequestHead(RequestHead {
                id,
                method,
                path,
                headers: vec![],
                timeout_ms: 1_000,
                end_of_stream,
                content_length,
                body: bytes::Bytes::from(vec![7u8; n]),
            })
        ),
        6 => (id(), data_len()).prop_map(|(id, n)| In::Data(Data { id, data: bytes::Bytes::from(vec![3u8; n]) })),
        2 => id().prop_map(|id| In::End(End { id })),
        2 => id().prop_map(|id| In::Cancel(Cancel { id })),
        2 => (id(), any::<u32>()).prop_map(|(id, bytes)| In::Credit(Credit { id, bytes })),
        1 => any::<u64>().prop_map(|nonce| In::Ping(Ping { nonce })),
        1 => any::<u64>().prop_map(|nonce| In::Pong(Pong { nonce })),
        1 => ".{0,300}".prop_map(|reason| In::Drain(Drain { reason })),
        1 => Just(In::Welcome(Welcome::default())),
    ];
    prop_oneof![20 => m.prop_map(|m| BrokerMessage { msg: Some(m) }), 1 => Just(BrokerMessage { msg: None })]
}

/// A frame for an id the broker never sent (above every id used).
fn bogus_frame() -> impl Strategy<Value = BrokerMessage> {
    ((1u64 << 40)..u64::MAX, 0..3u8).prop_map(|(id, kind)| {
        let m = match kind {
            0 => In::Data(Data {
                id,
                data: bytes::Bytes::from_static(b"x"),
            }),
            1 => In::End(End { id }),
            _ => In::Credit(Credit { id, bytes: 1 }),
        };
        BrokerMessage { msg: Some(m) }
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Live requests are ids that were started, and no body buffers more than
/// the window.
fn check_bounds(h: &Harness) {
    let window = h.reader.shared.cfg.flow.window_bytes as usize;
    let started: Vec<u64> = h
        .reader
        .held
        .as_ref()
        .map(|v| v.iter().map(|(head, _)| head.id).collect())
        .unwrap_or_default();
    for (id, e) in h.reader.shared.lock().iter() {
        assert!(started.contains(id), "live id {id} never started");
        if let Some(b) = &e.body {
            assert!(b.buffered() <= window, "{} buffered", b.buffered());
        }
    }
}

fn feed(h: &mut Harness, frames: Vec<BrokerMessage>) -> Option<usize> {
    for (i, f) in frames.into_iter().enumerate() {
        if let Some(In::Cancel(c)) = &f.msg {
            h.cancelled.insert(c.id);
        }
        let d = h.reader.dispatch(f);
        check_bounds(h);
        if let Dispatch::Drain(r) = &d {
            assert!(r.len() <= sanitize::MAX_REASON_BYTES);
            assert!(!r.chars().any(sanitize::is_unsafe));
        }
        if matches!(d, Dispatch::End(_)) {
            return Some(i);
        }
    }
    None
}

/// Every request head the dispatcher accepted is live here (its body open,
/// ended or failed, never waiting on a dead sender), was answered with an
/// Error frame, or was cancelled by the broker; every Error frame names a
/// product code.
fn check_outcomes(mut h: Harness) {
    let mut answered = std::collections::BTreeSet::new();
    while let Ok(m) = h.out.try_recv() {
        if let Some(Out::Error(e)) = m.msg {
            assert!(
                ErrorCode::ALL.iter().any(|c| c.as_str() == e.code),
                "{}",
                e.code
            );
            answered.insert(e.id);
        }
    }
    let live: Vec<u64> = h.reader.shared.lock().keys().copied().collect();
    let held = h.reader.held.take().unwrap_or_default();
    for (head, body) in held {
        let id = head.id;
        assert!(
            live.contains(&id) || answered.contains(&id) || h.cancelled.contains(&id),
            "request {id} has no outcome"
        );
        if let Some(mut b) = body {
            drain(&mut b, live.contains(&id));
        }
    }
}

/// Reads what is buffered; a body whose request is no longer live must not
/// be left waiting for data that cannot come.
fn drain(b: &mut BodyReceiver, live: bool) {
    loop {
        match frame_now(b) {
            Some(Some(Ok(_))) => continue,
            Some(_) => return,
            None => {
                assert!(live, "a body left waiting after its request ended");
                return;
            }
        }
    }
}

proptest! {
    #[test]
    fn prop_any_frame_sequence_is_handled(frames in proptest::collection::vec(frame(), 0..120)) {
        rt().block_on(async {
            let mut h = harness();
            let ended = feed(&mut h, frames);
            let total = h.reader.violations.total();
            prop_assert!(total <= MAX_PROTOCOL_VIOLATIONS);
            prop_assert_eq!(ended.is_some(), total == MAX_PROTOCOL_VIOLATIONS);
            check_outcomes(h);
            Ok(())
        })?;
    }

    #[test]
    fn prop_frames_for_never_sent_ids_end_the_stream_at_the_limit(
        frames in proptest::collection::vec(bogus_frame(), 0..(2 * MAX_PROTOCOL_VIOLATIONS as usize))
    ) {
        rt().block_on(async {
            let mut h = harness();
            let n = frames.len();
            let ended = feed(&mut h, frames);
            let limit = MAX_PROTOCOL_VIOLATIONS as usize;
            prop_assert_eq!(ended, (n >= limit).then(|| limit - 1));
            // Nothing is answered for ids the broker never sent.
            prop_assert!(h.out.try_recv().is_err());
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
            let mut h = harness();
            if let Ok(m) = BrokerMessage::decode(&bytes[..]) {
                let _ = h.reader.dispatch(m);
            }
            let mut enc = seed.encode_to_vec();
            if !enc.is_empty() {
                for (i, b) in flips {
                    let i = i.index(enc.len());
                    enc[i] = b;
                }
            }
            if let Ok(m) = BrokerMessage::decode(&enc[..]) {
                let _ = h.reader.dispatch(m);
            }
            check_bounds(&h);
            check_outcomes(h);
            Ok::<(), TestCaseError>(())
        })?;
    }
}

/// A hostile Welcome (control characters in the URL, a bogus connection id)
/// is refused before anything logs it or sends requests by it.
#[test]
fn hostile_welcomes_are_refused() {
    let ok = Welcome {
        connection_id: "acme".into(),
        gitlab_url: "http://gitlab.corp".into(),
        window_bytes: 512 * 1024,
        min_frame_cost: 1024,
        max_chunk_bytes: 64 * 1024,
        heartbeat_interval_ms: 15_000,
        heartbeat_timeout_ms: 40_000,
        capabilities: vec![],
    };
    assert!(check_welcome(&ok).is_ok());
    for (id, url) in [
        ("acme\nFORGED", "http://gitlab.corp"),
        ("", "http://gitlab.corp"),
        ("acme", "http://gitlab\n.corp"),
        ("acme", "http://gitlab.corp/\x1b[31m"),
    ] {
        let w = Welcome {
            connection_id: id.into(),
            gitlab_url: url.into(),
            ..ok.clone()
        };
        assert!(check_welcome(&w).is_err(), "{id:?} {url:?}");
    }
    let w = Welcome {
        gitlab_url: format!("http://gitlab.corp/{}", "a".repeat(5000)),
        ..ok
    };
    assert!(check_welcome(&w).is_err());
}

/// A policy refusal of a broker's request logs its method and path cleaned,
/// and answers `blocked_by_policy`.
#[test]
fn refused_requests_are_answered() {
    rt().block_on(async {
        let mut h = harness();
        let d = h.reader.dispatch(BrokerMessage {
            msg: Some(In::RequestHead(RequestHead {
                id: 1,
                method: "GET\n\x1b[31m".into(),
                path: "/admin/\nusers".into(),
                headers: vec![],
                timeout_ms: 0,
                end_of_stream: true,
                content_length: None,
                body: Default::default(),
            })),
        });
        assert_eq!(d, Dispatch::Continue);
        match h.out.try_recv().map(|m| m.msg) {
            Ok(Some(Out::Error(e))) => assert_eq!(e.code, "blocked_by_policy"),
            other => panic!("{other:?}"),
        }
    });
}
