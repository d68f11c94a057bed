//! Acceptance 8, agent side: the agent's policy holds even when a broker
//! sends forbidden requests. A fake broker (a tonic server speaking the real
//! protocol) drives the real agent binary.

use futures::StreamExt;
use gitproxy_integration_tests::harness::agent::Agent;
use gitproxy_integration_tests::harness::upstream::Upstream;
use gitproxy_integration_tests::harness::WAIT;
use gitproxy_proto::v1::tunnel_server::{Tunnel, TunnelServer};
use gitproxy_proto::v1::{
    agent_message, broker_message, AgentMessage, BrokerMessage, RequestHead, Welcome,
};
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

struct FakeBroker {
    gitlab_url: String,
    heads: Vec<RequestHead>,
    seen: mpsc::Sender<AgentMessage>,
}

type Out = Pin<Box<dyn futures::Stream<Item = Result<BrokerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Tunnel for FakeBroker {
    type ConnectStream = Out;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let welcome = Welcome {
            connection_id: "acme".into(),
            gitlab_url: self.gitlab_url.clone(),
            window_bytes: 512 * 1024,
            min_frame_cost: 1024,
            max_chunk_bytes: 64 * 1024,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 40_000,
            capabilities: vec![],
        };
        tx.send(BrokerMessage {
            msg: Some(broker_message::Msg::Welcome(welcome)),
        })
        .await
        .unwrap();
        for h in &self.heads {
            tx.send(BrokerMessage {
                msg: Some(broker_message::Msg::RequestHead(h.clone())),
            })
            .await
            .unwrap();
        }
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let _ = seen.send(m).await;
            }
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

fn head(id: u64, method: &str, path: &str) -> RequestHead {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_forbidden_requests_from_any_broker() {
    gitproxy_integration_tests::harness::init();
    let up = Upstream::start().await;
    let forbidden = [
        head(1, "GET", "/../../etc/passwd"),
        head(2, "GET", "/api/v4/%2e%2e/%2e%2e/etc/passwd"),
        head(3, "GET", &format!("http://{}/api/v4/version", up.addr)),
        head(4, "CONNECT", "/api/v4/version"),
        head(5, "TRACE", "/api/v4/version"),
        head(6, "GET", "/admin/users"),
        head(7, "GET", "//evil.example/api/v4/version"),
    ];
    let mut heads = forbidden.to_vec();
    heads.push(head(8, "GET", "/api/v4/version"));
    let (seen_tx, mut seen) = mpsc::channel(64);
    let fake = FakeBroker {
        gitlab_url: up.url(),
        heads,
        seen: seen_tx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TunnelServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let agent = Agent::spawn("agent-policy", &format!("http://{addr}"), "any-key", &[]);

    let mut refused = std::collections::BTreeSet::new();
    let mut allowed_status = None;
    tokio::time::timeout(WAIT, async {
        while refused.len() < forbidden.len() || allowed_status.is_none() {
            match seen.recv().await.expect("agent stream ended").msg {
                Some(agent_message::Msg::Error(e)) => {
                    assert_eq!(
                        e.code, "blocked_by_policy",
                        "request {} failed otherwise: {}",
                        e.id, e.message
                    );
                    refused.insert(e.id);
                }
                Some(agent_message::Msg::ResponseHead(h)) => {
                    assert_eq!(h.id, 8, "a forbidden request got an answer");
                    allowed_status = Some(h.status);
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the agent did not answer every request");
    assert_eq!(refused, (1..=7).collect());
    assert_eq!(allowed_status, Some(200));
    assert_eq!(
        up.requests(),
        vec![("GET".to_string(), "/api/v4/version".to_string())]
    );
    agent
        .proc
        .wait_for_nth(7, WAIT, |v| v["error"] == "blocked_by_policy")
        .await;
}
