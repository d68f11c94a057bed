//! One request replayed against GitLab: build it from the head, stream the
//! body in (credit handed back as GitLab takes it), stream the answer out
//! within the broker's credit, filling in the request's record
//! (`record.rs`: one log line, the metrics). A
//! GitLab that stops sending mid-body for the body idle time ends the
//! request with `timeout`; time spent waiting for the broker's credit (a
//! slow caller) does not count.

use crate::record::RequestRecord;
use crate::session::{error_frame, Shared};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use gitproxy_proto::v1::{
    agent_message::Msg as Out, AgentMessage, Data, End, RequestHead, ResponseHead,
};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use gitproxy_shared::headers;
use gitproxy_shared::idle::{self, IdleTimeout};
use gitproxy_shared::sanitize;
use gitproxy_shared::secret::Secret;
use gitproxy_shared::tunnel::body::BodyReceiver;
use gitproxy_shared::tunnel::credit::SendCredit;
use gitproxy_shared::upstream::{self, RequestBody};
use http::{HeaderMap, HeaderValue, Method};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Serves one request until it completes, fails or is cancelled.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    head: RequestHead,
    body: Option<BodyReceiver>,
    credit: SendCredit,
    cancel: CancellationToken,
) {
    let id = head.id;
    let mut rec = RequestRecord::new(
        id,
        sanitize::text(&head.method, sanitize::MAX_METHOD_BYTES),
        sanitize::text(
            head.path.split('?').next().unwrap_or(""),
            sanitize::MAX_PATH_BYTES,
        ),
    );
    // The request leaves the in-flight table however this task ends (a
    // panic included), so a drain never waits for a request that is gone.
    let _done = Finished {
        shared: &shared,
        id,
    };
    let _in_flight = shared.metrics.request_started();
    tokio::select! {
        // Dropping `relay` drops the upstream request and its connection, so
        // GitLab sees the caller go away at once.
        _ = cancel.cancelled() => {}
        _ = relay(&shared, &head, body, &credit, &mut rec) => {}
    }
    // A cancel also closes the credit, which can end `relay` first.
    rec.cancelled = cancel.is_cancelled();
    rec.finish(&shared.metrics);
}

/// Removes a request from the in-flight table when dropped.
struct Finished<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.shared.finish(self.id);
    }
}

async fn relay(
    shared: &Shared,
    head: &RequestHead,
    body: Option<BodyReceiver>,
    credit: &SendCredit,
    rec: &mut RequestRecord<'_>,
) {
    let id = head.id;
    let fail = |rec: &mut RequestRecord<'_>, e: GitproxyError| {
        rec.error = Some(e.error);
        warn!(request_id = id, error = %e.error, "{}", e.message);
        shared.reply_error(id, &e);
    };
    let Ok(method) = Method::from_bytes(head.method.as_bytes()) else {
        return fail(
            rec,
            GitproxyError::new(ErrorCode::BadRequest, "malformed method"),
        );
    };
    let mut hdrs = match headers::from_wire(&head.headers) {
        Ok(h) => h,
        Err(e) => return fail(rec, GitproxyError::new(ErrorCode::ProtocolError, e)),
    };
    let mut target = head.path.clone();
    if let Some(token) = &shared.cfg.gitlab_token {
        target = use_own_token(&mut hdrs, &target, token);
    }
    let idle = shared.cfg.body_idle_timeout;
    // The broker's request body: a broker that keeps it open without data
    // cannot hold GitLab's connection forever either.
    let body = body.map(|b| RequestBody::wrap(IdleTimeout::new(b, idle, "the broker")));
    let send = shared.upstream.send(method.clone(), &target, hdrs, body);
    let result = if head.timeout_ms > 0 {
        match tokio::time::timeout(Duration::from_millis(head.timeout_ms), send).await {
            Ok(r) => r,
            Err(_) => Err(GitproxyError::new(
                ErrorCode::Timeout,
                format!("GitLab did not answer within {} ms", head.timeout_ms),
            )),
        }
    } else {
        send.await
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => return fail(rec, e),
    };
    let status = resp.status();
    rec.status = status.as_u16();
    let no_body = method == Method::HEAD
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || upstream::content_length(&resp) == Some(0);
    let max_chunk = shared.broker_flow.max_chunk_bytes as usize;
    let mut head = ResponseHead {
        id,
        status: u32::from(status.as_u16()),
        headers: headers::response_to_wire(resp.headers()),
        end_of_stream: no_body,
        body: Bytes::new(),
    };
    // A small body of known length (most API answers) goes whole in the
    // head: one frame instead of head, Data and End. Its length is known
    // before reading, so no streamed answer is held back.
    let whole = upstream::content_length(&resp)
        .filter(|&n| shared.inline_bodies && !no_body && n <= max_chunk as u64);
    if let Some(len) = whole {
        let mut buf = BytesMut::new();
        let mut first = None;
        loop {
            match next_chunk(&mut resp, idle, rec.bytes_out).await {
                Ok(Some(chunk)) if buf.is_empty() && first.is_none() => first = Some(chunk),
                Ok(Some(chunk)) => {
                    if let Some(f) = first.take() {
                        buf.reserve(len as usize);
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return fail(rec, e),
            }
        }
        // GitLab's client enforces the declared length, so this is `len`.
        let body = first.unwrap_or_else(|| buf.freeze());
        let n = body.len();
        if credit
            .acquire(shared.broker_flow.frame_cost(n))
            .await
            .is_err()
        {
            return;
        }
        rec.bytes_out = n as u64;
        head.end_of_stream = true;
        head.body = body;
        let frame = AgentMessage {
            msg: Some(Out::ResponseHead(head)),
        };
        let _ = shared.tx.send_data(frame, n).await;
        return;
    }
    let head_frame = AgentMessage {
        msg: Some(Out::ResponseHead(head)),
    };
    if shared.tx.send(head_frame).await.is_err() || no_body {
        return;
    }
    loop {
        let mut bytes = match next_chunk(&mut resp, idle, rec.bytes_out).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(err) => {
                rec.error = Some(err.error);
                warn!(request_id = id, error = %err.error, "{}", err.message);
                let _ = shared.tx.send(error_frame(id, &err)).await;
                return;
            }
        };
        while !bytes.is_empty() {
            let part: Bytes = bytes.split_to(bytes.len().min(max_chunk));
            if credit
                .acquire(shared.broker_flow.frame_cost(part.len()))
                .await
                .is_err()
            {
                return;
            }
            rec.bytes_out += part.len() as u64;
            let n = part.len();
            let frame = AgentMessage {
                msg: Some(Out::Data(Data { id, data: part })),
            };
            if shared.tx.send_data(frame, n).await.is_err() {
                return;
            }
        }
    }
    let _ = shared
        .tx
        .send(AgentMessage {
            msg: Some(Out::End(End { id })),
        })
        .await;
}

