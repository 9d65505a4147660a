//! The `/ws/app` namespace of one Engine.IO session: the CONNECT with the
//! token in `auth`, the events of the seed document, acks, and the
//! automatic rooms (`user:<id>`, the namespace-wide broadcast room).

use std::sync::Arc;

use roomcast_auth::{AuthFailure, Decision, Identity};
use roomcast_protocol::RoomName;
use serde_json::{json, Value};

use super::engine::Engine;
use super::packet::{self, Kind, SocketPacket};
use super::presence;
use crate::dialect::{JoinError, SessionCtx};
use crate::disconnect::Disconnect;

use crate::session::Session;

/// Error codes of the seed document, and ours for bad input.
pub(crate) const UNAUTHORIZED: &str = "socket_error:unauthorized";
pub(crate) const TOKEN_EXPIRED: &str = "socket_error:token_expired";
const INVALID_PACKET: &str = "socket_error:invalid_packet";
const BINARY_UNSUPPORTED: &str = "socket_error:binary_unsupported";
const RATE_LIMITED: &str = "socket_error:rate_limited";

pub(crate) enum Socket {
    /// No namespace connected yet.
    Waiting,
    Connected(Box<SessionCtx>),
    /// Cleaned up; nothing more happens.
    Gone,
}

impl Socket {
    pub(crate) async fn on_message(&mut self, engine: &Arc<Engine>, text: &str) {
        let ns = engine.shared.settings.namespace.as_str();
        let p = match packet::parse_socket(text) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(sid = %engine.sid, error = %e, "socket.io parse error");
                return match self {
                    Socket::Connected(_) => emit_error(engine, INVALID_PACKET, &e.to_string()),
                    _ => engine.close(Disconnect::PROTOCOL_ERROR),
                };
            }
        };
        if p.nsp != ns {
            if p.kind == Kind::Connect {
                let data = json!({"message": "Invalid namespace"}).to_string();
                engine.push_socket(&packet::socket_text(
                    Kind::ConnectError,
                    p.nsp,
                    None,
                    Some(&data),
                ));
            }
            return;
        }
        match (p.kind, &*self) {
            (Kind::Connect, Socket::Waiting) => self.connect(engine, p).await,
            (Kind::Connect, Socket::Connected(ctx)) => {
                // A repeated CONNECT: the socket is already there.
                let data = json!({"sid": ctx.session.id.as_str()}).to_string();
                engine.push_socket(&packet::socket_text(Kind::Connect, ns, None, Some(&data)));
            }
            (Kind::Disconnect, _) => engine.close(Disconnect::CLIENT_CLOSED),
            (Kind::Event, Socket::Connected(ctx)) => event(engine, ctx, p).await,
            (Kind::BinaryEvent | Kind::BinaryAck, Socket::Connected(_)) => {
                emit_error(
                    engine,
                    BINARY_UNSUPPORTED,
                    "binary attachments are not supported on this server",
                );
                if let Some(id) = p.ack.filter(|_| p.kind == Kind::BinaryEvent) {
                    ack(
                        engine,
                        id,
                        false,
                        Some("binary attachments are not supported"),
                    );
                }
            }
            // Acks of server emits (none ask for one), CONNECT_ERROR from a
            // client, and packets for a namespace not connected: ignored, as
            // Socket.IO does.
            _ => {}
        }
    }

    async fn connect(&mut self, engine: &Arc<Engine>, p: SocketPacket<'_>) {
        let ns = engine.shared.settings.namespace.as_str();
        let token = p
            .data
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned));
        let identity = match token.as_deref().map(|t| engine.shared.verifier.verify(t)) {
            Some(Ok(identity)) => identity,
            failure => {
                let failure = match failure {
                    Some(Err(f)) => f,
                    _ => AuthFailure::MissingToken,
                };
                metrics::counter!("roomcast_auth_failures_total", "reason" => failure.reason())
                    .increment(1);
                let code = if failure == AuthFailure::Expired {
                    TOKEN_EXPIRED
                } else {
                    UNAUTHORIZED
                };
                // `message` is the code, so `err.message` and
                // `err.data.code` both carry it in socket.io-client.
                let data = json!({
                    "message": code,
                    "data": {"code": code, "message": failure.to_string()},
                })
                .to_string();
                engine.push_socket(&packet::socket_text(
                    Kind::ConnectError,
                    ns,
                    None,
                    Some(&data),
                ));
                return;
            }
        };
        if engine.is_closed() {
            return;
        }
        let node = &engine.node;
        let limits = &node.config().limits;
        let session = Session::for_identity("s", &identity, engine.shared.renderer.clone(), limits);
        if let Some(ua) = &engine.client.user_agent {
            session.set_user_agent(ua);
        }
        if let Some(ip) = &engine.client.ip {
            session.set_ip(ip);
        }
        node.register(&session);
        let expires = token_deadline(identity.expires_at + node.config().auth.leeway_secs);
        engine.set_hub(session.clone(), expires);
        let data = json!({"sid": session.id.as_str()}).to_string();
        engine.push_socket(&packet::socket_text(Kind::Connect, ns, None, Some(&data)));
        let ctx = SessionCtx {
            node: node.clone(),
            session,
            identity,
        };
        let max = limits.max_rooms_per_session.max(2);
        let own = user_room(&ctx.identity);
        for room in [own, engine.shared.broadcast_room.clone()] {
            if let Err(e) = ctx.join(room.clone(), max).await {
                tracing::warn!(sid = %engine.sid, %room, ?e, "automatic room not joined");
                emit_error(
                    engine,
                    "socket_error:adapter",
                    "could not join the personal room; reconnect",
                );
            }
        }
        let ready = json!({
            "message": "Notifications channel ready",
            "userId": ctx.identity.user.as_str(),
        });
        emit(engine, "notifications:ready", &ready);
        *self = Socket::Connected(Box::new(ctx));
        self.refresh_presence(engine, true).await;
    }

    /// Refreshes the presence entry; `announce` broadcasts the snapshot.
    pub(crate) async fn refresh_presence(&self, engine: &Engine, announce: bool) {
        if let Socket::Connected(ctx) = self {
            presence::refresh(engine, ctx, announce).await;
        }
    }

    pub(crate) fn rate_limited(&self, engine: &Engine) {
        if let Socket::Connected(_) = self {
            let l = &engine.node.config().limits;
            let msg = format!(
                "at most {} messages per {:?}",
                l.rate_messages, l.rate_window
            );
            emit_error(engine, RATE_LIMITED, &msg);
        }
    }

    /// The token's `exp` passed: the `error` event, then the server-side
    /// DISCONNECT of the namespace, then the session closes.
    pub(crate) fn token_expired(&self, engine: &Engine) {
        if let Socket::Connected(_) = self {
            emit_error(engine, TOKEN_EXPIRED, "Token verified but has expired.");
            let ns = engine.shared.settings.namespace.as_str();
            engine.push_socket(&packet::socket_text(Kind::Disconnect, ns, None, None));
            engine.close(Disconnect::TOKEN_EXPIRED);
        }
    }

    /// After the session closed: presence, rooms, registration.
    pub(crate) async fn closed(&mut self, engine: &Engine) {
        if let Socket::Connected(ctx) = std::mem::replace(self, Socket::Gone) {
            presence::remove(engine, &ctx).await;
            ctx.node.hub().leave_all(&ctx.session).await;
            ctx.node.unregister(&ctx.session.id);
        }
    }
}

