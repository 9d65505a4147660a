//! Redis key and channel names of a room, and the cluster slot they share.
//!
//! ```text
//! stream  : <prefix>{<tenant>/<room>}:h     e.g. rc:{acme/team:42}:h
//! channel : <prefix>{<tenant>/<room>}:c     e.g. rc:{acme/team:42}:c
//! trim mark: <prefix>{<tenant>/<room>}:t    newest id trimmed from the stream
//! presence : <prefix>{<tenant>/<room>}:p / :pz / :pu / :pr   (see presence.rs)
//! registry : <prefix>{presence:<n>}:rooms / :gen / :seq, n < 16
//! ```
//!
//! The `{...}` hash tag puts a room's stream and channel in one Cluster slot,
//! so the publish script may touch both. Tenants and room names cannot
//! contain `{`, `}`, `/` or whitespace, and the prefix may not contain braces,
//! so the tag is always exactly `<tenant>/<room>`.

use roomcast_protocol::{RoomKey, RoomName, TenantId};

/// Number of Redis Cluster hash slots.
pub(crate) const SLOTS: u16 = 16384;

/// Builds and parses the names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The room's history stream key.
    pub(crate) fn stream(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:h", self.prefix, room.tenant, room.room)
    }

    /// The room's trim mark: a string holding the newest id trimmed away.
    pub(crate) fn trim_mark(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:t", self.prefix, room.tenant, room.room)
    }

    /// The room's pub/sub channel.
    pub(crate) fn channel(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:c", self.prefix, room.tenant, room.room)
    }

    /// The room's presence entries: HASH session → encoded entry.
    pub(crate) fn presence_entries(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:p", self.prefix, room.tenant, room.room)
    }

    /// The room's presence expiries: ZSET session → expiry (unix ms).
    pub(crate) fn presence_expiry(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:pz", self.prefix, room.tenant, room.room)
    }

    /// The room's present users: HASH user → number of entries.
    pub(crate) fn presence_users(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:pu", self.prefix, room.tenant, room.room)
    }

    /// The room's registration mark: STRING, present while the room is
    /// known to be listed in its registry shard.
    pub(crate) fn presence_mark(&self, room: &RoomKey) -> String {
        format!("{}{{{}/{}}}:pr", self.prefix, room.tenant, room.room)
    }

    /// Registry shard `n`'s keys, one hash tag: the due ZSET
    /// (`<tenant>/<room>` → ms), the generation HASH and its counter.
    pub(crate) fn presence_registry(&self, shard: u16) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}{{presence:{shard}}}:rooms"),
            format!("{p}{{presence:{shard}}}:gen"),
            format!("{p}{{presence:{shard}}}:seq"),
        ]
    }

    /// The room a channel name belongs to, if it is one of ours.
    pub(crate) fn parse_channel(&self, channel: &[u8]) -> Option<RoomKey> {
        let s = std::str::from_utf8(channel).ok()?;
        let tag = s.strip_prefix(&self.prefix)?.strip_suffix(":c")?;
        let (tenant, room) = tag.strip_prefix('{')?.strip_suffix('}')?.split_once('/')?;
        let tenant: TenantId = tenant.parse().ok()?;
        let room: RoomName = room.parse().ok()?;
        Some(RoomKey::new(tenant, room))
    }
}

/// The Cluster slot of a key or channel: CRC16 of its hash tag (or of the
/// whole name when it has none), modulo 16384.
pub(crate) fn slot_of(name: &[u8]) -> u16 {
    let tagged = name
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(name);
    crc16(tagged) % SLOTS
}

/// CRC16/XMODEM (polynomial 0x1021), the Cluster key hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, r: &str) -> RoomKey {
        RoomKey::new(t.parse().unwrap(), r.parse().unwrap())
    }

    #[test]
    fn names_round_trip_and_share_a_slot() {
        let names = Names::new("rc:");
        let room = key("acme", "work_item:a:b");
        let ch = names.channel(&room);
        assert_eq!(ch, "rc:{acme/work_item:a:b}:c");
        assert_eq!(names.stream(&room), "rc:{acme/work_item:a:b}:h");
        assert_eq!(names.parse_channel(ch.as_bytes()), Some(room.clone()));
        assert_eq!(
            slot_of(ch.as_bytes()),
            slot_of(names.stream(&room).as_bytes())
        );
        assert_eq!(names.parse_channel(b"rc:{acme/team:1}:h"), None);
        assert_eq!(names.parse_channel(b"xx:{acme/team:1}:c"), None);
        assert_eq!(names.parse_channel(b"rc:{acme/bad}:c"), None);
    }

    #[test]
    fn slots_match_the_cluster_spec() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
    }
}
