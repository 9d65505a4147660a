//! The WebSocket transport, shared by every WebSocket dialect: checks before
//! the upgrade (connection cap, then the dialect's `accept`), then one reader
//! loop and one writer task per session. The writer drains the session's
//! outbox in vectored writes and sends pings; the reader parses frames,
//! enforces size and rate limits, the idle timeout, token expiry and the
//! dialect's timers, and hands complete messages to the dialect's
//! [`crate::dialect::Connection`].

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use roomcast_protocol::native::ErrorCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::dialect::{Accepted, Inbound, Refusal, SessionCtx};
use crate::disconnect::Disconnect;
use crate::frame::{close_frame, ws_frame, OP_PING, OP_PONG};
use crate::http::{json_error, Body};
use crate::node::{ConnectionSlot, Node};
use crate::outbox::{Next, Outbox};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::session::Session;

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
    tokio::spawn(async move {
        match upgrade.await {
            Ok(ws) => run_session(node, slot, ws.into_inner(), accepted).await,
            Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
        }
    });
    response
}

type Io = TokioIo<hyper::upgrade::Upgraded>;

async fn run_session(node: Arc<Node>, slot: ConnectionSlot, io: Io, accepted: Accepted) {
    let Accepted {
        identity,
        renderer,
        subprotocol: _,
        mut connection,
        limits,
        guard,
        transport,
    } = accepted;
    let session = Arc::new(Session::new(
        crate::ids::random_id("s")
            .parse()
            .expect("generated ids are valid"),
        identity.user.clone(),
        identity.tenant.clone(),
        identity.roles.clone().into_boxed_slice(),
        renderer,
        Outbox::new(limits.outbound_queue_frames, limits.outbound_queue_bytes),
    ));
    let (read, write) = tokio::io::split(io);
    let (mut reader, _) =
        fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    reader.set_max_message_size(limits.max_message_bytes);
    reader.set_auto_close(false);
    reader.set_auto_pong(false);

    node.register(&session);
    metrics::gauge!("roomcast_connections", "transport" => transport).increment(1.0);
    metrics::counter!("roomcast_connections_total", "transport" => transport).increment(1);
    tracing::debug!(session = %session.id, user = %identity.user, tenant = %identity.tenant, transport, "session open");

    let mut writer = tokio::spawn(write_loop(session.clone(), write, limits.ping_interval));
    let expires = token_deadline(identity.expires_at + node.config().auth.leeway_secs);
    let ctx = SessionCtx {
        node: node.clone(),
        session: session.clone(),
        identity,
    };
    let mut idle_deadline = Instant::now() + limits.idle_timeout;
    let mut limiter = RateLimiter::new(
        limits.rate_messages,
        limits.rate_window,
        limits.rate_strikes,
    );
    let mut fragments: Option<(bool, Vec<u8>)> = None;
    let outbox = &session.outbox;
    let mut obligated = |frame: fastwebsockets::Frame<'_>| {
        // Only reached for obligations we did not disable; answer in order.
        let _ = outbox.push(ws_frame(frame.opcode as u8, &frame.payload));
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };
    let mut writer_done = false;
    let opened = connection.opened(&ctx).await;
    let reason: Disconnect = 'session: {
        if let Err(d) = opened {
            break 'session d;
        }
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let dialect_deadline = connection.deadline().unwrap_or(far);
            let frame = tokio::select! {
                biased;
                _ = &mut writer => {
                    writer_done = true;
                    break outbox.close_reason().unwrap_or(Disconnect::CLIENT_GONE);
                }
                _ = tokio::time::sleep_until(expires) => break Disconnect::TOKEN_EXPIRED,
                _ = tokio::time::sleep_until(idle_deadline) => break Disconnect::IDLE_TIMEOUT,
                _ = tokio::time::sleep_until(dialect_deadline) => {
                    if let Err(d) = connection.on_deadline(&ctx).await {
                        break d;
                    }
                    continue;
                }
                frame = reader.read_frame(&mut obligated) => frame,
            };
            let frame = match frame {
                Ok(f) => f,
                Err(WebSocketError::FrameTooLarge) => {
                    connection.too_large(&ctx);
                    break Disconnect::MESSAGE_TOO_LARGE;
                }
                Err(WebSocketError::UnexpectedEOF | WebSocketError::IoError(_)) => {
                    break Disconnect::CLIENT_GONE
                }
                Err(e) => {
                    tracing::debug!(session = %session.id, error = %e, "protocol error");
                    break Disconnect::PROTOCOL_ERROR;
                }
            };
            idle_deadline = Instant::now() + limits.idle_timeout;
            let (binary, payload): (bool, Bytes) = match frame.opcode {
                OpCode::Ping => {
                    let _ = outbox.push(ws_frame(OP_PONG, &frame.payload));
                    continue;
                }
                OpCode::Pong => continue,
                OpCode::Close => break Disconnect::CLIENT_CLOSED,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    if fragments.is_some() {
                        break Disconnect::PROTOCOL_ERROR;
                    }
                    (
                        frame.opcode == OpCode::Binary,
                        Bytes::copy_from_slice(&frame.payload),
                    )
                }
                OpCode::Text | OpCode::Binary => {
                    if fragments.is_some() {
                        break Disconnect::PROTOCOL_ERROR;
                    }
                    fragments = Some((frame.opcode == OpCode::Binary, frame.payload.to_vec()));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((binary, buf)) = fragments.as_mut() else {
                        break Disconnect::PROTOCOL_ERROR;
                    };
                    if buf.len() + frame.payload.len() > limits.max_message_bytes {
                        connection.too_large(&ctx);
                        break Disconnect::MESSAGE_TOO_LARGE;
                    }
                    buf.extend_from_slice(&frame.payload);
                    if !frame.fin {
                        continue;
                    }
                    let binary = *binary;
                    let (_, buf) = fragments.take().expect("checked above");
                    (binary, Bytes::from(buf))
                }
            };
            match limiter.check(Instant::now()) {
                Verdict::Allow => {
                    let msg = Inbound {
                        binary,
                        payload: &payload,
                    };
                    if let Err(d) = connection.message(&ctx, msg).await {
                        break d;
                    }
                }
                Verdict::Reject { first_in_window } => {
                    if first_in_window {
                        connection.rate_limited(&ctx);
                    }
                }
                Verdict::Disconnect => break Disconnect::RATE_LIMIT,
            }
            if let Some(reason) = outbox.close_reason() {
                // A slow-consumer overflow or a drain: the writer ends the socket.
                break reason;
            }
        }
    };

    // Flush pending replies (e.g. the error frame) before a policy close; a
    // gone client has nobody to flush to.
    outbox.close(reason, reason != Disconnect::CLIENT_GONE);
    if !writer_done {
        // The writer gives the close frame at most CLOSE_WRITE_GRACE.
        let _ = tokio::time::timeout(CLOSE_WRITE_GRACE * 2, &mut writer).await;
        writer.abort();
    }
    connection.closed(&ctx).await;
    node.hub().leave_all(&session).await;
    node.unregister(&session.id);
    metrics::gauge!("roomcast_connections", "transport" => transport).decrement(1.0);
    metrics::counter!("roomcast_disconnects_total", "reason" => reason.label).increment(1);
    tracing::debug!(session = %session.id, reason = reason.label, "session closed");
    drop(guard);
    drop(slot);
}

