//! Identifier newtypes. Each is validated once, when parsed, so an invalid
//! room or tenant cannot exist past the parser.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest room name accepted, `kind:id` included.
pub const MAX_ROOM_LEN: usize = 160;
/// Longest room kind (`team`, `conversation`, ...).
pub const MAX_ROOM_KIND_LEN: usize = 32;
/// Longest tenant, user or session id.
pub const MAX_ID_LEN: usize = 128;

/// Why an identifier was rejected. The message is shown to clients as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("room `{0}` must have the form kind:id")]
    RoomShape(String),
    #[error("room kind `{0}` must start with a-z and contain only a-z, 0-9 and _")]
    RoomKind(String),
    #[error("{what} contains a character outside A-Z a-z 0-9 . _ - @ : = + ~")]
    Charset { what: &'static str },
}

fn id_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'@' | b':' | b'=' | b'+' | b'~')
}

fn check_id(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            max: MAX_ID_LEN,
        });
    }
    if !s.bytes().all(id_char) {
        return Err(IdError::Charset { what });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_id($what, s)?;
                Ok(Self(Arc::from(s)))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A tenant: the isolation boundary. Rooms, sessions and events live in exactly one.
    TenantId,
    "tenant"
);
string_id!(
    /// An authenticated user (the token's subject).
    UserId,
    "user id"
);
string_id!(
    /// One client connection, whatever its transport.
    SessionId,
    "session id"
);
string_id!(
    /// One edge node process.
    NodeId,
    "node id"
);

/// A room name `kind:id`, e.g. `team:42`. Always inside a tenant: see [`RoomKey`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:` (`team` in `team:42`).
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map(|(k, _)| k).unwrap_or("")
    }

    /// The part after the first `:` (`42` in `team:42`).
    pub fn id(&self) -> &str {
        self.0.split_once(':').map(|(_, id)| id).unwrap_or("")
    }

    /// Builds `kind:id`, validating both halves.
    pub fn from_parts(kind: &str, id: &str) -> Result<Self, IdError> {
        format!("{kind}:{id}").parse()
    }
}

impl FromStr for RoomName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty { what: "room" });
        }
        if s.len() > MAX_ROOM_LEN {
            return Err(IdError::TooLong {
                what: "room",
                max: MAX_ROOM_LEN,
            });
        }
        let Some((kind, id)) = s.split_once(':') else {
            return Err(IdError::RoomShape(s.to_owned()));
        };
        if kind.is_empty() || id.is_empty() {
            return Err(IdError::RoomShape(s.to_owned()));
        }
        let kind_ok = kind.len() <= MAX_ROOM_KIND_LEN
            && kind.as_bytes()[0].is_ascii_lowercase()
            && kind
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if !kind_ok {
            return Err(IdError::RoomKind(kind.to_owned()));
        }
        if !id.bytes().all(id_char) {
            return Err(IdError::Charset { what: "room id" });
        }
        Ok(Self(Arc::from(s)))
    }
}

impl TryFrom<String> for RoomName {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomName({:?})", &*self.0)
    }
}

impl Serialize for RoomName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A room inside its tenant: the unit of subscription and fan-out. Two tenants'
/// `team:42` are different keys, so isolation holds by construction.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct RoomKey {
    pub tenant: TenantId,
    pub room: RoomName,
}

impl RoomKey {
    pub fn new(tenant: TenantId, room: RoomName) -> Self {
        Self { tenant, room }
    }
}

impl fmt::Display for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.room)
    }
}

/// An event id in Redis stream form `<ms>-<seq>`: ordered, and the position
/// a client resumes from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

/// An event id that is not `<ms>-<seq>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event id `{0}` must have the form <ms>-<seq> (two unsigned integers)")]
pub struct EventIdError(pub String);

impl EventId {
    pub const ZERO: EventId = EventId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The smallest id greater than `self`.
    pub fn next(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self { ms: self.ms, seq },
            None => Self {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl FromStr for EventId {
    type Err = EventIdError;
    fn from_str(s: &str) -> Result<Self, EventIdError> {
        let err = || EventIdError(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(err)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| err())?,
            seq: seq.parse().map_err(|_| err())?,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_validated() {
        let r: RoomName = "team:42".parse().unwrap();
        assert_eq!((r.kind(), r.id()), ("team", "42"));
        assert!("conversation:c-9_x@y".parse::<RoomName>().is_ok());
        assert!("work_item:a:b".parse::<RoomName>().is_ok());
        for bad in [
            "", "team", ":42", "team:", "Team:1", "9a:1", "team:a b", "team:ü",
        ] {
            assert!(bad.parse::<RoomName>().is_err(), "{bad:?} accepted");
        }
        let long = format!("team:{}", "x".repeat(MAX_ROOM_LEN));
        assert!(matches!(
            long.parse::<RoomName>(),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn event_ids_order_like_stream_ids() {
        let a: EventId = "1700000000000-0".parse().unwrap();
        let b: EventId = "1700000000000-1".parse().unwrap();
        let c: EventId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.next(), b);
        assert_eq!(b.to_string(), "1700000000000-1");
        assert!("17".parse::<EventId>().is_err());
        assert!("a-b".parse::<EventId>().is_err());
    }

    #[test]
    fn tenant_ids_reject_bad_characters() {
        assert!("acme".parse::<TenantId>().is_ok());
        assert!("ac me".parse::<TenantId>().is_err());
        assert!("".parse::<TenantId>().is_err());
    }
}
