//! Fan-out lanes: where received events are handed to the sink.
//!
//! A node's fan-out (one write per local member of the room) is most of its
//! work, and it runs wherever the sink is called. Called on a connection's
//! reader, as with one lane, it is one task per Redis node: a standalone
//! Redis gives the whole node's fan-out one thread, however many cores it
//! has. With several lanes each room belongs to one lane (by a hash of the
//! room), so its events stay in order, and the lanes' tasks run on the
//! runtime's worker threads side by side.
//!
//! A lane's queue is bounded: when the lanes fall behind, the readers wait
//! for room in them and stop reading Redis, as they would if they fanned
//! out themselves (Redis then buffers the channel messages, up to its
//! `client-output-buffer-limit pubsub`).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use roomcast_broker::EventSink;
use roomcast_protocol::RoomKey;
use tokio::sync::mpsc;

use crate::subscriber::Batch;

/// Batches waiting per lane before the readers wait (each at most
/// `link::MAX_BATCH` events).
const QUEUE: usize = 16;

pub(crate) struct Lanes {
    sink: Arc<dyn EventSink>,
    /// Empty with one lane: the reader calls the sink itself.
    queues: Vec<mpsc::Sender<Batch>>,
}

impl Lanes {
    /// `count` lanes (`0`: one per worker thread of the current runtime).
    /// Their tasks end when the returned value is dropped.
    pub(crate) fn start(sink: Arc<dyn EventSink>, count: usize) -> Lanes {
        let count = match count {
            0 => tokio::runtime::Handle::current().metrics().num_workers(),
            n => n,
        };
        let mut queues = Vec::new();
        if count > 1 {
            for _ in 0..count {
                let (tx, mut rx) = mpsc::channel::<Batch>(QUEUE);
                let sink = sink.clone();
                tokio::spawn(async move {
                    while let Some(batch) = rx.recv().await {
                        sink.deliver_batch(&batch);
                    }
                });
                queues.push(tx);
            }
        }
        Lanes { sink, queues }
    }

    /// How many lanes there are.
    pub(crate) fn count(&self) -> usize {
        self.queues.len().max(1)
    }

    /// The lane of `room`: the same for all its events.
    pub(crate) fn lane_of(&self, room: &RoomKey) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        room.hash(&mut h);
        (h.finish() % self.count() as u64) as usize
    }

    /// Hands `batch`'s events to their lanes, in order per room, and
    /// empties it; waits while a lane's queue is full.
    pub(crate) async fn deliver(&self, batch: &mut Batch) {
        if batch.is_empty() {
            return;
        }
        if self.queues.is_empty() {
            self.sink.deliver_batch(batch);
            batch.clear();
            return;
        }
        if let [(room, _)] = &batch[..] {
            let lane = self.lane_of(room);
            let _ = self.queues[lane].send(std::mem::take(batch)).await;
            return;
        }
        let mut parts: Vec<Batch> = vec![Vec::new(); self.queues.len()];
        for (room, event) in batch.drain(..) {
            parts[self.lane_of(&room)].push((room, event));
        }
        for (queue, part) in self.queues.iter().zip(parts) {
            if !part.is_empty() {
                // A closed queue means the runtime is shutting down.
                let _ = queue.send(part).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use roomcast_protocol::{Event, EventId};

    use super::*;

    /// Records what it is given; a room named `block` waits in the sink
    /// until `release` is called, holding its lane.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(RoomKey, EventId)>>,
        released: Mutex<bool>,
        release_cv: Condvar,
        /// Signalled on every event seen.
        changed: Condvar,
    }

    impl Recorder {
        fn release(&self) {
            *self.released.lock().unwrap() = true;
            self.release_cv.notify_all();
        }

        fn seen(&self) -> Vec<(RoomKey, EventId)> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl EventSink for Recorder {
        fn deliver(&self, room: &RoomKey, event: Arc<Event>) {
            if room.room.as_str() == "team:block" {
                let released = self.released.lock().unwrap();
                let (_guard, wait) = self
                    .release_cv
                    .wait_timeout_while(released, Duration::from_secs(10), |r| !*r)
                    .unwrap();
                assert!(!wait.timed_out(), "never released");
            }
            self.seen.lock().unwrap().push((room.clone(), event.id));
            self.changed.notify_all();
        }
    }

    fn key(room: &str) -> RoomKey {
        RoomKey::new("acme".parse().unwrap(), room.parse().unwrap())
    }

    fn event(id: u64) -> Arc<Event> {
        let mut e = Event::decode(
            br#"{"tenant":"acme","rooms":["team:1"],"type":"t"}"#,
            &Default::default(),
        )
        .unwrap();
        e.id = EventId::new(id, 0);
        Arc::new(e)
    }

    /// A room in another lane than `team:block`.
    fn other_room(lanes: &Lanes) -> RoomKey {
        let blocked = lanes.lane_of(&key("team:block"));
        (0..100)
            .map(|n| key(&format!("team:{n}")))
            .find(|k| lanes.lane_of(k) != blocked)
            .expect("some room is in another lane")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_busy_lane_does_not_hold_up_the_others_and_each_room_stays_in_order() {
        let sink = Arc::new(Recorder::default());
        let lanes = Lanes::start(sink.clone(), 4);
        assert_eq!(lanes.count(), 4);
        let free = other_room(&lanes);
        let mut batch: Batch = vec![(key("team:block"), event(1))];
        for id in 1..=50 {
            batch.push((free.clone(), event(id)));
        }
        lanes.deliver(&mut batch).await;
        assert!(batch.is_empty());
        // The blocked lane is stuck in the sink; the free room's lane is not.
        let seen = sink.seen.lock().unwrap();
        let (seen, wait) = sink
            .changed
            .wait_timeout_while(seen, Duration::from_secs(10), |s| s.len() < 50)
            .unwrap();
        assert!(!wait.timed_out(), "the free room's events did not arrive");
        let ids: Vec<u64> = seen.iter().map(|(_, id)| id.ms).collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>(), "in order, all of them");
        assert!(seen.iter().all(|(room, _)| *room == free));
        drop(seen);
        sink.release();
        let seen = sink.seen.lock().unwrap();
        let (seen, wait) = sink
            .changed
            .wait_timeout_while(seen, Duration::from_secs(10), |s| s.len() < 51)
            .unwrap();
        assert!(!wait.timed_out(), "the blocked room's event did not arrive");
        assert_eq!(seen.last().unwrap().0, key("team:block"));
    }

    #[tokio::test]
    async fn one_lane_delivers_on_the_caller() {
        let sink = Arc::new(Recorder::default());
        let lanes = Lanes::start(sink.clone(), 1);
        assert_eq!(lanes.count(), 1);
        let mut batch: Batch = vec![(key("team:1"), event(1)), (key("team:2"), event(2))];
        lanes.deliver(&mut batch).await;
        assert!(batch.is_empty());
        assert_eq!(
            sink.seen(),
            vec![
                (key("team:1"), EventId::new(1, 0)),
                (key("team:2"), EventId::new(2, 0))
            ],
            "delivered before deliver returned"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn zero_lanes_means_one_per_worker_thread() {
        let lanes = Lanes::start(Arc::new(Recorder::default()), 0);
        assert_eq!(lanes.count(), 3);
    }
}
