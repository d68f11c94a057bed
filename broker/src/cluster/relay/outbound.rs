//! The forwarding side of a relayed connection (api listener, cluster
//! mode): decides from the first request head, dials the peer, copies bytes
//! both ways following message boundaries, and hands the connection back
//! to hyper when a request must be served here.

use super::framing::{self, BodyCounter, BodyLen};
use super::{CLIENT_HEADER, PREAMBLE_LINE};
use crate::cluster::peer::{AUTH_HEADER, CONNECT_TIMEOUT, FROM_HEADER};
use crate::cluster::registry::RemoteAgent;
use crate::cluster::Cluster;
use crate::config::{Connection, Mode};
use crate::observe::Observer;
use crate::state::AppState;
use bytes::{Bytes, BytesMut};
use gitproxy_shared::errors::{ErrorCode, GitproxyError};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Read buffer of each direction.
const BUF_BYTES: usize = 16 * 1024;

/// How a relayed (or examined) connection ended.
pub enum Ending<IO> {
    /// Closed: nothing more to do.
    Closed,
    /// Served here from now on: hyper gets the connection, with these bytes
    /// (already read from it) first.
    Local(Bytes, IO, Option<Replayed>),
}

/// Requests sent to a peer that went away before answering them, sent
/// again here: the first `requests` requests of the connection are served
/// as requests lost at `replica` (`frontdoor::origin::LostAt`).
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The replica that went away.
    pub replica: Arc<str>,
    /// How many requests the replayed bytes hold.
    pub requests: usize,
}

/// The api listener's relay (cluster mode).
pub struct Outbound {
    state: Arc<AppState>,
    cluster: Arc<Cluster>,
    preamble_headers: String,
}

/// A request sent to the peer whose answer is not complete.
#[derive(Debug, Clone)]
struct Sent {
    /// The connection it is for (its answer is counted there).
    conn: Arc<Connection>,
    is_head: bool,
    /// Bytes of its answer were written to the caller.
    started: bool,
    /// A `GET`, `HEAD` or `OPTIONS` without body: its head, to send again
    /// if the peer goes away before answering (the rule of a local agent's
    /// death and of `frontdoor::remote`).
    replay: Option<Bytes>,
}

/// A stream another replica holds that a connection can be relayed to: not
/// draining, and on a replica that takes relayed connections (one older
/// than the relay gets requests one by one).
fn relay_target(a: &RemoteAgent) -> bool {
    !a.entry.draining && a.relay
}

/// The caller-facing limits the relay applies itself (the peer sees a
/// head only once it is complete, and keeps relayed connections open
/// longer than the relay does: see [`super::PEER_IDLE_MARGIN`]).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `--header-read-timeout`: a request head must be complete within it.
    pub header: Duration,
    /// `--idle-timeout`: a connection with nothing in flight is closed.
    pub idle: Duration,
}

/// What the two directions share.
struct Shared {
    sent: Mutex<VecDeque<Sent>>,
    /// When the last answer in flight completed.
    answered_at: Mutex<Instant>,
    /// An answer completed (the queue shrank).
    answered: Notify,
    /// The peer's side ended: send nothing more.
    peer_gone: CancellationToken,
    /// No more requests go to the peer.
    up_done: CancellationToken,
}

impl Shared {
    fn sent(&self) -> std::sync::MutexGuard<'_, VecDeque<Sent>> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answered_at(&self) -> Instant {
        *self.answered_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every request sent has its answer, or the peer is gone.
    async fn all_answered(&self) {
        loop {
            let n = self.answered.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.sent().is_empty() || self.peer_gone.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = n => {}
                _ = self.peer_gone.cancelled() => return,
            }
        }
    }
}

/// Why the caller-to-peer direction stopped.
#[derive(Debug, PartialEq, Eq)]
enum UpEnd {
    /// The caller closed its side (or failed).
    CallerClosed,
    /// The next request is served here (its bytes are kept).
    Local,
    /// The peer's side ended.
    PeerGone,
    /// Close the connection (a head not finished in time, shutdown).
    Close,
}

/// Why the peer-to-caller direction stopped.
#[derive(Debug, PartialEq, Eq)]
enum DownEnd {
    /// Every answer was delivered and no more requests come.
    Done,
    /// The peer closed between two exchanges.
    PeerClosed,
    /// The caller's connection must be closed (an answer cut, the caller
    /// gone, an answer delimited by the close).
    Close,
    /// The peer went away before answering requests that may be sent
    /// again: their heads, in order.
    Replay(Vec<Bytes>),
}

