//! The hub: a node's local room index and fan-out.
//!
//! Rooms are sharded over independent `RwLock`s, so no global lock sits on
//! the delivery path. A room holds one broker subscription however many local
//! members it has: the first member subscribes (under a per-room striped lock,
//! rolled back when the broker call fails), and the last one out unsubscribes
//! after `unsubscribe_delay`, so join/leave churn does not thrash the broker.
//! Fan-out renders each event once per renderer and pushes the same `Bytes`
//! into every member's outbound queue; it never awaits a socket.
//!
//! Events the broker read together arrive as one batch. An event whose room
//! gets another one later in the batch is deferred in each member's outbox,
//! so that member's frames of the batch leave in one write (see
//! `outbox.rs`); an event alone in its batch goes out at once, so batching
//! never adds a wait: it only happens to events that were already queued
//! behind each other.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use roomcast_broker::{Broker, BrokerError, EventSink, PresenceChange, PresenceEntry};
use roomcast_protocol::{Event, EventId, RoomKey, RoomName};

use crate::outbox::{DirectSend, PushError, Shared};
use crate::session::{Session, MAX_RENDER_SLOTS};

/// A fan-out's sends that may go straight to their sockets, each with its
/// frame's renderer slot. They are flushed at one `io_uring` batch, so they
/// always fit on the stack and an event allocates nothing for them.
type DirectSends<'a> = smallvec::SmallVec<[(DirectSend<'a>, usize); crate::uring::MAX_BATCH]>;

const SHARDS: usize = 64;
const STRIPES: usize = 256;

#[derive(Default)]
struct Room {
    members: Vec<Arc<Session>>,
    /// Whether the broker subscription is in place.
    subscribed: bool,
    /// Newest event delivered here, to fill a gap after a broker reconnect
    /// and to drop an event seen twice (overlapping subscriptions).
    last_id: EventId,
    /// Set from the moment the broker loses the room's subscription until
    /// its gap is refilled from history: live events wait here meanwhile.
    resync: Option<Resync>,
}

/// A room whose live events wait for a history refill.
#[derive(Default)]
struct Resync {
    /// Live events received meanwhile, in order; fanned out after the
    /// refill (those it already delivered are dropped by id).
    waiting: Vec<Arc<Event>>,
    /// A refill is reading history; before that the room waits for the
    /// broker to say it is back.
    refilling: bool,
    /// What the broker said while the refill ran, for after it.
    after: AfterRefill,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum AfterRefill {
    /// Nothing: deliver live again.
    #[default]
    Release,
    /// The subscription was lost again: hold until the broker is back.
    Hold,
    /// The broker resynced once more: refill again from where this ended.
    Refill,
}

/// Most live events a room holds while it waits for the broker to be back
/// (other rooms may still be down, e.g. a Cluster master being replaced);
/// past it the room refills on its own, since its events arrive again.
const MAX_HELD: usize = 1_000;

/// Where a join starts the session in the room.
#[derive(Clone, Copy)]
enum JoinFrom {
    /// Live from now: nothing published before the join.
    Now,
    /// From a resume position the caller reads history after.
    Resume,
}

/// One renderer's output for the event being fanned out.
struct Rendered {
    frame: Option<Bytes>,
    coalesce: Option<(String, Duration)>,
}

/// Which rooms' members are tracked in the broker's presence store.
#[derive(Debug, Clone)]
pub struct PresenceTracking {
    pub kinds: Vec<String>,
    pub ttl: Duration,
    pub node: roomcast_protocol::NodeId,
    /// `(room kind, room)`: the sweep's `presence.left` for a room of that
    /// kind is also announced in that room of the same tenant (seed003: a
    /// `user:` room's lapsed user reaches the namespace-wide room), so
    /// clients beyond the user's own room learn the user's node is gone.
    pub left_also: Vec<(String, RoomName)>,
}

/// The result of a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    New,
    AlreadyMember,
}

struct HubMetrics {
    events_in: Counter,
    deliveries: Counter,
    deliveries_deferred: Counter,
    slow_consumer_drops: Counter,
    latency: Histogram,
    rooms: Gauge,
    subscriptions: Gauge,
    io_uring_submissions: Counter,
    io_uring_sends: Counter,
    broker_subscribe_errors: Counter,
}

/// The local room index.
pub struct Hub {
    /// The hub itself, for tasks the broker's callbacks start.
    me: OnceLock<std::sync::Weak<Hub>>,
    shards: Box<[RwLock<HashMap<RoomKey, Room>>]>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    broker: OnceLock<Arc<dyn Broker>>,
    presence: OnceLock<PresenceTracking>,
    lag: crate::lag::LagTracker,
    unsubscribe_delay: Duration,
    /// Direct sends of a fan-out go to the kernel in `io_uring` submissions.
    io_uring: bool,
    metrics: HubMetrics,
}

