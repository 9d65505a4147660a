//! Events as Socket.IO EVENT packets: an event of type `messages:new` with
//! JSON data `{...}` becomes `42/ws/app,["messages:new",{...}]`, rendered
//! once per event as a whole WebSocket text frame.

use std::collections::HashSet;

use bytes::Bytes;
use roomcast_protocol::{Event, RoomName};

use super::packet;
use crate::session::Renderer;

pub(crate) struct SocketIoRenderer {
    slot: usize,
    namespace: String,
    /// The event types of the seed document; others (another dialect's
    /// events sharing a `user:` room, the node's `presence.joined`) are not
    /// this protocol's and are not sent.
    events: HashSet<String>,
}

impl SocketIoRenderer {
    pub(crate) fn new(slot: usize, namespace: &str, events: &[String]) -> Self {
        Self {
            slot,
            namespace: namespace.to_owned(),
            events: events.iter().cloned().collect(),
        }
    }

    /// The EVENT packet frame for `name` with raw JSON `data`.
    pub(crate) fn event_frame(&self, name: &str, data: &str) -> Bytes {
        packet::frame(&packet::event_text(&self.namespace, name, data))
    }
}

impl Renderer for SocketIoRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, _room: &RoomName) -> Option<Bytes> {
        if !self.events.contains(&*event.kind) {
            return None;
        }
        // Protobuf bodies have no Socket.IO form.
        let data = event.body.json_text()?;
        Some(self.event_frame(&event.kind, data))
    }
}

#[cfg(test)]
mod tests {
    use roomcast_protocol::{Body, EventId};

    use super::*;

    fn event(kind: &str, body: Body) -> Event {
        Event {
            id: EventId::ZERO,
            tenant: "t".parse().unwrap(),
            rooms: vec!["conversation:c1".parse().unwrap()],
            kind: kind.into(),
            ts: 0,
            actor: None,
            version: None,
            audience: Vec::new(),
            exclude_users: Vec::new(),
            exclude_sessions: Vec::new(),
            body,
        }
    }

    #[test]
    fn renders_seed_events_only() {
        let r = SocketIoRenderer::new(0, "/ws/app", &["messages:new".to_owned()]);
        let room = "conversation:c1".parse().unwrap();
        let f = r
            .render(
                &event(
                    "messages:new",
                    Body::from_value(&serde_json::json!({"a": 1})),
                ),
                &room,
            )
            .unwrap();
        assert_eq!(
            super::packet::frame_payload(&f),
            Bytes::from_static(b"42/ws/app,[\"messages:new\",{\"a\":1}]")
        );
        assert!(r
            .render(&event("task.updated", Body::json_null()), &room)
            .is_none());
        let proto = Body::Proto {
            type_name: "x.Y".into(),
            value: Bytes::new(),
        };
        assert!(r.render(&event("messages:new", proto), &room).is_none());
    }
}
