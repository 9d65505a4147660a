//! Roadmap frames: events rendered as the document's server messages, and
//! the dialect's own `PING` and `ERROR` frames.
//!
//! An event's type is the message type (`VOTE_UPDATE`, `FEATURE_UPDATE`,
//! `FEATURE_CREATED`, `FEATURE_DELETED`); its `data` object gives the other
//! fields, and `timestamp` is `data.timestamp` or else the event time in
//! ISO 8601. Admin-only messages are rendered only by the admin renderer, so
//! they never reach other sessions even when a publisher forgets `audience`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use roomcast_protocol::{Event, RoomName};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::rate::BroadcastRate;
use crate::frame::{ws_frame, OP_TEXT};
use crate::session::Renderer;

pub(crate) const VOTE_UPDATE: &str = "VOTE_UPDATE";
pub(crate) const FEATURE_UPDATE: &str = "FEATURE_UPDATE";
pub(crate) const FEATURE_CREATED: &str = "FEATURE_CREATED";
pub(crate) const FEATURE_DELETED: &str = "FEATURE_DELETED";

/// Which messages only admins receive.
fn admin_only(kind: &str) -> bool {
    kind == FEATURE_CREATED || kind == FEATURE_DELETED
}

/// `2025-10-20T15:30:45.123Z` for milliseconds since the epoch.
pub(crate) fn iso8601(ms: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Renders roadmap events for admin or non-admin sessions.
pub(crate) struct RoadmapRenderer {
    pub(crate) slot: usize,
    pub(crate) admin: bool,
    /// VOTE_UPDATEs of one feature within this window collapse to the last.
    pub(crate) vote_window: Duration,
    /// The node's broadcast rate, shared by the admin and member renderers;
    /// `None` when batching is off (`broadcast_cap = 0`).
    pub(crate) rate: Option<Arc<BroadcastRate>>,
    /// The VOTE_UPDATE window while the rate is near the cap.
    pub(crate) batch_window: Duration,
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    fields: Map<String, Value>,
    timestamp: Value,
}

#[derive(Deserialize)]
struct FeatureOf {
    #[serde(rename = "featureId")]
    feature_id: String,
}

impl RoadmapRenderer {
    /// The message for an event, or why it has none.
    fn message(&self, event: &Event) -> Result<Vec<u8>, &'static str> {
        let kind: &str = &event.kind;
        if ![
            VOTE_UPDATE,
            FEATURE_UPDATE,
            FEATURE_CREATED,
            FEATURE_DELETED,
        ]
        .contains(&kind)
        {
            return Err("not a roadmap message");
        }
        if admin_only(kind) && !self.admin {
            return Err("admin only");
        }
        let text = event.body.json_text().ok_or("not a JSON body")?;
        let mut fields: Map<String, Value> =
            serde_json::from_str(text).map_err(|_| "data is not an object")?;
        let named = match kind {
            FEATURE_CREATED => fields.get("feature").is_some_and(Value::is_object),
            _ => fields.get("featureId").is_some_and(Value::is_string),
        };
        if !named {
            return Err("data lacks a featureId string (FEATURE_CREATED: a feature object)");
        }
        if kind == FEATURE_UPDATE && !fields.get("changes").is_some_and(Value::is_object) {
            return Err("FEATURE_UPDATE data lacks a changes object");
        }
        fields.remove("type");
        let timestamp = match fields.remove("timestamp") {
            Some(Value::String(s)) => Value::String(s),
            _ => Value::String(iso8601(event.ts)),
        };
        serde_json::to_vec(&Message {
            kind,
            fields,
            timestamp,
        })
        .map_err(|_| "unserialisable")
    }
}

impl Renderer for RoadmapRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, _room: &RoomName) -> Option<Bytes> {
        match self.message(event) {
            Ok(text) => {
                if let Some(rate) = &self.rate {
                    rate.record(event);
                }
                Some(ws_frame(OP_TEXT, &text))
            }
            Err(why) => {
                if event
                    .kind
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
                {
                    tracing::debug!(kind = %event.kind, why, "roadmap event not rendered");
                }
                None
            }
        }
    }

    /// VOTE_UPDATEs coalesce per feature over `vote_window`, or over
    /// `batch_window` while the node's broadcast rate is near the cap. The
    /// vote count is absolute, so the last one held is the truth.
    ///
    /// Other messages are never batched: a FEATURE_UPDATE carries only the
    /// fields that changed, so keeping the last of several would lose the
    /// others' fields, and merging them would need the same event's copies
    /// on its several rooms told apart from later updates (they carry
    /// different ids on Redis). Votes are the high-rate traffic anyway.
    fn coalesce(&self, event: &Event, _room: &RoomName) -> Option<(String, Duration)> {
        if &*event.kind != VOTE_UPDATE {
            return None;
        }
        let window = match &self.rate {
            Some(rate) if rate.batching() => self.batch_window.max(self.vote_window),
            // With batching configured a zero window still goes through the
            // key: a vote still held from a batch is replaced, not overtaken.
            Some(_) => self.vote_window,
            None if self.vote_window.is_zero() => return None,
            None => self.vote_window,
        };
        let f: FeatureOf = serde_json::from_str(event.body.json_text()?).ok()?;
        Some((format!("vote:{}", f.feature_id), window))
    }
}