fn user_room(identity: &Identity) -> RoomName {
    RoomName::from_parts("user", identity.user.as_str()).expect("user ids are valid room ids")
}

/// When the token's `exp` passes, as a timer deadline.
fn token_deadline(expires_at: u64) -> tokio::time::Instant {
    let now_s = crate::hub::now_ms() / 1000;
    let left = std::time::Duration::from_secs(expires_at.saturating_sub(now_s));
    tokio::time::Instant::now() + left.min(std::time::Duration::from_secs(10 * 365 * 24 * 3600))
}

pub(crate) fn emit(engine: &Engine, name: &str, data: &Value) {
    let ns = engine.shared.settings.namespace.as_str();
    engine.push_socket(&packet::event_text(ns, name, &data.to_string()));
}

/// The seed's `error` event: `{code, message}`.
pub(crate) fn emit_error(engine: &Engine, code: &str, message: &str) {
    metrics::counter!("roomcast_client_errors_total", "code" => code.to_owned()).increment(1);
    emit(engine, "error", &json!({"code": code, "message": message}));
}

fn ack(engine: &Engine, id: u64, success: bool, message: Option<&str>) {
    let ns = engine.shared.settings.namespace.as_str();
    let body = match message {
        Some(m) if !success => json!([{"success": false, "message": m}]),
        _ => json!([{"success": success}]),
    };
    engine.push_socket(&packet::socket_text(
        Kind::Ack,
        ns,
        Some(id),
        Some(&body.to_string()),
    ));
}