fn index_of<T: Hash>(value: &T, n: usize) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    (h.finish() as usize) % n
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Hub {
    /// With `io_uring`, a fan-out's direct sends go to the kernel in one
    /// submission per chunk of members (falling back to `send(2)` where the
    /// process may not use it).
    pub fn new(unsubscribe_delay: Duration, io_uring: bool) -> Arc<Self> {
        let hub = Arc::new(Self {
            me: OnceLock::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            broker: OnceLock::new(),
            presence: OnceLock::new(),
            lag: crate::lag::LagTracker::default(),
            unsubscribe_delay,
            io_uring,
            metrics: HubMetrics {
                events_in: metrics::counter!("roomcast_events_in_total"),
                deliveries: metrics::counter!("roomcast_deliveries_total"),
                deliveries_deferred: metrics::counter!("roomcast_deliveries_deferred_total"),
                slow_consumer_drops: metrics::counter!("roomcast_drops_total", "reason" => "slow_consumer"),
                latency: metrics::histogram!("roomcast_publish_to_deliver_seconds"),
                rooms: metrics::gauge!("roomcast_rooms"),
                subscriptions: metrics::gauge!("roomcast_subscriptions"),
                broker_subscribe_errors: metrics::counter!(
                    "roomcast_broker_subscribe_errors_total"
                ),
                io_uring_submissions: metrics::counter!("roomcast_io_uring_submissions_total"),
                io_uring_sends: metrics::counter!("roomcast_io_uring_sends_total"),
            },
        });
        let _ = hub.me.set(Arc::downgrade(&hub));
        hub
    }

    /// Connects the hub to its broker; only the first call counts.
    pub fn attach(&self, broker: Arc<dyn Broker>) {
        let _ = self.broker.set(broker);
    }

    /// The largest publish→fan-out delay (ms) seen in the last second or two.
    pub fn recent_lag_ms(&self) -> u64 {
        self.lag.recent_max(now_ms())
    }

    /// Turns presence tracking on; only the first call counts.
    pub fn track_presence(&self, tracking: PresenceTracking) {
        let _ = self.presence.set(tracking);
    }

    /// Whether members of `room` are tracked in presence.
    pub fn tracks_presence(&self, room: &RoomName) -> bool {
        self.presence.get().is_some_and(|p| {
            self.broker().presence().is_some() && p.kinds.iter().any(|k| k == room.kind())
        })
    }

    fn broker(&self) -> &Arc<dyn Broker> {
        self.broker
            .get()
            .expect("hub used before a broker was attached")
    }

    fn shard(&self, key: &RoomKey) -> &RwLock<HashMap<RoomKey, Room>> {
        &self.shards[index_of(key, SHARDS)]
    }

    fn stripe(&self, key: &RoomKey) -> &tokio::sync::Mutex<()> {
        &self.stripes[index_of(key, STRIPES)]
    }

    /// Adds the session to `room` (inside the session's tenant), subscribing
    /// the node in the broker if it is the room's first local member.
    pub async fn join(
        &self,
        session: &Arc<Session>,
        room: RoomName,
    ) -> Result<Joined, BrokerError> {
        self.join_from(session, room, JoinFrom::Now).await
    }

    async fn join_from(
        &self,
        session: &Arc<Session>,
        room: RoomName,
        from: JoinFrom,
    ) -> Result<Joined, BrokerError> {
        if session.in_room(&room) {
            return Ok(Joined::AlreadyMember);
        }
        let key = RoomKey::new(session.tenant.clone(), room.clone());
        let _stripe = self.stripe(&key).lock().await;
        let subscribed = self
            .shard(&key)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|r| r.subscribed);
        if !subscribed {
            if let Err(e) = self.broker().subscribe(&key).await {
                self.metrics.broker_subscribe_errors.increment(1);
                return Err(e);
            }
        }
        {
            let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
            let entry = shard.entry(key).or_insert_with(|| {
                self.metrics.rooms.increment(1.0);
                Room::default()
            });
            entry.subscribed = true;
            // The events up to the newest one the room holds for a refill
            // were published before this join: the refill would otherwise
            // send them to this session too.
            let newest_held = entry.resync.as_ref().and_then(|r| {
                r.waiting
                    .iter()
                    .rev()
                    .map(|e| e.id)
                    .find(|id| *id != EventId::ZERO)
            });
            if let (JoinFrom::Now, Some(last)) = (from, newest_held) {
                session.joined_after(&room, last);
            }
            entry.members.push(session.clone());
        }
        session.rooms().push(room.clone());
        self.metrics.subscriptions.increment(1.0);
        if self.tracks_presence(&room) {
            self.presence_refresh(session, &RoomKey::new(session.tenant.clone(), room))
                .await;
        }
        Ok(Joined::New)
    }

    /// Adds or refreshes the session's presence entry in `key`; the user's
    /// first session announces `presence.joined` to the room.
    pub(crate) async fn presence_refresh(&self, session: &Session, key: &RoomKey) {
        let (Some(tracking), Some(store)) = (self.presence.get(), self.broker().presence()) else {
            return;
        };
        let now = now_ms();
        let entry = PresenceEntry {
            session: session.id.clone(),
            user: session.user.clone(),
            node: tracking.node.clone(),
            connected_at: session.connected_at,
            last_seen: now,
            user_agent: session.user_agent().cloned(),
            ip: session.ip().cloned(),
        };
        match store.upsert(key, entry, tracking.ttl, now).await {
            Ok(PresenceChange::UserJoined) => {
                let data = serde_json::json!({
                    "user": session.user.as_str(),
                    "session": session.id.as_str(),
                    "node": tracking.node.as_str(),
                });
                // The joiner knows it joined; the others learn it.
                self.announce(
                    key,
                    "presence.joined",
                    &session.user,
                    &data,
                    Some(&session.id),
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(room = %key, error = %e, "presence refresh failed"),
        }
    }

    async fn presence_remove(&self, session: &Session, key: &RoomKey) {
        let Some(store) = self.broker().presence() else {
            return;
        };
        match store.remove(key, &session.id, now_ms()).await {
            Ok(PresenceChange::UserLeft) => {
                let data = serde_json::json!({ "user": session.user.as_str() });
                self.announce(key, "presence.left", &session.user, &data, None)
                    .await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(room = %key, error = %e, "presence remove failed"),
        }
    }

    /// Publishes an ephemeral presence event to one room.
    pub(crate) async fn announce(
        &self,
        key: &RoomKey,
        kind: &str,
        user: &roomcast_protocol::UserId,
        data: &serde_json::Value,
        except: Option<&roomcast_protocol::SessionId>,
    ) {
        self.announce_in(key, &[], kind, user, data, except).await;
    }

    /// Publishes an ephemeral presence event to `key` and to `extra` rooms
    /// of its tenant (a session in several gets it once).
    async fn announce_in(
        &self,
        key: &RoomKey,
        extra: &[RoomName],
        kind: &str,
        user: &roomcast_protocol::UserId,
        data: &serde_json::Value,
        except: Option<&roomcast_protocol::SessionId>,
    ) {
        let event = Event {
            id: EventId::ZERO,
            tenant: key.tenant.clone(),
            rooms: std::iter::once(&key.room).chain(extra).cloned().collect(),
            kind: Arc::from(kind),
            ts: now_ms(),
            actor: Some(Arc::from(user.as_str())),
            version: None,
            audience: Vec::new(),
            exclude_users: Vec::new(),
            exclude_sessions: except.into_iter().cloned().collect(),
            body: roomcast_protocol::Body::from_value(data),
        };
        if let Err(e) = self.broker().publish_ephemeral(event).await {
            tracing::warn!(room = %key, error = %e, kind, "presence announcement failed");
        }
    }

    /// Sweeps lapsed presence entries (a crashed node's sessions) and
    /// announces `presence.left` for users with no session left.
    pub async fn sweep_presence(&self) {
        let Some(store) = self.broker().presence() else {
            return;
        };
        let also: &[(String, RoomName)] = self.presence.get().map_or(&[], |p| &p.left_also);
        match store.expire(now_ms()).await {
            Ok(lapsed) => {
                for (key, user) in lapsed {
                    let data = serde_json::json!({ "user": user.as_str() });
                    let extra: Vec<RoomName> = also
                        .iter()
                        .filter(|(kind, room)| kind == key.room.kind() && *room != key.room)
                        .map(|(_, room)| room.clone())
                        .collect();
                    self.announce_in(&key, &extra, "presence.left", &user, &data, None)
                        .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
        }
    }

    /// Removes the session from `room`; returns whether it was a member.
    pub async fn leave(self: &Arc<Self>, session: &Arc<Session>, room: &RoomName) -> bool {
        {
            let mut rooms = session.rooms();
            let Some(pos) = rooms.iter().position(|r| r == room) else {
                return false;
            };
            rooms.remove(pos);
        }
        session.forget_replay(room);
        let key = RoomKey::new(session.tenant.clone(), room.clone());
        let _stripe = self.stripe(&key).lock().await;
        let now_empty = {
            let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
            match shard.get_mut(&key) {
                Some(r) => {
                    if let Some(pos) = r.members.iter().position(|m| Arc::ptr_eq(m, session)) {
                        r.members.swap_remove(pos);
                    }
                    r.members.is_empty()
                }
                None => false,
            }
        };
        self.metrics.subscriptions.decrement(1.0);
        if self.tracks_presence(room) {
            self.presence_remove(session, &key).await;
        }
        if now_empty {
            if self.unsubscribe_delay.is_zero() {
                self.release_if_empty(&key).await;
            } else {
                let hub = self.clone();
                let delay = self.unsubscribe_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _stripe = hub.stripe(&key).lock().await;
                    hub.release_if_empty(&key).await;
                });
            }
        }
        true
    }

    /// Unsubscribes and forgets an empty room. Caller holds the room's stripe.
    async fn release_if_empty(&self, key: &RoomKey) {
        let empty = self
            .shard(key)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|r| r.members.is_empty());
        if !empty {
            return;
        }
        if let Err(e) = self.broker().unsubscribe(key).await {
            tracing::warn!(room = %key, error = %e, "broker unsubscribe failed; keeping the room");
            return;
        }
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        if shard.get(key).is_some_and(|r| r.members.is_empty()) {
            shard.remove(key);
            self.metrics.rooms.decrement(1.0);
        }
    }

    /// Removes the session from every room it holds (at disconnect).
    pub async fn leave_all(self: &Arc<Self>, session: &Arc<Session>) {
        let rooms: Vec<RoomName> = session.rooms().clone();
        for room in rooms {
            self.leave(session, &room).await;
        }
    }

    /// Local members of a room (for tests and introspection).
    pub fn member_count(&self, tenant: &roomcast_protocol::TenantId, room: &RoomName) -> usize {
        let key = RoomKey::new(tenant.clone(), room.clone());
        self.shard(&key)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map_or(0, |r| r.members.len())
    }

    /// Delivers one event to a room's members; with `deferred`, it is held
    /// in their outboxes for a later write, and each session whose outbox
    /// must then be flushed is added to `deferred`.
    fn fan_out(&self, key: &RoomKey, event: &Arc<Event>, deferred: Option<&mut Vec<Arc<Session>>>) {
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        let Some(room) = shard.get_mut(key) else {
            return;
        };
        if let Some(resync) = room.resync.as_mut() {
            resync.waiting.push(event.clone());
            if !resync.refilling && resync.waiting.len() >= MAX_HELD {
                resync.refilling = true;
                tracing::info!(room = %key, "room held long enough while the broker recovers; refilling it now");
                self.spawn_refill(vec![(key.clone(), room.last_id)]);
            }
            return;
        }
        self.fan_out_locked(key, room, event, deferred);
    }

    /// Refills `rooms` (each from the id given) one after the other.
    fn spawn_refill(&self, rooms: Vec<(RoomKey, EventId)>) {
        let Some(hub) = self.me.get().and_then(|w| w.upgrade()) else {
            return;
        };
        tokio::spawn(async move {
            for (key, since) in rooms {
                hub.refill(&key, since).await;
            }
        });
    }

    fn record_arrival(&self, event: &Event) {
        self.metrics.events_in.increment(1);
        let now = now_ms();
        if event.ts > 0 {
            let lag_ms = now.saturating_sub(event.ts);
            self.metrics.latency.record(lag_ms as f64 / 1000.0);
        }
        // The broker's own clock (the stream id's ms), not the publisher's ts,
        // says how far behind fan-out runs.
        if event.id != EventId::ZERO {
            self.lag.record(now, now.saturating_sub(event.id.ms));
        }
    }

    /// Delivers to a room whose shard lock the caller holds.
    fn fan_out_locked(
        &self,
        key: &RoomKey,
        room: &mut Room,
        event: &Event,
        mut deferred: Option<&mut Vec<Arc<Session>>>,
    ) {
        if event.id != EventId::ZERO {
            if event.id <= room.last_id {
                // Already delivered (a history refill or an overlapping subscription).
                return;
            }
            room.last_id = event.id;
        }
        let position = event.rooms.iter().position(|r| *r == key.room).unwrap_or(0);
        let earlier_rooms = &event.rooms[..position];
        let filter_audience = !event.audience.is_empty();
        let filter_exclusions =
            !event.exclude_users.is_empty() || !event.exclude_sessions.is_empty();
        let mut rendered: [Option<Rendered>; MAX_RENDER_SLOTS] = Default::default();
        let mut delivered = 0u64;
        let mut slow = 0u64;
        // Sends that may go straight to their sockets, with their frame's
        // renderer slot; each keeps its session's later frames queued
        // behind it until it is sent.
        let batch_sends = self.io_uring && crate::uring::usable() && room.members.len() > 1;
        let mut direct = DirectSends::new();
        for session in &room.members {
            // A session in several of the event's rooms gets it through the
            // first of them only.
            if !earlier_rooms.is_empty() && earlier_rooms.iter().any(|r| session.in_room(r)) {
                continue;
            }
            if filter_audience && !event.audience_allows(&session.roles) {
                continue;
            }
            if filter_exclusions && event.excludes(&session.user, &session.id) {
                continue;
            }
            let slot = session.renderer.slot();
            let r = rendered[slot].get_or_insert_with(|| Rendered {
                frame: session.renderer.render(event, &key.room),
                coalesce: session.renderer.coalesce(event, &key.room),
            });
            let Some(frame) = &r.frame else {
                continue;
            };
            let elsewhere = || {
                event
                    .rooms
                    .iter()
                    .any(|r| *r != key.room && session.in_room(r))
            };
            if session.hold_if_replaying(&key.room, event.id, frame, elsewhere) {
                continue;
            }
            let pushed = match (&r.coalesce, deferred.as_deref_mut()) {
                (None, None) if batch_sends => match session.outbox.begin_shared(frame) {
                    Shared::Done(pushed) => pushed,
                    Shared::Direct(send) => {
                        direct.push((send, slot));
                        if direct.len() == crate::uring::MAX_BATCH {
                            self.send_direct(&mut direct, &rendered);
                        }
                        Ok(())
                    }
                },
                (None, None) => session.outbox.push_shared(frame),
                (None, Some(flush)) => session.outbox.push_deferred(frame).map(|first| {
                    if first {
                        flush.push(session.clone());
                    }
                }),
                (Some((k, window)), _) => session.outbox.push_coalesced(k, frame.clone(), *window),
            };
            match pushed {
                Ok(()) => delivered += 1,
                Err(PushError::Overflow) => {
                    slow += 1;
                    tracing::info!(session = %session.id, "slow consumer: outbound queue full, disconnecting");
                }
                Err(PushError::Closed) => {}
            }
        }
        self.send_direct(&mut direct, &rendered);
        self.metrics.deliveries.increment(delivered);
        if deferred.is_some() {
            self.metrics.deliveries_deferred.increment(delivered);
        }
        if slow > 0 {
            self.metrics.slow_consumer_drops.increment(slow);
        }
    }
}

impl Hub {
    /// Sends the frames of `direct` in one `io_uring` submission (one
    /// `send(2)` each if this process may not use it) and releases their
    /// outboxes, queueing for the writers what the sockets did not take.
    fn send_direct(
        &self,
        direct: &mut DirectSends<'_>,
        rendered: &[Option<Rendered>; MAX_RENDER_SLOTS],
    ) {
        if direct.is_empty() {
            return;
        }
        let frame_of = |slot: usize| -> &Bytes {
            rendered[slot]
                .as_ref()
                .and_then(|r| r.frame.as_ref())
                .expect("a direct send's frame was rendered")
        };
        let mut results = [0i32; crate::uring::MAX_BATCH];
        let submitted = crate::uring::send_each(
            direct
                .iter()
                .map(|(send, slot)| (send.socket(), &frame_of(*slot)[..])),
            &mut results,
        );
        if submitted.is_ok() {
            self.metrics.io_uring_submissions.increment(1);
            self.metrics.io_uring_sends.increment(direct.len() as u64);
        }
        for (i, (send, slot)) in direct.drain(..).enumerate() {
            let frame = frame_of(slot);
            let sent = match submitted {
                Ok(()) => crate::uring::result(results[i]),
                Err(crate::uring::Unavailable) => send.send_now(frame),
            };
            send.finish(frame, sent);
        }
    }
}

impl EventSink for Hub {
    fn deliver(&self, room: &RoomKey, event: Arc<Event>) {
        self.record_arrival(&event);
        self.fan_out(room, &event, None);
    }

    fn deliver_batch(&self, events: &[(RoomKey, Arc<Event>)]) {
        if let [(room, event)] = events {
            return self.deliver(room, event.clone());
        }
        // Which events have a later one in the same room: only those wait.
        let mut rooms = std::collections::HashSet::with_capacity(events.len());
        let mut more_follow = vec![false; events.len()];
        for (i, (room, _)) in events.iter().enumerate().rev() {
            more_follow[i] = !rooms.insert(room);
        }
        let mut to_flush = Vec::new();
        for ((room, event), more) in events.iter().zip(more_follow) {
            self.record_arrival(event);
            self.fan_out(room, event, more.then_some(&mut to_flush));
        }
        // Most were sent with their room's last event of the batch; these
        // are for members that event skipped, or that left the room meanwhile.
        for session in to_flush {
            session.outbox.flush_deferred();
        }
    }

    fn interrupted(&self, key: &RoomKey) {
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        let Some(room) = shard.get_mut(key) else {
            return;
        };
        match &mut room.resync {
            None => room.resync = Some(Resync::default()),
            Some(resync) if resync.refilling => resync.after = AfterRefill::Hold,
            Some(_) => {}
        }
    }

    fn resynced(&self) {
        // Every room holds its live events while it refills from history.
        let mut rooms = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            for (key, room) in shard.iter_mut() {
                let resync = room.resync.get_or_insert_with(Resync::default);
                if resync.refilling {
                    resync.after = AfterRefill::Refill;
                } else {
                    resync.refilling = true;
                    rooms.push((key.clone(), room.last_id));
                }
            }
        }
        tracing::info!(
            rooms = rooms.len(),
            "broker resynced; refilling rooms from history"
        );
        self.spawn_refill(rooms);
    }
}

