//! A fake broker: a tonic server speaking the real tunnel protocol, played
//! from a script per session, to see what the real agent does with whatever
//! a broker (possibly a hostile one) sends it.
//!
//! Session `n` (0-based, counted over every `Connect` call) plays script `n`,
//! or the last script once they run out: a Welcome naming `gitlab_url`, then
//! the request heads, then the stream stays open, or ends once the agent has
//! answered `close_after` requests. Every frame the agent sends comes out of
//! [`FakeBroker::next`] with its session number.

use gitproxy_proto::v1::tunnel_server::{Tunnel, TunnelServer};
use gitproxy_proto::v1::{
    agent_message, broker_message, AgentMessage, BrokerMessage, RequestHead, Welcome,
};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// What the fake broker does in one session.
#[derive(Debug, Clone)]
pub struct Script {
    /// The GitLab URL of the Welcome.
    pub gitlab_url: String,
    /// Requests sent right after the Welcome.
    pub heads: Vec<RequestHead>,
    /// End the stream once the agent answered this many requests
    /// (response heads or errors); `Some(0)` ends it after the Welcome.
    pub close_after: Option<usize>,
}

impl Script {
    /// A session that sends `heads` and stays open.
    pub fn new(gitlab_url: &str, heads: Vec<RequestHead>) -> Script {
        Script {
            gitlab_url: gitlab_url.into(),
            heads,
            close_after: None,
        }
    }

    /// Ends the stream after `n` answers.
    pub fn close_after(mut self, n: usize) -> Script {
        self.close_after = Some(n);
        self
    }
}

/// A `GET`-like request head without a body.
pub fn head(id: u64, method: &str, path: &str) -> RequestHead {
    RequestHead {
        id,
        method: method.into(),
        path: path.into(),
        headers: vec![],
        timeout_ms: 10_000,
        end_of_stream: true,
        content_length: None,
        body: Default::default(),
    }
}

struct Service {
    scripts: Vec<Script>,
    sessions: AtomicUsize,
    seen: mpsc::Sender<(usize, AgentMessage)>,
}

type Out = Pin<Box<dyn futures::Stream<Item = Result<BrokerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Tunnel for Service {
    type ConnectStream = Out;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Out>, Status> {
        let n = self.sessions.fetch_add(1, Ordering::SeqCst);
        let script = self
            .scripts
            .get(n)
            .or(self.scripts.last())
            .cloned()
            .ok_or_else(|| Status::unavailable("no script"))?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let welcome = Welcome {
            connection_id: "acme".into(),
            gitlab_url: script.gitlab_url.clone(),
            window_bytes: 512 * 1024,
            min_frame_cost: 1024,
            max_chunk_bytes: 64 * 1024,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 40_000,
            // A broker from before `inline-body-v1`: answers come as head,
            // Data and End.
            capabilities: vec![],
        };
        let mut frames = vec![broker_message::Msg::Welcome(welcome)];
        frames.extend(
            script
                .heads
                .iter()
                .cloned()
                .map(broker_message::Msg::RequestHead),
        );
        for f in frames {
            tx.send(Ok(BrokerMessage { msg: Some(f) }))
                .await
                .map_err(|_| Status::internal("queue closed"))?;
        }
        let mut tx = (script.close_after != Some(0)).then_some(tx);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let mut answers = 0;
            while let Ok(Some(m)) = inbound.message().await {
                let answer = matches!(
                    m.msg,
                    Some(agent_message::Msg::ResponseHead(_)) | Some(agent_message::Msg::Error(_))
                );
                let _ = seen.send((n, m)).await;
                if answer {
                    answers += 1;
                    if Some(answers) == script.close_after {
                        tx = None;
                    }
                }
            }
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A running fake broker; stops when dropped.
pub struct FakeBroker {
    /// Its address.
    pub addr: SocketAddr,
    seen: mpsc::Receiver<(usize, AgentMessage)>,
    stop: CancellationToken,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeBroker {
    /// Starts on an ephemeral port.
    pub async fn start(scripts: Vec<Script>) -> FakeBroker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, seen) = mpsc::channel(256);
        let service = Arc::new(Service {
            scripts,
            sessions: AtomicUsize::new(0),
            seen: seen_tx,
        });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TunnelServer::from_arc(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { stopped.cancelled().await },
                ),
        );
        FakeBroker { addr, seen, stop }
    }

    /// `http://addr` for the agent.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next frame from the agent and its session number, or `None` when
    /// nothing came within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(usize, AgentMessage)> {
        tokio::time::timeout(timeout, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the agent's answer (response head or error) to request `id`
    /// of session `session`; other frames are skipped. `None` on timeout.
    pub async fn answer(
        &mut self,
        session: usize,
        id: u64,
        timeout: Duration,
    ) -> Option<agent_message::Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (n, m) = self.next(left).await?;
            match m.msg {
                Some(agent_message::Msg::ResponseHead(h)) if n == session && h.id == id => {
                    return Some(agent_message::Msg::ResponseHead(h))
                }
                Some(agent_message::Msg::Error(e)) if n == session && e.id == id => {
                    return Some(agent_message::Msg::Error(e))
                }
                _ => {}
            }
        }
    }
}