impl Outbound {
    /// The relay of this replica.
    pub fn new(state: Arc<AppState>, cluster: Arc<Cluster>) -> Self {
        let preamble_headers = format!(
            "{AUTH_HEADER}: {}\r\n{FROM_HEADER}: {}\r\n",
            cluster.settings.peer_secret.expose(),
            cluster.replica_id()
        );
        Outbound {
            state,
            cluster,
            preamble_headers,
        }
    }

    /// The agent-mode connection a request for `path` is for, with the
    /// agent streams other replicas hold, when it has no ready stream here
    /// (`frontdoor::route`'s rule; anything else is served here).
    async fn remote(&self, path: &str) -> Option<(Arc<Connection>, Arc<[RemoteAgent]>)> {
        let rest = path.strip_prefix("/gitlab/")?;
        let name = rest.split(['/', '?']).next()?;
        let conn = self.state.connections().get(name)?;
        if conn.mode != Mode::Agent || self.state.registry.local_state(&conn.id).1 {
            return None;
        }
        let remote = self.cluster.registry.lookup(&conn.id, false).await.ok()?;
        Some((conn, remote))
    }

    /// Serves a fresh HTTP/1.1 connection: relays it when its first request
    /// goes to another replica, else hands it back at once.
    pub async fn serve<IO>(
        &self,
        mut io: IO,
        client: SocketAddr,
        timeouts: Timeouts,
        shutdown: &CancellationToken,
    ) -> Ending<IO>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf = BytesMut::with_capacity(BUF_BYTES);
        let deadline = Instant::now() + timeouts.header;
        let head = loop {
            match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return Ending::Closed,
                Ok(Ok(n)) if n > 0 => {}
                // The head had its header-read timeout here already.
                Err(_) => return Ending::Closed,
                // hyper answers what the relay does not take.
                _ => return Ending::Local(buf.freeze(), io, None),
            }
            match framing::request_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => continue,
                Err(_) => return Ending::Local(buf.freeze(), io, None),
            }
        };
        if !head.relayable {
            return Ending::Local(buf.freeze(), io, None);
        }
        let Some((_, remote)) = self.remote(&head.path).await else {
            return Ending::Local(buf.freeze(), io, None);
        };
        // Agents of a connection on several replicas share its load.
        let ready: Vec<&RemoteAgent> = remote.iter().filter(|a| relay_target(a)).collect();
        if ready.is_empty() {
            return Ending::Local(buf.freeze(), io, None);
        }
        let t = ready[rand::random_range(0..ready.len())];
        let (replica, peer_addr) = (t.replica.clone(), t.peer.clone());
        let peers = &self.cluster.peers;
        if peers.recently_failed(&peer_addr).is_some() {
            return Ending::Local(buf.freeze(), io, None);
        }
        let peer = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&peer_addr)).await
        {
            Ok(Ok(s)) => s,
            // The per-request path tries the other replicas and reports.
            Ok(Err(e)) => {
                peers.remember_failure(&peer_addr, &e.to_string());
                return Ending::Local(buf.freeze(), io, None);
            }
            Err(_) => {
                peers.remember_failure(&peer_addr, "connecting timed out");
                return Ending::Local(buf.freeze(), io, None);
            }
        };
        let _ = peer.set_nodelay(true);
        debug!(replica = %replica, client = %client, "relaying a caller connection");
        self.state.observer.relayed("out");
        let preamble = format!(
            "{PREAMBLE_LINE}{}{CLIENT_HEADER}: {client}\r\n\r\n",
            self.preamble_headers
        );
        let (peer_rd, mut peer_wr) = peer.into_split();
        if peer_wr.write_all(preamble.as_bytes()).await.is_err() {
            return Ending::Local(buf.freeze(), io, None);
        }
        let to = (replica.as_str(), peer_addr.as_str());
        self.relay(io, buf, peer_rd, peer_wr, to, timeouts, shutdown)
            .await
    }

    /// Copies bytes both ways until the connection ends or continues here.
    #[allow(clippy::too_many_arguments)]
    async fn relay<IO>(
        &self,
        io: IO,
        buf: BytesMut,
        peer_rd: OwnedReadHalf,
        peer_wr: OwnedWriteHalf,
        (replica, peer_addr): (&str, &str),
        timeouts: Timeouts,
        shutdown: &CancellationToken,
    ) -> Ending<IO>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let shared = Shared {
            sent: Mutex::new(VecDeque::new()),
            answered_at: Mutex::new(Instant::now()),
            answered: Notify::new(),
            peer_gone: CancellationToken::new(),
            up_done: CancellationToken::new(),
        };
        let (rd, wr) = tokio::io::split(io);
        let up = async {
            let r = self
                .upstream(rd, buf, peer_wr, peer_addr, &shared, timeouts, shutdown)
                .await;
            shared.up_done.cancel();
            r
        };
        let down = async {
            let r = downstream(peer_rd, wr, &shared, &self.state.observer).await;
            shared.peer_gone.cancel();
            r
        };
        let ((rd, rest, up), (wr, down)) = tokio::join!(up, down);
        let io = rd.unsplit(wr);
        debug!(?up, ?down, "relay ended");
        match (up, down) {
            (UpEnd::Local, DownEnd::Done | DownEnd::PeerClosed) => {
                Ending::Local(rest.freeze(), io, None)
            }
            // The peer closed between exchanges while the caller was still
            // sending the next head: it is served here.
            (UpEnd::PeerGone, DownEnd::PeerClosed) if !rest.is_empty() => {
                Ending::Local(rest.freeze(), io, None)
            }
            // The peer went away (closed an idle connection as the request
            // came, or died) before answering requests safe to send again:
            // they are served here, as requests lost at that replica.
            (_, DownEnd::Replay(heads)) => {
                let requests = heads.len();
                let mut again = BytesMut::new();
                for h in heads {
                    again.extend_from_slice(&h);
                }
                again.extend_from_slice(&rest);
                debug!(
                    replica,
                    requests, "the peer went away before answering; serving here"
                );
                Ending::Local(
                    again.freeze(),
                    io,
                    Some(Replayed {
                        replica: replica.into(),
                        requests,
                    }),
                )
            }
            _ => Ending::Closed,
        }
    }

    /// Caller to peer: routes each request head, then passes its body.
    #[allow(clippy::too_many_arguments)]
    async fn upstream<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        mut buf: BytesMut,
        mut peer: OwnedWriteHalf,
        peer_addr: &str,
        sh: &Shared,
        timeouts: Timeouts,
        shutdown: &CancellationToken,
    ) -> (R, BytesMut, UpEnd) {
        let mut body: Option<BodyCounter> = None;
        let mut head_since: Option<Instant> = None;
        loop {
            // What is buffered: whole heads routed, bodies counted.
            let mut k = 0;
            let mut stop = None;
            loop {
                if let Some(c) = &mut body {
                    match c.take(&buf[k..]) {
                        Ok(n) => k += n,
                        // hyper on the peer refuses it too and closes.
                        Err(_) => {
                            stop = Some(UpEnd::Close);
                            break;
                        }
                    }
                    if !c.done() {
                        break;
                    }
                    body = None;
                }
                if k == buf.len() {
                    break;
                }
                let head = match framing::request_head(&buf[k..]) {
                    Ok(None) => break,
                    Ok(Some(h)) if h.relayable => h,
                    _ => {
                        stop = Some(UpEnd::Local);
                        break;
                    }
                };
                // Draining here changes nothing: the peer serves it.
                let Some((conn, remote)) = self.remote(&head.path).await else {
                    stop = Some(UpEnd::Local);
                    break;
                };
                // Kept while the peer holds a ready stream of the connection.
                if !remote
                    .iter()
                    .any(|a| relay_target(a) && a.peer == peer_addr)
                {
                    stop = Some(UpEnd::Local);
                    break;
                }
                self.state.observer.forwarded(&conn.id, "out");
                let replay = head
                    .idempotent_bodyless
                    .then(|| Bytes::copy_from_slice(&buf[k..k + head.len]));
                sh.sent().push_back(Sent {
                    conn,
                    is_head: head.is_head,
                    started: false,
                    replay,
                });
                k += head.len;
                let c = BodyCounter::new(head.body);
                body = (!c.done()).then_some(c);
            }
            if k > 0 {
                let out = buf.split_to(k);
                if peer.write_all(&out).await.is_err() {
                    return (rd, buf, UpEnd::PeerGone);
                }
            }
            if let Some(stop) = stop {
                if stop == UpEnd::Local {
                    // Answers come in order: the ones in flight first.
                    sh.all_answered().await;
                    if sh.peer_gone.is_cancelled() && !sh.sent().is_empty() {
                        return (rd, buf, UpEnd::PeerGone);
                    }
                }
                return (rd, buf, stop);
            }
            // A head being received must be complete within the header-read
            // timeout (the peer does not see it yet, so cannot time it).
            head_since = match (&body, buf.is_empty()) {
                (None, false) => head_since.or_else(|| Some(Instant::now())),
                _ => None,
            };
            let head_deadline = head_since.map(|t| t + timeouts.header);
            let idle = body.is_none() && buf.is_empty();
            // Nothing in flight: the caller-facing idle timeout (from the
            // last answer's end) is the relay's to apply. Registered before
            // the check, so an answer completing meanwhile is not missed.
            let answered = sh.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            let idle_deadline =
                (idle && sh.sent().is_empty()).then(|| sh.answered_at() + timeouts.idle);
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return (rd, buf, UpEnd::CallerClosed),
                    Ok(_) => {}
                },
                _ = sh.peer_gone.cancelled() => return (rd, buf, UpEnd::PeerGone),
                _ = sleep_until(head_deadline) => return (rd, buf, UpEnd::Close),
                // The last answer completed: the idle clock starts.
                _ = answered, if idle && idle_deadline.is_none() => {}
                _ = sleep_until(idle_deadline) => {
                    let still = sh.sent().is_empty()
                        && Instant::now() >= sh.answered_at() + timeouts.idle;
                    if still {
                        return (rd, buf, UpEnd::Close);
                    }
                }
                // Draining: close once nothing is in flight.
                _ = shutdown.cancelled(), if idle => {
                    sh.all_answered().await;
                    return (rd, buf, UpEnd::Close);
                }
            }
        }
    }
}

