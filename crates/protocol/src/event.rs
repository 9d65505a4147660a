//! The event contract: what a domain service publishes, in its protobuf
//! (`Envelope`) and JSON forms. See docs/contract.md.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{EventId, IdError, RoomName, SessionId, TenantId, UserId};
use crate::pb;

/// The contract version this build reads and writes.
pub const CONTRACT_VERSION: u32 = 1;
/// Most rooms one event may name.
pub const MAX_ROOMS_PER_EVENT: usize = 64;
/// Longest event type (`task.updated`).
pub const MAX_TYPE_LEN: usize = 128;

/// An event body: JSON text (kept as text, never re-serialised on the hot
/// path) or protobuf bytes with their message type name.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// Valid UTF-8 JSON text.
    Json(Bytes),
    Proto {
        type_name: Arc<str>,
        value: Bytes,
    },
}

impl Body {
    pub fn json_null() -> Self {
        Body::Json(Bytes::from_static(b"null"))
    }

    /// Wraps a JSON value (serialises it once).
    pub fn from_value(value: &serde_json::Value) -> Self {
        Body::Json(Bytes::from(
            serde_json::to_vec(value).expect("a Value always serialises"),
        ))
    }

    /// The JSON text, when this is a JSON body.
    pub fn json_text(&self) -> Option<&str> {
        match self {
            // Only ever built from validated UTF-8.
            Body::Json(b) => std::str::from_utf8(b).ok(),
            Body::Proto { .. } => None,
        }
    }
}

/// One domain event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: EventId,
    pub tenant: TenantId,
    /// Never empty; a session in several of these rooms receives the event once.
    pub rooms: Vec<RoomName>,
    /// Event type, e.g. `task.updated`.
    pub kind: Arc<str>,
    /// Milliseconds since the Unix epoch, set when published.
    pub ts: u64,
    pub actor: Option<Arc<str>>,
    pub version: Option<u64>,
    /// Roles allowed to receive the event; empty means everyone in the room.
    pub audience: Vec<Arc<str>>,
    pub exclude_users: Vec<UserId>,
    pub exclude_sessions: Vec<SessionId>,
    pub body: Body,
}

/// Why an event was rejected. Messages are shown to publishers as is.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("invalid protobuf envelope: {0}")]
    Proto(#[source] prost::DecodeError),
    #[error("unsupported contract version {0} (this node reads {CONTRACT_VERSION})")]
    Version(u32),
    #[error("`{field}`: {source}")]
    Id {
        field: &'static str,
        #[source]
        source: IdError,
    },
    #[error("`id`: {0}")]
    EventId(#[source] crate::ids::EventIdError),
    #[error("`rooms` must name at least one room")]
    NoRooms,
    #[error("`rooms` names more than {MAX_ROOMS_PER_EVENT} rooms")]
    TooManyRooms,
    #[error("`type` must be 1..={MAX_TYPE_LEN} characters of A-Z a-z 0-9 . _ : -")]
    Type,
    #[error("`tenant` is required")]
    NoTenant,
    #[error("`proto.value` is not valid base64")]
    Base64,
    #[error("give either `data` or `proto`, not both")]
    TwoBodies,
    #[error("`{0}` is too long")]
    FieldTooLong(&'static str),
}

fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TYPE_LEN
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// The JSON form of an event, as accepted by `POST /v1/publish` and as a
/// JSON envelope on a Redis channel. Unknown fields are an error.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EventJson<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub rooms: Vec<String>,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_sessions: Vec<String>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<ProtoBodyJson>,
}

/// `{"type_name": "...", "value": "<base64>"}`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProtoBodyJson {
    pub type_name: String,
    pub value: String,
}

/// Values the receiver fills in when a published event leaves them out.
#[derive(Debug, Clone, Default)]
pub struct EventDefaults {
    /// Used when the event names no tenant.
    pub tenant: Option<TenantId>,
    /// Used when the event has no `ts`.
    pub now_ms: u64,
}

