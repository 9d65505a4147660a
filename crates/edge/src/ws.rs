//! The WebSocket transport, shared by every WebSocket dialect: checks before
//! the upgrade (connection cap, then the dialect's `accept`), then one task
//! per session, spawned small by a short task that waits for the upgrade
//! (`SessionTask`). The task waits on one readiness future for both directions:
//! it parses inbound frames (`wsread`), enforces size and rate limits, the
//! idle timeout, token expiry and the dialect's timers, hands complete
//! messages to the dialect's [`crate::dialect::Connection`], and writes what
//! the outbox holds in vectored writes (pings included). fastwebsockets only
//! performs the upgrade handshake; most deliveries are written by the hub
//! itself through the outbox's direct path (see `outbox`).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use roomcast_protocol::native::ErrorCode;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::dialect::{Accepted, Connection, Refusal, SessionCtx};
use crate::disconnect::Disconnect;
use crate::frame::{close_frame, ws_frame, OP_PING, OP_PONG};
use crate::http::{json_error, Body};
use crate::node::{ConnectionSlot, Node};
use crate::outbox::Next;
use crate::ratelimit::{RateLimiter, Verdict};
use crate::session::Session;
use crate::wsread::{FrameReader, Inbound, ReadError};

/// Upgrades a WebSocket request for a dialect. Every refusal happens here,
/// before the upgrade, so a refused client never gets an open socket: the
/// node's connection cap (503), then `accept` (credentials, subprotocol,
/// the dialect's own caps).
pub async fn upgrade<F, Fut>(node: Arc<Node>, req: Request<Incoming>, accept: F) -> Response<Body>
where
    F: FnOnce(http::request::Parts) -> Fut,
    Fut: std::future::Future<Output = Result<Accepted, Refusal>>,
{
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::InvalidMessage,
            "this endpoint speaks WebSocket only",
        );
    }
    let Some(slot) = node.try_reserve_connection() else {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ConnectionLimit,
            "node is at its connection limit or draining; retry another node",
            "connection_limit",
        )
        .into_response();
    };
    let (parts, body) = req.into_parts();
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut req = Request::from_parts(parts.clone(), body);
    let accepted = match accept(parts).await {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                &e.to_string(),
            )
        }
    };
    let mut response = response.map(|_| Body::default());
    if let Some(p) = accepted.subprotocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    let session = async move {
        match upgrade.await {
            Ok(ws) => {
                // The session's own task starts small: this one, holding the
                // upgrade and the dialect's acceptance, ends here.
                if let Some(task) =
                    SessionTask::start(node, slot, ws.into_inner(), accepted, user_agent)
                {
                    tokio::spawn(task.run());
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
        }
    };
    tokio::spawn(session);
    response
}

type Io = TokioIo<hyper::upgrade::Upgraded>;

thread_local! {
    /// Read scratch space shared by every connection on a worker thread: an
    /// idle connection owns no read buffer (see `wsread`).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 16 * 1024]);
}

/// What a session's task holds for its whole life, and nothing more: the
/// upgrade, the dialect's acceptance and the handshake leftovers live in a
/// first, short task (see [`SessionTask::start`]), so they never size the
/// long-lived one. Fields are read in place rather than moved into locals,
/// which an async fn would keep a second copy of for its whole run.
struct SessionTask {
    stream: Arc<TcpStream>,
    ctx: SessionCtx,
    connection: Box<dyn Connection>,
    reader: FrameReader,
    limiter: RateLimiter,
    max_message_bytes: usize,
    idle_timeout: Duration,
    ping_interval: Duration,
    /// When the token expires (plus leeway).
    expires: Instant,
    /// Frames taken from the outbox and not yet fully written.
    pending: VecDeque<Bytes>,
    /// Parsed from the bytes the client sent right behind its handshake.
    early: Result<Vec<Inbound>, ReadError>,
    transport: &'static str,
    guard: Option<Box<dyn Send + Sync>>,
    slot: ConnectionSlot,
}

impl SessionTask {
    /// Sets the session up; `None` when the upgraded connection is not a
    /// TCP stream (it is closed by dropping it).
    fn start(
        node: Arc<Node>,
        slot: ConnectionSlot,
        io: Io,
        accepted: Accepted,
        user_agent: Option<String>,
    ) -> Option<Self> {
        let (stream, leftover) = match io.into_inner().downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Arc::new(parts.io.into_inner()), parts.read_buf),
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream; closing");
                return None;
            }
        };
        let Accepted {
            identity,
            renderer,
            subprotocol: _,
            connection,
            limits,
            guard,
            transport,
        } = accepted;
        let session = Session::for_identity("s", &identity, renderer, &limits);
        if let Some(ua) = &user_agent {
            session.set_user_agent(ua);
        }
        node.register(&session);
        session.outbox.attach_socket(stream.clone());
        metrics::gauge!("roomcast_connections", "transport" => transport).increment(1.0);
        metrics::counter!("roomcast_connections_total", "transport" => transport).increment(1);
        tracing::debug!(session = %session.id, user = %identity.user, tenant = %identity.tenant, transport, "session open");
        let expires = token_deadline(identity.expires_at + node.config().auth.leeway_secs);
        // Bytes the client sent right behind its handshake are parsed now and
        // dropped: even empty, this buffer may share hyper's whole read buffer.
        let mut reader = FrameReader::default();
        let mut items = Vec::new();
        let early = reader
            .feed(&leftover, limits.max_message_bytes, &mut |i| items.push(i))
            .map(|()| items);
        drop(leftover);
        Some(Self {
            stream,
            ctx: SessionCtx {
                node,
                session,
                identity,
            },
            connection,
            reader,
            limiter: RateLimiter::new(
                limits.rate_messages,
                limits.rate_window,
                limits.rate_strikes,
            ),
            max_message_bytes: limits.max_message_bytes,
            idle_timeout: limits.idle_timeout,
            ping_interval: limits.ping_interval,
            expires,
            pending: VecDeque::new(),
            early,
            transport,
            guard,
            slot,
        })
    }

    /// The connection's whole life after the upgrade, in one task: reads are
    /// parsed by [`FrameReader`] from a per-thread scratch buffer, the outbox
    /// is written with vectored writes when the socket is writable, and every
    /// timer (pings, idle timeout, token expiry, the dialect's own) is one
    /// deadline.
    async fn run(mut self) {
        let (reason, closing) = self.serve().await;
        // Boxed: this runs once, at the end, and would otherwise size every
        // idle connection's task for its deepest state.
        Box::pin(self.finish(reason, closing)).await;
    }

    /// Serves the session until it ends; returns why, and whether the close
    /// was already under way (its close frame queued).
    async fn serve(&mut self) -> (Disconnect, bool) {
        // Set once the outbox asked to close: write `pending` (it ends with the
        // close frame), then stop.
        let mut closing: Option<(Disconnect, Instant)> = None;
        let reason: Disconnect = 'session: {
            if let Err(d) = self.connection.opened(&self.ctx).await {
                break 'session d;
            }
            let mut items = match std::mem::replace(&mut self.early, Ok(Vec::new())) {
                Ok(items) => items,
                Err(e) => break 'session read_error(&mut *self.connection, &self.ctx, e),
            };
            if let Some(d) = Box::pin(dispatch(
                &mut *self.connection,
                &self.ctx,
                &mut items,
                &mut self.limiter,
            ))
            .await
            {
                break 'session d;
            }
            let mut idle_deadline = Instant::now() + self.idle_timeout;
            let mut next_ping = Instant::now() + self.ping_interval;
            let outbox = &self.ctx.session.outbox;
            loop {
                if let Some((reason, since)) = closing {
                    if self.pending.is_empty() {
                        break reason;
                    }
                    if since.elapsed() > CLOSE_WRITE_GRACE {
                        // A slow consumer's buffer stays full: drop the socket.
                        break reason;
                    }
                }
                // Take what the outbox has ready, unless a write is under way.
                let mut outbox_due = None;
                if self.pending.is_empty() && closing.is_none() {
                    match outbox.take_ready() {
                        Ok(Next::Write(frames)) => self.pending = frames,
                        Ok(Next::Close(frames, disconnect)) => {
                            self.pending = frames;
                            if disconnect != Disconnect::CLIENT_GONE {
                                self.pending
                                    .push_back(close_frame(disconnect.code, disconnect.reason));
                            }
                            closing = Some((disconnect, Instant::now()));
                        }
                        Err(due) => outbox_due = due,
                    }
                    if !self.pending.is_empty()
                        && write_pending(&self.stream, &mut self.pending).is_err()
                    {
                        break closing.map_or(Disconnect::CLIENT_GONE, |(d, _)| d);
                    }
                    if closing.is_some() {
                        continue;
                    }
                    if self.pending.is_empty() {
                        outbox.writer_done();
                    }
                }
                let far = Instant::now() + Duration::from_secs(3600);
                let dialect_deadline = self.connection.deadline().unwrap_or(far);
                let mut timer = self
                    .expires
                    .min(idle_deadline)
                    .min(dialect_deadline)
                    .min(next_ping);
                if let Some(due) = outbox_due {
                    timer = timer.min(due);
                }
                if let Some((_, since)) = closing {
                    timer = timer.min(since + CLOSE_WRITE_GRACE);
                }
                // One readiness future for both directions keeps the task small.
                let interest = match (closing.is_none(), self.pending.is_empty()) {
                    (true, true) => Interest::READABLE,
                    (true, false) => Interest::READABLE | Interest::WRITABLE,
                    (false, _) => Interest::WRITABLE,
                };
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(timer) => {
                        let now = Instant::now();
                        if now >= self.expires {
                            break Disconnect::TOKEN_EXPIRED;
                        }
                        if now >= idle_deadline {
                            break Disconnect::IDLE_TIMEOUT;
                        }
                        if now >= dialect_deadline {
                            if let Err(d) = self.connection.on_deadline(&self.ctx).await {
                                break d;
                            }
                        }
                        if now >= next_ping {
                            let _ = outbox.push(ws_frame(OP_PING, b""));
                            next_ping = now + self.ping_interval;
                        }
                    }
                    ready = self.stream.ready(interest) => {
                        let Ok(ready) = ready else {
                            break closing.map_or(Disconnect::CLIENT_GONE, |(d, _)| d);
                        };
                        if ready.is_writable() && !self.pending.is_empty() {
                            if write_pending(&self.stream, &mut self.pending).is_err() {
                                break closing.map_or(Disconnect::CLIENT_GONE, |(d, _)| d);
                            }
                            if self.pending.is_empty() && closing.is_none() {
                                outbox.writer_done();
                            }
                        }
                        if closing.is_some() || !(ready.is_readable() || ready.is_read_closed()) {
                            continue;
                        }
                        let mut items: Vec<Inbound> = Vec::new();
                        match read_available(&self.stream, &mut self.reader, self.max_message_bytes, &mut items) {
                            ReadOutcome::Open => {}
                            ReadOutcome::Eof => break Disconnect::CLIENT_GONE,
                            ReadOutcome::Failed(e) => break read_error(&mut *self.connection, &self.ctx, e),
                        }
                        if !items.is_empty() {
                            idle_deadline = Instant::now() + self.idle_timeout;
                            if let Some(d) = Box::pin(dispatch(&mut *self.connection, &self.ctx, &mut items, &mut self.limiter)).await {
                                break d;
                            }
                        }
                    }
                    _ = outbox.changed(), if self.pending.is_empty() && closing.is_none() => {}
                }
            }
        };
        (reason, closing.is_some())
    }

    /// After the loop: flush and close the socket, tell the dialect, leave
    /// the rooms, give the connection slot back.
    async fn finish(mut self, reason: Disconnect, closing: bool) {
        let outbox = &self.ctx.session.outbox;
        if !closing && reason != Disconnect::CLIENT_GONE {
            // Flush what is queued (e.g. an error frame), then the close frame.
            outbox.close(reason, true);
            if let Next::Close(frames, _) = outbox.next().await {
                self.pending.extend(frames);
            }
            self.pending
                .push_back(close_frame(reason.code, reason.reason));
            let _ = tokio::time::timeout(
                CLOSE_WRITE_GRACE,
                write_all(&self.stream, &mut self.pending),
            )
            .await;
        } else {
            outbox.close(reason, false);
        }
        outbox.detach_socket();
        let SessionTask {
            stream,
            ctx,
            mut connection,
            transport,
            guard,
            slot,
            ..
        } = self;
        drop(stream);
        connection.closed(&ctx).await;
        ctx.node.hub().leave_all(&ctx.session).await;
        ctx.node.unregister(&ctx.session.id);
        metrics::gauge!("roomcast_connections", "transport" => transport).decrement(1.0);
        metrics::counter!("roomcast_disconnects_total", "reason" => reason.label).increment(1);
        tracing::debug!(session = %ctx.session.id, reason = reason.label, "session closed");
        drop(guard);
        drop(slot);
    }
}

