//! Seed 000's channels, the rooms they map onto and who may read them.
//!
//! | channel          | room           | who may subscribe |
//! |------------------|----------------|-------------------|
//! | `worker:<id>`    | `worker:<id>`  | the worker whose token `sub` is `<id>`, or `worker_admin_role` |
//! | `board:zoo`      | `board:zoo`    | `board_roles` (empty: every authenticated user of the tenant) |
//! | `board:readonly` | `board:zoo`    | `stakeholder_role` only (read-only stakeholder sessions) |
//!
//! `board:readonly` carries the same events as `board:zoo`, so publishers
//! only ever send to `board:zoo`. A room the token grants explicitly (its
//! `rooms` claim) is allowed too.

use roomcast_auth::Identity;
use roomcast_protocol::RoomName;

use super::Settings;

/// A channel a client names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Channel {
    Worker(RoomName),
    Board,
    BoardReadonly,
}

/// The room of `board:zoo` and `board:readonly`.
pub(crate) const BOARD_ROOM: &str = "board:zoo";

impl Channel {
    /// Parses a channel name; `None` for anything but the three shapes.
    pub(crate) fn parse(name: &str) -> Option<Channel> {
        match name {
            "board:zoo" => Some(Channel::Board),
            "board:readonly" => Some(Channel::BoardReadonly),
            _ => {
                let id = name.strip_prefix("worker:")?;
                if id.is_empty() {
                    return None;
                }
                RoomName::from_parts("worker", id).ok().map(Channel::Worker)
            }
        }
    }

    /// The room whose events the channel carries.
    pub(crate) fn room(&self) -> RoomName {
        match self {
            Channel::Worker(room) => room.clone(),
            Channel::Board | Channel::BoardReadonly => {
                BOARD_ROOM.parse().expect("a valid room name")
            }
        }
    }

    /// Whether `identity` may read this channel.
    pub(crate) fn allowed(&self, settings: &Settings, identity: &Identity) -> bool {
        if identity.rooms.contains(&self.room()) && *self != Channel::BoardReadonly {
            return true;
        }
        match self {
            Channel::Worker(room) => {
                room.id() == identity.user.as_str()
                    || identity.has_role(&settings.worker_admin_role)
            }
            Channel::Board => {
                settings.board_roles.is_empty()
                    || settings.board_roles.iter().any(|r| identity.has_role(r))
            }
            Channel::BoardReadonly => identity.has_role(&settings.stakeholder_role),
        }
    }

    /// The channels a token implies when an SSE or poll request names none:
    /// a stakeholder reads `board:readonly`; anyone else their own
    /// `worker:<sub>` channel and `board:zoo` when allowed.
    pub(crate) fn implied(settings: &Settings, identity: &Identity) -> Vec<String> {
        if identity.has_role(&settings.stakeholder_role) {
            return vec!["board:readonly".into()];
        }
        let mut out = vec![format!("worker:{}", identity.user)];
        if Channel::Board.allowed(settings, identity) {
            out.push("board:zoo".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, roles: &[&str]) -> Identity {
        Identity {
            user: user.parse().unwrap(),
            tenant: "default".parse().unwrap(),
            teams: vec![],
            roles: roles.iter().map(|r| (*r).into()).collect(),
            rooms: vec![],
            expires_at: 0,
        }
    }

    #[test]
    fn parses_and_maps_channels() {
        assert_eq!(
            Channel::parse("board:readonly").unwrap().room().as_str(),
            "board:zoo"
        );
        assert_eq!(
            Channel::parse("worker:w123").unwrap().room().as_str(),
            "worker:w123"
        );
        for bad in ["worker:", "board:other", "team:1", "worker:a b", ""] {
            assert_eq!(Channel::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn authorization_rules() {
        let s = Settings::default();
        let w = who("w123", &[]);
        assert!(Channel::parse("worker:w123").unwrap().allowed(&s, &w));
        assert!(!Channel::parse("worker:w999").unwrap().allowed(&s, &w));
        assert!(Channel::Board.allowed(&s, &w));
        assert!(!Channel::BoardReadonly.allowed(&s, &w));
        let st = who("s1", &["stakeholder"]);
        assert!(Channel::BoardReadonly.allowed(&s, &st));
        assert_eq!(Channel::implied(&s, &st), vec!["board:readonly"]);
        assert_eq!(Channel::implied(&s, &w), vec!["worker:w123", "board:zoo"]);
        let admin = who("a", &["admin"]);
        assert!(Channel::parse("worker:w999").unwrap().allowed(&s, &admin));
    }
}
