//! Seed 001's frames: the types generated from `proto/seed001.proto`, the
//! events a publisher may send (by protobuf message name), and how an event
//! or a reply becomes a whole binary WebSocket frame.

use bytes::Bytes;
use prost::Message as _;
use roomcast_protocol::{Body, Event, EventId, RoomName};

use crate::frame::{ws_frame, OP_BINARY};
use crate::session::Renderer;

/// Types generated from `proto/seed001.proto`.
#[allow(unreachable_pub, clippy::all)] // generated code
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/roomcast.seed001.rs"));
}

use pb::web_socket_message::Payload;

/// The proto source, shipped so clients can generate their code from it.
pub const PROTO_SOURCE: &str = include_str!("../../../proto/seed001.proto");

/// The package of the event messages: an event's `type_name` is this plus
/// the message name (`roomcast.seed001.WorkItemUpdated`).
pub const TYPE_PREFIX: &str = "roomcast.seed001.";

/// The document's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    AuthenticationFailed,
    AuthorizationFailed,
    ValidationError,
    RateLimitExceeded,
    InternalError,
}

impl Code {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::AuthenticationFailed => "AUTHENTICATION_FAILED",
            Code::AuthorizationFailed => "AUTHORIZATION_FAILED",
            Code::ValidationError => "VALIDATION_ERROR",
            Code::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            Code::InternalError => "INTERNAL_ERROR",
        }
    }
}

macro_rules! events {
    ($($name:ident => $variant:ident),* $(,)?) => {
        /// The event messages a publisher may send, by message name.
        pub const EVENT_MESSAGES: &[&str] = &[$(stringify!($name)),*];

        /// Decodes an event body of message `name` into its payload;
        /// `None` for a name that is not one of the event messages.
        fn decode_event(name: &str, bytes: &[u8]) -> Option<Result<Payload, prost::DecodeError>> {
            match name {
                $(stringify!($name) => Some(pb::$name::decode(bytes).map(Payload::$variant)),)*
                _ => None,
            }
        }
    };
}

events! {
    WorkItemCreated => WorkItemCreated,
    WorkItemUpdated => WorkItemUpdated,
    WorkItemDeleted => WorkItemDeleted,
    WorkItemMoved => WorkItemMoved,
    SprintCreated => SprintCreated,
    SprintUpdated => SprintUpdated,
    SprintDeleted => SprintDeleted,
    SprintStarted => SprintStarted,
    SprintCompleted => SprintCompleted,
    CommentAdded => CommentAdded,
    CommentUpdated => CommentUpdated,
    CommentDeleted => CommentDeleted,
    TimeEntryStarted => TimeEntryStarted,
    TimeEntryStopped => TimeEntryStopped,
    TimeEntryUpdated => TimeEntryUpdated,
    TimeEntryDeleted => TimeEntryDeleted,
    DependencyCreated => DependencyCreated,
    DependencyDeleted => DependencyDeleted,
    UserPresence => UserPresence,
    UserTyping => UserTyping,
}

/// Why an event is not delivered to seed 001 clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// A JSON body: seed 001 clients only read protobuf.
    JsonBody,
    /// A protobuf body of a message the document does not name.
    UnknownType,
    /// Bytes that do not decode as the named message.
    InvalidBody,
}

impl Skip {
    fn label(self) -> &'static str {
        match self {
            Skip::JsonBody => "json_body",
            Skip::UnknownType => "unknown_type",
            Skip::InvalidBody => "invalid_body",
        }
    }
}

/// The payload an event carries, read from its protobuf body. The type name
/// is `roomcast.seed001.<Message>` (the bare message name is accepted too).
pub(crate) fn event_payload(event: &Event) -> Result<Payload, Skip> {
    let Body::Proto { type_name, value } = &event.body else {
        return Err(Skip::JsonBody);
    };
    let name = type_name.strip_prefix(TYPE_PREFIX).unwrap_or(type_name);
    match decode_event(name, value) {
        None => Err(Skip::UnknownType),
        Some(Err(_)) => Err(Skip::InvalidBody),
        Some(Ok(payload)) => Ok(payload),
    }
}