enum ReadOutcome {
    Open,
    Eof,
    Failed(ReadError),
}

/// Reads whatever the socket has, without blocking, and parses it.
fn read_available(
    stream: &TcpStream,
    reader: &mut FrameReader,
    max: usize,
    items: &mut Vec<Inbound>,
) -> ReadOutcome {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => {
                    if let Err(e) = reader.feed(&buf[..n], max, &mut |i| items.push(i)) {
                        return ReadOutcome::Failed(e);
                    }
                    if n < buf.len() {
                        return ReadOutcome::Open;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return ReadOutcome::Open,
                Err(_) => return ReadOutcome::Eof,
            }
        }
    })
}

/// The disconnect for a read error, after telling the dialect about a too-large message.
fn read_error(connection: &mut dyn Connection, ctx: &SessionCtx, e: ReadError) -> Disconnect {
    match e {
        ReadError::TooLarge => {
            connection.too_large(ctx);
            Disconnect::MESSAGE_TOO_LARGE
        }
        ReadError::Protocol => Disconnect::PROTOCOL_ERROR,
        ReadError::InvalidUtf8 => Disconnect::INVALID_PAYLOAD,
    }
}

/// Hands parsed items to the dialect, through the rate limiter.
async fn dispatch(
    connection: &mut dyn Connection,
    ctx: &SessionCtx,
    items: &mut Vec<Inbound>,
    limiter: &mut RateLimiter,
) -> Option<Disconnect> {
    for item in items.drain(..) {
        match item {
            Inbound::Ping(payload) => {
                let _ = ctx.session.outbox.push(ws_frame(OP_PONG, &payload));
            }
            Inbound::Pong => {}
            Inbound::Close(_) => return Some(Disconnect::CLIENT_CLOSED),
            Inbound::Message { binary, payload } => match limiter.check(Instant::now()) {
                Verdict::Allow => {
                    let msg = crate::dialect::Inbound {
                        binary,
                        payload: &payload,
                    };
                    if let Err(d) = connection.message(ctx, msg).await {
                        return Some(d);
                    }
                }
                Verdict::Reject { first_in_window } => {
                    if first_in_window {
                        connection.rate_limited(ctx);
                    }
                }
                Verdict::Disconnect => return Some(Disconnect::RATE_LIMIT),
            },
        }
    }
    None
}