/// Most events one refill or one session replay reads from history; past it
/// the reader is told it did not recover and must refetch.
pub const MAX_REPLAY: usize = 10_000;
const PAGE: usize = 500;

/// A room joined with a resume position: history is read, and live frames
/// of the room are held until [`Resume::replay`] queues the history.
pub struct Resume {
    room: RoomName,
    since: EventId,
    events: Vec<Arc<Event>>,
    /// False when history no longer reaches back to the requested id (or
    /// holds more than [`MAX_REPLAY`] events after it): the client must
    /// refetch its state.
    pub recovered: bool,
}

impl Resume {
    /// Queues the missed events for the session, then lets live frames
    /// through (those held meanwhile that are newer). Returns how many
    /// events were replayed.
    pub fn replay(self, session: &Session) -> usize {
        let mut last = self.since;
        let mut replayed = 0;
        for event in &self.events {
            last = last.max(event.id);
            if !event.audience.is_empty() && !event.audience_allows(&session.roles) {
                continue;
            }
            if event.excludes(&session.user, &session.id) {
                continue;
            }
            if let Some(frame) = session.renderer.render(event, &self.room) {
                let _ = session.outbox.push(frame);
                replayed += 1;
            }
        }
        session.end_replay(&self.room, last);
        replayed
    }
}

