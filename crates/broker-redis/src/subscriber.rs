//! The node's subscriptions: which rooms it wants, and the hand-off of
//! received messages to the sink. The connections themselves are driven by
//! the [`crate::actor`]; this file is the part shared with the reader tasks
//! and the broker's handle on the actor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use roomcast_broker::EventSink;
use roomcast_protocol::{Event, EventDefaults, EventId, RoomKey};
use tokio::sync::{mpsc, oneshot};

use crate::lanes::Lanes;
use crate::link::Connected;
use crate::topology::SlotMap;

/// What the actor is told: by the broker (subscribe/unsubscribe), by the
/// reader tasks, by connect and topology tasks.
pub(crate) enum Msg {
    Subscribe {
        room: RoomKey,
        channel: Box<[u8]>,
        done: oneshot::Sender<()>,
    },
    Unsubscribe {
        channel: Box<[u8]>,
        done: oneshot::Sender<()>,
    },
    Link(LinkEvent),
    Connected {
        addr: Arc<str>,
        conn: Connected,
    },
    /// One connect attempt to `addr` failed (the task keeps retrying).
    ConnectFailed {
        addr: Arc<str>,
    },
    Topology(Result<SlotMap, String>),
}

/// What a reader task saw on its connection.
pub(crate) enum LinkEvent {
    Subscribed { conn_id: u64, channel: Box<[u8]> },
    Unsubscribed { conn_id: u64, channel: Box<[u8]> },
    ServerError { conn_id: u64, message: String },
    Closed { conn_id: u64, reason: String },
}

/// State the actor, the reader tasks and the broker share.
pub(crate) struct Shared {
    /// Channel → room of every room the node wants. Written only by the
    /// actor; readers deliver only what is in here (the channel name alone
    /// is not trusted).
    pub(crate) rooms: RwLock<HashMap<Box<[u8]>, RoomKey>>,
    /// Every connection up and every wanted room subscribed (see `healthy()`).
    pub(crate) healthy: AtomicBool,
    /// Woken whenever `healthy` is set.
    pub(crate) health_changed: tokio::sync::Notify,
    pub(crate) sink: Arc<dyn EventSink>,
    /// Where the readers hand received events over.
    lanes: Lanes,
}

impl Shared {
    /// With `lanes` fan-out lanes (see [`crate::RedisConfig::fanout_lanes`]).
    pub(crate) fn new(sink: Arc<dyn EventSink>, lanes: usize) -> Self {
        Self {
            rooms: RwLock::new(HashMap::new()),
            healthy: AtomicBool::new(false),
            health_changed: tokio::sync::Notify::new(),
            lanes: Lanes::start(sink.clone(), lanes),
            sink,
        }
    }

    /// How many fan-out lanes the node runs.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.count()
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
        self.health_changed.notify_waiters();
    }

    /// Waits until healthy, at most `patience`; returns the health then.
    pub(crate) async fn wait_healthy(&self, patience: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.health_changed.notified();
            if self.healthy() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.healthy();
            }
        }
    }

    pub(crate) fn wants(&self, channel: &[u8]) -> bool {
        self.rooms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(channel)
    }

    /// One message on `channel`: decode it and add it to `batch`, which the
    /// reader hands to the sink with [`Shared::deliver`] before it waits for
    /// more bytes.
    pub(crate) fn receive(&self, channel: &[u8], payload: &[u8], batch: &mut Batch) {
        let room = {
            let rooms = self.rooms.read().unwrap_or_else(|p| p.into_inner());
            match rooms.get(channel) {
                Some(room) => room.clone(),
                None => return, // unsubscribed meanwhile
            }
        };
        match decode_message(payload, &room) {
            Some(event) => batch.push((room, Arc::new(event))),
            None => count_decode_error(&room, "channel message"),
        }
    }

    /// Tells the sink that the wanted rooms among `channels` lost their
    /// subscription (see [`EventSink::interrupted`]).
    pub(crate) fn interrupted<'a>(&self, channels: impl IntoIterator<Item = &'a Box<[u8]>>) {
        let rooms = self.rooms.read().unwrap_or_else(|p| p.into_inner());
        for channel in channels {
            if let Some(room) = rooms.get(channel) {
                self.sink.interrupted(room);
            }
        }
    }

    /// Hands what `batch` holds to the sink, through the fan-out lanes, and
    /// empties it. Runs on a reader task; waits only while a lane is full.
    pub(crate) async fn deliver(&self, batch: &mut Batch) {
        self.lanes.deliver(batch).await;
    }
}