/// Writes as much of `pending` as the socket takes now (vectored).
fn write_pending(stream: &TcpStream, pending: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    const MAX_IOV: usize = 64;
    while !pending.is_empty() {
        let slices: Vec<IoSlice<'_>> = pending
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect();
        let written = match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        drop(slices);
        let mut n = written;
        while n > 0 {
            let front = pending.front_mut().expect("wrote no more than was pending");
            if n >= front.len() {
                n -= front.len();
                pending.pop_front();
            } else {
                let rest = front.slice(n..);
                *front = rest;
                n = 0;
            }
        }
    }
    // An idle connection keeps no write buffer.
    *pending = VecDeque::new();
    Ok(())
}

/// Writes all of `pending`, waiting for the socket as needed.
async fn write_all(stream: &TcpStream, pending: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !pending.is_empty() {
        stream.writable().await?;
        write_pending(stream, pending)?;
    }
    Ok(())
}

/// When the token's `exp` passes; tokens without one never get here (the
/// verifier requires `exp`), but a far deadline keeps the select simple.
pub(crate) fn token_deadline(expires_at: u64) -> Instant {
    let now_s = crate::hub::now_ms() / 1000;
    let left = Duration::from_secs(expires_at.saturating_sub(now_s));
    Instant::now() + left.min(Duration::from_secs(10 * 365 * 24 * 3600))
}

/// How long a closing session may take to take its last frames and the close
/// frame. Its queue is already freed, so only kernel buffers wait meanwhile.
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::SessionTask;

    /// The future of `SessionTask::run` is what every idle connection keeps
    /// (docs/performance.md, idle). It was 2,456 bytes (release) when the
    /// upgrade and the session shared one task; split, it is ~1.3 KB.
    #[test]
    fn an_idle_sessions_task_stays_small() {
        fn future_size<F: FnOnce(SessionTask) -> Fut, Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(SessionTask::run);
        eprintln!("SessionTask::run future: {size} bytes");
        assert!(
            size <= 1_400,
            "an idle session's task future grew to {size} bytes"
        );
    }
}
