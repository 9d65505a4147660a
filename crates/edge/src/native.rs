//! The native protocol v1 (docs/protocol.md): JSON text frames under
//! `roomcast.v1.json`, protobuf binary frames under `roomcast.v1.proto`.
//! Turns inbound frames into commands and renders replies and events.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::Decision;
use roomcast_protocol::native::{self, ClientMessage, Command, Denied, ErrorCode, Reply};
use roomcast_protocol::{Event, EventId, RoomName};

use crate::dialect::{Accepted, Connection, Dialect, Inbound, Refusal, SessionCtx};
use crate::disconnect::Disconnect;
use crate::frame::{ws_frame, OP_BINARY, OP_TEXT};
use crate::http::{json_error, Body};
use crate::node::Node;
use crate::session::Renderer;

/// Wire format negotiated through the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Proto,
}

impl Format {
    /// Picks the format from a `Sec-WebSocket-Protocol` offer. `Ok(None)`:
    /// no offer (JSON, nothing echoed); `Err`: only unknown subprotocols.
    pub fn negotiate(offer: Option<&str>) -> Result<Option<Format>, String> {
        let Some(offer) = offer else {
            return Ok(None);
        };
        let mut offered = offer.split(',').map(str::trim);
        let list: Vec<&str> = offered.by_ref().collect();
        if list.contains(&native::SUBPROTOCOL_PROTO) {
            Ok(Some(Format::Proto))
        } else if list.contains(&native::SUBPROTOCOL_JSON) {
            Ok(Some(Format::Json))
        } else {
            Err(format!(
                "unsupported subprotocol; offer {} or {}",
                native::SUBPROTOCOL_JSON,
                native::SUBPROTOCOL_PROTO
            ))
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::Json => native::SUBPROTOCOL_JSON,
            Format::Proto => native::SUBPROTOCOL_PROTO,
        }
    }
}

/// Renders native event frames, whole WebSocket frames included.
pub(crate) struct NativeRenderer {
    format: Format,
    slot: usize,
}

impl NativeRenderer {
    pub(crate) fn new(format: Format, slot: usize) -> Self {
        Self { format, slot }
    }
}

impl Renderer for NativeRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, room: &RoomName) -> Option<Bytes> {
        Some(match self.format {
            Format::Json => ws_frame(OP_TEXT, &native::render_event_json(event, room.as_str())),
            Format::Proto => ws_frame(OP_BINARY, &native::render_event_proto(event, room.as_str())),
        })
    }
}

/// Renders a reply as a whole WebSocket frame in the session's format.
pub(crate) fn reply_frame(format: Format, reply: &Reply, reference: Option<&str>) -> Bytes {
    match format {
        Format::Json => ws_frame(OP_TEXT, reply.to_json(reference).as_bytes()),
        Format::Proto => ws_frame(OP_BINARY, &reply.to_proto(reference)),
    }
}

/// The native dialect: `/v1/ws` (and the fallbacks that share its envelope).
pub(crate) struct NativeDialect {
    ws_path: String,
    json: Arc<dyn Renderer>,
    proto: Arc<dyn Renderer>,
}

impl NativeDialect {
    pub(crate) fn new(
        config: &crate::config::NativeSettings,
        slots: &mut crate::dialects::Slots,
    ) -> Self {
        Self {
            ws_path: config.ws_path.clone(),
            json: Arc::new(NativeRenderer::new(Format::Json, slots.allocate())),
            proto: Arc::new(NativeRenderer::new(Format::Proto, slots.allocate())),
        }
    }

    async fn accept(
        &self,
        node: Arc<Node>,
        parts: http::request::Parts,
    ) -> Result<Accepted, Refusal> {
        let token =
            roomcast_auth::token_from_request(&parts, Some(&node.config().auth.cookie_name));
        let identity = match token.as_deref().map(|t| node.verifier().verify(t)) {
            Some(Ok(identity)) => identity,
            Some(Err(e)) => return Err(Refusal::unauthenticated(&e)),
            None => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::AuthenticationFailed,
                    "no token: send Authorization: Bearer, ?token= or the cookie",
                    "missing_token",
                ))
            }
        };
        let offer = parts
            .headers
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        let negotiated = Format::negotiate(offer).map_err(|message| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                message,
                "subprotocol",
            )
        })?;
        let format = negotiated.unwrap_or(Format::Json);
        Ok(Accepted {
            identity,
            renderer: match format {
                Format::Json => self.json.clone(),
                Format::Proto => self.proto.clone(),
            },
            subprotocol: negotiated.map(Format::subprotocol),
            connection: Box::new(NativeConnection { format }),
            limits: node.config().limits.clone(),
            guard: None,
            transport: "ws",
        })
    }
}

#[async_trait]
impl Dialect for NativeDialect {
    fn name(&self) -> &'static str {
        "native"
    }

    fn paths(&self) -> Vec<String> {
        vec![self.ws_path.clone()]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if req.method() != http::Method::GET {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidMessage,
                "method not allowed",
            );
        }
        let n = node.clone();
        crate::ws::upgrade(node.clone(), req, |parts| self.accept(n, parts)).await
    }
}

/// One native session's protocol state.
pub(crate) struct NativeConnection {
    format: Format,
}

impl NativeConnection {
    fn send(&self, ctx: &SessionCtx, reply: &Reply, reference: Option<&str>) {
        ctx.send(reply_frame(self.format, reply, reference));
    }

    fn send_error(
        &self,
        ctx: &SessionCtx,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<&str>,
    ) {
        metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
        self.send(
            ctx,
            &Reply::Error {
                code,
                message: message.into(),
            },
            reference,
        );
    }

