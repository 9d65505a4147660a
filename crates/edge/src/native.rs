//! The native protocol v1 (docs/protocol.md): JSON text frames under
//! `roomcast.v1.json`, protobuf binary frames under `roomcast.v1.proto`.
//! Turns inbound frames into commands and renders replies and events.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::{Decision, Identity};
use roomcast_protocol::native::{
    self, ClientMessage, Command, Denied, ErrorCode, PresenceSession, PresenceUser, Reply,
};
use roomcast_protocol::{Event, EventId, RoomKey, RoomName};

use crate::dialect::{Accepted, Connection, Dialect, Inbound, Refusal, SessionCtx};
use crate::disconnect::Disconnect;
use crate::frame::{ws_frame, OP_BINARY, OP_TEXT};
use crate::http::Body;
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
    /// The SSE and long-poll fallbacks (docs/protocol.md, "Fallback transports").
    sse_path: String,
    poll_path: String,
    sse_heartbeat: std::time::Duration,
    poll_wait: std::time::Duration,
    sse: Arc<dyn Renderer>,
    poll: Arc<dyn Renderer>,
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
            sse_path: config.sse_path.clone(),
            poll_path: config.poll_path.clone(),
            sse_heartbeat: config.sse_heartbeat,
            poll_wait: config.poll_wait,
            sse: Arc::new(crate::sse::SseRenderer::new(slots.allocate(), |e, r| {
                Some(native::render_event_json(e, r.as_str()))
            })),
            poll: Arc::new(crate::poll::ItemRenderer::new(slots.allocate(), |e, r| {
                Some(native::render_event_json(e, r.as_str()))
            })),
        }
    }

    /// The token of the request (`Authorization: Bearer`, `?token=`, the
    /// cookie), verified.
    fn authenticate(node: &Node, parts: &http::request::Parts) -> Result<Identity, Refusal> {
        let token = roomcast_auth::token_from_request(parts, Some(&node.config().auth.cookie_name));
        match token.as_deref().map(|t| node.verifier().verify(t)) {
            Some(Ok(identity)) => Ok(identity),
            Some(Err(e)) => Err(Refusal::unauthenticated(&e)),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationFailed,
                "no token: send Authorization: Bearer, ?token= or the cookie",
                "missing_token",
            )),
        }
    }

    /// Who the fallback request is and which rooms (`?rooms=a,b`) it may
    /// read: every room must parse and be authorised, or the request is
    /// refused (400/403) before anything streams.
    async fn fallback_rooms(
        node: &Node,
        parts: &http::request::Parts,
    ) -> Result<(Identity, Vec<RoomName>), Refusal> {
        let identity = Self::authenticate(node, parts)?;
        let bad = |code, message: String, reason| {
            Refusal::new(StatusCode::BAD_REQUEST, code, message, reason)
        };
        let raw = crate::http::query_param(parts.uri.query(), "rooms").unwrap_or_default();
        let mut rooms: Vec<RoomName> = Vec::new();
        for name in raw.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let room: RoomName = name.parse().map_err(|_| {
                bad(
                    ErrorCode::InvalidRoom,
                    format!("not a room name: {name}"),
                    "invalid_room",
                )
            })?;
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        if rooms.is_empty() {
            return Err(bad(
                ErrorCode::InvalidMessage,
                "`rooms` must name at least one room (?rooms=team:42,task:t1)".into(),
                "no_rooms",
            ));
        }
        let max = node.config().limits.max_rooms_per_session;
        if rooms.len() > max {
            return Err(bad(
                ErrorCode::SubscriptionLimit,
                format!("at most {max} rooms per session"),
                "subscription_limit",
            ));
        }
        for room in &rooms {
            if let Decision::Deny(reason) = node.authorizer().authorize(&identity, room).await {
                let status = match reason.error_code() {
                    ErrorCode::InternalError => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::FORBIDDEN,
                };
                return Err(Refusal::new(
                    status,
                    reason.error_code(),
                    format!("{room}: {reason}"),
                    "room_denied",
                ));
            }
        }
        Ok((identity, rooms))
    }

    async fn accept_sse(
        &self,
        node: Arc<Node>,
        parts: http::request::Parts,
    ) -> Result<crate::sse::SseAccepted, Refusal> {
        let (identity, rooms) = Self::fallback_rooms(&node, &parts).await?;
        let since = crate::sse::last_event_id(&parts)?;
        Ok(crate::sse::SseAccepted {
            identity,
            renderer: self.sse.clone(),
            rooms,
            since,
            heartbeat: self.sse_heartbeat,
            limits: node.config().limits.clone(),
            transport: "sse",
            opening: Some(Box::new(|opened: &crate::sse::Opened| {
                let reply = Reply::Subscribed {
                    rooms: opened.rooms.iter().map(|r| r.to_string()).collect(),
                    denied: Vec::new(),
                    recovered: opened.recovered.clone(),
                };
                Some(crate::sse::sse_event(
                    None,
                    None,
                    reply.to_json(None).as_bytes(),
                ))
            })),
        })
    }

    async fn accept_poll(
        &self,
        node: Arc<Node>,
        parts: http::request::Parts,
    ) -> Result<crate::poll::PollAccepted, Refusal> {
        let (identity, rooms) = Self::fallback_rooms(&node, &parts).await?;
        let since = match crate::http::query_param(parts.uri.query(), "since").as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse::<EventId>().map_err(|_| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidMessage,
                    "`since` must be an event id <ms>-<seq>",
                    "bad_since",
                )
            })?),
        };
        Ok(crate::poll::PollAccepted {
            identity,
            renderer: self.poll.clone(),
            rooms,
            since,
            wait: self.poll_wait,
            limits: node.config().limits.clone(),
        })
    }

    async fn accept(
        &self,
        node: Arc<Node>,
        parts: http::request::Parts,
    ) -> Result<Accepted, Refusal> {
        let identity = Self::authenticate(&node, &parts)?;
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
            connection: Box::new(NativeConnection {
                format,
                signals: crate::ratelimit::RateLimiter::new(
                    node.config().limits.signal_messages,
                    node.config().limits.signal_window,
                    u32::MAX,
                ),
            }),
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
        vec![
            self.ws_path.clone(),
            self.sse_path.clone(),
            self.poll_path.clone(),
        ]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if let Some(refusal) = crate::http::only_get(&req) {
            return refusal;
        }
        let n = node.clone();
        let path = req.uri().path();
        if path == self.sse_path {
            return crate::sse::serve(node.clone(), req, |parts| self.accept_sse(n, parts)).await;
        }
        if path == self.poll_path {
            return crate::poll::serve(node.clone(), req, |parts| self.accept_poll(n, parts)).await;
        }
        crate::ws::upgrade(node.clone(), req, |parts| self.accept(n, parts)).await
    }
}

