//! What the hub knows of a session: who it is, how its frames are rendered,
//! its outbound queue and its rooms. Transports own the socket; the hub only
//! ever holds an `Arc<Session>` and pushes into its [`Outbox`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use roomcast_protocol::{Event, EventId, RoomName, SessionId, TenantId, UserId};

use crate::outbox::Outbox;

/// Most distinct renderers a node serves (native JSON, native protobuf, SSE,
/// one or two per dialect). The hub keeps one rendered frame per slot per
/// fan-out.
pub const MAX_RENDER_SLOTS: usize = 32;

/// Turns an event into the exact bytes a session's transport writes. Called
/// once per (event, room, renderer) fan-out; the bytes are shared.
pub trait Renderer: Send + Sync + 'static {
    /// A slot below [`MAX_RENDER_SLOTS`], unique per renderer on the node.
    fn slot(&self) -> usize;
    /// The frame for `event` delivered on `room`, or `None` when this
    /// renderer does not carry that event.
    fn render(&self, event: &Event, room: &RoomName) -> Option<Bytes>;

    /// A key and window when frames of this event coalesce per session: a
    /// newer frame with the same key replaces one still held (the last wins).
    fn coalesce(&self, _event: &Event, _room: &RoomName) -> Option<(String, std::time::Duration)> {
        None
    }
}

/// One authenticated client connection, whatever its transport.
pub struct Session {
    pub id: SessionId,
    pub user: UserId,
    pub tenant: TenantId,
    pub roles: Box<[Arc<str>]>,
    pub(crate) renderer: Arc<dyn Renderer>,
    pub(crate) outbox: Outbox,
    /// Rooms joined, in join order: for the per-session limit, for cleanup at
    /// disconnect and to deliver a multi-room event once.
    pub(crate) rooms: Mutex<Vec<RoomName>>,
    /// Rooms being replayed from history: live frames of those rooms wait
    /// here until the replay has been queued, so the switch to live has no
    /// gap and no duplicate. After the replay each room's entry remembers
    /// the last id replayed until a newer event arrives.
    replays: Mutex<Vec<Replay>>,
    /// Fast check on the delivery path: most sessions never replay.
    replaying: AtomicBool,
    /// Unix ms when the session was accepted (for presence).
    pub connected_at: u64,
    /// The client's User-Agent, when it sent one (for presence).
    user_agent: std::sync::OnceLock<Arc<str>>,
    /// The client's IP address, when its dialect reports it (for presence).
    ip: std::sync::OnceLock<Arc<str>>,
}

