//! The HTTP long-polling transport. `GET` without a sid is the handshake
//! (answered with the open packet); `GET ?sid=` waits for packets and
//! answers them joined with `\x1e`; `POST ?sid=` carries client packets the
//! same way. A session lives on the node that created it: the load balancer
//! must keep a polling client on one node (sticky sessions), and a request
//! for a sid this node does not hold gets HTTP 400
//! `{"code":1,"message":"Session ID unknown"}`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::engine::{ClientInfo, Engine};
use super::{bad, engine_error, packet, Shared, BAD_REQUEST, UNKNOWN_SID};
use crate::disconnect::Disconnect;
use crate::http::Body;
use crate::node::Node;
use crate::outbox::Next;

fn text(body: Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=UTF-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body))
        .expect("static response parts are valid")
}

/// `GET`: the handshake, or one long poll.
pub(super) async fn get(
    shared: &Arc<Shared>,
    node: &Arc<Node>,
    req: Request<Incoming>,
    sid: Option<String>,
) -> Response<Body> {
    let engine = match sid {
        None => {
            let Some(slot) = node.try_reserve_connection() else {
                return engine_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    3,
                    "node is at its connection limit or draining; retry another node",
                );
            };
            let client = ClientInfo::of(&req, shared.settings.trust_forwarded_for);
            Engine::create(shared, node, slot, false, client)
        }
        Some(sid) => match shared.engine(&sid) {
            Some(e) => e,
            None => return bad(UNKNOWN_SID),
        },
    };
    if engine.is_websocket() {
        return bad(BAD_REQUEST);
    }
    let Some(_claim) = engine.claim_poll() else {
        // Two GETs at once: a broken client; Engine.IO closes the session.
        engine.close(Disconnect::PROTOCOL_ERROR);
        return bad(BAD_REQUEST);
    };
    match engine.next_batch().await {
        Next::Write(frames) => text(packet::polling_payload(frames.iter())),
        Next::Close(frames, disconnect) => {
            engine.close(disconnect);
            let mut frames: Vec<Bytes> = frames.into_iter().collect();
            frames.push(packet::frame("1"));
            text(packet::polling_payload(frames.iter()))
        }
    }
}

/// `POST`: client packets.
pub(super) async fn post(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    sid: Option<String>,
) -> Response<Body> {
    let Some(engine) = sid.and_then(|sid| shared.engine(&sid)) else {
        return bad(UNKNOWN_SID);
    };
    if engine.is_closed() {
        return bad(UNKNOWN_SID);
    }
    let max = shared.settings.max_payload_bytes;
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                engine.close(Disconnect::MESSAGE_TOO_LARGE);
                return engine_error(StatusCode::PAYLOAD_TOO_LARGE, 3, "payload too large");
            }
            engine.close(Disconnect::CLIENT_GONE);
            return bad(BAD_REQUEST);
        }
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        engine.close(Disconnect::PROTOCOL_ERROR);
        return bad(BAD_REQUEST);
    };
    for record in body.split(char::from(packet::SEPARATOR)) {
        // `b<base64>` records are binary attachments: refused at the
        // Socket.IO layer, dropped here.
        if record.starts_with('b') {
            continue;
        }
        engine.on_text(record).await;
        if engine.is_closed() {
            break;
        }
    }
    text(Bytes::from_static(b"ok"))
}
