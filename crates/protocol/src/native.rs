//! Native protocol v1: client commands and server frames, in JSON text
//! (`roomcast.v1.json`) and protobuf binary (`roomcast.v1.proto`) forms.
//! See docs/protocol.md.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::event::{Body, Event};
use crate::pb;

/// Subprotocol for JSON text frames (the default).
pub const SUBPROTOCOL_JSON: &str = "roomcast.v1.json";
/// Subprotocol for protobuf binary frames.
pub const SUBPROTOCOL_PROTO: &str = "roomcast.v1.proto";

/// Machine-readable error codes, shared by error frames, denied rooms and
/// HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    AuthenticationFailed,
    AuthorizationFailed,
    InvalidMessage,
    InvalidRoom,
    RateLimitExceeded,
    SubscriptionLimit,
    MessageTooLarge,
    ConnectionLimit,
    Conflict,
    NotFound,
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthenticationFailed => "AUTHENTICATION_FAILED",
            ErrorCode::AuthorizationFailed => "AUTHORIZATION_FAILED",
            ErrorCode::InvalidMessage => "INVALID_MESSAGE",
            ErrorCode::InvalidRoom => "INVALID_ROOM",
            ErrorCode::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            ErrorCode::SubscriptionLimit => "SUBSCRIPTION_LIMIT",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::ConnectionLimit => "CONNECTION_LIMIT",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command from a native client. Room names are still raw strings here:
/// each one is validated and authorised separately, so one bad room is
/// denied without failing the others.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Subscribe {
        rooms: Vec<String>,
        /// room -> last event id seen
        since: BTreeMap<String, String>,
    },
    Unsubscribe {
        rooms: Vec<String>,
    },
    Ping {
        ts: Option<u64>,
    },
    /// Who is in a room the session is subscribed to.
    Presence {
        room: String,
    },
    /// An ephemeral signal to the room's other members (`type` without the
    /// `signal.` prefix the server adds; `data` is JSON text).
    Signal {
        room: String,
        kind: String,
        data: Option<String>,
    },
}

/// A command plus the client's correlation `ref`, echoed in the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    pub reference: Option<String>,
    pub command: Command,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum JsonCommand {
    Subscribe {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        rooms: Vec<String>,
        #[serde(default)]
        since: BTreeMap<String, String>,
    },
    Unsubscribe {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        rooms: Vec<String>,
    },
    Ping {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        #[serde(default)]
        ts: Option<u64>,
    },
    Presence {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        room: String,
    },
    Signal {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        room: String,
        #[serde(rename = "type")]
        kind: String,
        // A Value, not a RawValue: raw values cannot sit in an internally
        // tagged enum (serde buffers its content). Signals are rare.
        #[serde(default)]
        data: Option<serde_json::Value>,
    },
}

/// A client frame that could not be understood; `reference` is recovered
/// when possible so the error reply can still be correlated.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub reference: Option<String>,
    pub message: String,
}

/// Longest `ref` accepted (it is echoed back).
pub const MAX_REF_LEN: usize = 64;

fn check_ref(reference: Option<String>) -> Result<Option<String>, ParseError> {
    match reference {
        Some(r) if r.len() > MAX_REF_LEN => Err(ParseError {
            reference: None,
            message: format!("`ref` is longer than {MAX_REF_LEN} bytes"),
        }),
        r => Ok(r),
    }
}

impl ClientMessage {
    /// Parses a JSON text frame.
    pub fn from_json(text: &[u8]) -> Result<ClientMessage, ParseError> {
        match serde_json::from_slice::<JsonCommand>(text) {
            Ok(JsonCommand::Subscribe {
                reference,
                rooms,
                since,
            }) => Ok(ClientMessage {
                reference: check_ref(reference)?,
                command: Command::Subscribe { rooms, since },
            }),
            Ok(JsonCommand::Unsubscribe { reference, rooms }) => Ok(ClientMessage {
                reference: check_ref(reference)?,
                command: Command::Unsubscribe { rooms },
            }),
            Ok(JsonCommand::Ping { reference, ts }) => Ok(ClientMessage {
                reference: check_ref(reference)?,
                command: Command::Ping { ts },
            }),
            Ok(JsonCommand::Presence { reference, room }) => Ok(ClientMessage {
                reference: check_ref(reference)?,
                command: Command::Presence { room },
            }),
            Ok(JsonCommand::Signal {
                reference,
                room,
                kind,
                data,
            }) => Ok(ClientMessage {
                reference: check_ref(reference)?,
                command: Command::Signal {
                    room,
                    kind,
                    data: data.map(|d| d.to_string()),
                },
            }),
            Err(e) => {
                #[derive(Deserialize)]
                struct RefOnly {
                    #[serde(rename = "ref")]
                    reference: Option<String>,
                }
                let reference = serde_json::from_slice::<RefOnly>(text)
                    .ok()
                    .and_then(|r| r.reference)
                    .filter(|r| r.len() <= MAX_REF_LEN);
                Err(ParseError {
                    reference,
                    message: e.to_string(),
                })
            }
        }
    }

