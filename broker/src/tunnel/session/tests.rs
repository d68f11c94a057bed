//! The broker's dispatcher against a fake agent, in process, on tokio's
//! paused clock: the real session task (`run`) reads frames the test sends
//! and the test reads what the broker sends (data queue and control table,
//! through the same `Outbound` the tunnel uses). Every protocol violation
//! gives its documented outcome (the request ends with `protocol_error`, a
//! `Cancel` goes to the agent, one violation is counted, the stream and the
//! other requests go on); late frames are ignored; silence ends the session;
//! and many interleaved requests get exactly their bytes, both ways.

use super::*;
use crate::tunnel::registry::Registry;
use futures::channel::mpsc as fmpsc;
use futures::{FutureExt, StreamExt};
use gitproxy_proto::v1::{agent_message::Msg as In, AgentMessage, Data, End, Header, ResponseHead};
use gitproxy_shared::tunnel::outbound::Outbound;
use http_body_util::{BodyExt, Full};
use tokio::task::JoinHandle;

type Reply = Result<(Answer, RequestGuard), GitproxyError>;

/// A fake agent on one session.
struct Peer {
    session: Arc<AgentSession>,
    to_broker: fmpsc::UnboundedSender<Result<AgentMessage, tonic::Status>>,
    from_broker: Outbound<Box<BrokerMessage>>,
    /// Frames read while looking for a request's head.
    stash: std::collections::VecDeque<Out>,
    task: JoinHandle<String>,
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

fn peer() -> Peer {
    peer_with(settings())
}

fn peer_with(settings: SessionSettings) -> Peer {
    let (tx, rx) = queue::channel(1024, queue::QUEUE_BYTES);
    let control = Control::new();
    let session = AgentSession::new(
        "acme".into(),
        AgentIdentity {
            instance: "agent-0".into(),
            version: "test".into(),
            holds_token: false,
        },
        settings,
        tx,
        control.clone(),
        CancellationToken::new(),
        Arc::new(Observer::new()),
    );
    let registry = Arc::new(Registry::default());
    registry.add(session.clone());
    let (to_broker, inbound) = fmpsc::unbounded();
    let task = tokio::spawn(session.clone().run(inbound, registry));
    Peer {
        session,
        to_broker,
        from_broker: Outbound::new(control, rx, |c| Box::new(control_to_msg(c))),
        stash: Default::default(),
        task,
    }
}

impl Peer {
    fn send(&self, m: In) {
        self.to_broker
            .unbounded_send(Ok(AgentMessage { msg: Some(m) }))
            .expect("session alive");
    }

    /// The next frame from the broker, skipping pings.
    async fn next(&mut self) -> Out {
        match self.stash.pop_front() {
            Some(m) => m,
            None => self.recv().await,
        }
    }

    /// The next frame off the stream, skipping pings.
    async fn recv(&mut self) -> Out {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), self.from_broker.next())
                .await
                .expect("a frame from the broker")
                .expect("stream open");
            match m.msg {
                Some(Out::Ping(_)) => continue,
                Some(m) => return m,
                None => panic!("empty frame"),
            }
        }
    }

    /// Starts a request (body: `body`, of known length) and returns its id
    /// once its head reached the agent, with the caller's task.
    async fn request(&mut self, body: Option<&'static [u8]>) -> (u64, JoinHandle<Reply>) {
        let (h, task) = self
            .request_with(body.map(|b| Full::new(Bytes::from_static(b))))
            .await;
        (h.id, task)
    }

    /// Starts a request with `body` and returns its head as the agent got
    /// it, with the caller's task.
    async fn request_with<B>(&mut self, body: Option<B>) -> (RequestHead, JoinHandle<Reply>)
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let s = self.session.clone();
        let task = tokio::spawn(async move {
            let head = RequestHead {
                method: "GET".into(),
                path: "/api/v4/projects".into(),
                ..Default::default()
            };
            s.send_request(head, body, Duration::from_secs(600), Default::default())
                .await
        });
        loop {
            match self.recv().await {
                Out::RequestHead(h) => return (h, task),
                other => self.stash.push_back(other),
            }
        }
    }

    /// The next frame that is not a credit return (a body being read
    /// hands credit back).
    async fn next_but_credit(&mut self) -> Out {
        loop {
            match self.next().await {
                Out::Credit(_) => continue,
                m => return m,
            }
        }
    }

    fn violations(&self) -> u32 {
        self.session.violations.total()
    }

    /// `h` came without its body, which follows as one Data, then End.
    async fn expect_streamed(&mut self, h: &RequestHead, body: &'static [u8]) {
        assert!(!h.end_of_stream && h.body.is_empty(), "{h:?}");
        let id = h.id;
        let data = Bytes::from_static(body);
        assert_eq!(self.next().await, Out::Data(Data { id, data }));
        assert_eq!(self.next().await, Out::End(End { id }));
    }
}