/// The next chunk of GitLab's answer, `None` at its end. Only the wait for
/// GitLab counts towards the idle time, never a wait for the broker's
/// credit; `sent` (bytes relayed so far) goes into the error messages.
async fn next_chunk(
    resp: &mut upstream::Response,
    idle: Duration,
    sent: u64,
) -> Result<Option<Bytes>, GitproxyError> {
    match idle::within(idle, upstream::next_chunk(resp.body_mut())).await {
        None => Err(GitproxyError::new(
            ErrorCode::Timeout,
            format!(
                "GitLab sent no data for {}s in the middle of the response (after {sent} bytes); the body idle timeout (GITPROXY_BODY_IDLE_TIMEOUT) ended it",
                idle.as_secs_f32(),
            ),
        )),
        Some(Ok(chunk)) => Ok(chunk),
        Some(Err(e)) => Err(GitproxyError::new(
            ErrorCode::UpstreamUnreachable,
            format!(
                "GitLab cut the response after {sent} bytes: {}",
                gitproxy_shared::errors::Chain::new(&e).text()
            ),
        )),
    }
}

/// Replaces whatever credentials came from the cloud with the agent's own
/// token, so that token never leaves the customer network and the cloud can
/// neither authenticate as anyone else nor impersonate (`sudo`): every
/// credential header in any spelling, `Sudo`, the whole `Cookie`, and every
/// credential or `sudo` query parameter as GitLab (Rack) decodes names
/// (`gitproxy_shared::credentials`) go; then `PRIVATE-TOKEN` for the API,
/// HTTP Basic `oauth2:<token>` for git. Returns the target without those
/// parameters, the rest of the query byte for byte.
fn use_own_token(hdrs: &mut HeaderMap, target: &str, token: &Secret) -> String {
    use gitproxy_shared::credentials;
    credentials::strip_header_credentials(hdrs);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let is_api = path.starts_with("/api/");
    let value = if is_api {
        HeaderValue::from_str(token.expose()).map(|v| ("private-token", v))
    } else {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{}", token.expose()));
        HeaderValue::from_str(&format!("Basic {basic}")).map(|v| ("authorization", v))
    };
    if let Ok((name, mut v)) = value {
        v.set_sensitive(true);
        hdrs.insert(name, v);
    }
    match query.and_then(credentials::strip_query_credentials) {
        None => path.to_string(),
        Some(q) => format!("{path}?{q}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_token_replaces_cloud_credentials() {
        let mut h = HeaderMap::new();
        h.insert("private-token", HeaderValue::from_static("cloud"));
        h.insert("authorization", HeaderValue::from_static("Bearer cloud"));
        let t = use_own_token(
            &mut h,
            "/api/v4/projects?private_token=cloud&page=2",
            &Secret::new("agent-tok"),
        );
        assert_eq!(t, "/api/v4/projects?page=2");
        assert_eq!(h.get("private-token").unwrap(), "agent-tok");
        assert!(h.get("authorization").is_none());

        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic Y2xvdWQ6Y2xvdWQ="),
        );
        let t = use_own_token(
            &mut h,
            "/g/p.git/info/refs?service=git-upload-pack",
            &Secret::new("agent-tok"),
        );
        assert_eq!(t, "/g/p.git/info/refs?service=git-upload-pack");
        let v = h.get("authorization").unwrap().to_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&v[6..])
            .unwrap();
        assert_eq!(decoded, b"oauth2:agent-tok");
    }
}