    /// Parses a protobuf binary frame.
    pub fn from_proto(bytes: &[u8]) -> Result<ClientMessage, ParseError> {
        let frame = pb::ClientFrame::decode(bytes).map_err(|e| ParseError {
            reference: None,
            message: format!("invalid protobuf ClientFrame: {e}"),
        })?;
        let reference = check_ref((!frame.r#ref.is_empty()).then_some(frame.r#ref))?;
        let command = match frame.op {
            Some(pb::client_frame::Op::Subscribe(s)) => Command::Subscribe {
                rooms: s.rooms,
                since: s.since.into_iter().collect(),
            },
            Some(pb::client_frame::Op::Unsubscribe(u)) => Command::Unsubscribe { rooms: u.rooms },
            Some(pb::client_frame::Op::Ping(p)) => Command::Ping {
                ts: (p.ts != 0).then_some(p.ts),
            },
            Some(pb::client_frame::Op::Presence(p)) => Command::Presence { room: p.room },
            Some(pb::client_frame::Op::Signal(sig)) => {
                let data = (!sig.json.is_empty()).then_some(sig.json);
                if let Some(d) = &data {
                    if serde_json::from_str::<&serde_json::value::RawValue>(d).is_err() {
                        return Err(ParseError {
                            reference,
                            message: "Signal.json is not valid JSON".to_owned(),
                        });
                    }
                }
                Command::Signal {
                    room: sig.room,
                    kind: sig.r#type,
                    data,
                }
            }
            None => {
                return Err(ParseError {
                    reference,
                    message: "ClientFrame has no op".to_owned(),
                })
            }
        };
        Ok(ClientMessage { reference, command })
    }
}

/// A room the server refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Denied {
    pub room: String,
    pub code: ErrorCode,
}

/// A reply or notice from the server (events are rendered separately, once
/// per event: see [`render_event_json`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Welcome {
        session: String,
        node: String,
        user: String,
        tenant: String,
    },
    Subscribed {
        rooms: Vec<String>,
        denied: Vec<Denied>,
        /// Only for rooms that asked to resume with `since`.
        recovered: BTreeMap<String, bool>,
    },
    Unsubscribed {
        rooms: Vec<String>,
    },
    Pong {
        ts: u64,
        client_ts: Option<u64>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Presence {
        room: String,
        users: Vec<PresenceUser>,
    },
    /// A signal was relayed.
    Signaled,
}

/// One user present in a room, with their live sessions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceUser {
    pub user: String,
    pub sessions: Vec<PresenceSession>,
}