impl Hub {
    /// Reads `key`'s history after `since`, page by page, up to [`MAX_REPLAY`].
    async fn read_history(
        &self,
        key: &RoomKey,
        since: EventId,
    ) -> Result<(Vec<Arc<Event>>, bool), BrokerError> {
        let mut events = Vec::new();
        let mut cursor = since;
        let mut recovered = true;
        loop {
            let page = self.broker().history_since(key, cursor, PAGE).await?;
            recovered &= page.recovered;
            if let Some(last) = page.events.last() {
                cursor = last.id;
            }
            events.extend(page.events);
            if !page.more {
                break;
            }
            if events.len() >= MAX_REPLAY {
                recovered = false;
                break;
            }
        }
        Ok((events, recovered))
    }

    /// Refills a room from history after a broker reconnect, then releases
    /// the live events that waited meanwhile; each event once, in order.
    async fn refill(&self, key: &RoomKey, since: EventId) {
        let history = if since == EventId::ZERO {
            // Nothing was delivered here before the outage: nothing to refill.
            Ok((Vec::new(), true))
        } else {
            // Right after a reconnect the command path may still be failing
            // over: retry briefly before giving up on the gap.
            let mut backoff =
                roomcast_broker::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            loop {
                match self.read_history(key, since).await {
                    Err(e) if backoff.attempts() < 8 => {
                        tracing::debug!(room = %key, error = %e, "history refill failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    result => break result,
                }
            }
        };
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        let Some(room) = shard.get_mut(key) else {
            return;
        };
        let Resync { waiting, after, .. } = room.resync.take().unwrap_or_default();
        match history {
            Ok((events, _)) => {
                for event in &events {
                    self.fan_out_locked(key, room, event, None);
                }
            }
            Err(e) => {
                tracing::warn!(room = %key, error = %e, "history refill failed; live delivery resumes with a gap")
            }
        }
        for event in &waiting {
            self.fan_out_locked(key, room, event, None);
        }
        match after {
            AfterRefill::Release => {}
            AfterRefill::Hold => room.resync = Some(Resync::default()),
            AfterRefill::Refill => {
                room.resync = Some(Resync {
                    refilling: true,
                    ..Resync::default()
                });
                self.spawn_refill(vec![(key.clone(), room.last_id)]);
            }
        }
    }

    /// Joins `room` and reads what the session missed after `since`. Live
    /// frames of the room are held from before the join until
    /// [`Resume::replay`], so the switch to live has no gap and no duplicate.
    /// The caller must call `replay` (it may first send a reply).
    pub async fn join_resuming(
        &self,
        session: &Arc<Session>,
        room: RoomName,
        since: EventId,
    ) -> Result<Resume, BrokerError> {
        session.begin_replay(&room);
        if let Err(e) = self
            .join_from(session, room.clone(), JoinFrom::Resume)
            .await
        {
            session.end_replay(&room, EventId::ZERO);
            return Err(e);
        }
        let key = RoomKey::new(session.tenant.clone(), room.clone());
        match self.read_history(&key, since).await {
            Ok((events, recovered)) => Ok(Resume {
                room,
                since,
                events,
                recovered,
            }),
            Err(e) => {
                session.end_replay(&room, EventId::ZERO);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use roomcast_broker::{HistoryPolicy, MemoryBroker};

    use super::*;
    use crate::native::{Format, NativeRenderer};
    use crate::outbox::{Next, Outbox};

    fn session() -> Arc<Session> {
        named_session("s_test")
    }

    fn named_session(id: &str) -> Arc<Session> {
        Arc::new(Session::new(
            id.parse().unwrap(),
            "u1".parse().unwrap(),
            "acme".parse().unwrap(),
            Box::new([]),
            Arc::new(NativeRenderer::new(Format::Json, 0)),
            Outbox::new(100, 1 << 20),
        ))
    }

    /// The frames queued for `session` so far.
    fn queued(session: &Session) -> Vec<Bytes> {
        match session.outbox.take_ready() {
            Ok(Next::Write(frames)) => {
                session.outbox.writer_done();
                frames.into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The channel message of an event can reach the node after a resuming
    /// client's history read already returned that event (the message sat
    /// in the subscriber's socket or a fan-out lane, or a refill reads it
    /// again after an outage): the client gets it once.
    #[tokio::test]
    async fn an_event_replayed_from_history_is_not_delivered_again_when_it_arrives_live() {
        let hub = Hub::new(Duration::ZERO, false);
        // The broker keeps history but does not deliver to the hub: the
        // test delivers the live copies itself, late.
        let broker = Arc::new(MemoryBroker::new(HistoryPolicy::default()));
        hub.attach(broker.clone());
        let key = RoomKey::new("acme".parse().unwrap(), "team:1".parse().unwrap());
        let publish = |n: u32| {
            let json = format!(r#"{{"tenant":"acme","rooms":["team:1"],"type":"t","data":{n}}}"#);
            Event::decode(json.as_bytes(), &Default::default()).unwrap()
        };
        broker.publish(publish(1)).await.unwrap();
        let session = session();
        let resume = hub
            .join_resuming(&session, key.room.clone(), EventId::ZERO)
            .await
            .unwrap();
        assert_eq!(resume.replay(&session), 1);
        let first = broker.history_since(&key, EventId::ZERO, 10).await.unwrap();
        hub.deliver(&key, first.events[0].clone());
        assert_eq!(queued(&session).len(), 1, "replayed once, not again live");

        broker.publish(publish(2)).await.unwrap();
        let both = broker.history_since(&key, EventId::ZERO, 10).await.unwrap();
        hub.deliver(&key, both.events[1].clone());
        let frames = queued(&session);
        assert_eq!(frames.len(), 1, "the next event goes through");
        assert!(String::from_utf8_lossy(&frames[0]).contains(r#""data":2"#));
    }

    /// A room whose subscription was lost and is back again, with `old` a
    /// member since before: the broker keeps history, the test delivers
    /// the live copies itself.
    struct HeldRoom {
        hub: Arc<Hub>,
        broker: Arc<MemoryBroker>,
        key: RoomKey,
        old: Arc<Session>,
    }

    impl HeldRoom {
        async fn new() -> Self {
            let hub = Hub::new(Duration::ZERO, false);
            let broker = Arc::new(MemoryBroker::new(HistoryPolicy::default()));
            hub.attach(broker.clone());
            let key = RoomKey::new("acme".parse().unwrap(), "team:1".parse().unwrap());
            let old = named_session("s_old");
            hub.join(&old, key.room.clone()).await.unwrap();
            let held = HeldRoom {
                hub,
                broker,
                key,
                old,
            };
            let first = held.publish(&["team:1"], 1).await;
            held.live("team:1", &first);
            assert_eq!(frames_data(&held.old), [1]);
            held.hub.interrupted(&held.key);
            held
        }

        /// Publishes `data` into `rooms` (history only); returns the event.
        async fn publish(&self, rooms: &[&str], data: u32) -> Event {
            let rooms = rooms
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(",");
            let json = format!(r#"{{"tenant":"acme","rooms":[{rooms}],"type":"t","data":{data}}}"#);
            let event = Event::decode(json.as_bytes(), &Default::default()).unwrap();
            let published = self.broker.publish(event.clone()).await.unwrap();
            let mut stored = event;
            stored.id = published.ids[0].1;
            stored
        }

        /// The live copy of `event` reaches the node on `room`'s channel.
        fn live(&self, room: &str, event: &Event) {
            let key = RoomKey::new("acme".parse().unwrap(), room.parse().unwrap());
            self.hub.deliver(&key, Arc::new(event.clone()));
        }

        /// Tells the hub the broker is back and waits until `old` has had
        /// `events` more events (the refill runs on its own task).
        async fn resync(&self, events: usize) -> Vec<u32> {
            self.hub.resynced();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), async {
                while got.len() < events {
                    got.extend(frames_data(&self.old));
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the refill reached the member");
            got
        }
    }

    /// The `data` of the event frames queued for `session` so far.
    fn frames_data(session: &Session) -> Vec<u32> {
        queued(session)
            .iter()
            .map(|frame| {
                // The frame is a whole WebSocket frame: header, then the JSON.
                let text = String::from_utf8_lossy(frame);
                let data = text.split(r#""data":"#).nth(1).expect("an event frame");
                let digits: String = data.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().expect("numeric data")
            })
            .collect()
    }

    /// A client that subscribes (without resuming) while its room waits for
    /// a refill gets what was published after it joined, not the events the
    /// room held or the refill reads from before.
    #[tokio::test]
    async fn a_session_joining_a_held_room_gets_no_events_from_before_it_joined() {
        let held = HeldRoom::new().await;
        // Its live copy was lost with the subscription.
        held.publish(&["team:1"], 2).await;
        let waited = held.publish(&["team:1"], 3).await;
        held.live("team:1", &waited);
        let new = named_session("s_new");
        held.hub.join(&new, held.key.room.clone()).await.unwrap();
        let after = held.publish(&["team:1"], 4).await;
        held.live("team:1", &after);
        assert_eq!(
            held.resync(3).await,
            [2, 3, 4],
            "the member from before gets every event"
        );
        assert_eq!(
            frames_data(&new),
            [4],
            "the new one only what came after its join"
        );

        let next = held.publish(&["team:1"], 5).await;
        held.live("team:1", &next);
        assert_eq!(frames_data(&new), [5]);
    }

    /// The same for a session whose transport holds the room's live frames
    /// until its own opening is out (SSE), with the refill done meanwhile.
    #[tokio::test]
    async fn a_session_holding_for_its_opening_gets_no_events_from_before_it_joined() {
        let held = HeldRoom::new().await;
        held.publish(&["team:1"], 2).await;
        let waited = held.publish(&["team:1"], 3).await;
        held.live("team:1", &waited);
        let new = named_session("s_new");
        new.begin_replay(&held.key.room);
        held.hub.join(&new, held.key.room.clone()).await.unwrap();
        let after = held.publish(&["team:1"], 4).await;
        held.live("team:1", &after);
        assert_eq!(held.resync(3).await, [2, 3, 4]);
        assert_eq!(frames_data(&new), Vec::<u32>::new(), "held for the opening");
        new.end_replay(&held.key.room, EventId::ZERO);
        assert_eq!(frames_data(&new), [4]);
    }

    /// A session already in another room of such an event gets it through
    /// this one: the other room's copy skips it for the first of its rooms.
    #[tokio::test]
    async fn an_event_from_before_the_join_still_reaches_a_member_of_its_other_room() {
        let held = HeldRoom::new().await;
        let new = named_session("s_new");
        held.hub
            .join(&new, "team:2".parse().unwrap())
            .await
            .unwrap();
        let both = held.publish(&["team:1", "team:2"], 2).await;
        held.live("team:1", &both);
        held.hub.join(&new, held.key.room.clone()).await.unwrap();
        held.live("team:2", &both);
        assert_eq!(
            frames_data(&new),
            Vec::<u32>::new(),
            "team:1 comes first in its rooms"
        );
        assert_eq!(held.resync(1).await, [2]);
        assert_eq!(frames_data(&new), [2], "once, through team:1");
    }
}
