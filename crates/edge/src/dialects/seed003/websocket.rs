//! The WebSocket transport: a fresh session (`transport=websocket`, no sid)
//! or the upgrade of a polling session (`sid=`): `2probe` → `3probe`, a
//! noop flushes the pending poll, `5` switches the session over. One reader
//! loop per socket and, once the socket carries the session, one writer task
//! draining the session's queues (Engine.IO packets are WS text frames).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::engine::{ClientInfo, Engine};
use super::{bad, packet, Shared, BAD_REQUEST, UNKNOWN_SID};
use crate::disconnect::Disconnect;
use crate::frame::{close_frame, ws_frame, OP_PONG};
use crate::http::Body;
use crate::node::Node;
use crate::outbox::Next;

type Io = TokioIo<hyper::upgrade::Upgraded>;

/// How long a closing socket may take to take its last frames.
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(5);

pub(super) async fn handle(
    shared: &Arc<Shared>,
    node: &Arc<Node>,
    mut req: Request<Incoming>,
    sid: Option<String>,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return bad(BAD_REQUEST);
    }
    // Resolve everything that can refuse before the upgrade.
    let target = match sid {
        Some(sid) => match shared.engine(&sid) {
            Some(engine) if !engine.is_websocket() && !engine.is_closed() => {
                Target::Upgrade(engine)
            }
            Some(_) => return bad(BAD_REQUEST),
            None => return bad(UNKNOWN_SID),
        },
        None => match node.try_reserve_connection() {
            Some(slot) => {
                let client = ClientInfo::of(&req, shared.settings.trust_forwarded_for);
                Target::Fresh(Engine::create(shared, node, slot, true, client))
            }
            None => {
                return super::engine_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    3,
                    "node is at its connection limit or draining; retry another node",
                )
            }
        },
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(_) => {
            if let Target::Fresh(engine) = &target {
                engine.close(Disconnect::CLIENT_GONE);
            }
            return bad(BAD_REQUEST);
        }
    };
    let max = shared.settings.max_payload_bytes;
    tokio::spawn(async move {
        let engine = match &target {
            Target::Fresh(e) | Target::Upgrade(e) => e.clone(),
        };
        match upgrade.await {
            Ok(ws) => {
                let fresh = matches!(target, Target::Fresh(_));
                run(engine, ws.into_inner(), max, fresh).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                if let Target::Fresh(engine) = target {
                    engine.close(Disconnect::CLIENT_GONE);
                }
            }
        }
    });
    response.map(|_| Body::default())
}

enum Target {
    Fresh(Arc<Engine>),
    Upgrade(Arc<Engine>),
}