fn id_field<T: std::str::FromStr<Err = IdError>>(
    field: &'static str,
    s: &str,
) -> Result<T, EventError> {
    s.parse().map_err(|source| EventError::Id { field, source })
}

fn short(field: &'static str, s: &str) -> Result<Arc<str>, EventError> {
    if s.len() > 256 {
        return Err(EventError::FieldTooLong(field));
    }
    Ok(Arc::from(s))
}

impl Event {
    /// Validates the JSON form. An absent `id` stays [`EventId::ZERO`]: the
    /// broker assigns it when publishing.
    pub fn from_json_form(
        form: EventJson<'_>,
        defaults: &EventDefaults,
    ) -> Result<Event, EventError> {
        if let Some(v) = form.v {
            if v != CONTRACT_VERSION {
                return Err(EventError::Version(v));
            }
        }
        let id = match form.id.as_deref() {
            None | Some("") => EventId::ZERO,
            Some(s) => s.parse().map_err(EventError::EventId)?,
        };
        let tenant = match form.tenant.as_deref() {
            Some(t) => id_field("tenant", t)?,
            None => defaults.tenant.clone().ok_or(EventError::NoTenant)?,
        };
        let body = match (form.data, form.proto) {
            (Some(_), Some(_)) => return Err(EventError::TwoBodies),
            (Some(raw), None) => Body::Json(Bytes::copy_from_slice(raw.get().as_bytes())),
            (None, Some(p)) => Body::Proto {
                type_name: short("proto.type_name", &p.type_name)?,
                value: Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(p.value.as_bytes())
                        .map_err(|_| EventError::Base64)?,
                ),
            },
            (None, None) => Body::json_null(),
        };
        Self::build(
            id,
            tenant,
            &form.rooms,
            &form.kind,
            form.ts.unwrap_or(defaults.now_ms),
            form.actor.as_deref(),
            form.version,
            &form.audience,
            &form.exclude_users,
            &form.exclude_sessions,
            body,
        )
    }

    /// Parses a JSON envelope (the JSON form of the contract).
    pub fn from_json_slice(bytes: &[u8], defaults: &EventDefaults) -> Result<Event, EventError> {
        let form: EventJson<'_> = serde_json::from_slice(bytes).map_err(EventError::Json)?;
        Self::from_json_form(form, defaults)
    }

    #[allow(clippy::too_many_arguments)] // one private constructor shared by both wire forms
    fn build(
        id: EventId,
        tenant: TenantId,
        rooms: &[String],
        kind: &str,
        ts: u64,
        actor: Option<&str>,
        version: Option<u64>,
        audience: &[String],
        exclude_users: &[String],
        exclude_sessions: &[String],
        body: Body,
    ) -> Result<Event, EventError> {
        if rooms.is_empty() {
            return Err(EventError::NoRooms);
        }
        if rooms.len() > MAX_ROOMS_PER_EVENT {
            return Err(EventError::TooManyRooms);
        }
        let mut parsed: Vec<RoomName> = Vec::with_capacity(rooms.len());
        for r in rooms {
            let room: RoomName = id_field("rooms", r)?;
            if !parsed.contains(&room) {
                parsed.push(room);
            }
        }
        if !valid_type(kind) {
            return Err(EventError::Type);
        }
        Ok(Event {
            id,
            tenant,
            rooms: parsed,
            kind: Arc::from(kind),
            ts,
            actor: match actor {
                None | Some("") => None,
                Some(a) => Some(short("actor", a)?),
            },
            version,
            audience: audience
                .iter()
                .map(|a| short("audience", a))
                .collect::<Result<_, _>>()?,
            exclude_users: exclude_users
                .iter()
                .map(|u| id_field("exclude_users", u))
                .collect::<Result<_, _>>()?,
            exclude_sessions: exclude_sessions
                .iter()
                .map(|s| id_field("exclude_sessions", s))
                .collect::<Result<_, _>>()?,
            body,
        })
    }

    /// The protobuf envelope.
    pub fn to_envelope(&self) -> pb::Envelope {
        pb::Envelope {
            v: CONTRACT_VERSION,
            id: if self.id == EventId::ZERO {
                String::new()
            } else {
                self.id.to_string()
            },
            tenant: self.tenant.to_string(),
            rooms: self.rooms.iter().map(|r| r.to_string()).collect(),
            r#type: self.kind.to_string(),
            ts: self.ts,
            actor: self.actor.as_deref().unwrap_or("").to_owned(),
            version: self.version,
            audience: self.audience.iter().map(|a| a.to_string()).collect(),
            exclude_users: self.exclude_users.iter().map(|u| u.to_string()).collect(),
            exclude_sessions: self
                .exclude_sessions
                .iter()
                .map(|s| s.to_string())
                .collect(),
            body: Some(match &self.body {
                Body::Json(b) => {
                    pb::envelope::Body::Json(std::str::from_utf8(b).unwrap_or("null").to_owned())
                }
                Body::Proto { type_name, value } => pb::envelope::Body::Proto(pb::ProtoBody {
                    type_name: type_name.to_string(),
                    value: value.clone(),
                }),
            }),
        }
    }

    /// Encodes the protobuf envelope.
    pub fn encode_envelope(&self) -> Vec<u8> {
        self.to_envelope().encode_to_vec()
    }

    /// The JSON form of the envelope, as documented in docs/contract.md.
    pub fn to_json_form(&self) -> String {
        let data = match &self.body {
            Body::Json(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| RawValue::from_string(s.to_owned()).ok()),
            Body::Proto { .. } => None,
        };
        let form = EventJson {
            v: Some(CONTRACT_VERSION),
            id: (self.id != EventId::ZERO).then(|| self.id.to_string()),
            tenant: Some(self.tenant.to_string()),
            rooms: self.rooms.iter().map(|r| r.to_string()).collect(),
            kind: self.kind.to_string(),
            ts: Some(self.ts),
            actor: self.actor.as_deref().map(str::to_owned),
            version: self.version,
            audience: self.audience.iter().map(|a| a.to_string()).collect(),
            exclude_users: self.exclude_users.iter().map(|u| u.to_string()).collect(),
            exclude_sessions: self
                .exclude_sessions
                .iter()
                .map(|s| s.to_string())
                .collect(),
            data: data.as_deref(),
            proto: match &self.body {
                Body::Proto { type_name, value } => Some(ProtoBodyJson {
                    type_name: type_name.to_string(),
                    value: base64::engine::general_purpose::STANDARD.encode(value),
                }),
                Body::Json(_) => None,
            },
        };
        serde_json::to_string(&form).expect("event JSON form always serialises")
    }

    /// Decodes a protobuf envelope.
    pub fn from_envelope(env: pb::Envelope, defaults: &EventDefaults) -> Result<Event, EventError> {
        if env.v != CONTRACT_VERSION && env.v != 0 {
            return Err(EventError::Version(env.v));
        }
        let id = if env.id.is_empty() {
            EventId::ZERO
        } else {
            env.id.parse().map_err(EventError::EventId)?
        };
        let tenant = if env.tenant.is_empty() {
            defaults.tenant.clone().ok_or(EventError::NoTenant)?
        } else {
            id_field("tenant", &env.tenant)?
        };
        let body = match env.body {
            None => Body::json_null(),
            Some(pb::envelope::Body::Json(text)) => {
                // Keep the promise that a JSON body is valid JSON.
                serde_json::from_str::<&RawValue>(&text).map_err(EventError::Json)?;
                Body::Json(Bytes::from(text))
            }
            Some(pb::envelope::Body::Proto(p)) => Body::Proto {
                type_name: short("proto.type_name", &p.type_name)?,
                value: p.value,
            },
        };
        Self::build(
            id,
            tenant,
            &env.rooms,
            &env.r#type,
            if env.ts == 0 { defaults.now_ms } else { env.ts },
            Some(env.actor.as_str()),
            env.version,
            &env.audience,
            &env.exclude_users,
            &env.exclude_sessions,
            body,
        )
    }

    /// Decodes an envelope in either form. JSON envelopes start with `{`
    /// (after optional whitespace); a protobuf envelope never does, because
    /// `{` (0x7b) would be the deprecated start-group tag of field 15.
    pub fn decode(bytes: &[u8], defaults: &EventDefaults) -> Result<Event, EventError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            Self::from_json_slice(bytes, defaults)
        } else {
            let env = pb::Envelope::decode(bytes).map_err(EventError::Proto)?;
            Self::from_envelope(env, defaults)
        }
    }

    /// True when a session with these roles may receive the event.
    pub fn audience_allows(&self, roles: &[Arc<str>]) -> bool {
        self.audience.is_empty() || self.audience.iter().any(|a| roles.contains(a))
    }

    /// True when the user or the session is excluded.
    pub fn excludes(&self, user: &UserId, session: &SessionId) -> bool {
        self.exclude_users.contains(user) || self.exclude_sessions.contains(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> EventDefaults {
        EventDefaults {
            tenant: None,
            now_ms: 42,
        }
    }

    #[test]
    fn json_and_protobuf_forms_round_trip() {
        let json =
            br#"{"tenant":"acme","rooms":["team:42","task:t1","team:42"],"type":"task.updated",
            "actor":"u2","version":7,"audience":["admin"],"exclude_users":["u9"],"data":{"id":1}}"#;
        let ev = Event::decode(json, &defaults()).unwrap();
        assert_eq!(ev.rooms.len(), 2, "duplicate rooms collapse");
        assert_eq!(ev.ts, 42);
        assert_eq!(ev.body.json_text(), Some(r#"{"id":1}"#));
        let again = Event::decode(&ev.encode_envelope(), &defaults()).unwrap();
        assert_eq!(again, ev);
        let from_json = Event::decode(ev.to_json_form().as_bytes(), &defaults()).unwrap();
        assert_eq!(from_json, ev);
    }

    #[test]
    fn proto_bodies_survive_both_forms() {
        let json = br#"{"tenant":"acme","rooms":["team:1"],"type":"x","proto":{"type_name":"a.B","value":"AQID"}}"#;
        let ev = Event::decode(json, &defaults()).unwrap();
        assert_eq!(
            ev.body,
            Body::Proto {
                type_name: Arc::from("a.B"),
                value: Bytes::from_static(&[1, 2, 3])
            }
        );
        assert_eq!(
            Event::decode(&ev.encode_envelope(), &defaults()).unwrap(),
            ev
        );
        assert_eq!(
            Event::decode(ev.to_json_form().as_bytes(), &defaults()).unwrap(),
            ev
        );
    }

    #[test]
    fn bad_events_are_rejected_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"tenant":"acme","rooms":[],"type":"x"}"#,
                "at least one room",
            ),
            (
                br#"{"tenant":"acme","rooms":["nope"],"type":"x"}"#,
                "kind:id",
            ),
            (
                br#"{"tenant":"acme","rooms":["team:1"],"type":""}"#,
                "`type`",
            ),
            (br#"{"rooms":["team:1"],"type":"x"}"#, "tenant"),
            (
                br#"{"tenant":"acme","rooms":["team:1"],"type":"x","bogus":1}"#,
                "unknown field",
            ),
            (
                br#"{"tenant":"acme","rooms":["team:1"],"type":"x","v":2}"#,
                "version",
            ),
            (
                br#"{"tenant":"acme","rooms":["team:1"],"type":"x","id":"abc"}"#,
                "<ms>-<seq>",
            ),
            (b"\x0a\x05", "protobuf"),
        ];
        for (input, needle) in cases {
            let err = Event::decode(input, &defaults()).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }
}