/// Peer to caller: passes each answer, and knows when one is complete.
async fn downstream<W: AsyncWrite + Unpin>(
    mut peer: OwnedReadHalf,
    mut wr: W,
    sh: &Shared,
    observer: &Observer,
) -> (W, DownEnd) {
    let mut buf = BytesMut::with_capacity(BUF_BYTES);
    let mut body: Option<BodyCounter> = None;
    loop {
        let mut k = 0;
        let mut completed = 0;
        let mut broken = false;
        loop {
            if let Some(c) = &mut body {
                match c.take(&buf[k..]) {
                    Ok(n) => k += n,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
                if !c.done() {
                    break;
                }
                body = None;
                completed += 1;
            }
            if k == buf.len() {
                break;
            }
            let front = sh
                .sent()
                .get(completed)
                .map(|s| (s.is_head, s.conn.clone()));
            let Some((front_is_head, front_conn)) = front else {
                // Bytes nobody asked for.
                broken = true;
                break;
            };
            match framing::response_head(&buf[k..], front_is_head) {
                Ok(None) => break,
                Ok(Some(h)) => {
                    k += h.len;
                    if let Some(s) = sh.sent().get_mut(completed) {
                        s.started = true;
                    }
                    if h.interim {
                        continue;
                    }
                    observer.relayed_request(&front_conn.id, h.status);
                    let c = BodyCounter::new(h.body);
                    if c.done() {
                        completed += 1;
                    } else {
                        body = Some(c);
                    }
                }
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if k > 0 {
            let out = buf.split_to(k);
            if wr.write_all(&out).await.is_err() {
                return (wr, DownEnd::Close);
            }
        }
        if completed > 0 {
            let mut sent = sh.sent();
            sent.drain(..completed);
            if sent.is_empty() {
                *sh.answered_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            }
            drop(sent);
            sh.answered.notify_waiters();
        }
        if broken {
            return (wr, DownEnd::Close);
        }
        let nothing_pending = body.is_none() && buf.is_empty() && sh.sent().is_empty();
        if nothing_pending && sh.up_done.is_cancelled() {
            return (wr, DownEnd::Done);
        }
        let r = tokio::select! {
            r = peer.read_buf(&mut buf) => r,
            _ = sh.up_done.cancelled(), if nothing_pending => return (wr, DownEnd::Done),
        };
        if matches!(r, Ok(n) if n > 0) {
            continue;
        }
        // The peer's side ended.
        sh.peer_gone.cancel();
        if body.is_some_and(|b| b == BodyCounter::new(BodyLen::UntilClose)) {
            let _ = wr.flush().await;
            return (wr, DownEnd::Close);
        }
        let sent: Vec<Sent> = sh.sent().iter().cloned().collect();
        return match sent.first() {
            None if body.is_none() => (wr, DownEnd::PeerClosed),
            Some(s) if !s.started && body.is_none() => {
                let replay: Option<Vec<Bytes>> = sent.iter().map(|s| s.replay.clone()).collect();
                if let Some(heads) = replay {
                    return (wr, DownEnd::Replay(heads));
                }
                let _ = wr.write_all(&disconnected(s.is_head)).await;
                let _ = wr.flush().await;
                (wr, DownEnd::Close)
            }
            _ => (wr, DownEnd::Close),
        };
    }
}

/// The answer to a request the peer took and then went away without
/// answering (the rule of `frontdoor::remote`: `agent_disconnected`).
fn disconnected(is_head: bool) -> Vec<u8> {
    let e = GitproxyError::new(
        ErrorCode::AgentDisconnected,
        "the broker replica holding the agent went away before answering this request",
    );
    let body = e.to_json();
    let mut out = format!(
        "HTTP/1.1 {} Bad Gateway\r\ncontent-type: application/json\r\nx-gitproxy-error: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        e.error.http_status(),
        e.error.as_str(),
        body.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