/// When the token's `exp` passes; tokens without one never get here (the
/// verifier requires `exp`), but a far deadline keeps the select simple.
fn token_deadline(expires_at: u64) -> Instant {
    let now_s = crate::hub::now_ms() / 1000;
    let left = Duration::from_secs(expires_at.saturating_sub(now_s));
    Instant::now() + left.min(Duration::from_secs(10 * 365 * 24 * 3600))
}

/// How long a closing session may take to take its last frames and the close
/// frame. Its queue is already freed, so only kernel buffers wait meanwhile.
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(5);

/// Drains the outbox into the socket, several frames per syscall, and sends
/// a ping every `ping_interval`. Ends after writing a close frame or when the
/// socket fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    session: Arc<Session>,
    mut write: W,
    ping_interval: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        let next = tokio::select! {
            next = session.outbox.next() => next,
            _ = ping.tick() => {
                let _ = session.outbox.push(ws_frame(OP_PING, b""));
                continue;
            }
        };
        match next {
            Next::Write(frames) => {
                if write_all_vectored(&mut write, frames.iter().cloned().collect())
                    .await
                    .is_err()
                {
                    session.outbox.close(Disconnect::CLIENT_GONE, false);
                    return;
                }
            }
            Next::Close(frames, disconnect) => {
                let mut batch: Vec<Bytes> = frames.into_iter().collect();
                if disconnect != Disconnect::CLIENT_GONE {
                    batch.push(close_frame(disconnect.code, disconnect.reason));
                }
                // A slow consumer's socket buffer may be full: give the close
                // frame a bounded chance, then drop the socket regardless.
                let _ = tokio::time::timeout(CLOSE_WRITE_GRACE, async {
                    write_all_vectored(&mut write, batch).await?;
                    write.shutdown().await
                })
                .await;
                return;
            }
        }
    }
}

/// Writes every frame, as few syscalls as the kernel allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    write: &mut W,
    mut frames: Vec<Bytes>,
) -> std::io::Result<()> {
    const MAX_IOV: usize = 64;
    let mut start = 0;
    while start < frames.len() {
        let end = frames.len().min(start + MAX_IOV);
        let slices: Vec<IoSlice<'_>> = frames[start..end].iter().map(|b| IoSlice::new(b)).collect();
        let mut n = write.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let len = frames[start].len();
            if n >= len {
                n -= len;
                start += 1;
            } else {
                let rest = frames[start].slice(n..);
                frames[start] = rest;
                n = 0;
            }
        }
    }
    write.flush().await
}
