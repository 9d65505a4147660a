//! Helpers shared by the Redis broker tests: a sink that records what it is
//! given, event builders, and an `eventually` poll with a deadline.

#![allow(dead_code, unreachable_pub)] // each test binary uses its own subset

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use roomcast_broker::EventSink;
use roomcast_protocol::{Event, EventDefaults, RoomKey};
use tokio::sync::{mpsc, watch};

/// How long a test waits for something that should happen quickly. Only a
/// failing test waits this long.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Records deliveries and counts resyncs.
pub struct TestSink {
    events: mpsc::UnboundedSender<(RoomKey, Arc<Event>)>,
    resyncs: watch::Sender<u64>,
}

impl EventSink for TestSink {
    fn deliver(&self, room: &RoomKey, event: Arc<Event>) {
        let _ = self.events.send((room.clone(), event));
    }

    fn resynced(&self) {
        self.resyncs.send_modify(|n| *n += 1);
    }
}

/// The receiving end of a [`TestSink`].
pub struct Received {
    events: mpsc::UnboundedReceiver<(RoomKey, Arc<Event>)>,
    pub resyncs: watch::Receiver<u64>,
}

pub fn sink() -> (Arc<TestSink>, Received) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (rtx, rrx) = watch::channel(0);
    (
        Arc::new(TestSink {
            events: tx,
            resyncs: rtx,
        }),
        Received {
            events: rx,
            resyncs: rrx,
        },
    )
}

impl Received {
    /// The next delivery; panics if none comes within [`PATIENCE`].
    pub async fn next(&mut self) -> (RoomKey, Arc<Event>) {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("no event delivered in time")
            .expect("sink dropped")
    }

    /// Nothing was delivered so far (without waiting).
    pub fn assert_empty(&mut self) {
        if let Ok((room, ev)) = self.events.try_recv() {
            panic!("unexpected delivery on {room}: {ev:?}");
        }
    }

    /// Waits until the sink has seen more than `seen` resyncs.
    pub async fn resynced_after(&mut self, seen: u64) {
        tokio::time::timeout(PATIENCE, self.resyncs.wait_for(|n| *n > seen))
            .await
            .expect("no resync in time")
            .expect("sink dropped");
    }
}

pub fn key(tenant: &str, room: &str) -> RoomKey {
    RoomKey::new(tenant.parse().unwrap(), room.parse().unwrap())
}

/// An event of tenant `acme` in `rooms` with body `{"n": n}`.
pub fn event(rooms: &[&str], n: u64) -> Event {
    let rooms: Vec<String> = rooms.iter().map(|r| format!("\"{r}\"")).collect();
    let json = format!(
        r#"{{"tenant":"acme","rooms":[{}],"type":"test.event","data":{{"n":{n}}}}}"#,
        rooms.join(",")
    );
    Event::decode(
        json.as_bytes(),
        &EventDefaults {
            tenant: None,
            now_ms: 1,
        },
    )
    .unwrap()
}

/// The `n` in an event's body.
pub fn n_of(event: &Event) -> u64 {
    let v: serde_json::Value = serde_json::from_str(event.body.json_text().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

/// Polls `check` until it is true; panics after [`PATIENCE`]. For state
/// that has no notification (a Redis server's counters).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
