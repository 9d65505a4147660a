//! Presence: who is in a room, across every node. An optional capability of a
//! broker, in its own trait so brokers without it stay small.
//!
//! Entries are per session and expire unless refreshed (heartbeats), so a
//! node that dies leaves no ghost: its sessions lapse after the TTL. A user is
//! present while any of their sessions is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use roomcast_protocol::{NodeId, RoomKey, SessionId, UserId};

use crate::broker::BrokerError;

/// One session's presence in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    pub session: SessionId,
    pub user: UserId,
    pub node: NodeId,
    /// Unix ms.
    pub connected_at: u64,
    /// Unix ms of the last heartbeat.
    pub last_seen: u64,
    pub user_agent: Option<Arc<str>>,
    /// The client's IP address, when the session's transport reports it.
    pub ip: Option<Arc<str>>,
}

/// What a presence write changed for the entry's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// The user's first live session in the room: emit `presence.joined`.
    UserJoined,
    /// The user's last live session left: emit `presence.left`.
    UserLeft,
    /// The user was and stays present (another session, or a refresh).
    Unchanged,
}

/// Per-room presence shared by the cluster.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Adds or refreshes the session's entry; it lapses after `ttl` unless
    /// refreshed again.
    async fn upsert(
        &self,
        room: &RoomKey,
        entry: PresenceEntry,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<PresenceChange, BrokerError>;

    /// Removes the session's entry.
    async fn remove(
        &self,
        room: &RoomKey,
        session: &SessionId,
        now_ms: u64,
    ) -> Result<PresenceChange, BrokerError>;

    /// Live entries of the room, oldest connection first.
    async fn members(&self, room: &RoomKey, now_ms: u64)
        -> Result<Vec<PresenceEntry>, BrokerError>;

    /// Drops lapsed entries everywhere and returns the (room, user) pairs
    /// whose last session lapsed, for `presence.left`.
    async fn expire(&self, now_ms: u64) -> Result<Vec<(RoomKey, UserId)>, BrokerError>;
}

/// A room's entries with their expiry (unix ms).
type RoomEntries = HashMap<SessionId, (PresenceEntry, u64)>;

/// Presence kept in this process (the memory broker's, single node).
#[derive(Default)]
pub struct MemoryPresence {
    rooms: Mutex<HashMap<RoomKey, RoomEntries>>,
}