fn head(id: u64, status: u32, end_of_stream: bool) -> In {
    In::ResponseHead(ResponseHead {
        id,
        status,
        headers: vec![],
        end_of_stream,
        body: Bytes::new(),
    })
}

/// A head carrying `n` bytes of body.
fn head_with_body(id: u64, end_of_stream: bool, n: usize) -> In {
    In::ResponseHead(ResponseHead {
        id,
        status: 200,
        headers: vec![],
        end_of_stream,
        body: Bytes::from(vec![7u8; n]),
    })
}

/// A body of unknown length (like a chunked upload): it streams.
fn streamed(
    b: &'static [u8],
) -> impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Unpin {
    let frames = vec![Ok(http_body::Frame::data(Bytes::from_static(b)))];
    http_body_util::StreamBody::new(futures::stream::iter(frames))
}

fn data(id: u64, n: usize, byte: u8) -> In {
    In::Data(Data {
        id,
        data: Bytes::from(vec![byte; n]),
    })
}

async fn failed_head(task: JoinHandle<Reply>) -> ErrorCode {
    match task.await.expect("caller task") {
        Err(e) => e.error,
        Ok((a, _)) => panic!("a head with status {}", a.status),
    }
}

/// The body to its end: the bytes, or the error code it failed with.
async fn read_body(b: BodyReceiver) -> Result<Vec<u8>, ErrorCode> {
    b.collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .map_err(|e| e.error)
}

/// A violation before the head fails the caller with `protocol_error` and
/// cancels the request at the agent.
#[tokio::test(start_paused = true)]
async fn violations_before_the_head_end_the_request() {
    let mut p = peer();
    let mut too_many = vec![];
    for i in 0..=gitproxy_shared::headers::MAX_HEADER_COUNT {
        too_many.push(Header {
            name: format!("x-h{i}"),
            value: b"v".to_vec(),
        });
    }
    let cases: Vec<(&str, In)> = vec![
        ("data before head", data(0, 10, 1)),
        ("end before head", In::End(End { id: 0 })),
        ("status 101", head(0, 101, true)),
        (
            "too many headers",
            In::ResponseHead(ResponseHead {
                id: 0,
                status: 200,
                headers: too_many,
                end_of_stream: true,
                body: Bytes::new(),
            }),
        ),
        ("inline body without the end", head_with_body(0, false, 3)),
        (
            "inline body above the largest chunk",
            head_with_body(
                0,
                true,
                FlowSettings::default().max_chunk_bytes as usize + 1,
            ),
        ),
    ];
    for (n, (what, mut frame)) in cases.into_iter().enumerate() {
        let (id, task) = p.request(None).await;
        match &mut frame {
            In::Data(d) => d.id = id,
            In::End(e) => e.id = id,
            In::ResponseHead(h) => h.id = id,
            _ => unreachable!(),
        }
        p.send(frame);
        assert_eq!(failed_head(task).await, ErrorCode::ProtocolError, "{what}");
        assert_eq!(p.next().await, Out::Cancel(Cancel { id }), "{what}");
        assert_eq!(p.violations(), n as u32 + 1, "{what}");
    }
    assert!(p.session.lock().is_empty());
    assert!(!p.session.is_closed());
}

