//! `GET /v1/events[?connection=ID]`: the tunnel events of every connection
//! (or one) as server-sent events, fed by the same broadcast as
//! `Admin/WatchTunnel` ([`crate::observe`]).
//!
//! Behind the `/v1` API-key layer like every other `/v1` call: the console
//! reads it with `fetch()` and a streamed body, so the key travels in the
//! `X-Gitproxy-Key` header and never in a URL (where logs and history would
//! keep it).
//!
//! Frames: `event: <kind>` and one line of JSON `data`, kinds
//! `agent_connected`, `agent_disconnected`, `request_started`,
//! `request_finished`; `hello` first (the stream is open), a comment every
//! [`KEEPALIVE`] so proxies keep an idle stream, and `lagged` as the last
//! frame for a consumer that fell [`crate::observe::EVENT_BUFFER`] events
//! behind: the broker never waits for a slow reader, it ends that stream
//! (the reader reconnects and rereads the state). The stream also ends when
//! the broker starts draining.

use crate::api::error::ApiError;
use crate::observe::Event;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::Stream;
use gitproxy_proto::v1::tunnel_event::Event as Kind;
use http::{header, HeaderValue, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

/// How long a stream may stay silent before a keep-alive comment.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Query of `GET /v1/events`.
#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Only this connection's events.
    pub connection: Option<String>,
}

/// `GET /v1/events`.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Response<Body> {
    if let Some(id) = &q.connection {
        if state.connections().get(id).is_none() {
            return ApiError::unknown(id).into_response();
        }
    }
    // Subscribed before answering: nothing after the answer is missed.
    let rx = state.observer.subscribe();
    let stream = frames(rx, q.connection, state.draining.clone(), KEEPALIVE);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx-style proxies would otherwise hold frames back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The event's kind and its JSON form.
pub fn to_json(ev: &Event) -> Option<(&'static str, Value)> {
    let (c, t) = (&ev.connection, &ev.event.time);
    Some(match ev.event.event.as_ref()? {
        Kind::AgentConnected(a) => (
            "agent_connected",
            json!({"connection": c, "time": t, "instance": a.instance, "version": a.version}),
        ),
        Kind::AgentDisconnected(a) => (
            "agent_disconnected",
            json!({"connection": c, "time": t, "instance": a.instance, "reason": a.reason}),
        ),
        Kind::RequestStarted(r) => (
            "request_started",
            json!({"connection": c, "time": t, "request_id": r.request_id,
                   "method": r.method, "path": r.path}),
        ),
        Kind::RequestFinished(r) => (
            "request_finished",
            json!({"connection": c, "time": t, "request_id": r.request_id,
                   "method": r.method, "path": r.path, "status": r.status,
                   "duration_ms": r.duration_ms, "bytes_in": r.bytes_in,
                   "bytes_out": r.bytes_out, "error": r.error, "mode": r.mode,
                   "agent": r.agent}),
        ),
    })
}

fn frame(kind: &str, data: &Value) -> Bytes {
    // Compact JSON has no newline: one `data:` line per frame.
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

struct Feed {
    rx: broadcast::Receiver<Event>,
    only: Option<String>,
    stop: CancellationToken,
    keepalive: Duration,
    hello_sent: bool,
    done: bool,
}

/// The frames of one stream: `hello`, then the events of `only` (or all)
/// until `stop`, the broadcast's end, or the reader lagging.
pub fn frames(
    rx: broadcast::Receiver<Event>,
    only: Option<String>,
    stop: CancellationToken,
    keepalive: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let feed = Feed {
        rx,
        only,
        stop,
        keepalive,
        hello_sent: false,
        done: false,
    };
    futures::stream::unfold(feed, |mut f| async move {
        if !f.hello_sent {
            f.hello_sent = true;
            // `retry`: how long an EventSource waits before reconnecting.
            let hello = Bytes::from("retry: 2000\nevent: hello\ndata: {}\n\n");
            return Some((Ok(hello), f));
        }
        if f.done {
            return None;
        }
        loop {
            let next = tokio::select! {
                _ = f.stop.cancelled() => return None,
                r = tokio::time::timeout(f.keepalive, f.rx.recv()) => r,
            };
            match next {
                Err(_) => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), f)),
                Ok(Ok(ev)) => {
                    if f.only.as_ref().is_some_and(|c| *c != ev.connection) {
                        continue;
                    }
                    if let Some((kind, data)) = to_json(&ev) {
                        return Some((Ok(frame(kind, &data)), f));
                    }
                }
                Ok(Err(RecvError::Lagged(n))) => {
                    tracing::warn!(
                        lost = n,
                        "a /v1/events reader is too slow: its stream is ended"
                    );
                    f.done = true;
                    return Some((Ok(frame("lagged", &json!({ "lost": n }))), f));
                }
                Ok(Err(RecvError::Closed)) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Observer;
    use futures::StreamExt;

    fn text(b: &Bytes) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[tokio::test]
    async fn events_are_framed_and_filtered() {
        let obs = Observer::new();
        let stop = CancellationToken::new();
        let s = frames(
            obs.subscribe(),
            Some("acme".into()),
            stop.clone(),
            Duration::from_secs(60),
        );
        let mut s = std::pin::pin!(s);
        obs.request_started("other", "GET", "/api/v4/projects");
        let seq = obs.request_started("acme", "GET", "/api/v4/version");
        let first = text(&s.next().await.unwrap().unwrap());
        assert!(first.contains("event: hello\n"), "{first}");
        let second = text(&s.next().await.unwrap().unwrap());
        assert!(
            second.starts_with("event: request_started\ndata: {"),
            "{second}"
        );
        assert!(second.ends_with("}\n\n"));
        let v: Value = serde_json::from_str(
            second
                .trim_start_matches("event: request_started\ndata: ")
                .trim(),
        )
        .unwrap();
        assert_eq!(v["connection"], "acme");
        assert_eq!(v["request_id"], seq);
        assert_eq!(v["path"], "/api/v4/version");
        stop.cancel();
        assert!(s.next().await.is_none(), "draining ends the stream");
    }

    #[tokio::test]
    async fn a_slow_reader_gets_lagged_and_its_stream_ends() {
        let obs = Observer::new();
        let s = frames(
            obs.subscribe(),
            None,
            CancellationToken::new(),
            Duration::from_secs(60),
        );
        let mut s = std::pin::pin!(s);
        for _ in 0..crate::observe::EVENT_BUFFER + 10 {
            obs.request_started("acme", "GET", "/x");
        }
        let _hello = s.next().await;
        let lagged = text(&s.next().await.unwrap().unwrap());
        assert!(lagged.starts_with("event: lagged\n"), "{lagged}");
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_sends_keep_alives() {
        let obs = Observer::new();
        let s = frames(obs.subscribe(), None, CancellationToken::new(), KEEPALIVE);
        let mut s = std::pin::pin!(s);
        let _hello = s.next().await;
        let k = text(&s.next().await.unwrap().unwrap());
        assert_eq!(k, ": keep-alive\n\n");
    }
}