async fn event(engine: &Arc<Engine>, ctx: &SessionCtx, p: SocketPacket<'_>) {
    let args: Vec<Value> = match p.data.map(serde_json::from_str) {
        Some(Ok(Value::Array(a))) if a.first().is_some_and(Value::is_string) => a,
        _ => {
            return emit_error(
                engine,
                INVALID_PACKET,
                "an EVENT carries a JSON array starting with the event name",
            )
        }
    };
    let name = args[0].as_str().unwrap_or_default();
    let arg = args.get(1);
    match name {
        "conversations:join" => {
            let outcome = join(ctx, arg).await;
            if let Some(id) = p.ack {
                match outcome {
                    Ok(()) => ack(engine, id, true, None),
                    Err(message) => ack(engine, id, false, Some(&message)),
                }
            }
        }
        "conversations:leave" => {
            let outcome = match conversation_room(arg) {
                Ok(room) => {
                    ctx.leave(&room).await;
                    Ok(())
                }
                Err(m) => Err(m),
            };
            if let Some(id) = p.ack {
                ack(engine, id, outcome.is_ok(), outcome.err().as_deref());
            }
        }
        "presence:heartbeat" => {
            presence::refresh(engine, ctx, true).await;
            if let Some(id) = p.ack {
                ack(engine, id, true, None);
            }
        }
        _ => {
            if let Some(id) = p.ack {
                ack(engine, id, false, Some("unknown event"));
            }
        }
    }
}

/// `conversation:<conversationId>` from `{conversationId}` (string or number).
fn conversation_room(arg: Option<&Value>) -> Result<RoomName, String> {
    let id = match arg.and_then(|a| a.get("conversationId")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return Err("conversationId is required".into()),
    };
    RoomName::from_parts("conversation", &id).map_err(|_| "conversationId is invalid".into())
}

/// The membership check (the product's callback, cached), then the join.
async fn join(ctx: &SessionCtx, arg: Option<&Value>) -> Result<(), String> {
    let room = conversation_room(arg)?;
    if ctx.session.in_room(&room) {
        return Ok(());
    }
    if let Decision::Deny(reason) = ctx.node.authorizer().authorize(&ctx.identity, &room).await {
        return Err(reason.to_string());
    }
    let max = ctx.node.config().limits.max_rooms_per_session;
    match ctx.join(room, max).await {
        Ok(_) => Ok(()),
        Err(JoinError::Limit) => Err("too many rooms joined".into()),
        Err(JoinError::Broker) => Err("could not join the conversation; try again".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids() {
        assert_eq!(
            conversation_room(Some(&json!({"conversationId": "c1"})))
                .unwrap()
                .as_str(),
            "conversation:c1"
        );
        assert_eq!(
            conversation_room(Some(&json!({"conversationId": 42})))
                .unwrap()
                .as_str(),
            "conversation:42"
        );
        assert!(conversation_room(Some(&json!({"conversationId": "a b"}))).is_err());
        assert!(conversation_room(Some(&json!({}))).is_err());
        assert!(conversation_room(None).is_err());
    }
}