/// Events one reader decoded from what it has read so far, in order.
pub(crate) type Batch = Vec<(RoomKey, Arc<Event>)>;

/// Decodes `<id>\n<envelope>` received on `room`'s channel. The envelope's
/// tenant (when it names one) must be the room's.
pub(crate) fn decode_message(payload: &[u8], room: &RoomKey) -> Option<Event> {
    let nl = payload.iter().position(|&b| b == b'\n')?;
    let id: EventId = std::str::from_utf8(&payload[..nl]).ok()?.parse().ok()?;
    let defaults = EventDefaults {
        tenant: Some(room.tenant.clone()),
        now_ms: now_ms(),
    };
    let mut event = Event::decode(&payload[nl + 1..], &defaults).ok()?;
    if event.tenant != room.tenant {
        return None;
    }
    event.id = id;
    Some(event)
}

/// Counts and logs a message or history entry that could not be decoded.
pub(crate) fn count_decode_error(room: &RoomKey, what: &'static str) {
    metrics::counter!("roomcast_broker_decode_errors_total").increment(1);
    tracing::warn!(%room, what, "dropped an undecodable event");
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The broker's handle on the actor. Dropping it stops the actor.
pub(crate) struct Subscriber {
    pub(crate) tx: mpsc::UnboundedSender<Msg>,
    pub(crate) shared: Arc<Shared>,
}

impl Subscriber {
    /// Records the room as wanted and waits until Redis confirms the
    /// subscription, the connection is known to be down (the room is then
    /// subscribed on reconnect), or `patience` runs out. Returns false only
    /// when the actor is gone.
    pub(crate) async fn subscribe(
        &self,
        room: &RoomKey,
        channel: String,
        patience: std::time::Duration,
    ) -> bool {
        let (done, wait) = oneshot::channel();
        let msg = Msg::Subscribe {
            room: room.clone(),
            channel: channel.into_bytes().into_boxed_slice(),
            done,
        };
        if self.tx.send(msg).is_err() {
            return false;
        }
        if tokio::time::timeout(patience, wait).await.is_err() {
            tracing::warn!(%room, "redis has not confirmed the subscription yet; it stays wanted");
        }
        true
    }

    /// Forgets the room and sends the unsubscribe.
    pub(crate) async fn unsubscribe(&self, channel: String) -> bool {
        let (done, wait) = oneshot::channel();
        let msg = Msg::Unsubscribe {
            channel: channel.into_bytes().into_boxed_slice(),
            done,
        };
        self.tx.send(msg).is_ok() && wait.await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_id_and_stay_in_their_tenant() {
        let room = RoomKey::new("acme".parse().unwrap(), "team:1".parse().unwrap());
        let json = br#"{"rooms":["team:1"],"type":"t","data":{"a":1}}"#;
        let mut msg = b"17-3\n".to_vec();
        msg.extend_from_slice(json);
        let ev = decode_message(&msg, &room).unwrap();
        assert_eq!(ev.id, EventId::new(17, 3));
        assert_eq!(ev.tenant, room.tenant);
        let other = br#"17-3
{"tenant":"evil","rooms":["team:1"],"type":"t"}"#;
        assert!(decode_message(other, &room).is_none());
        assert!(decode_message(b"no-newline", &room).is_none());
        assert!(decode_message(b"x\n{}", &room).is_none());
    }
}
