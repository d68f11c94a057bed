//! What the dispatcher and the request tasks of one stream share: the live
//! requests, the outbound queue, and the Error frames that end a request.

use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use gitproxy_proto::v1::{
    agent_message::Msg as Out, AgentMessage, Credit, Error as ErrorFrame, Pong,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::tunnel::body::BodySender;
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::tunnel::frames::RequestState;
use gitproxy_shared::tunnel::outbound::{Control, ControlFrame};
use gitproxy_shared::tunnel::queue;
use gitproxy_shared::tunnel::FlowSettings;
use gitproxy_shared::upstream::Upstream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A request being served.
pub(super) struct Inflight {
    /// Where the broker's half stands (the frame rules' state).
    pub(super) state: RequestState,
    pub(super) body: Option<BodySender>,
    pub(super) credit: SendCredit,
    pub(super) cancel: CancellationToken,
}

/// State shared by the dispatcher and the request tasks of one stream.
pub(crate) struct Shared {
    pub(crate) cfg: Arc<AgentConfig>,
    pub(crate) upstream: Upstream,
    pub(crate) tx: queue::Sender<AgentMessage>,
    pub(crate) broker_flow: FlowSettings,
    /// The broker's Welcome offered `inline-body-v1`: a small answer may go
    /// whole in its head.
    pub(crate) inline_bodies: bool,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(super) control: Arc<Control>,
    pub(super) inflight: Mutex<HashMap<u64, Inflight>>,
    pub(super) idle: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Inflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a request task when it is done.
    pub(crate) fn finish(&self, id: u64) {
        let mut map = self.lock();
        map.remove(&id);
        if map.is_empty() {
            self.idle.notify_one();
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Sends an Error frame without making the dispatcher wait.
    pub(crate) fn reply_error(&self, id: u64, err: &GitproxyError) {
        let msg = error_frame(id, err);
        if let Err(TrySendError::Full(msg)) = self.tx.try_send(msg) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Ends request `id`, if it is live here, because the broker broke the
    /// protocol (the broker is told with an Error frame). Ids not live here
    /// get no answer: the broker never sent them, or is done with them.
    pub(super) fn protocol_error(&self, id: u64, what: &str) {
        let Some(e) = self.lock().remove(&id) else {
            return;
        };
        e.cancel.cancel();
        e.credit.close();
        self.reply_error(
            id,
            &GitproxyError::new(ErrorCode::ProtocolError, format!("protocol error: {what}")),
        );
    }
}

/// Wire form of an error.
pub(crate) fn error_frame(id: u64, err: &GitproxyError) -> AgentMessage {
    AgentMessage {
        msg: Some(Out::Error(ErrorFrame {
            id,
            code: err.error.as_str().to_string(),
            message: err.message.clone(),
            hint: err.hint.clone(),
        })),
    }
}

pub(super) fn control_to_msg(f: ControlFrame) -> AgentMessage {
    let msg = match f {
        ControlFrame::Credit { id, bytes } => Out::Credit(Credit { id, bytes }),
        ControlFrame::Pong(nonce) => Out::Pong(Pong { nonce }),
        // The agent ends requests with Error frames; a cancel here means the
        // same to the broker.
        ControlFrame::Cancel(id) => Out::Error(ErrorFrame {
            id,
            code: ErrorCode::Internal.as_str().into(),
            message: "cancelled by the agent".into(),
            hint: String::new(),
        }),
    };
    AgentMessage { msg: Some(msg) }
}