struct Replay {
    room: RoomName,
    held: Vec<(EventId, Bytes)>,
    /// Set when the replay was queued: the last id it covered. An event of
    /// the room up to it can still arrive from the broker afterwards (its
    /// channel message was behind the history read, or a refill after a
    /// broker outage reads it again) and is dropped; the first newer one
    /// ends the entry.
    drop_up_to: Option<EventId>,
    /// The events up to this id were published before the session joined
    /// (it joined a room held for a refill): they are not sent to it, except
    /// one that reaches it through no other room. `ZERO` when none.
    joined_after: EventId,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        user: UserId,
        tenant: TenantId,
        roles: Box<[Arc<str>]>,
        renderer: Arc<dyn Renderer>,
        outbox: Outbox,
    ) -> Self {
        Self {
            id,
            user,
            tenant,
            roles,
            renderer,
            outbox,
            rooms: Mutex::new(Vec::new()),
            replays: Mutex::new(Vec::new()),
            replaying: AtomicBool::new(false),
            connected_at: crate::hub::now_ms(),
            user_agent: std::sync::OnceLock::new(),
            ip: std::sync::OnceLock::new(),
        }
    }

    /// A session for an authenticated identity, with a fresh random id
    /// (`<prefix>_…`) and an outbox bounded by `limits`.
    pub(crate) fn for_identity(
        prefix: &str,
        identity: &roomcast_auth::Identity,
        renderer: Arc<dyn Renderer>,
        limits: &crate::config::Limits,
    ) -> Arc<Session> {
        Arc::new(Session::new(
            crate::ids::random_id(prefix)
                .parse()
                .expect("generated ids are valid"),
            identity.user.clone(),
            identity.tenant.clone(),
            identity.roles.clone().into_boxed_slice(),
            renderer,
            Outbox::new(limits.outbound_queue_frames, limits.outbound_queue_bytes),
        ))
    }

    /// Records the client's User-Agent (first call wins).
    pub(crate) fn set_user_agent(&self, user_agent: &str) {
        let cut: String = user_agent.chars().take(256).collect();
        let _ = self.user_agent.set(Arc::from(cut));
    }

    pub fn user_agent(&self) -> Option<&Arc<str>> {
        self.user_agent.get()
    }

    /// Records the client's IP address (first call wins).
    pub(crate) fn set_ip(&self, ip: &str) {
        let _ = self.ip.set(Arc::from(ip));
    }

    pub fn ip(&self) -> Option<&Arc<str>> {
        self.ip.get()
    }

    fn replays(&self) -> std::sync::MutexGuard<'_, Vec<Replay>> {
        self.replays.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts holding live frames of `room` (before joining it).
    pub(crate) fn begin_replay(&self, room: &RoomName) {
        let mut replays = self.replays();
        match replays.iter_mut().find(|r| &r.room == room) {
            // A room replayed before holds again (its `held` is empty then).
            Some(r) => {
                r.drop_up_to = None;
                r.joined_after = EventId::ZERO;
            }
            None => replays.push(Replay {
                room: room.clone(),
                held: Vec::new(),
                drop_up_to: None,
                joined_after: EventId::ZERO,
            }),
        }
        self.replaying.store(true, Ordering::Release);
    }

    /// Joins `room` (without resuming) after the events up to `last`, which
    /// the room still holds for a refill: they were published before this
    /// session joined, so they are not sent to it. A room held for the
    /// session's own opening (SSE) keeps holding, without them.
    pub(crate) fn joined_after(&self, room: &RoomName, last: EventId) {
        let mut replays = self.replays();
        match replays.iter_mut().find(|r| &r.room == room) {
            Some(r) => {
                r.joined_after = r.joined_after.max(last);
                if let Some(up_to) = &mut r.drop_up_to {
                    *up_to = (*up_to).max(last);
                }
            }
            None => replays.push(Replay {
                room: room.clone(),
                held: Vec::new(),
                drop_up_to: Some(last),
                joined_after: last,
            }),
        }
        self.replaying.store(true, Ordering::Release);
    }

    /// Holds a live frame when `room` is replaying, or drops one the session
    /// has or must not get (see [`Replay`]); gives it back otherwise.
    /// `elsewhere` says whether the session is in another room of the event,
    /// asked only for an event published before the session joined.
    pub(crate) fn hold_if_replaying(
        &self,
        room: &RoomName,
        id: EventId,
        frame: &Bytes,
        elsewhere: impl Fn() -> bool,
    ) -> bool {
        if !self.replaying.load(Ordering::Acquire) {
            return false;
        }
        let mut replays = self.replays();
        let Some(pos) = replays.iter().position(|r| &r.room == room) else {
            return false;
        };
        let replay = &mut replays[pos];
        // An event from before the join still goes to a session that was in
        // another of its rooms: that room's copy skips it for this one.
        let before_join = id != EventId::ZERO && id <= replay.joined_after;
        match replay.drop_up_to {
            None if before_join && !elsewhere() => true,
            None => {
                replay.held.push((id, frame.clone()));
                true
            }
            Some(_) if id == EventId::ZERO => false,
            Some(last) if id <= last => !(before_join && elsewhere()),
            Some(_) => {
                replays.swap_remove(pos);
                if replays.is_empty() {
                    self.replaying.store(false, Ordering::Release);
                }
                false
            }
        }
    }

    /// Ends the replay of `room`: queues the held live frames newer than
    /// `last` (ephemeral ones, without an id, always), then lets live frames
    /// through, except those up to `last` (already replayed) or from before
    /// the join until a newer one came. Runs under the replay lock, so no
    /// live frame slips between.
    pub(crate) fn end_replay(&self, room: &RoomName, last: EventId) {
        let mut replays = self.replays();
        if let Some(pos) = replays.iter().position(|r| &r.room == room) {
            let mut replay = replays.swap_remove(pos);
            let up_to = last.max(replay.joined_after);
            let mut newer = false;
            for (id, frame) in replay.held.drain(..) {
                if id == EventId::ZERO || id > last {
                    newer |= id > up_to;
                    let _ = self.outbox.push(frame);
                }
            }
            if up_to != EventId::ZERO && !newer {
                replay.drop_up_to = Some(up_to);
                replays.push(replay);
            }
        }
        if replays.is_empty() {
            self.replaying.store(false, Ordering::Release);
        }
    }

    /// Drops what is remembered of a replay of `room` (the session left it).
    pub(crate) fn forget_replay(&self, room: &RoomName) {
        let mut replays = self.replays();
        replays.retain(|r| &r.room != room || r.drop_up_to.is_none());
        if replays.is_empty() {
            self.replaying.store(false, Ordering::Release);
        }
    }

    pub(crate) fn rooms(&self) -> std::sync::MutexGuard<'_, Vec<RoomName>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn in_room(&self, room: &RoomName) -> bool {
        self.rooms().contains(room)
    }

    pub fn room_count(&self) -> usize {
        self.rooms().len()
    }
}
