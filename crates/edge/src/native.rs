//! The native protocol v1 (docs/protocol.md): JSON text frames under
//! `roomcast.v1.json`, protobuf binary frames under `roomcast.v1.proto`.
//! Turns inbound frames into commands and renders replies and events.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use roomcast_auth::{Decision, Identity};
use roomcast_protocol::native::{self, ClientMessage, Command, Denied, ErrorCode, Reply};
use roomcast_protocol::{Event, RoomName};

use crate::frame::{ws_frame, OP_BINARY, OP_TEXT};
use crate::node::Node;
use crate::session::{Renderer, Session};

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

/// Handles one complete inbound message of a native session.
pub(crate) struct NativeHandler {
    pub(crate) node: Arc<Node>,
    pub(crate) session: Arc<Session>,
    pub(crate) identity: Identity,
    pub(crate) format: Format,
}

impl NativeHandler {
    fn send(&self, reply: &Reply, reference: Option<&str>) {
        // A closing session drops its replies; nothing else to do.
        let _ = self
            .session
            .outbox
            .push(reply_frame(self.format, reply, reference));
    }

    pub(crate) fn send_error(
        &self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<&str>,
    ) {
        metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
        self.send(
            &Reply::Error {
                code,
                message: message.into(),
            },
            reference,
        );
    }

    pub(crate) fn welcome(&self) {
        self.send(
            &Reply::Welcome {
                session: self.session.id.to_string(),
                node: self.node.id().to_string(),
                user: self.identity.user.to_string(),
                tenant: self.identity.tenant.to_string(),
            },
            None,
        );
    }

    /// A text (`binary == false`) or binary message.
    pub(crate) async fn on_message(&self, binary: bool, payload: &[u8]) {
        let parsed = match (self.format, binary) {
            (Format::Json, false) => ClientMessage::from_json(payload),
            (Format::Proto, true) => ClientMessage::from_proto(payload),
            (Format::Json, true) => {
                return self.send_error(
                    ErrorCode::InvalidMessage,
                    "binary frames need subprotocol roomcast.v1.proto",
                    None,
                )
            }
            (Format::Proto, false) => {
                return self.send_error(
                    ErrorCode::InvalidMessage,
                    "text frames need subprotocol roomcast.v1.json",
                    None,
                )
            }
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                return self.send_error(
                    ErrorCode::InvalidMessage,
                    e.message,
                    e.reference.as_deref(),
                )
            }
        };
        let reference = msg.reference.as_deref();
        match msg.command {
            Command::Subscribe { rooms, since } => self.subscribe(rooms, since, reference).await,
            Command::Unsubscribe { rooms } => self.unsubscribe(rooms, reference).await,
            Command::Ping { ts } => self.send(
                &Reply::Pong {
                    ts: crate::hub::now_ms(),
                    client_ts: ts,
                },
                reference,
            ),
        }
    }

    async fn subscribe(
        &self,
        rooms: Vec<String>,
        since: BTreeMap<String, String>,
        reference: Option<&str>,
    ) {
        if rooms.is_empty() {
            return self.send_error(
                ErrorCode::InvalidMessage,
                "`rooms` must name at least one room",
                reference,
            );
        }
        let max = self.node.config().limits.max_rooms_per_session;
        let mut ok = Vec::new();
        let mut denied = Vec::new();
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
            if !self.session.in_room(&room) && self.session.room_count() >= max {
                denied.push(Denied {
                    room: raw,
                    code: ErrorCode::SubscriptionLimit,
                });
                continue;
            }
            match self
                .node
                .authorizer()
                .authorize(&self.identity, &room)
                .await
            {
                Decision::Allow => {}
                Decision::Deny(reason) => {
                    denied.push(Denied {
                        room: raw,
                        code: reason.error_code(),
                    });
                    continue;
                }
            }
            match self.node.hub().join(&self.session, room).await {
                Ok(_) => ok.push(raw),
                Err(e) => {
                    tracing::warn!(session = %self.session.id, error = %e, "join failed");
                    denied.push(Denied {
                        room: raw,
                        code: ErrorCode::InternalError,
                    });
                }
            }
        }
        // Resume from history is not wired yet: a room asked to resume says
        // `recovered: false`, so the client refetches instead of assuming
        // there was no gap.
        let recovered = since
            .keys()
            .filter(|r| ok.contains(r))
            .map(|r| (r.clone(), false))
            .collect();
        self.send(
            &Reply::Subscribed {
                rooms: ok,
                denied,
                recovered,
            },
            reference,
        );
    }

    async fn unsubscribe(&self, rooms: Vec<String>, reference: Option<&str>) {
        let mut left = Vec::new();
        for raw in rooms {
            if let Ok(room) = raw.parse::<RoomName>() {
                self.node.hub().leave(&self.session, &room).await;
                left.push(raw);
            }
        }
        self.send(&Reply::Unsubscribed { rooms: left }, reference);
    }
}
