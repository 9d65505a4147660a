//! The embedded broker: one process, no engine. Complete on a single node:
//! publish, per-room history with caps, ref-counted subscriptions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use roomcast_protocol::{Event, EventId, RoomKey};

use crate::broker::{Broker, BrokerError, EventSink, History, Published};
use crate::history::HistoryPolicy;

const SHARDS: usize = 64;

#[derive(Default)]
struct RoomLog {
    events: VecDeque<Arc<Event>>,
    last_id: EventId,
    /// Id of the newest event trimmed away: a reader behind it lost events.
    trimmed_up_to: EventId,
}

#[derive(Default)]
struct Shard {
    logs: HashMap<RoomKey, RoomLog>,
    subscribed: HashSet<RoomKey>,
}

/// The in-memory broker.
pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    presence: crate::presence::MemoryPresence,
    counters: crate::counters::MemoryCounters,
    policy: HistoryPolicy,
    sink: OnceLock<Arc<dyn EventSink>>,
    clock: Mutex<EventId>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MemoryBroker {
    pub fn new(policy: HistoryPolicy) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            presence: crate::presence::MemoryPresence::default(),
            counters: crate::counters::MemoryCounters::default(),
            policy,
            sink: OnceLock::new(),
            clock: Mutex::new(EventId::ZERO),
        }
    }

    /// Connects the broker to the node's hub. Only the first call counts.
    pub fn attach(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    fn shard(&self, room: &RoomKey) -> &Mutex<Shard> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        room.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Next id of the node-wide clock: `<now ms>-<seq>`, strictly increasing.
    fn next_id(&self) -> EventId {
        let mut last = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let id = if now > last.ms {
            EventId::new(now, 0)
        } else {
            last.next()
        };
        *last = id;
        id
    }

    fn trim(&self, room: &RoomKey, log: &mut RoomLog, now: u64) {
        let cap = self.policy.cap_for(room.room.kind());
        let oldest_ms = now.saturating_sub(cap.max_age.as_millis() as u64);
        while let Some(front) = log.events.front() {
            if log.events.len() > cap.max_len || front.id.ms < oldest_ms {
                log.trimmed_up_to = front.id;
                log.events.pop_front();
            } else {
                break;
            }
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, mut event: Event) -> Result<Published, BrokerError> {
        let supplied = event.id != EventId::ZERO;
        if !supplied {
            event.id = self.next_id();
        }
        let keys: Vec<RoomKey> = event
            .rooms
            .iter()
            .map(|r| RoomKey::new(event.tenant.clone(), r.clone()))
            .collect();
        if supplied {
            for key in &keys {
                let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
                if let Some(log) = shard.logs.get(key) {
                    if event.id <= log.last_id {
                        return Err(BrokerError::Conflict(format!(
                            "event id {} is not greater than the last id {} of room {}",
                            event.id, log.last_id, key.room
                        )));
                    }
                }
            }
        }
        let event = Arc::new(event);
        let now = now_ms();
        for key in &keys {
            // Append and deliver under the room's shard lock, so every
            // subscriber sees the room's events in id order.
            let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
            let log = shard.logs.entry(key.clone()).or_default();
            log.last_id = log.last_id.max(event.id);
            log.events.push_back(event.clone());
            self.trim(key, log, now);
            if log.events.is_empty() && log.trimmed_up_to == EventId::ZERO {
                shard.logs.remove(key);
            }
            if shard.subscribed.contains(key) {
                if let Some(sink) = self.sink.get() {
                    sink.deliver(key, event.clone());
                }
            }
        }
        Ok(Published {
            ids: event.rooms.iter().map(|r| (r.clone(), event.id)).collect(),
        })
    }

    async fn publish_ephemeral(&self, mut event: Event) -> Result<(), BrokerError> {
        event.id = EventId::ZERO;
        let event = Arc::new(event);
        for room in &event.rooms {
            let key = RoomKey::new(event.tenant.clone(), room.clone());
            let shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
            if shard.subscribed.contains(&key) {
                if let Some(sink) = self.sink.get() {
                    sink.deliver(&key, event.clone());
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&self, room: &RoomKey) -> Result<(), BrokerError> {
        self.shard(room)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribed
            .insert(room.clone());
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomKey) -> Result<(), BrokerError> {
        self.shard(room)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribed
            .remove(room);
        Ok(())
    }

    async fn history_since(
        &self,
        room: &RoomKey,
        since: EventId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let mut shard = self.shard(room).lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = shard.logs.get_mut(room) else {
            return Ok(History {
                events: Vec::new(),
                recovered: true,
                more: false,
            });
        };
        self.trim(room, log, now_ms());
        let recovered = since >= log.trimmed_up_to;
        let start = log.events.partition_point(|e| e.id <= since);
        let events: Vec<Arc<Event>> = log.events.iter().skip(start).take(limit).cloned().collect();
        let more = log.events.len() - start > events.len();
        Ok(History {
            events,
            recovered,
            more,
        })
    }

    fn healthy(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn presence(&self) -> Option<&dyn crate::Presence> {
        Some(&self.presence)
    }

    fn counters(&self) -> Option<&dyn crate::Counters> {
        Some(&self.counters)
    }
}

impl MemoryBroker {
    /// Rooms currently subscribed (for tests and introspection).
    pub fn subscribed_rooms(&self) -> Vec<RoomKey> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .subscribed
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use roomcast_protocol::EventDefaults;

    use super::*;
    use crate::history::HistoryCap;

    struct Collect(Mutex<Vec<(RoomKey, EventId)>>);
    impl EventSink for Collect {
        fn deliver(&self, room: &RoomKey, event: Arc<Event>) {
            self.0.lock().unwrap().push((room.clone(), event.id));
        }
    }

    fn event(rooms: &str) -> Event {
        let json = format!(r#"{{"tenant":"acme","rooms":{rooms},"type":"t"}}"#);
        Event::decode(
            json.as_bytes(),
            &EventDefaults {
                tenant: None,
                now_ms: now_ms(),
            },
        )
        .unwrap()
    }

    fn key(room: &str) -> RoomKey {
        RoomKey::new("acme".parse().unwrap(), room.parse().unwrap())
    }

    #[tokio::test]
    async fn delivers_only_subscribed_rooms_in_order() {
        let broker = MemoryBroker::new(HistoryPolicy::default());
        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        broker.attach(sink.clone());
        broker.subscribe(&key("team:1")).await.unwrap();
        let a = broker.publish(event(r#"["team:1"]"#)).await.unwrap().ids[0].1;
        broker.publish(event(r#"["team:2"]"#)).await.unwrap();
        let b = broker
            .publish(event(r#"["team:2","team:1"]"#))
            .await
            .unwrap()
            .ids[1]
            .1;
        assert!(a < b);
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![(key("team:1"), a), (key("team:1"), b)]
        );
        broker.unsubscribe(&key("team:1")).await.unwrap();
        broker.publish(event(r#"["team:1"]"#)).await.unwrap();
        assert_eq!(sink.0.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn history_reports_trimmed_gaps() {
        let mut policy = HistoryPolicy::default();
        policy.per_kind.insert(
            "task".into(),
            HistoryCap {
                max_len: 3,
                max_age: Duration::from_secs(60),
            },
        );
        let broker = MemoryBroker::new(policy);
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(broker.publish(event(r#"["task:1"]"#)).await.unwrap().ids[0].1);
        }
        let h = broker
            .history_since(&key("task:1"), ids[1], 100)
            .await
            .unwrap();
        assert!(h.recovered);
        assert_eq!(h.events.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
        let h = broker
            .history_since(&key("task:1"), ids[0], 100)
            .await
            .unwrap();
        assert!(!h.recovered, "ids[1] was trimmed");
        let h = broker
            .history_since(&key("task:1"), ids[2], 1)
            .await
            .unwrap();
        assert_eq!((h.events.len(), h.more), (1, true));
        let h = broker
            .history_since(&key("task:9"), EventId::ZERO, 10)
            .await
            .unwrap();
        assert!(h.recovered && h.events.is_empty());
    }

    #[tokio::test]
    async fn ephemeral_events_are_delivered_but_not_kept() {
        let broker = MemoryBroker::new(HistoryPolicy::default());
        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        broker.attach(sink.clone());
        broker.subscribe(&key("team:1")).await.unwrap();
        broker
            .publish_ephemeral(event(r#"["team:1"]"#))
            .await
            .unwrap();
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![(key("team:1"), EventId::ZERO)]
        );
        let h = broker
            .history_since(&key("team:1"), EventId::ZERO, 10)
            .await
            .unwrap();
        assert!(h.events.is_empty());
    }

    #[tokio::test]
    async fn supplied_ids_must_increase() {
        let broker = MemoryBroker::new(HistoryPolicy::default());
        let mut e = event(r#"["team:1"]"#);
        e.id = EventId::new(10, 0);
        broker.publish(e.clone()).await.unwrap();
        assert!(matches!(
            broker.publish(e).await,
            Err(BrokerError::Conflict(_))
        ));
    }
}