/// A violation mid-body cuts that body with `protocol_error`; a request
/// beside it completes.
#[tokio::test(start_paused = true)]
async fn violations_mid_body_cut_the_body() {
    let mut p = peer();
    let window = FlowSettings::default().window_bytes as usize;
    let chunk = FlowSettings::default().max_chunk_bytes as usize;
    let cases: Vec<(&str, Vec<In>)> = vec![
        ("oversized frame", vec![data(0, chunk + 1, 1)]),
        (
            "beyond credit",
            (0..=window / chunk).map(|_| data(0, chunk, 1)).collect(),
        ),
        ("second head", vec![head(0, 200, false)]),
    ];
    let (bystander, bystander_task) = p.request(None).await;
    p.send(head(bystander, 200, false));
    let (mut by_answer, _by_guard) = bystander_task.await.unwrap().unwrap();
    let mut by_body = Vec::new();
    for (n, (what, frames)) in cases.into_iter().enumerate() {
        let (id, task) = p.request(None).await;
        p.send(head(id, 200, false));
        let (answer, _guard) = task.await.unwrap().expect(what);
        p.send(data(bystander, 3, n as u8));
        by_body.extend([n as u8; 3]);
        for mut f in frames {
            match &mut f {
                In::Data(d) => d.id = id,
                In::ResponseHead(h) => h.id = id,
                _ => unreachable!(),
            }
            p.send(f);
        }
        let body = answer.body.expect("a body");
        assert_eq!(
            read_body(body).await,
            Err(ErrorCode::ProtocolError),
            "{what}"
        );
        assert_eq!(
            p.next_but_credit().await,
            Out::Cancel(Cancel { id }),
            "{what}"
        );
        assert_eq!(p.violations(), n as u32 + 1, "{what}");
    }
    p.send(In::End(End { id: bystander }));
    let body = by_answer.body.take().expect("a body");
    assert_eq!(read_body(body).await, Ok(by_body));
}

/// A small answer whole in its head (`inline-body-v1`, which every Welcome
/// offers) reaches the caller as its whole body and a clean end, and the
/// request is over: a late Data for it is ignored.
#[tokio::test(start_paused = true)]
async fn a_whole_body_in_the_head_is_the_whole_answer() {
    let mut p = peer();
    let chunk = FlowSettings::default().max_chunk_bytes as usize;
    for n in [1, chunk] {
        let (id, task) = p.request(None).await;
        p.send(head_with_body(id, true, n));
        let (answer, _guard) = task.await.unwrap().unwrap();
        assert_eq!(answer.status, 200);
        let body = answer.body.expect("a body");
        assert_eq!(read_body(body).await, Ok(vec![7u8; n]));
        assert!(!p.session.lock().contains_key(&id));
        p.send(data(id, 5, 1));
    }
    let (id, task) = p.request(None).await;
    p.send(head(id, 204, true));
    assert!(task.await.unwrap().unwrap().0.body.is_none());
    assert_eq!(p.violations(), 0);
}

/// A small request body of known length goes whole in the head when the
/// agent offered `inline-body-v1`, and no Data or End follows; a body of
/// unknown length, or any body to an agent that did not offer it, streams.
#[tokio::test(start_paused = true)]
async fn a_small_request_body_goes_whole_in_the_head() {
    const UP: &[u8] = br#"{"branch":"fix"}"#;
    let mut p = peer();
    let (h, task) = p
        .request_with(Some(Full::new(Bytes::from_static(UP))))
        .await;
    assert!(h.end_of_stream, "{h:?}");
    assert_eq!(&h.body[..], UP);
    p.send(head(h.id, 201, true));
    assert_eq!(task.await.unwrap().unwrap().0.status, 201);
    // Nothing of the first request follows: the next frame is the next head.
    let (next, _task) = p.request_with(Some(streamed(UP))).await;
    p.expect_streamed(&next, UP).await;

    let mut old = peer_with(SessionSettings {
        agent_inline_bodies: false,
        ..settings()
    });
    let (h, _task) = old
        .request_with(Some(Full::new(Bytes::from_static(UP))))
        .await;
    old.expect_streamed(&h, UP).await;
}