/// `{"type":"PING"}`, built once.
pub(crate) fn ping_frame() -> Bytes {
    ws_frame(OP_TEXT, br#"{"type":"PING"}"#)
}

/// An `ERROR` frame with the document's fields.
pub(crate) fn error_frame(code: &str, message: &str, context: Option<Value>) -> Bytes {
    let mut v = serde_json::json!({
        "type": "ERROR",
        "code": code,
        "message": message,
        "timestamp": iso8601(crate::hub::now_ms()),
    });
    if let Some(c) = context {
        v["context"] = c;
    }
    ws_frame(OP_TEXT, v.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: Value) -> Event {
        Event {
            id: roomcast_protocol::EventId::new(1, 0),
            tenant: "default".parse().unwrap(),
            rooms: vec!["roadmap:all".parse().unwrap()],
            kind: kind.into(),
            ts: 1_760_974_245_123,
            actor: None,
            version: None,
            audience: vec![],
            exclude_users: vec![],
            exclude_sessions: vec![],
            body: roomcast_protocol::Body::from_value(&data),
        }
    }

    fn renderer(admin: bool) -> RoadmapRenderer {
        RoadmapRenderer {
            slot: 0,
            admin,
            vote_window: Duration::from_millis(100),
            rate: None,
            batch_window: Duration::from_secs(1),
        }
    }

    fn json_of(frame: Bytes) -> Value {
        serde_json::from_slice(&frame[if frame[1] == 126 { 4 } else { 2 }..]).unwrap()
    }

    #[test]
    fn vote_update_gets_type_and_timestamp_and_coalesces_per_feature() {
        let e = event(
            VOTE_UPDATE,
            serde_json::json!({"featureId":"f1","voteCount":43,"voterId":"u","action":"add"}),
        );
        let room = "roadmap:all".parse().unwrap();
        let v = json_of(renderer(false).render(&e, &room).unwrap());
        assert_eq!(
            v,
            serde_json::json!({"type":"VOTE_UPDATE","featureId":"f1","voteCount":43,
                "voterId":"u","action":"add","timestamp":"2025-10-20T15:30:45.123Z"})
        );
        assert_eq!(
            renderer(false).coalesce(&e, &room),
            Some(("vote:f1".into(), Duration::from_millis(100)))
        );
        let u = event(
            FEATURE_UPDATE,
            serde_json::json!({"featureId":"f1","changes":{}}),
        );
        assert_eq!(renderer(false).coalesce(&u, &room), None);
    }

    #[tokio::test(start_paused = true)]
    async fn votes_batch_when_the_rate_nears_the_cap() {
        let r = RoadmapRenderer {
            rate: Some(Arc::new(BroadcastRate::new(5, 80))),
            ..renderer(false)
        };
        let room = "roadmap:all".parse().unwrap();
        let vote = |n: u64| {
            event(
                VOTE_UPDATE,
                serde_json::json!({"featureId":"f1","voteCount":n,"action":"add"}),
            )
        };
        let windows: Vec<Duration> = (0..6)
            .map(|n| {
                let e = vote(n);
                // Each render of one event counts once (several rooms, renderers).
                r.render(&e, &room).unwrap();
                r.render(&e, &room).unwrap();
                r.coalesce(&e, &room).unwrap().1
            })
            .collect();
        let (normal, batch) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(windows, [normal, normal, normal, batch, batch, batch]);
        let update = event(
            FEATURE_UPDATE,
            serde_json::json!({"featureId":"f1","changes":{"status":"PLANNED"}}),
        );
        assert_eq!(
            r.coalesce(&update, &room),
            None,
            "FEATURE_UPDATE is not batched"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(r.coalesce(&vote(9), &room).unwrap().1, normal);
    }

    #[test]
    fn admin_only_messages_need_the_admin_renderer() {
        let room = "roadmap:all".parse().unwrap();
        let created = event(FEATURE_CREATED, serde_json::json!({"feature":{"id":"f9"}}));
        let deleted = event(FEATURE_DELETED, serde_json::json!({"featureId":"f9"}));
        for e in [&created, &deleted] {
            assert!(renderer(false).render(e, &room).is_none());
            assert!(renderer(true).render(e, &room).is_some());
        }
    }

    #[test]
    fn malformed_or_foreign_events_are_not_rendered() {
        let room = "roadmap:all".parse().unwrap();
        for e in [
            event(VOTE_UPDATE, serde_json::json!([1])),
            event(VOTE_UPDATE, serde_json::json!({"voteCount": 1})),
            event(FEATURE_UPDATE, serde_json::json!({"featureId": "f"})),
            event("task.created", serde_json::json!({"featureId": "f"})),
        ] {
            assert!(renderer(true).render(&e, &room).is_none(), "{}", e.kind);
        }
    }
}
