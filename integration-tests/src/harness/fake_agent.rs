//! A fake agent: a tonic client of the real broker's agent listener that
//! speaks the real protocol frame by frame, so a test can play a hostile or
//! broken agent (oversized Hello, bogus ids, malformed heads) against the
//! real broker binary.

use gitproxy_proto::v1::tunnel_client::TunnelClient;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, broker_message::Msg as In, AgentMessage, BrokerMessage, Data, End,
    Hello, Pong, RequestHead, ResponseHead, Welcome,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::Streaming;

/// A connected fake agent.
pub struct FakeAgent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<BrokerMessage>,
    /// The broker's answer to the Hello.
    pub welcome: Welcome,
}

/// A well-formed Hello for `instance`.
pub fn hello(instance: &str) -> Hello {
    Hello {
        version: "0.1.0".into(),
        instance: instance.into(),
        capabilities: vec!["flow-control-v1".into(), "drain-v1".into()],
        pinned_gitlab_url: String::new(),
        holds_token: false,
        window_bytes: 512 * 1024,
    }
}

/// An `AgentMessage` holding `m`.
pub fn msg(m: Out) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// A ResponseHead frame.
pub fn response_head(id: u64, status: u32, headers: Vec<gitproxy_proto::v1::Header>) -> Out {
    Out::ResponseHead(ResponseHead {
        id,
        status,
        headers,
        end_of_stream: false,
        body: Default::default(),
    })
}

/// The frames of a complete `200 ok` answer to request `id`.
pub fn ok_answer(id: u64) -> Vec<Out> {
    vec![
        response_head(id, 200, vec![]),
        Out::Data(Data {
            id,
            data: bytes::Bytes::from_static(b"ok"),
        }),
        Out::End(End { id }),
    ]
}

impl FakeAgent {
    /// Dials `agent_addr` with `key` and sends `hello`; waits for Welcome.
    pub async fn connect(
        agent_addr: SocketAddr,
        key: &str,
        hello: Hello,
    ) -> Result<FakeAgent, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{agent_addr}"))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        FakeAgent::handshake(TunnelClient::new(channel), key, hello).await
    }

    /// Opens the `Connect` stream on an HTTP/2 connection already made
    /// (e.g. by the real agent's `gitproxy_agent::dial::over`) with `key`,
    /// sends `hello` and waits for Welcome.
    pub async fn handshake(
        client: TunnelClient<tonic::transport::Channel>,
        key: &str,
        hello: Hello,
    ) -> Result<FakeAgent, tonic::Status> {
        let mut client = client
            .max_decoding_message_size(4 << 20)
            .max_encoding_message_size(4 << 20);
        let (tx, rx) = mpsc::channel(1024);
        tx.send(msg(Out::Hello(hello)))
            .await
            .map_err(|_| tonic::Status::internal("queue"))?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        let auth = MetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| tonic::Status::internal("key"))?;
        req.metadata_mut().insert("authorization", auth);
        let mut inbound = client.connect(req).await?.into_inner();
        let welcome = match inbound.message().await? {
            Some(BrokerMessage {
                msg: Some(In::Welcome(w)),
            }) => w,
            other => return Err(tonic::Status::internal(format!("no Welcome: {other:?}"))),
        };
        Ok(FakeAgent {
            tx,
            inbound,
            welcome,
        })
    }

    /// Sends one frame; false once the stream is gone.
    pub async fn send(&self, m: Out) -> bool {
        self.tx.send(msg(m)).await.is_ok()
    }

    /// A sender for frames (e.g. to flood from another task).
    pub fn sender(&self) -> mpsc::Sender<AgentMessage> {
        self.tx.clone()
    }

    /// The next frame from the broker; `None` once the stream ended or broke.
    pub async fn next(&mut self) -> Option<BrokerMessage> {
        self.inbound.message().await.ok().flatten()
    }

    /// The next request head, answering pings on the way.
    pub async fn next_request(&mut self) -> Option<RequestHead> {
        loop {
            match self.next().await?.msg {
                Some(In::RequestHead(h)) => return Some(h),
                Some(In::Ping(p)) => {
                    self.send(Out::Pong(Pong { nonce: p.nonce })).await;
                }
                _ => {}
            }
        }
    }

    /// Waits until the broker ends the stream, reading (and dropping) what
    /// it sends meanwhile. True when it ended within `timeout`.
    pub async fn wait_ended(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async { while self.next().await.is_some() {} })
            .await
            .is_ok()
    }

    /// Serves every request head with the frames `answer(head, n)` returns
    /// (`n` counts heads from 0) and answers pings, in a task. Returns the
    /// number of heads seen so far and the task.
    pub fn serve<F>(mut self, mut answer: F) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
    where
        F: FnMut(&RequestHead, usize) -> Vec<Out> + Send + 'static,
    {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(h) = self.next_request().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                for m in answer(&h, n) {
                    if !self.send(m).await {
                        return;
                    }
                }
            }
        });
        (seen, task)
    }
}

/// Floods `tx` with `frames`, stopping when the stream is gone; returns how
/// many were queued.
pub async fn flood(tx: mpsc::Sender<AgentMessage>, frames: impl IntoIterator<Item = Out>) -> usize {
    let mut n = 0;
    for f in frames {
        if tx.send(msg(f)).await.is_err() {
            break;
        }
        n += 1;
    }
    n
}
