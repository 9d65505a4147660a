//! The document's global cap: "Maximum 100 broadcasts per second across all
//! connections — batching applied if limit approached".
//!
//! A broadcast is one roadmap event rendered on this node, however many
//! sessions, rooms and renderers it reaches: the hub renders an event once
//! per (room, renderer), so an event published to `roadmap:all` and
//! `feature:<id>` is rendered up to four times. Each is counted once through
//! a small table of recent event fingerprints (tenant, type, time, rooms and
//! body: an event's copies on different rooms carry different ids on Redis,
//! but the same fingerprint).
//!
//! The rate is a sliding one-second estimate (this second's count plus the
//! previous second's, weighted by how much of it the window still covers),
//! kept in two atomics: the renderer is shared and must not lock.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use roomcast_protocol::Event;
use tokio::time::Instant;

/// Recent fingerprints remembered; an event's copies arrive close together.
const SEEN: usize = 256;

/// Per-node count of roadmap broadcasts.
pub(crate) struct BroadcastRate {
    origin: Instant,
    /// `(second << 32) | count` of the current second since `origin`.
    current: AtomicU64,
    /// The same for the second `current` replaced.
    previous: AtomicU64,
    /// Fingerprints of recently counted events (direct-mapped).
    seen: Box<[AtomicU64]>,
    /// Estimated broadcasts per second from which batching applies.
    batch_from: f64,
}

fn pack(second: u64, count: u64) -> u64 {
    (second << 32) | count.min(u64::from(u32::MAX))
}

fn unpack(v: u64) -> (u64, u64) {
    (v >> 32, v & u64::from(u32::MAX))
}

/// Same for every copy of one published event; never zero (an empty slot).
fn fingerprint(event: &Event) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    event.tenant.as_str().hash(&mut h);
    event.kind.hash(&mut h);
    event.ts.hash(&mut h);
    event.rooms.hash(&mut h);
    event.body.json_text().hash(&mut h);
    h.finish() | 1
}

impl BroadcastRate {
    /// Batching from `percent`% of `cap` broadcasts per second.
    pub(crate) fn new(cap: u32, percent: u8) -> Self {
        Self {
            origin: Instant::now(),
            current: AtomicU64::new(0),
            previous: AtomicU64::new(0),
            seen: (0..SEEN).map(|_| AtomicU64::new(0)).collect(),
            batch_from: f64::from(cap) * f64::from(percent) / 100.0,
        }
    }

    /// Milliseconds since `origin`.
    fn elapsed_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Counts `event` once, whichever of its renders calls first.
    pub(crate) fn record(&self, event: &Event) {
        let fp = fingerprint(event);
        if self.seen[(fp % SEEN as u64) as usize].swap(fp, Ordering::Relaxed) == fp {
            return;
        }
        let second = self.elapsed_ms() / 1000;
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            let (s, n) = unpack(cur);
            // A caller that read the clock just before another moved on to
            // the next second counts into that one.
            let next = if s >= second {
                pack(s, n + 1)
            } else {
                pack(second, 1)
            };
            match self
                .current
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if s < second {
                        self.previous.store(cur, Ordering::Relaxed);
                    }
                    return;
                }
                Err(v) => cur = v,
            }
        }
    }

    /// Broadcasts in the last second (estimated).
    pub(crate) fn per_second(&self) -> f64 {
        let ms = self.elapsed_ms();
        let (second, into) = (ms / 1000, (ms % 1000) as f64 / 1000.0);
        let (cs, cn) = unpack(self.current.load(Ordering::Relaxed));
        let (ps, pn) = unpack(self.previous.load(Ordering::Relaxed));
        let this = if cs == second { cn } else { 0 };
        let last = if cs + 1 == second {
            cn
        } else if cs == second && ps + 1 == second {
            pn
        } else {
            0
        };
        this as f64 + last as f64 * (1.0 - into)
    }

    /// Whether the rate is near the cap: coalescing widens.
    pub(crate) fn batching(&self) -> bool {
        self.per_second() >= self.batch_from
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn event(n: u64, rooms: &[&str]) -> Event {
        Event {
            id: roomcast_protocol::EventId::new(n, 0),
            tenant: "default".parse().unwrap(),
            rooms: rooms.iter().map(|r| r.parse().unwrap()).collect(),
            kind: "VOTE_UPDATE".into(),
            ts: 1_000 + n,
            actor: None,
            version: None,
            audience: vec![],
            exclude_users: vec![],
            exclude_sessions: vec![],
            body: roomcast_protocol::Body::from_value(
                &serde_json::json!({"featureId": "f1", "voteCount": n}),
            ),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_each_event_once_and_slides_over_a_second() {
        let rate = BroadcastRate::new(10, 80);
        for n in 0..7 {
            let e = event(n, &["roadmap:all", "feature:f1"]);
            // Two rooms, two renderers; on Redis each room's copy has its own id.
            for id in [1, 2, 3, 4] {
                let mut copy = e.clone();
                copy.id = roomcast_protocol::EventId::new(id, n);
                rate.record(&copy);
            }
        }
        assert_eq!(rate.per_second(), 7.0);
        assert!(!rate.batching(), "7/s is under 80% of 10/s");
        rate.record(&event(7, &["roadmap:all"]));
        assert!(rate.batching(), "8/s is 80% of 10/s");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(
            rate.per_second(),
            4.0,
            "half of the last second still counts"
        );
        assert!(!rate.batching());
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(rate.per_second(), 0.0);
    }
}