/// `WebSocketMessage{message_id: <event id>, timestamp: <event ts>, payload}`
/// for an event, or why it is skipped (counted in
/// `roomcast_dialect_skipped_events_total`).
pub(crate) fn event_message(event: &Event) -> Option<pb::WebSocketMessage> {
    match event_payload(event) {
        Ok(payload) => Some(pb::WebSocketMessage {
            message_id: if event.id == EventId::ZERO {
                // Ephemeral events (presence, typing) have no stored id.
                crate::ids::random_id("e")
            } else {
                event.id.to_string()
            },
            timestamp: event.ts as i64,
            payload: Some(payload),
        }),
        Err(skip) => {
            metrics::counter!(
                "roomcast_dialect_skipped_events_total",
                "dialect" => "seed001",
                "reason" => skip.label()
            )
            .increment(1);
            None
        }
    }
}

/// A server frame carrying `payload`, with a fresh message id.
pub(crate) fn reply(payload: Payload) -> Bytes {
    let msg = pb::WebSocketMessage {
        message_id: crate::ids::random_id("m"),
        timestamp: crate::hub::now_ms() as i64,
        payload: Some(payload),
    };
    ws_frame(OP_BINARY, &msg.encode_to_vec())
}

/// An `ErrorResponse` frame.
pub(crate) fn error(code: Code, message: impl Into<String>, request: &str, field: &str) -> Bytes {
    metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
    reply(Payload::ErrorResponse(pb::ErrorResponse {
        error_code: code.as_str().to_owned(),
        error_message: message.into(),
        request_message_id: request.to_owned(),
        field_name: field.to_owned(),
    }))
}

/// Renders events as binary `WebSocketMessage` frames, once per event.
pub(crate) struct Seed001Renderer {
    slot: usize,
}

impl Seed001Renderer {
    pub(crate) fn new(slot: usize) -> Self {
        Self { slot }
    }
}

impl Renderer for Seed001Renderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, _room: &RoomName) -> Option<Bytes> {
        let msg = event_message(event)?;
        Some(ws_frame(OP_BINARY, &msg.encode_to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn event(type_name: &str, value: Vec<u8>) -> Event {
        Event {
            id: "1700000000000-3".parse().unwrap(),
            tenant: "acme".parse().unwrap(),
            rooms: vec!["project:p1".parse().unwrap()],
            kind: "work_item.updated".into(),
            ts: 1_700_000_000_123,
            actor: None,
            version: None,
            audience: vec![],
            exclude_users: vec![],
            exclude_sessions: vec![],
            body: Body::Proto {
                type_name: Arc::from(type_name),
                value: value.into(),
            },
        }
    }

    #[test]
    fn events_render_with_their_id_and_time() {
        let body = pb::WorkItemUpdated {
            work_item: Some(pb::WorkItem {
                id: "task-123".into(),
                status: "done".into(),
                ..Default::default()
            }),
            changes: vec![pb::FieldChange {
                field_name: "status".into(),
                old_value: "in_progress".into(),
                new_value: "done".into(),
            }],
            user_id: "user-456".into(),
        };
        for name in ["roomcast.seed001.WorkItemUpdated", "WorkItemUpdated"] {
            let msg = event_message(&event(name, body.encode_to_vec())).unwrap();
            assert_eq!(msg.message_id, "1700000000000-3");
            assert_eq!(msg.timestamp, 1_700_000_000_123);
            assert_eq!(msg.payload, Some(Payload::WorkItemUpdated(body.clone())));
        }
    }

    #[test]
    fn other_bodies_are_skipped() {
        let mut json = event("x", vec![]);
        json.body = Body::json_null();
        assert_eq!(event_payload(&json), Err(Skip::JsonBody));
        assert_eq!(
            event_payload(&event("roomcast.seed001.Subscribe", vec![])),
            Err(Skip::UnknownType)
        );
        assert_eq!(
            event_payload(&event("roomcast.seed001.UserTyping", vec![0xff, 0xff])),
            Err(Skip::InvalidBody)
        );
        assert_eq!(EVENT_MESSAGES.len(), 20);
    }
}