    async fn subscribe(
        &self,
        ctx: &SessionCtx,
        rooms: Vec<String>,
        since: BTreeMap<String, String>,
        reference: Option<&str>,
    ) {
        if rooms.is_empty() {
            return self.send_error(
                ctx,
                ErrorCode::InvalidMessage,
                "`rooms` must name at least one room",
                reference,
            );
        }
        let max = ctx.node.config().limits.max_rooms_per_session;
        let mut ok = Vec::new();
        let mut denied = Vec::new();
        let mut recovered = BTreeMap::new();
        let mut resumes = Vec::new();
        for raw in rooms {
            let room: RoomName = match raw.parse() {
                Ok(r) => r,
                Err(_) => {
                    denied.push(Denied {
                        room: raw,
                        code: ErrorCode::InvalidRoom,
                    });
                    continue;
                }
            };
            if ok.contains(&raw) {
                continue;
            }
            if !ctx.session.in_room(&room) && ctx.session.room_count() >= max {
                denied.push(Denied {
                    room: raw,
                    code: ErrorCode::SubscriptionLimit,
                });
                continue;
            }
            if let Decision::Deny(reason) =
                ctx.node.authorizer().authorize(&ctx.identity, &room).await
            {
                denied.push(Denied {
                    room: raw,
                    code: reason.error_code(),
                });
                continue;
            }
            let Some(position) = since.get(&raw) else {
                match ctx.join(room, max).await {
                    Ok(_) => ok.push(raw),
                    Err(e) => denied.push(Denied {
                        room: raw,
                        code: e.code(),
                    }),
                }
                continue;
            };
            let Ok(position) = position.parse::<EventId>() else {
                denied.push(Denied {
                    room: raw,
                    code: ErrorCode::InvalidMessage,
                });
                continue;
            };
            match ctx
                .node
                .hub()
                .join_resuming(&ctx.session, room, position)
                .await
            {
                Ok(resume) => {
                    recovered.insert(raw.clone(), resume.recovered);
                    resumes.push(resume);
                    ok.push(raw);
                }
                Err(e) => {
                    tracing::warn!(session = %ctx.session.id, error = %e, "resume failed");
                    denied.push(Denied {
                        room: raw,
                        code: ErrorCode::InternalError,
                    });
                }
            }
        }
        // The reply first, then the missed events, then live ones.
        self.send(
            ctx,
            &Reply::Subscribed {
                rooms: ok,
                denied,
                recovered,
            },
            reference,
        );
        for resume in resumes {
            resume.replay(&ctx.session);
        }
    }

    async fn unsubscribe(&self, ctx: &SessionCtx, rooms: Vec<String>, reference: Option<&str>) {
        let mut left = Vec::new();
        let mut invalid = Vec::new();
        for raw in rooms {
            match raw.parse::<RoomName>() {
                Ok(room) => {
                    ctx.leave(&room).await;
                    left.push(raw);
                }
                Err(_) => invalid.push(raw),
            }
        }
        if !invalid.is_empty() {
            self.send_error(
                ctx,
                ErrorCode::InvalidRoom,
                format!("not room names: {}", invalid.join(", ")),
                reference,
            );
        }
        self.send(ctx, &Reply::Unsubscribed { rooms: left }, reference);
    }
}

#[async_trait]
impl Connection for NativeConnection {
    async fn opened(&mut self, ctx: &SessionCtx) -> Result<(), Disconnect> {
        self.send(
            ctx,
            &Reply::Welcome {
                session: ctx.session.id.to_string(),
                node: ctx.node.id().to_string(),
                user: ctx.identity.user.to_string(),
                tenant: ctx.identity.tenant.to_string(),
            },
            None,
        );
        Ok(())
    }

    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect> {
        let parsed = match (self.format, msg.binary) {
            (Format::Json, false) => ClientMessage::from_json(msg.payload),
            (Format::Proto, true) => ClientMessage::from_proto(msg.payload),
            (Format::Json, true) => {
                self.send_error(
                    ctx,
                    ErrorCode::InvalidMessage,
                    "binary frames need subprotocol roomcast.v1.proto",
                    None,
                );
                return Ok(());
            }
            (Format::Proto, false) => {
                self.send_error(
                    ctx,
                    ErrorCode::InvalidMessage,
                    "text frames need subprotocol roomcast.v1.json",
                    None,
                );
                return Ok(());
            }
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                self.send_error(
                    ctx,
                    ErrorCode::InvalidMessage,
                    e.message,
                    e.reference.as_deref(),
                );
                return Ok(());
            }
        };
        let reference = msg.reference.as_deref();
        match msg.command {
            Command::Subscribe { rooms, since } => {
                self.subscribe(ctx, rooms, since, reference).await
            }
            Command::Unsubscribe { rooms } => self.unsubscribe(ctx, rooms, reference).await,
            Command::Ping { ts } => self.send(
                ctx,
                &Reply::Pong {
                    ts: crate::hub::now_ms(),
                    client_ts: ts,
                },
                reference,
            ),
        }
        Ok(())
    }

    fn rate_limited(&mut self, ctx: &SessionCtx) {
        let l = &ctx.node.config().limits;
        self.send_error(
            ctx,
            ErrorCode::RateLimitExceeded,
            format!(
                "at most {} messages per {:?}",
                l.rate_messages, l.rate_window
            ),
            None,
        );
    }

    fn too_large(&mut self, ctx: &SessionCtx) {
        let max = ctx.node.config().limits.max_message_bytes;
        self.send_error(
            ctx,
            ErrorCode::MessageTooLarge,
            format!("messages are limited to {max} bytes"),
            None,
        );
    }
}
