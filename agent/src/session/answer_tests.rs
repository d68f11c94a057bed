//! How an answer leaves the agent, against a scripted HTTP server standing in
//! for GitLab: a small body of known length goes whole in the head (one frame)
//! when the broker offered `inline-body-v1`; anything else — no offer, an
//! unknown length (chunked), a body above the largest chunk — streams as head,
//! Data and End; and a body cut before its declared end is an Error before
//! any head, never a short answer.

use super::props::shared_parts;
use super::*;
use gitproxy_proto::v1::{agent_message::Msg as Out, RequestHead, ResponseHead};
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::upstream::UpstreamConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that answers every request with `answer`, then closes.
async fn scripted(answer: Vec<u8>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(&answer).await;
            });
        }
    });
    addr
}

/// The frames the agent sends for one GET answered by `answer`.
async fn frames(answer: Vec<u8>, inline_bodies: bool) -> Vec<Out> {
    let addr = scripted(answer).await;
    let (cfg, _) = shared_parts();
    let upstream = Upstream::new(UpstreamConfig {
        base_url: url::Url::parse(&format!("http://{addr}")).expect("url"),
        extra_ca_pem: vec![],
        proxy: Default::default(),
        connect_timeout: Duration::from_secs(5),
        policy: Default::default(),
    })
    .expect("upstream");
    let (tx, mut out) = queue::channel(4096, queue::QUEUE_BYTES);
    let shared = Arc::new(Shared {
        cfg,
        upstream,
        tx,
        broker_flow: FlowSettings::default(),
        inline_bodies,
        metrics: Default::default(),
        control: Control::new(),
        inflight: Mutex::new(Default::default()),
        idle: Default::default(),
    });
    let head = RequestHead {
        id: 1,
        method: "GET".into(),
        path: "/api/v4/projects".into(),
        end_of_stream: true,
        ..Default::default()
    };
    let credit = SendCredit::new(FlowSettings::default().window_bytes as usize);
    let serve = crate::request::serve(shared, head, None, credit, CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(10), serve)
        .await
        .expect("the request ends");
    let mut v = vec![];
    while let Ok(m) = out.try_recv() {
        v.push(m.msg.expect("a frame"));
    }
    v
}

fn ok(body: &[u8]) -> Vec<u8> {
    let mut a = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    a.extend_from_slice(body);
    a
}

/// Head, the body's bytes over Data frames, End: the streamed shape.
fn streamed(frames: &[Out]) -> Vec<u8> {
    let Some(Out::ResponseHead(h)) = frames.first() else {
        panic!("no head first: {frames:?}");
    };
    assert!(!h.end_of_stream && h.body.is_empty(), "{h:?}");
    assert!(matches!(frames.last(), Some(Out::End(_))), "{frames:?}");
    frames[1..frames.len() - 1]
        .iter()
        .flat_map(|f| match f {
            Out::Data(d) => d.data.to_vec(),
            other => panic!("not Data: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_small_answer_goes_whole_in_its_head() {
    let got = frames(ok(br#"[{"id":1}]"#), true).await;
    match &got[..] {
        [Out::ResponseHead(ResponseHead {
            status: 200,
            end_of_stream: true,
            body,
            headers,
            ..
        })] => {
            assert_eq!(&body[..], br#"[{"id":1}]"#);
            assert!(headers.iter().any(|h| h.name == "content-length"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn without_the_offer_the_answer_streams() {
    let got = frames(ok(b"{}"), false).await;
    assert_eq!(streamed(&got), b"{}");
}

#[tokio::test]
async fn an_unknown_length_streams() {
    let chunked =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let got = frames(chunked.to_vec(), true).await;
    assert_eq!(streamed(&got), b"{}");
}

#[tokio::test]
async fn a_body_above_the_largest_chunk_streams() {
    let big = vec![b'x'; FlowSettings::default().max_chunk_bytes as usize + 1];
    let got = frames(ok(&big), true).await;
    assert_eq!(streamed(&got), big);
}

#[tokio::test]
async fn a_cut_small_body_is_an_error_not_a_short_answer() {
    let cut = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\n{}".to_vec();
    let got = frames(cut, true).await;
    match &got[..] {
        [Out::Error(e)] => {
            assert_eq!(e.code, "upstream_unreachable", "{e:?}");
            assert!(e.message.contains("after 0 bytes"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
}