async fn run(engine: Arc<Engine>, io: Io, max_payload: usize, fresh: bool) {
    let (read, write) = tokio::io::split(io);
    let (mut reader, _) =
        fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    reader.set_max_message_size(max_payload);
    reader.set_auto_close(false);
    reader.set_auto_pong(false);
    let mut writer = None;
    // The write half waits here until the upgrade completes.
    let mut parked = None;
    if fresh {
        writer = Some(tokio::spawn(write_loop(engine.clone(), write)));
    } else {
        parked = Some(write);
    }
    let mut done = engine.done();
    let mut fragments: Option<Vec<u8>> = None;
    let mut obligated = |_frame: fastwebsockets::Frame<'_>| {
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };
    let reason = loop {
        let frame = tokio::select! {
            _ = super::engine::closing(&mut done) => break None,
            frame = reader.read_frame(&mut obligated) => frame,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(WebSocketError::FrameTooLarge) => break Some(Disconnect::MESSAGE_TOO_LARGE),
            Err(WebSocketError::UnexpectedEOF | WebSocketError::IoError(_)) => {
                break Some(Disconnect::CLIENT_GONE)
            }
            Err(_) => break Some(Disconnect::PROTOCOL_ERROR),
        };
        let text: Bytes = match frame.opcode {
            OpCode::Ping => {
                let pong = ws_frame(OP_PONG, &frame.payload);
                match parked.as_mut() {
                    Some(w) => {
                        let _ = w.write_all(&pong).await;
                    }
                    None => engine.push_engine(pong),
                }
                continue;
            }
            OpCode::Pong => continue,
            OpCode::Close => break Some(Disconnect::CLIENT_CLOSED),
            // Binary Engine.IO messages carry attachments, refused at the
            // Socket.IO layer; the frames themselves are dropped.
            OpCode::Binary => continue,
            OpCode::Text if frame.fin => {
                if fragments.is_some() {
                    break Some(Disconnect::PROTOCOL_ERROR);
                }
                Bytes::copy_from_slice(&frame.payload)
            }
            OpCode::Text => {
                if fragments.is_some() {
                    break Some(Disconnect::PROTOCOL_ERROR);
                }
                fragments = Some(frame.payload.to_vec());
                continue;
            }
            OpCode::Continuation => {
                let Some(buf) = fragments.as_mut() else {
                    // The tail of a binary message.
                    continue;
                };
                if buf.len() + frame.payload.len() > max_payload {
                    break Some(Disconnect::MESSAGE_TOO_LARGE);
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                Bytes::from(fragments.take().unwrap_or_default())
            }
        };
        let Ok(text) = std::str::from_utf8(&text) else {
            break Some(Disconnect::PROTOCOL_ERROR);
        };
        if let Some(mut w) = parked.take() {
            // Still probing: only the probe and the upgrade are expected.
            match text {
                "2probe" => {
                    let ok = w.write_all(&packet::frame("3probe")).await.is_ok();
                    // Ends the pending poll so the client can pause polling.
                    engine.push_engine(packet::frame("6"));
                    parked = Some(w);
                    if !ok {
                        break None;
                    }
                }
                "5" => {
                    engine.upgraded();
                    writer = Some(tokio::spawn(write_loop(engine.clone(), w)));
                }
                _ => {
                    parked = Some(w);
                    engine.on_text(text).await;
                }
            }
            continue;
        }
        engine.on_text(text).await;
    };
    match (reason, parked) {
        // A failed probe leaves the polling session as it was.
        (reason, Some(mut w)) => {
            if let Some(d) = reason.filter(|d| *d != Disconnect::CLIENT_GONE) {
                let _ = w.write_all(&close_frame(d.code, d.reason)).await;
            }
        }
        (reason, None) => {
            if let Some(d) = reason {
                engine.close(d);
            }
            if let Some(mut writer) = writer {
                if tokio::time::timeout(CLOSE_WRITE_GRACE * 2, &mut writer)
                    .await
                    .is_err()
                {
                    writer.abort();
                }
            }
        }
    }
}

/// Drains the session's queues into the socket until the session closes.
async fn write_loop<W: AsyncWrite + Unpin>(engine: Arc<Engine>, mut write: W) {
    loop {
        match engine.next_batch().await {
            Next::Write(frames) => {
                if write_all(&mut write, frames.iter()).await.is_err() {
                    engine.close(Disconnect::CLIENT_GONE);
                    return;
                }
            }
            Next::Close(frames, disconnect) => {
                engine.close(disconnect);
                let _ = tokio::time::timeout(CLOSE_WRITE_GRACE, async {
                    write_all(&mut write, frames.iter()).await?;
                    if disconnect != Disconnect::CLIENT_GONE {
                        write
                            .write_all(&close_frame(disconnect.code, disconnect.reason))
                            .await?;
                    }
                    write.shutdown().await
                })
                .await;
                return;
            }
        }
    }
}

/// Writes a batch in one buffer: one syscall for the usual small batch.
async fn write_all<'a, W: AsyncWrite + Unpin>(
    write: &mut W,
    frames: impl Iterator<Item = &'a Bytes>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for f in frames {
        buf.extend_from_slice(f);
    }
    write.write_all(&buf).await?;
    write.flush().await
}