/// Frames for ids never issued only count; frames for requests that
/// finished here (ended, cancelled by the caller) are ignored; a second
/// End is such a late frame.
#[tokio::test(start_paused = true)]
async fn unknown_and_late_ids() {
    let mut p = peer();
    let (id, task) = p.request(None).await;
    p.send(head(id, 204, true));
    let (answer, _guard) = task.await.unwrap().unwrap();
    assert_eq!(answer.status, 204);
    assert!(answer.body.is_none());
    // Late: the request already finished here.
    p.send(In::End(End { id }));
    p.send(data(id, 5, 1));
    // Cancelled by the caller (its guard dropped), then frames arrive.
    let (gone, task) = p.request(None).await;
    task.abort();
    assert_eq!(p.next().await, Out::Cancel(Cancel { id: gone }));
    p.send(head(gone, 200, false));
    p.send(data(gone, 5, 1));
    p.send(In::End(End { id: gone }));
    // Never issued.
    for bogus in [0, gone + 100, u64::MAX] {
        p.send(data(bogus, 5, 1));
    }
    // A request after all that still works, and only the bogus ids counted.
    let (id, task) = p.request(None).await;
    p.send(head(id, 200, true));
    assert_eq!(task.await.unwrap().unwrap().0.status, 200);
    assert_eq!(p.violations(), 3);
    assert!(!p.session.is_closed());
}

/// At the violation limit the stream ends and pending callers get
/// `agent_disconnected`.
#[tokio::test(start_paused = true)]
async fn too_many_violations_end_the_stream() {
    let mut p = peer();
    let (_, task) = p.request(None).await;
    let limit = p.session.violations.limit();
    for _ in 0..limit {
        p.send(data(u64::MAX, 1, 0));
    }
    let reason = p.task.await.unwrap();
    assert!(reason.contains("times (limit"), "{reason}");
    assert_eq!(failed_head(task).await, ErrorCode::AgentDisconnected);
    assert!(p.session.is_closed());
}

/// Silence past the heartbeat timeout ends the session (pings went out
/// meanwhile); any frame counts as a sign of life.
#[tokio::test(start_paused = true)]
async fn heartbeat_silence_ends_the_session() {
    let mut p = peer();
    let (_, task) = p.request(None).await;
    let started = tokio::time::Instant::now();
    // A pong now and then keeps it alive past the timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(30)).await; // paused clock: no real wait
        p.send(In::Pong(gitproxy_proto::v1::Pong { nonce: 0 }));
    }
    assert!(!p.session.is_closed());
    // ...silence does not.
    let reason = p.task.await.unwrap();
    assert!(reason.starts_with("no frame from the agent"), "{reason}");
    let silent = started.elapsed() - Duration::from_secs(90);
    assert!(silent >= Duration::from_secs(40) && silent <= Duration::from_secs(60));
    assert_eq!(failed_head(task).await, ErrorCode::AgentDisconnected);
    let mut pings = 0;
    while let Some(Some(m)) = p.from_broker.next().now_or_never() {
        pings += usize::from(matches!(m.msg, Some(Out::Ping(_))));
    }
    assert!(pings >= 5, "{pings} pings");
}

/// Many requests with bodies both ways, their frames interleaved: each
/// gets exactly its own bytes, in order.
#[tokio::test(start_paused = true)]
async fn interleaved_requests_get_their_bytes() {
    const N: usize = 24;
    const UP: &[u8] = b"request body bytes";
    let mut p = peer();
    let mut reqs = Vec::new();
    for _ in 0..N {
        let (h, task) = p.request_with(Some(streamed(UP))).await;
        reqs.push((h.id, task));
    }
    // Each request body arrives whole, then End.
    let mut up: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut ended = 0;
    while ended < N {
        match p.next().await {
            Out::Data(d) => up.entry(d.id).or_default().extend_from_slice(&d.data),
            Out::End(_) => ended += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(up.values().all(|b| b == UP) && up.len() == N);
    for (id, _) in &reqs {
        p.send(head(*id, 200, false));
    }
    let mut answers = Vec::new();
    for (id, task) in reqs {
        let (answer, guard) = task.await.unwrap().unwrap();
        answers.push((id, answer.body.expect("a body"), guard));
    }
    // Round-robin chunks: request i gets chunks of i+1 bytes of (id % 251).
    for round in 0..5u8 {
        for (i, (id, _, _)) in answers.iter().enumerate() {
            p.send(data(*id, i + 1, (*id % 251) as u8 ^ round));
        }
    }
    for (id, _, _) in &answers {
        p.send(In::End(End { id: *id }));
    }
    for (i, (id, body, _guard)) in answers.into_iter().enumerate() {
        let want: Vec<u8> = (0..5u8)
            .flat_map(|r| vec![(id % 251) as u8 ^ r; i + 1])
            .collect();
        assert_eq!(read_body(body).await, Ok(want), "request {id}");
    }
    assert_eq!(p.violations(), 0);
}