/// Whether the user still has an entry in the room. A lapsed entry that no
/// sweep has removed yet still counts, so joins and leaves stay paired: the
/// sweep that removes it reports the leave, exactly once (as in Redis).
fn user_present(sessions: &RoomEntries, user: &UserId) -> bool {
    sessions.values().any(|(e, _)| &e.user == user)
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn upsert(
        &self,
        room: &RoomKey,
        entry: PresenceEntry,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<PresenceChange, BrokerError> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let sessions = rooms.entry(room.clone()).or_default();
        let was = user_present(sessions, &entry.user);
        let expires = now_ms + ttl.as_millis() as u64;
        sessions.insert(entry.session.clone(), (entry, expires));
        Ok(if was {
            PresenceChange::Unchanged
        } else {
            PresenceChange::UserJoined
        })
    }

    async fn remove(
        &self,
        room: &RoomKey,
        session: &SessionId,
        _now_ms: u64,
    ) -> Result<PresenceChange, BrokerError> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sessions) = rooms.get_mut(room) else {
            return Ok(PresenceChange::Unchanged);
        };
        let Some((entry, _)) = sessions.remove(session) else {
            return Ok(PresenceChange::Unchanged);
        };
        let still = user_present(sessions, &entry.user);
        if sessions.is_empty() {
            rooms.remove(room);
        }
        Ok(if still {
            PresenceChange::Unchanged
        } else {
            PresenceChange::UserLeft
        })
    }

    async fn members(
        &self,
        room: &RoomKey,
        now_ms: u64,
    ) -> Result<Vec<PresenceEntry>, BrokerError> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<PresenceEntry> = rooms
            .get(room)
            .map(|s| {
                s.values()
                    .filter(|(_, exp)| *exp > now_ms)
                    .map(|(e, _)| e.clone())
                    .collect()
            })
            .unwrap_or_default();
        live.sort_by_key(|e| e.connected_at);
        Ok(live)
    }

    async fn expire(&self, now_ms: u64) -> Result<Vec<(RoomKey, UserId)>, BrokerError> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let mut left = Vec::new();
        rooms.retain(|room, sessions| {
            let lapsed: Vec<UserId> = sessions
                .values()
                .filter(|(_, exp)| *exp <= now_ms)
                .map(|(e, _)| e.user.clone())
                .collect();
            sessions.retain(|_, (_, exp)| *exp > now_ms);
            for user in lapsed {
                if !user_present(sessions, &user) && !left.contains(&(room.clone(), user.clone())) {
                    left.push((room.clone(), user));
                }
            }
            !sessions.is_empty()
        });
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(session: &str, user: &str, at: u64) -> PresenceEntry {
        PresenceEntry {
            session: session.parse().unwrap(),
            user: user.parse().unwrap(),
            node: "n1".parse().unwrap(),
            connected_at: at,
            last_seen: at,
            user_agent: None,
            ip: None,
        }
    }

    #[tokio::test]
    async fn a_user_is_present_while_any_session_is() {
        let p = MemoryPresence::default();
        let room = RoomKey::new("acme".parse().unwrap(), "task:1".parse().unwrap());
        let ttl = Duration::from_secs(60);
        assert_eq!(
            p.upsert(&room, entry("s1", "u1", 1), ttl, 1).await.unwrap(),
            PresenceChange::UserJoined
        );
        assert_eq!(
            p.upsert(&room, entry("s2", "u1", 2), ttl, 2).await.unwrap(),
            PresenceChange::Unchanged
        );
        assert_eq!(p.members(&room, 3).await.unwrap().len(), 2);
        assert_eq!(
            p.remove(&room, &"s1".parse().unwrap(), 3).await.unwrap(),
            PresenceChange::Unchanged
        );
        assert_eq!(
            p.remove(&room, &"s2".parse().unwrap(), 3).await.unwrap(),
            PresenceChange::UserLeft
        );
    }

    #[tokio::test]
    async fn a_lapsed_unswept_session_keeps_join_and_leave_paired() {
        let p = MemoryPresence::default();
        let room = RoomKey::new("acme".parse().unwrap(), "task:1".parse().unwrap());
        let ttl = Duration::from_millis(100);
        assert_eq!(
            p.upsert(&room, entry("s1", "u1", 0), ttl, 0).await.unwrap(),
            PresenceChange::UserJoined
        );
        // s1 lapsed at 100 but nobody swept; a new session is not a second join.
        assert_eq!(
            p.upsert(&room, entry("s2", "u1", 150), ttl, 150)
                .await
                .unwrap(),
            PresenceChange::Unchanged
        );
        assert_eq!(
            p.remove(&room, &"s2".parse().unwrap(), 160).await.unwrap(),
            PresenceChange::Unchanged
        );
        // The sweep reports the leave, once.
        assert_eq!(
            p.expire(200).await.unwrap(),
            vec![(room.clone(), "u1".parse().unwrap())]
        );
        assert!(p.expire(300).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sessions_lapse_without_heartbeats() {
        let p = MemoryPresence::default();
        let room = RoomKey::new("acme".parse().unwrap(), "task:1".parse().unwrap());
        p.upsert(&room, entry("s1", "u1", 0), Duration::from_millis(100), 0)
            .await
            .unwrap();
        p.upsert(&room, entry("s2", "u2", 0), Duration::from_millis(100), 0)
            .await
            .unwrap();
        // u2 heartbeats, u1 does not.
        p.upsert(&room, entry("s2", "u2", 0), Duration::from_millis(100), 90)
            .await
            .unwrap();
        assert_eq!(
            p.expire(150).await.unwrap(),
            vec![(room.clone(), "u1".parse().unwrap())]
        );
        let live = p.members(&room, 150).await.unwrap();
        assert_eq!(
            live.iter().map(|e| e.user.as_str()).collect::<Vec<_>>(),
            ["u2"]
        );
    }
}
