//! Events as Socket.IO EVENT packets: an event of type `messages:new` with
//! JSON data `{...}` becomes `42/ws/app,["messages:new",{...}]`, rendered
//! once per event as a whole WebSocket text frame.

use std::collections::HashSet;

use bytes::Bytes;
use roomcast_protocol::{Event, RoomName};

use super::packet;
use crate::session::Renderer;

/// The hub's announcement of a user whose last session in a room ended.
const PRESENCE_LEFT: &str = "presence.left";
const PRESENCE_UPDATE: &str = "presence:update";

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

    /// A user's last socket lapsed (its node crashed): the presence sweep
    /// announces `presence.left` `{user}` in `user:<id>` (and the
    /// namespace-wide room), rendered as the offline `presence:update`
    /// snapshot, `lastSeen` the sweep's time. `presence.left` of other rooms
    /// (a tracked `conversation:`) is not a user going offline.
    fn offline(&self, event: &Event) -> Option<Bytes> {
        if !self.events.contains(PRESENCE_UPDATE) {
            return None;
        }
        let first = event.rooms.first()?;
        let data: serde_json::Value = serde_json::from_str(event.body.json_text()?).ok()?;
        let user = data.get("user")?.as_str()?;
        if first.kind() != "user" || first.id() != user {
            return None;
        }
        let snapshot = super::presence::snapshot(user, &[], event.ts);
        Some(self.event_frame(PRESENCE_UPDATE, &snapshot.to_string()))
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
        if &*event.kind == PRESENCE_LEFT {
            return self.offline(event);
        }
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

    #[test]
    fn a_lapsed_user_renders_as_the_offline_snapshot() {
        let r = SocketIoRenderer::new(0, "/ws/app", &["presence:update".to_owned()]);
        let left = |room: &str, user: &str| {
            let mut e = event(
                "presence.left",
                Body::from_value(&serde_json::json!({"user": user})),
            );
            e.rooms = vec![room.parse().unwrap(), "ns:app".parse().unwrap()];
            e.ts = 1234;
            e
        };
        let room = "ns:app".parse().unwrap();
        let f = r.render(&left("user:u1", "u1"), &room).unwrap();
        let payload = super::packet::frame_payload(&f);
        let text = std::str::from_utf8(&payload).unwrap();
        let args: serde_json::Value =
            serde_json::from_str(text.strip_prefix("42/ws/app,").unwrap()).unwrap();
        assert_eq!(
            args,
            serde_json::json!(["presence:update",
                {"userId": "u1", "isOnline": false, "lastSeen": 1234, "sockets": []}])
        );
        assert!(r.render(&left("conversation:c1", "u1"), &room).is_none());
        assert!(r.render(&left("user:u2", "u1"), &room).is_none());
        let quiet = SocketIoRenderer::new(0, "/ws/app", &["messages:new".to_owned()]);
        assert!(quiet.render(&left("user:u1", "u1"), &room).is_none());
    }
}