/// One native session's protocol state.
pub(crate) struct NativeConnection {
    format: Format,
    /// Signals have their own, tighter budget than commands.
    signals: crate::ratelimit::RateLimiter,
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

    /// The subscribed room's present users, with their sessions.
    async fn presence(&self, ctx: &SessionCtx, raw: &str, reference: Option<&str>) {
        let Some(room) = self.member_room(ctx, raw, reference) else {
            return;
        };
        if !ctx.node.hub().tracks_presence(&room) {
            return self.send_error(
                ctx,
                ErrorCode::InvalidRoom,
                format!("presence is not tracked for `{}` rooms", room.kind()),
                reference,
            );
        }
        let Some(store) = ctx.node.broker().presence() else {
            return self.send_error(
                ctx,
                ErrorCode::InternalError,
                "no presence store",
                reference,
            );
        };
        let key = RoomKey::new(ctx.session.tenant.clone(), room);
        let entries = match store.members(&key, crate::hub::now_ms()).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "presence query failed");
                return self.send_error(
                    ctx,
                    ErrorCode::InternalError,
                    "presence unavailable; retry",
                    reference,
                );
            }
        };
        let mut users: Vec<PresenceUser> = Vec::new();
        for e in entries {
            let session = PresenceSession {
                session: e.session.to_string(),
                node: e.node.to_string(),
                connected_at: e.connected_at,
                last_seen: e.last_seen,
                user_agent: e.user_agent.as_deref().map(str::to_owned),
            };
            match users.iter_mut().find(|u| u.user == e.user.as_str()) {
                Some(u) => u.sessions.push(session),
                None => users.push(PresenceUser {
                    user: e.user.to_string(),
                    sessions: vec![session],
                }),
            }
        }
        self.send(
            ctx,
            &Reply::Presence {
                room: raw.to_owned(),
                users,
            },
            reference,
        );
    }

    /// Relays an ephemeral signal to the room's other members: never stored.
    async fn signal(
        &mut self,
        ctx: &SessionCtx,
        raw: &str,
        kind: &str,
        data: Option<String>,
        reference: Option<&str>,
    ) {
        let Some(room) = self.member_room(ctx, raw, reference) else {
            return;
        };
        if self.signals.check(tokio::time::Instant::now()) != crate::ratelimit::Verdict::Allow {
            let l = &ctx.node.config().limits;
            return self.send_error(
                ctx,
                ErrorCode::RateLimitExceeded,
                format!(
                    "at most {} signals per {:?}",
                    l.signal_messages, l.signal_window
                ),
                reference,
            );
        }
        let kind = format!("signal.{kind}");
        if kind.len() > roomcast_protocol::MAX_TYPE_LEN
            || !kind
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return self.send_error(
                ctx,
                ErrorCode::InvalidMessage,
                "signal `type` must be a short name of A-Z a-z 0-9 . _ : -",
                reference,
            );
        }
        let event = Event {
            id: EventId::ZERO,
            tenant: ctx.session.tenant.clone(),
            rooms: vec![room],
            kind: Arc::from(kind),
            ts: crate::hub::now_ms(),
            actor: Some(Arc::from(ctx.session.user.as_str())),
            version: None,
            audience: Vec::new(),
            exclude_users: Vec::new(),
            exclude_sessions: vec![ctx.session.id.clone()],
            body: match data {
                Some(text) => roomcast_protocol::Body::Json(Bytes::from(text)),
                None => roomcast_protocol::Body::json_null(),
            },
        };
        match ctx.node.broker().publish_ephemeral(event).await {
            Ok(()) => self.send(ctx, &Reply::Signaled, reference),
            Err(e) => {
                tracing::warn!(error = %e, "signal relay failed");
                self.send_error(
                    ctx,
                    ErrorCode::InternalError,
                    "signal not relayed; retry",
                    reference,
                );
            }
        }
    }

    /// `raw` parsed as a room the session is subscribed to, or an error sent.
    fn member_room(
        &self,
        ctx: &SessionCtx,
        raw: &str,
        reference: Option<&str>,
    ) -> Option<RoomName> {
        let Ok(room) = raw.parse::<RoomName>() else {
            self.send_error(
                ctx,
                ErrorCode::InvalidRoom,
                format!("`{raw}` is not a room name"),
                reference,
            );
            return None;
        };
        if !ctx.session.in_room(&room) {
            self.send_error(
                ctx,
                ErrorCode::AuthorizationFailed,
                format!("subscribe to `{raw}` first"),
                reference,
            );
            return None;
        }
        Some(room)
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
            Command::Presence { room } => self.presence(ctx, &room, reference).await,
            Command::Signal { room, kind, data } => {
                self.signal(ctx, &room, &kind, data, reference).await
            }
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