/// One live session of a present user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceSession {
    pub session: String,
    pub node: String,
    pub connected_at: u64,
    pub last_seen: u64,
    pub user_agent: Option<String>,
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum JsonReply<'a> {
    Welcome {
        session: &'a str,
        node: &'a str,
        user: &'a str,
        tenant: &'a str,
    },
    Subscribed {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        rooms: &'a [String],
        denied: &'a [Denied],
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        recovered: &'a BTreeMap<String, bool>,
    },
    Unsubscribed {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        rooms: &'a [String],
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        ts: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_ts: Option<u64>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
    Presence {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a str,
        users: &'a [PresenceUser],
    },
    Signaled {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl Reply {
    /// JSON text of the reply, `ref` included when given.
    pub fn to_json(&self, reference: Option<&str>) -> String {
        let json = match self {
            Reply::Welcome {
                session,
                node,
                user,
                tenant,
            } => JsonReply::Welcome {
                session,
                node,
                user,
                tenant,
            },
            Reply::Subscribed {
                rooms,
                denied,
                recovered,
            } => JsonReply::Subscribed {
                reference,
                rooms,
                denied,
                recovered,
            },
            Reply::Unsubscribed { rooms } => JsonReply::Unsubscribed { reference, rooms },
            Reply::Pong { ts, client_ts } => JsonReply::Pong {
                reference,
                ts: *ts,
                client_ts: *client_ts,
            },
            Reply::Error { code, message } => JsonReply::Error {
                reference,
                code: *code,
                message,
            },
            Reply::Presence { room, users } => JsonReply::Presence {
                reference,
                room,
                users,
            },
            Reply::Signaled => JsonReply::Signaled { reference },
        };
        serde_json::to_string(&json).expect("replies always serialise")
    }

    /// Protobuf bytes of the reply.
    pub fn to_proto(&self, reference: Option<&str>) -> Vec<u8> {
        use pb::server_frame::Op;
        let op = match self {
            Reply::Welcome {
                session,
                node,
                user,
                tenant,
            } => Op::Welcome(pb::Welcome {
                session: session.clone(),
                node: node.clone(),
                user: user.clone(),
                tenant: tenant.clone(),
            }),
            Reply::Subscribed {
                rooms,
                denied,
                recovered,
            } => Op::Subscribed(pb::Subscribed {
                rooms: rooms.clone(),
                denied: denied
                    .iter()
                    .map(|d| pb::Denied {
                        room: d.room.clone(),
                        code: d.code.as_str().to_owned(),
                    })
                    .collect(),
                recovered: recovered.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            }),
            Reply::Unsubscribed { rooms } => Op::Unsubscribed(pb::Unsubscribed {
                rooms: rooms.clone(),
            }),
            Reply::Pong { ts, client_ts } => Op::Pong(pb::Pong {
                ts: *ts,
                client_ts: client_ts.unwrap_or(0),
            }),
            Reply::Error { code, message } => Op::Error(pb::Error {
                code: code.as_str().to_owned(),
                message: message.clone(),
            }),
            Reply::Presence { room, users } => Op::Presence(pb::PresenceReply {
                room: room.clone(),
                users: users
                    .iter()
                    .map(|u| pb::PresenceUser {
                        user: u.user.clone(),
                        sessions: u
                            .sessions
                            .iter()
                            .map(|s| pb::PresenceSession {
                                session: s.session.clone(),
                                node: s.node.clone(),
                                connected_at: s.connected_at,
                                last_seen: s.last_seen,
                                user_agent: s.user_agent.clone().unwrap_or_default(),
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            Reply::Signaled => Op::Signaled(pb::Signaled {}),
        };
        pb::ServerFrame {
            r#ref: reference.unwrap_or("").to_owned(),
            op: Some(op),
        }
        .encode_to_vec()
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Renders the native JSON `event` frame for `room`. Called once per
/// (event, room); the bytes are shared by every recipient.
pub fn render_event_json(event: &Event, room: &str) -> Bytes {
    use std::io::Write as _;
    let body_len = match &event.body {
        Body::Json(b) => b.len(),
        Body::Proto { value, .. } => value.len() * 4 / 3 + 64,
    };
    let mut out = Vec::with_capacity(96 + room.len() + event.kind.len() + body_len);
    out.extend_from_slice(br#"{"op":"event","room":"#);
    push_json_str(&mut out, room);
    if event.id != crate::EventId::ZERO {
        // Ephemeral events (presence changes, signals) have no history id.
        let _ = write!(out, r#","id":"{}""#, event.id);
    }
    out.extend_from_slice(br#","type":"#);
    push_json_str(&mut out, &event.kind);
    let _ = write!(out, r#","ts":{}"#, event.ts);
    if let Some(actor) = &event.actor {
        out.extend_from_slice(br#","actor":"#);
        push_json_str(&mut out, actor);
    }
    if let Some(v) = event.version {
        let _ = write!(out, r#","version":{v}"#);
    }
    match &event.body {
        Body::Json(b) => {
            out.extend_from_slice(br#","data":"#);
            out.extend_from_slice(b);
        }
        Body::Proto { type_name, value } => {
            use base64::Engine as _;
            out.extend_from_slice(br#","proto":{"type_name":"#);
            push_json_str(&mut out, type_name);
            out.extend_from_slice(br#","value":""#);
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(value)
                    .as_bytes(),
            );
            out.extend_from_slice(b"\"}");
        }
    }
    out.push(b'}');
    Bytes::from(out)
}

/// Renders the native protobuf `event` frame for `room`.
pub fn render_event_proto(event: &Event, room: &str) -> Bytes {
    let frame = pb::ServerFrame {
        r#ref: String::new(),
        op: Some(pb::server_frame::Op::Event(pb::EventFrame {
            room: room.to_owned(),
            id: if event.id == crate::EventId::ZERO {
                String::new()
            } else {
                event.id.to_string()
            },
            r#type: event.kind.to_string(),
            ts: event.ts,
            actor: event.actor.as_deref().unwrap_or("").to_owned(),
            version: event.version,
            body: Some(match &event.body {
                Body::Json(b) => {
                    pb::event_frame::Body::Json(std::str::from_utf8(b).unwrap_or("null").to_owned())
                }
                Body::Proto { type_name, value } => pb::event_frame::Body::Proto(pb::ProtoBody {
                    type_name: type_name.to_string(),
                    value: value.clone(),
                }),
            }),
        })),
    };
    Bytes::from(frame.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventDefaults;

    #[test]
    fn parses_the_documented_commands() {
        let m = ClientMessage::from_json(
            br#"{"op":"subscribe","ref":"1","rooms":["team:42","task:t1"]}"#,
        )
        .unwrap();
        assert_eq!(m.reference.as_deref(), Some("1"));
        assert!(matches!(m.command, Command::Subscribe { ref rooms, .. } if rooms.len() == 2));
        let m = ClientMessage::from_json(br#"{"op":"ping","ref":"3","ts":1700000000000}"#).unwrap();
        assert_eq!(
            m.command,
            Command::Ping {
                ts: Some(1700000000000)
            }
        );
        let m = ClientMessage::from_json(
            br#"{"op":"subscribe","rooms":["team:1"],"since":{"team:1":"5-0"}}"#,
        )
        .unwrap();
        assert!(
            matches!(m.command, Command::Subscribe { ref since, .. } if since["team:1"] == "5-0")
        );
    }

    #[test]
    fn bad_commands_keep_their_ref() {
        let e = ClientMessage::from_json(br#"{"op":"dance","ref":"9"}"#).unwrap_err();
        assert_eq!(e.reference.as_deref(), Some("9"));
        assert!(e.message.contains("unknown variant"), "{}", e.message);
        let e = ClientMessage::from_json(br#"{"op":"subscribe","ref":"2","rooms":["a:b"],"x":1}"#)
            .unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert!(ClientMessage::from_json(b"{nope").is_err());
    }

    #[test]
    fn event_frame_is_valid_json_with_every_field() {
        let ev = Event::decode(
            br#"{"tenant":"acme","rooms":["team:42"],"type":"task.updated","ts":5,"actor":"u\"2","version":3,"data":{"id":1}}"#,
            &EventDefaults::default(),
        )
        .unwrap();
        let frame = render_event_json(&ev, "team:42");
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"event","room":"team:42","type":"task.updated","ts":5,"actor":"u\"2","version":3,"data":{"id":1}})
        );
    }

    #[test]
    fn replies_render_in_both_forms() {
        let r = Reply::Subscribed {
            rooms: vec!["team:42".into()],
            denied: vec![Denied {
                room: "task:t1".into(),
                code: ErrorCode::AuthorizationFailed,
            }],
            recovered: BTreeMap::new(),
        };
        assert_eq!(
            r.to_json(Some("1")),
            r#"{"op":"subscribed","ref":"1","rooms":["team:42"],"denied":[{"room":"task:t1","code":"AUTHORIZATION_FAILED"}]}"#
        );
        let pbf = pb::ServerFrame::decode(&r.to_proto(Some("1"))[..]).unwrap();
        assert_eq!(pbf.r#ref, "1");
        assert!(
            matches!(pbf.op, Some(pb::server_frame::Op::Subscribed(ref s)) if s.denied[0].code == "AUTHORIZATION_FAILED")
        );
    }
}
